"""Who may associate: calling AE title + source IP allow-list (PS3.8 7.1.1).

Entries of ``settings.allowed_callers`` are ``"AE@ip-or-cidr"``; the AE may be ``*``
(any calling AE from that network). An empty list admits loopback callers only, so a
node on the embedded defaults is never open to the network by accident.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["AccessPolicy", "CallerRule"]

_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True)
class CallerRule:
    """One allow-list entry: an AE title (or ``*``) and a network."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, entry: str) -> CallerRule:
        ae, sep, network = entry.partition("@")
        if not sep or not ae.strip():
            raise ValueError(f"{entry!r}: expected 'AE@ip-or-cidr' (AE may be '*')")
        return cls(ae.strip(), ipaddress.ip_network(network.strip(), strict=False))

    def matches(self, calling_ae: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if self.ae_title != "*" and self.ae_title != calling_ae:
            return False
        if address.version != self.network.version:
            return False
        return address in self.network


def _address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    # An IPv4 caller on a dual-stack socket shows up as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class AccessPolicy:
    """Decides whether a (calling AE, peer address) pair may associate.

    Parameters
    ----------
    entries : iterable of str
        ``"AE@ip-or-cidr"`` rules; empty means loopback callers only (any AE).
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.rules = tuple(CallerRule.parse(e) for e in entries)

    def allows(self, calling_ae: str, peer: str) -> bool:
        """True when ``calling_ae`` (trailing spaces ignored) from ``peer`` is admitted."""
        address = _address(peer)
        if address is None:
            return False
        calling_ae = calling_ae.strip()
        if not self.rules:
            return any(address in net for net in _LOOPBACK if net.version == address.version)
        return any(rule.matches(calling_ae, address) for rule in self.rules)

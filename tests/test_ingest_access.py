"""Allow-list rules: calling AE title + source address (PS3.8 7.1.1 A-ASSOCIATE-RJ reasons)."""

from __future__ import annotations

import pytest

from triage_node.ingest.access import AccessPolicy


def test_empty_list_admits_loopback_only() -> None:
    policy = AccessPolicy([])
    assert policy.allows("ANY", "127.0.0.1") and policy.allows("ANY", "127.8.9.10")
    assert policy.allows("ANY", "::1") and policy.allows("ANY", "::ffff:127.0.0.1")
    assert not policy.allows("ANY", "192.0.2.7") and not policy.allows("ANY", "2001:db8::1")


def test_rules_match_ae_and_network_together() -> None:
    policy = AccessPolicy(["CT_SCANNER@10.1.0.0/16", "*@192.0.2.5", "PACS@2001:db8::/32"])
    assert policy.allows("CT_SCANNER", "10.1.200.3")
    assert policy.allows("CT_SCANNER  ", "10.1.200.3")  # AE padding is not significant
    assert not policy.allows("CT_SCANNER", "10.2.0.1")
    assert not policy.allows("MR_SCANNER", "10.1.200.3")
    assert policy.allows("WHATEVER", "192.0.2.5") and not policy.allows("WHATEVER", "192.0.2.6")
    assert policy.allows("PACS", "2001:db8:1::9") and not policy.allows("PACS", "10.1.0.1")
    # A configured list replaces the loopback default.
    assert not policy.allows("CT_SCANNER", "127.0.0.1")
    # An IPv4 caller on a dual-stack socket is matched as IPv4.
    assert policy.allows("CT_SCANNER", "::ffff:10.1.2.3")


def test_ae_titles_are_case_sensitive_and_garbage_addresses_are_refused() -> None:
    policy = AccessPolicy(["CT_SCANNER@0.0.0.0/0"])
    assert not policy.allows("ct_scanner", "10.0.0.1")
    assert not policy.allows("CT_SCANNER", "not-an-address")


@pytest.mark.parametrize("entry", ["CT_SCANNER", "@10.0.0.0/8", "CT@10.0.0.300", "CT@"])
def test_malformed_entries_are_refused(entry: str) -> None:
    with pytest.raises(ValueError):
        AccessPolicy([entry])

"""What the log scrubber remembers as patient identifiers, and what it refuses to.

`triage_node.logs` replaces remembered identifier values wherever they appear in a
log line. The values come from the network (PatientID, OtherPatientIDs, ...), so a
peer chooses them: ``info\\warning\\association finished`` as OtherPatientIDs once made
every later line unreadable. Three rules keep the scrubber from being turned on the log:

1. Values that cannot be identifiers are refused: shorter than `MIN_LENGTH`, pure
   numbers under `MIN_DIGITS` digits (counts, ports, years), IP addresses, common words,
   and the node's own vocabulary (level names, field names, the messages its code
   logs, the AE titles and names it is configured with, the current peer and calling AE).
2. Matches are whole words only (no letter or digit on either side), so a value never
   redacts part of a longer word.
3. The store is split per source (the peer address): one source can only push out its
   own older values, never another modality's. See `IdentifierMemory`.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

REDACTED = "[redacted]"
MIN_LENGTH = 4
#: Pure numbers with fewer digits are counts, sizes, ports and years, not identifiers
#: (birth dates, 8 digits, and medical record numbers stay).
MIN_DIGITS = 6
#: At most this many values are remembered from one data set (identifiers first).
PER_DATASET = 24
#: Values remembered per source, and sources remembered (idle longest goes first).
PER_SOURCE = 512
SOURCES = 32

LEVELS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "notset")
#: Fields whose values are the node's own or the network's addressing, never patient
#: identifiers: they are never scrubbed, so a log line always says who and what.
STRUCTURAL_KEYS = frozenset({
    "level", "logger", "timestamp", "peer", "calling_ae", "called_ae", "request_id",
    "http_method", "http_path", "task_id", "task_name", "source",
})
COMMON_WORDS = frozenset("""
none null true false nan yes unknown anonymous anon test patient name other unk
from with that this have were what when which will been into more than then them
file line traceback most recent call last error errors failed self return
status reason detail event level logger timestamp message value values dataset
""".split())

_WORD = re.compile(r"\w+")
_LOG_CALL = re.compile(
    r"\b_?log(?:ger)?\.(?:debug|info|warning|warn|error|exception|critical)\(\s*([\"'])(.+?)\1"
)


def words(text: str) -> str:
    """``text`` lower-cased as single-space-separated words (what a match lines up on)."""
    return " ".join(_WORD.findall(text.lower()))


def _scan_log_messages() -> list[str]:
    """The constant messages the node's code logs (``log.info("...")``), read from its source.

    Read once per process; a change of wording in the code needs no list kept in step.
    """
    package = Path(__file__).resolve().parent
    roots = [package, package.parent / "worker"]
    found: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            try:
                source = path.read_text(errors="replace")
            except OSError:
                continue
            found.extend(m.group(2) for m in _LOG_CALL.finditer(source))
    return found


class Vocabulary:
    """The node's own words; a value that lines up with them is not remembered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phrases: str | None = None  # "\n word word \n ..." for substring checks
        self._extra: set[str] = set()

    def protect(self, items: Iterable[str]) -> None:
        with self._lock:
            self._extra.update(words(i) for i in items if i and words(i))
            self._phrases = None

    def _blob(self) -> str:
        with self._lock:
            if self._phrases is None:
                phrases = {words(m) for m in _scan_log_messages()}
                phrases.update(LEVELS, (words(k) for k in STRUCTURAL_KEYS), self._extra)
                self._phrases = "\n " + " \n ".join(sorted(p for p in phrases if p)) + " \n"
            return self._phrases

    def contains(self, value: str) -> bool:
        """True when ``value``'s words are a run of words in one of the node's phrases."""
        normal = words(value)
        return bool(normal) and f" {normal} " in self._blob()


def refusal(value: str, vocabulary: Vocabulary, context: Iterable[str] = ()) -> str | None:
    """Why ``value`` is not worth remembering as an identifier, or None to remember it."""
    if len(value) < MIN_LENGTH:
        return "too short"
    if not any(c.isalnum() for c in value):
        return "no letters or digits"
    if value.isdigit() and len(value) < MIN_DIGITS:
        return "small number"
    try:
        ipaddress.ip_address(value)
        return "address"
    except ValueError:
        pass
    normal = words(value)
    if normal in COMMON_WORDS:
        return "common word"
    if normal in {words(c) for c in context if c}:
        return "the current peer"
    if vocabulary.contains(value):
        return "the node's vocabulary"
    return None


def _pattern_for(value: str) -> str:
    # Word boundaries only where the value itself starts or ends with a word character.
    head = r"(?<!\w)" if _WORD.match(value[0]) else ""
    tail = r"(?!\w)" if _WORD.match(value[-1]) else ""
    return head + re.escape(value) + tail


class IdentifierMemory:
    """Identifier values seen in this process, per source, bounded and thread-safe.

    Why per source: with one shared least-recently-used list, one peer sending data sets
    with thousands of made-up OtherPatientIDs pushed every genuine identifier out, and
    those then appeared in clear. Here each source (peer address; ``-`` when none is
    known) keeps its newest `PER_SOURCE` values, so a flood only evicts the flooder's
    own values; a new source beyond `SOURCES` evicts the one idle longest, so pushing
    out another modality's values needs many addresses, each of which must pass the
    allow-list first. A data set gives at most `PER_DATASET` values, identifiers first.
    """

    def __init__(self, per_source: int = PER_SOURCE, sources: int = SOURCES) -> None:
        self._sources: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()
        self._per_source = per_source
        self._max_sources = sources
        self._lock = threading.Lock()
        self._pattern: re.Pattern[str] | None = None

    def add(self, values: Iterable[str], source: str = "-") -> None:
        with self._lock:
            bucket = self._sources.get(source)
            changed = False
            if bucket is None:
                bucket = self._sources[source] = OrderedDict()
                while len(self._sources) > self._max_sources:
                    self._sources.popitem(last=False)
                    changed = True
            self._sources.move_to_end(source)
            for value in values:
                if value not in bucket:
                    changed = True
                bucket[value] = None
                bucket.move_to_end(value)
            while len(bucket) > self._per_source:
                bucket.popitem(last=False)
                changed = True
            if changed:
                self._pattern = None

    def clear(self) -> None:
        with self._lock:
            self._sources.clear()
            self._pattern = None

    def __len__(self) -> int:
        with self._lock:
            return sum(len(b) for b in self._sources.values())

    def scrub(self, text: str) -> str:
        pattern = self._pattern
        if pattern is None:
            with self._lock:
                values = {v for bucket in self._sources.values() for v in bucket}
                if not values:
                    return text
                alternatives = sorted(values, key=len, reverse=True)
                pattern = re.compile("|".join(_pattern_for(v) for v in alternatives))
                self._pattern = pattern
        return pattern.sub(REDACTED, text)

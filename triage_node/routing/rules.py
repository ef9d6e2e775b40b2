"""Modality auto-routing rules: which received objects also go to which destinations.

The file named by ``settings.routing_rules`` (YAML or JSON) holds a list of rules::

    rules:
      - name: ed-to-archive
        match: {calling_ae: CT_ED_1}
        destinations: [archive]
      - name: head-ct-to-triage
        match:
          modality: CT
          body_part: [HEAD, BRAIN]
          series_description: "(?i)head|brain|skull"
        destinations: [triage]

``match`` keys (all given keys must match; a missing attribute never matches):

``modality``, ``body_part``, ``calling_ae``
    a value or a list of values, compared case-insensitively with Modality
    (0008,0060), BodyPartExamined (0018,0015) and the calling AE title;
``series_description``, ``study_description``
    a regular expression searched in SeriesDescription (0008,103E) /
    StudyDescription (0008,1030);
``attributes``
    ``{DICOM keyword: regex}`` tested against the instance's header, when one is given.

Every matching rule adds its destinations (``stop: true`` ends the evaluation after
that rule). Destination names must be in ``settings.destinations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

MATCH_LIST_KEYS = ("modality", "body_part", "calling_ae")
MATCH_REGEX_KEYS = ("series_description", "study_description")


class RoutingRulesError(ValueError):
    """The rules file cannot be read or does not follow the format."""


class Match(BaseModel):
    """Conditions of one rule; every given condition must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: list[str] | None = None
    body_part: list[str] | None = None
    calling_ae: list[str] | None = None
    series_description: str | None = None
    study_description: str | None = None
    attributes: dict[str, str] = Field(default_factory=dict)

    @field_validator(*MATCH_LIST_KEYS, mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator(*MATCH_REGEX_KEYS)
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regular expression {value!r}: {exc}") from None
        return value

    @field_validator("attributes")
    @classmethod
    def _attribute_regexes(cls, value: dict[str, str]) -> dict[str, str]:
        from pydicom.datadict import tag_for_keyword

        for keyword, pattern in value.items():
            if tag_for_keyword(keyword) is None:
                raise ValueError(f"{keyword!r} is not a DICOM keyword")
            re.compile(pattern)
        return value


class Rule(BaseModel):
    """One routing rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    match: Match = Field(default_factory=Match)
    destinations: list[str] = Field(min_length=1)
    stop: bool = False


class RuleSet(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class Attributes:
    """What rules are tested against (from the database rows and, if given, the header)."""

    modality: str | None = None
    body_part: str | None = None
    calling_ae: str | None = None
    series_description: str | None = None
    study_description: str | None = None
    header: Any = None  # pydicom Dataset or None


def _norm(value: str | None) -> str | None:
    return value.strip().upper() if value else None


def rule_matches(rule: Rule, attrs: Attributes) -> bool:
    """True when every condition of ``rule.match`` holds for ``attrs``."""
    m = rule.match
    for key in MATCH_LIST_KEYS:
        wanted = getattr(m, key)
        if wanted is None:
            continue
        actual = _norm(getattr(attrs, key))
        if actual is None or actual not in {_norm(w) for w in wanted}:
            return False
    for key in MATCH_REGEX_KEYS:
        pattern = getattr(m, key)
        if pattern is None:
            continue
        actual = getattr(attrs, key)
        if actual is None or re.search(pattern, actual) is None:
            return False
    for keyword, pattern in m.attributes.items():
        if attrs.header is None or keyword not in attrs.header:
            return False
        value = attrs.header.get(keyword)
        text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        if re.search(pattern, text) is None:
            return False
    return True


def evaluate(rules: RuleSet, attrs: Attributes) -> tuple[list[str], list[str]]:
    """Names of the matching rules and their destinations (in order, no repeats)."""
    matched: list[str] = []
    destinations: list[str] = []
    for rule in rules.rules:
        if rule_matches(rule, attrs):
            matched.append(rule.name)
            destinations.extend(d for d in rule.destinations if d not in destinations)
            if rule.stop:
                break
    return matched, destinations


def parse_rules(text: str, *, source: str = "<rules>") -> RuleSet:
    """Parse YAML or JSON text (JSON is YAML) into a `RuleSet`."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise RoutingRulesError(f"{source}: not YAML/JSON: {exc}") from None
    if isinstance(data, list):
        data = {"rules": data}
    try:
        return RuleSet.model_validate(data or {})
    except ValueError as exc:
        raise RoutingRulesError(f"{source}: {exc}") from None


_CACHE: dict[Path, tuple[float, RuleSet]] = {}


def load_rules(path: Path) -> RuleSet:
    """Read and validate the rules file; re-read when its modification time changes."""
    try:
        mtime = path.stat().st_mtime
    except OSError as exc:
        raise RoutingRulesError(f"{path}: {exc.strerror}") from None
    cached = _CACHE.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    rules = parse_rules(path.read_text(), source=str(path))
    _CACHE[path] = (mtime, rules)
    return rules


def check_destinations(rules: RuleSet, known: set[str]) -> list[str]:
    """Destination names used by ``rules`` that are not configured (for start-up checks)."""
    return sorted({d for r in rules.rules for d in r.destinations} - known)


__all__ = [
    "Attributes",
    "Match",
    "Rule",
    "RuleSet",
    "RoutingRulesError",
    "check_destinations",
    "evaluate",
    "load_rules",
    "parse_rules",
    "rule_matches",
]

"""The selection rules: ``selection_rules.yaml`` read, checked and cached.

Kept apart from ``triage_node.studies.selection``, which applies the rules to a study's
series: reading the file checks every key and names a missing or malformed one
(`RulesError`), and the parsed rules are cached until the file changes, so that
selection itself works on a checked `SelectionRules` and never parses YAML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_RULES_PATH", "RulesError", "SelectionRules", "load_rules"]

DEFAULT_RULES_PATH = Path(__file__).with_name("selection_rules.yaml")


class RulesError(ValueError):
    """The selection-rules file is missing a key or has a value of the wrong kind."""


def _patterns(values: Any, where: str) -> tuple[re.Pattern[str], ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RulesError(f"{where}: expected a list of regular expressions")
    try:
        return tuple(re.compile(v, re.IGNORECASE) for v in values)
    except re.error as exc:
        raise RulesError(f"{where}: {exc}") from None


def _upper_set(values: Any, where: str) -> frozenset[str]:
    if not isinstance(values, list):
        raise RulesError(f"{where}: expected a list")
    return frozenset(str(v).strip().upper() for v in values)


def _get(data: dict[str, Any], key: str, where: str = "") -> Any:
    if not isinstance(data, dict) or key not in data:
        raise RulesError(f"selection rules: missing key {where}{key}")
    return data[key]


@dataclass(frozen=True)
class SelectionRules:
    """Parsed rules (see ``selection_rules.yaml`` for the meaning of each key)."""

    modalities: frozenset[str]
    sop_classes: frozenset[str]
    image_type_value1: frozenset[str]
    image_type_value2: frozenset[str]
    image_type_axial: frozenset[str]
    image_type_reject: frozenset[str]
    reject_description: tuple[re.Pattern[str], ...]
    body_parts: frozenset[str]
    anatomy_description: tuple[re.Pattern[str], ...]
    accept_unknown_anatomy: bool
    contrast_negations: tuple[re.Pattern[str], ...]
    contrast_description: tuple[re.Pattern[str], ...]
    kernel_bone: tuple[re.Pattern[str], ...]
    kernel_soft: tuple[re.Pattern[str], ...]
    bone_policy: str
    window_soft_max: float
    window_bone_min: float
    description_bone: tuple[re.Pattern[str], ...]
    description_soft: tuple[re.Pattern[str], ...]
    thickness_preferred: tuple[float, float]
    thickness_min: float
    thickness_max: float
    min_instances: int
    lossy_compressed_original: bool = True
    axial_max_tilt_deg: float = 30.0
    spacing_tolerance: float = 0.1
    field_of_view_mm: tuple[float, float] = (150.0, 320.0)
    geometry_identifies_head: bool = True
    source: str = field(default="")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> SelectionRules:
        """Validate and build rules from the parsed YAML mapping."""
        if not isinstance(data, dict):
            raise RulesError("selection rules: the file must hold a mapping")
        it = _get(data, "image_type")
        anatomy = _get(data, "anatomy")
        contrast = _get(data, "contrast")
        kernel = _get(data, "kernel")
        window = _get(kernel, "window_width", "kernel.")
        thickness = _get(data, "thickness")
        preferred = _get(thickness, "preferred", "thickness.")
        if (
            not isinstance(preferred, list)
            or len(preferred) != 2
            or not float(preferred[0]) <= float(preferred[1])
        ):
            raise RulesError("thickness.preferred: expected [low, high] in mm")
        # Optional, with the shipped values as defaults (rules files copied before they existed).
        shape = data.get("geometry") or {}
        fov = shape.get("field_of_view_mm", [150, 320])
        if not isinstance(fov, list) or len(fov) != 2 or not float(fov[0]) <= float(fov[1]):
            raise RulesError("geometry.field_of_view_mm: expected [low, high] in mm")
        policy = str(_get(kernel, "bone_policy", "kernel."))
        if policy not in ("fallback", "reject"):
            raise RulesError("kernel.bone_policy: expected 'fallback' or 'reject'")
        return cls(
            modalities=_upper_set(_get(data, "modalities"), "modalities"),
            sop_classes=frozenset(str(v).strip() for v in data.get("sop_classes") or []),
            image_type_value1=_upper_set(_get(it, "value1", "image_type."), "image_type.value1"),
            image_type_value2=_upper_set(_get(it, "value2", "image_type."), "image_type.value2"),
            image_type_axial=_upper_set(_get(it, "axial", "image_type."), "image_type.axial"),
            image_type_reject=_upper_set(_get(it, "reject", "image_type."), "image_type.reject"),
            reject_description=_patterns(data.get("reject_description", []), "reject_description"),
            body_parts=_upper_set(_get(anatomy, "body_parts", "anatomy."), "anatomy.body_parts"),
            anatomy_description=_patterns(
                _get(anatomy, "description", "anatomy."), "anatomy.description"
            ),
            accept_unknown_anatomy=bool(anatomy.get("accept_unknown", False)),
            contrast_negations=_patterns(contrast.get("negations", []), "contrast.negations"),
            contrast_description=_patterns(
                _get(contrast, "description", "contrast."), "contrast.description"
            ),
            kernel_bone=_patterns(_get(kernel, "bone", "kernel."), "kernel.bone"),
            kernel_soft=_patterns(_get(kernel, "soft", "kernel."), "kernel.soft"),
            bone_policy=policy,
            window_soft_max=float(_get(window, "soft_max", "kernel.window_width.")),
            window_bone_min=float(_get(window, "bone_min", "kernel.window_width.")),
            description_bone=_patterns(kernel.get("description_bone", []), "kernel.description_bone"),
            description_soft=_patterns(kernel.get("description_soft", []), "kernel.description_soft"),
            thickness_preferred=(float(preferred[0]), float(preferred[1])),
            thickness_min=float(_get(thickness, "min", "thickness.")),
            thickness_max=float(_get(thickness, "max", "thickness.")),
            min_instances=int(data.get("min_instances", 1)),
            lossy_compressed_original=bool(it.get("lossy_compressed_original", True)),
            axial_max_tilt_deg=float(shape.get("axial_max_tilt_deg", 30.0)),
            spacing_tolerance=float(shape.get("spacing_tolerance", 0.1)),
            field_of_view_mm=(float(fov[0]), float(fov[1])),
            geometry_identifies_head=bool(shape.get("identifies_head", True)),
            source=source,
        )


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int) -> SelectionRules:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise RulesError(f"{path}: not valid YAML: {exc}") from None
    return SelectionRules.from_dict(data, source=path)


def load_rules(path: Path | str | None = None) -> SelectionRules:
    """Load rules from ``path`` (default: the shipped file); re-read when the file changes.

    Raises
    ------
    RulesError
        The file is missing or invalid; the message names the key.
    """
    target = Path(path) if path is not None else DEFAULT_RULES_PATH
    try:
        mtime = target.stat().st_mtime_ns
    except OSError as exc:
        raise RulesError(f"selection rules {target}: {exc.strerror}") from None
    return _load_cached(str(target.resolve()), mtime)

"""Site thresholds: ``site_thresholds.json`` beside ``model_card.json``.

A site sets its own operating points on a labelled sample of its own studies
(``triage-node calibrate``, :mod:`worker.model.calibrate`); the weights and the model card
stay as shipped. When the file sits next to the card, :func:`worker.inference.card.load_model_card`
attaches it to the card and ``ModelCard.thresholds`` returns its thresholds. The file names
the Device UID it was calibrated for: a file made for other weights is refused at load, never
skipped, since serving the card's thresholds where the site expects its own would change the
sensitivity without anyone noticing.

This module imports nothing from :mod:`worker.inference.card`, which imports it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from triage_node import CLASSES

if TYPE_CHECKING:
    from worker.inference.card import ModelCard

SITE_FILE = "site_thresholds.json"
KIND: Final = "ich-triage-node site thresholds v1"
#: Hex digits of the SHA-256 kept: short enough for an SR parameter, long enough to tell files apart.
DIGEST_CHARS = 12


class SiteCalibrationError(ValueError):
    """A site thresholds file that cannot be used with this model card."""


def thresholds_digest(operating_points: dict[str, dict[str, float]]) -> str:
    """Short SHA-256 of the thresholds (canonical JSON: sorted keys, no spaces).

    Python's JSON writes floats as their shortest round-trip repr, so the digest read back
    from the file is the digest written.
    """
    canonical = json.dumps(operating_points, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:DIGEST_CHARS]


class ClassResult(BaseModel):
    """One class at one operating point, measured on the site's sample."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float = Field(ge=0.0, le=1.0)
    source: Literal["site", "model card"]
    n_pos: int = Field(ge=0)
    n_neg: int = Field(ge=0)
    tp: int = Field(ge=0)
    fn: int = Field(ge=0)
    tn: int = Field(ge=0)
    fp: int = Field(ge=0)
    # None where the sample has no positives (negatives) of the class
    sensitivity: float | None
    sensitivity_ci95: tuple[float | None, float | None]
    specificity: float | None
    specificity_ci95: tuple[float | None, float | None]


class Sample(BaseModel):
    """The labelled studies the thresholds were chosen on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str
    format: str
    n_studies: int = Field(gt=0)
    failed_series: int = Field(ge=0)
    unreadable_files: int = Field(ge=0)


class SiteThresholds(BaseModel):
    """Validated content of ``site_thresholds.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ich-triage-node site thresholds v1"] = KIND
    device_uid: str = Field(pattern=r"^[0-9]+(\.[0-9]+)+$", max_length=64)
    model_name: str
    model_version: str
    calibrated_utc: str
    target_sensitivity: float = Field(gt=0.0, lt=1.0)
    min_positives: int = Field(ge=1)
    min_negatives: int = Field(ge=1)
    sample: Sample
    operating_points: dict[str, dict[str, float]]
    rules: dict[str, str]
    results: dict[str, dict[str, ClassResult]]
    kept_card_threshold: dict[str, str] = Field(default_factory=dict)
    digest: str = Field(pattern=r"^[0-9a-f]+$")

    @model_validator(mode="after")
    def _consistent(self) -> SiteThresholds:
        for op, got in self.operating_points.items():
            if set(got) != set(CLASSES):
                raise ValueError(f"operating_points[{op!r}] must have one threshold per class {CLASSES}")
            for k, t in got.items():
                if not 0.0 <= t <= 1.0:
                    raise ValueError(f"threshold {op}/{k}={t} outside 0..1")
            if set(self.results.get(op, {})) != set(CLASSES):
                raise ValueError(f"results[{op!r}] must have one entry per class {CLASSES}")
        if set(self.results) != set(self.operating_points) or set(self.rules) != set(self.operating_points):
            raise ValueError("operating_points, rules and results must name the same operating points")
        if "any" in self.kept_card_threshold or not set(self.kept_card_threshold) <= set(CLASSES):
            raise ValueError("kept_card_threshold may name subtypes only (a sample too small for 'any' is refused)")
        # a hand-edited threshold would make the SR name thresholds that are not the ones used
        if self.digest != thresholds_digest(self.operating_points):
            raise ValueError(f"digest {self.digest} does not match the thresholds (edited by hand?)")
        return self

    @property
    def source(self) -> str:
        """``site calibration <digest> (<date>)``: what ``ModelCard.threshold_source`` says."""
        return f"site calibration {self.digest} ({self.calibrated_utc[:10]})"


def read_site_file(path: str | Path) -> SiteThresholds:
    """Read and validate a site thresholds file.

    Raises
    ------
    SiteCalibrationError
        Not JSON, or not a valid site thresholds file; the message names the file.
    """
    p = Path(path)
    try:
        return SiteThresholds(**json.loads(p.read_text()))
    except (json.JSONDecodeError, ValidationError, TypeError) as exc:
        raise SiteCalibrationError(f"{p} is not a valid site thresholds file: {exc}") from None


def site_thresholds_for(card: ModelCard) -> SiteThresholds | None:
    """The site file beside ``card.path``, checked against the card; None when there is none.

    Raises
    ------
    SiteCalibrationError
        The file is invalid, was calibrated for another Device UID or model version, or
        lacks one of the card's operating points.
    """
    if card.path is None:
        return None
    path = card.path.parent / SITE_FILE
    if not path.is_file():
        return None
    site = read_site_file(path)
    if (site.device_uid, site.model_version) != (card.device_uid, card.version):
        raise SiteCalibrationError(
            f"{path} was calibrated for model {site.model_version} (Device UID {site.device_uid}), "
            f"but {card.path.name} is model {card.version} (Device UID {card.device_uid}): its thresholds "
            f"do not apply to these weights. Move it aside and run `triage-node calibrate` for this model."
        )
    if set(site.operating_points) != set(card.operating_points):
        raise SiteCalibrationError(
            f"{path} has operating points {sorted(site.operating_points)}, the card {sorted(card.operating_points)}"
        )
    return site

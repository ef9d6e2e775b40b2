"""The frozen description of one synthetic study: subject, placement and lesions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from triage_node import SUBTYPES
from triage_node.synth.anatomy import Anatomy, sample_anatomy
from triage_node.synth.lesions import Lesion, sample_lesion

__all__ = ["StudySpec", "sample_study_spec"]


@dataclass(frozen=True)
class StudySpec:
    """Everything :func:`render_axial` needs to draw one head.

    Attributes
    ----------
    anatomy : Anatomy
        Subject parameters (head size/shape, rotation, skull, ventricles, calcium).
    lesions : tuple of Lesion
        Haemorrhages; empty for a negative study.
    head_center : tuple of float
        Patient-coordinate (LPS, mm) position of the head origin; x/y are the offset
        from the scanner isocentre, z is the table position.
    fov_mm : float
        Reconstruction diameter (display field of view), mm.
    streak_hu : float
        Strength of beam-hardening streaks at the skull base.
    noise_seed : int
        Seed of the noise realisation.
    """

    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    head_center: tuple[float, float, float]
    fov_mm: float
    streak_hu: float
    noise_seed: int

    def __post_init__(self) -> None:
        if not 150.0 <= self.fov_mm <= 400.0:
            raise ValueError(f"fov_mm must be within 150-400 mm, got {self.fov_mm}")
        if not isinstance(self.lesions, tuple):
            raise TypeError("lesions must be a tuple of Lesion")

    @property
    def subtypes(self) -> tuple[str, ...]:
        """Subtypes present in the study (RSNA order)."""
        present = {les.subtype for les in self.lesions}
        return tuple(s for s in SUBTYPES if s in present)

    @property
    def positive(self) -> bool:
        """Whether the study carries any haemorrhage."""
        return bool(self.lesions)


def sample_study_spec(
    rng: np.random.Generator,
    positive_fraction: float = 0.5,
    subtypes: Sequence[str] = SUBTYPES,
) -> StudySpec:
    """Draw a random study.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness; the spec is a pure function of its state.
    positive_fraction : float
        Probability that the study carries haemorrhage.
    subtypes : sequence of str
        Subtypes allowed in positive studies (each positive study has 1-3 lesions
        of 1-3 of these subtypes).

    Returns
    -------
    StudySpec
    """
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be within 0-1, got {positive_fraction}")
    subtypes = tuple(subtypes)
    bad = [s for s in subtypes if s not in SUBTYPES]
    if bad or not subtypes:
        raise ValueError(f"subtypes must be a non-empty subset of {SUBTYPES}, got {subtypes}")
    anatomy = sample_anatomy(rng)
    lesions: list[Lesion] = []
    if rng.random() < positive_fraction:
        k = int(rng.choice([1, 1, 1, 2, 2, 3]))
        chosen = rng.choice(len(subtypes), size=min(k, len(subtypes)), replace=False)
        for i in sorted(chosen.tolist()):
            lesions.append(sample_lesion(rng, subtypes[i], anatomy))
            if subtypes[i] == "intraparenchymal" and "intraventricular" in subtypes and rng.random() < 0.2:
                lesions.append(sample_lesion(rng, "intraventricular", anatomy))
    return StudySpec(
        anatomy=anatomy,
        lesions=tuple(lesions),
        head_center=(float(rng.normal(0, 4)), float(rng.normal(3, 4)), float(rng.uniform(-180, 60))),
        fov_mm=float(rng.choice([220.0, 230.0, 240.0, 250.0])),
        streak_hu=float(rng.uniform(8, 28)),
        noise_seed=int(rng.integers(2**31)),
    )

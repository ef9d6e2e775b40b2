"""Synthetic head-CT studies as real DICOM, with per-slice haemorrhage labels.

Public API::

    from triage_node.synth import sample_study_spec, render_axial, write_dataset

    spec = sample_study_spec(np.random.default_rng(0), positive_fraction=0.5)
    series = render_axial(spec, rows=256, slice_thickness_mm=5.0)   # RenderedSeries
    truths = write_dataset("out", studies=4, seed=0, preview=True)  # list[StudyTruth]

Modules: :mod:`phantom` (anatomy in HU), :mod:`lesions` (the five subtypes),
:mod:`noise` (image formation), :mod:`render` (axial series and labels),
:mod:`dicom_writer` (profiles, transfer syntaxes), :mod:`study` (composition and
files on disk), :mod:`preview` (PNG montages), :mod:`jpeg_lossless` (encoder).
"""

from triage_node import SUBTYPES
from triage_node.synth.anatomy import Anatomy
from triage_node.synth.lesions import Lesion
from triage_node.synth.render import MIN_BLOOD_MM2, RenderedSeries, render_axial
from triage_node.synth.spec import StudySpec, sample_study_spec
from triage_node.synth.study import COMPONENTS, LABEL_SUBTYPES, SeriesTruth, StudyTruth, study_spec, write_dataset

__all__ = [
    "SUBTYPES",
    "COMPONENTS",
    "LABEL_SUBTYPES",
    "MIN_BLOOD_MM2",
    "Anatomy",
    "Lesion",
    "RenderedSeries",
    "SeriesTruth",
    "StudySpec",
    "StudyTruth",
    "render_axial",
    "sample_study_spec",
    "study_spec",
    "write_dataset",
]

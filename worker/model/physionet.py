"""The PhysioNet CT-ICH layout (Hssayeni et al. 2020) as a labelled dataset.

Layout, as downloaded from PhysioNet ("Computed Tomography Images for Intracranial
Hemorrhage Detection and Segmentation", version 1.0.0)::

    <root>/hemorrhage_diagnosis.csv        PatientNumber, SliceNumber, Intraventricular,
                                           Intraparenchymal, Subarachnoid, Epidural, Subdural,
                                           No_Hemorrhage, Fracture_Yes_No
    <root>/Patients_CT/<pid>/brain/<n>.jpg brain window of slice n (1 = lowest)
    <root>/Patients_CT/<pid>/bone/<n>.jpg  bone window
    <root>/Patients_CT/<pid>/brain/<n>_HGE_Seg.jpg  bleed mask, where drawn

Each patient is one series, its slices stacked in slice order, so the sequence model trains
on real series. The brain JPEGs hold the window center 40 / width 120 HU (the data paper;
checked on the images: air 0, brain parenchyma 106-134, i.e. 30-43 HU, skull 255), so
``pixel / 255`` equals :func:`worker.pipeline.preprocess.window` of the HU slice in the
``brain_wide`` window, up to 8-bit and JPEG rounding. The bone JPEGs are not used: their
grey levels do not match the documented bone window (air is 71, not 0).

The slices have no DICOM identifiers; each gets a UID derived from (patient, slice), so the
same slice has the same SOP Instance UID in every run (``explain`` names its files by it).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from triage_node import CLASSES
from worker.pipeline.input_frame import HEAD_WINDOW, SEARCH_STEP, InputFrame, find_head_frame, plan_inputs

LABEL_FILE = "hemorrhage_diagnosis.csv"
#: What the model card says of this data set (counts are added from the data actually read).
DATASET: dict[str, object] = {
    "name": "Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation (CT-ICH)",
    "version": "1.0.0",
    "licence": "Creative Commons Attribution 4.0 International (CC BY 4.0), under which version 1.0.0 and its "
    "data paper were published; PhysioNet's page for the current version 1.3.1 shows restricted access",
    "origin": "non-contrast head CT of 82 patients, Al Hilla Teaching Hospital, Iraq (per the data paper)",
    "copy_used": "brain-window JPEGs and hemorrhage_diagnosis.csv of version 1.0.0 from the public repository "
    "lammih/MultiModal2 at commit a5b2600bbce2d29d8beadacb2b73d2398a37f7ad, laid out by scripts/ctich_from_flat_copy.py",
    "citations": [
        "Hssayeni MD, Croock MS, Salman AD, Al-khafaji HF, Yahya ZA, Ghoraani B. Intracranial Hemorrhage "
        "Segmentation Using a Deep Convolutional Model. Data 2020;5(1):14. doi:10.3390/data5010014",
        "Hssayeni M. Computed Tomography Images for Intracranial Hemorrhage Detection and Segmentation "
        "(version 1.0.0). PhysioNet 2020. doi:10.13026/4nae-zg36",
        "Goldberger A, et al. PhysioBank, PhysioToolkit, and PhysioNet: Components of a new research resource "
        "for complex physiologic signals. Circulation 2000;101(23):e215-e220",
    ],
}
#: The window the brain JPEGs were rendered in (center, width) in HU; the head framing
#: searches in this same window (input_frame.HEAD_WINDOW is defined as it).
JPEG_WINDOW: tuple[float, float] = HEAD_WINDOW
_COLUMNS = {
    "epidural": "Epidural",
    "intraparenchymal": "Intraparenchymal",
    "intraventricular": "Intraventricular",
    "subarachnoid": "Subarachnoid",
    "subdural": "Subdural",
}


def slice_uid(patient: int, slice_number: int, what: str = "slice") -> str:
    """A stable UID for one CT-ICH slice (or ``what`` = "study"/"series" of a patient)."""
    return generate_uid(entropy_srcs=["physionet-ich", what, str(patient), str(slice_number)])


def read_labels(path: str | Path) -> dict[tuple[int, int], np.ndarray]:
    """``hemorrhage_diagnosis.csv`` -> {(patient, slice): uint8[6]} in CLASSES order.

    ``any`` is set when No_Hemorrhage is 0 or any subtype is 1.
    """
    out: dict[tuple[int, int], np.ndarray] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for row in csv.DictReader(fh):
            y = np.zeros(len(CLASSES), np.uint8)
            for name, col in _COLUMNS.items():
                y[CLASSES.index(name)] = int(float(row[col]))
            y[0] = int(y[1:].any() or int(float(row["No_Hemorrhage"])) == 0)
            out[(int(row["PatientNumber"]), int(row["SliceNumber"]))] = y
    return out


@dataclass(frozen=True)
class CtIchSlice:
    patient: int
    number: int
    path: Path
    mask: Path | None


def find_slices(root: str | Path) -> dict[int, list[CtIchSlice]]:
    """{patient: slices in slice order} below ``root/Patients_CT``."""
    base = Path(root) / "Patients_CT"
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: expected the PhysioNet CT-ICH layout (Patients_CT/<pid>/brain/<n>.jpg)")
    out: dict[int, list[CtIchSlice]] = {}
    for pdir in sorted(p for p in base.iterdir() if p.is_dir() and p.name.isdigit()):
        brain = pdir / "brain"
        found = []
        for f in brain.glob("*.jpg"):
            m = re.fullmatch(r"(\d+)\.jpg", f.name)
            if m:
                n = int(m.group(1))
                mask = brain / f"{n}_HGE_Seg.jpg"
                found.append(CtIchSlice(int(pdir.name), n, f, mask if mask.is_file() else None))
        if found:
            out[int(pdir.name)] = sorted(found, key=lambda s: s.number)
    return out


def load_stack(paths: list[Path]) -> np.ndarray:
    """Brain-window JPEGs of one series as float32 [Z, H, W] in 0..1."""
    imgs = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths]
    shapes = {i.shape for i in imgs}
    if len(shapes) != 1:
        raise ValueError(f"slices of one series differ in size: {sorted(shapes)}")
    return np.stack(imgs)


def stack_inputs(
    stack: np.ndarray,
    plan: tuple[tuple[int, str], ...] | list[tuple[int, str]],
    windows: dict[str, tuple[float, float]],
    size: int,
    crop: str,
) -> tuple[np.ndarray, InputFrame]:
    """CNN inputs of a brain-window image stack [Z, H, W], as :func:`series_inputs` makes them from HU.

    Every window of ``plan`` must be the JPEGs' own window: no other can be recovered from them.
    """
    for _, name in plan:
        if tuple(windows[name]) != JPEG_WINDOW:
            raise ValueError(f"window {name!r} {windows[name]} cannot be made from CT-ICH brain JPEGs (window {JPEG_WINDOW})")
    z, h, w = stack.shape
    frame = find_head_frame(stack[:, ::SEARCH_STEP, ::SEARCH_STEP], h, w) if crop == "head" else InputFrame.centred(h, w)
    return plan_inputs(lambda i, _name: stack[i], z, plan, size, frame), frame

#!/usr/bin/env python3
"""Lay out the flat public copy of PhysioNet CT-ICH as PhysioNet distributes it.

The copy in the public repository lammih/MultiModal2 (commit a5b2600bbce2d29d8beadacb2b73d2398a37f7ad)
holds the brain- and bone-window JPEGs of CT-ICH 1.0.0 renamed to <patient><slice>.jpg
(``4914.jpg`` = patient 49, slice 14; patients are 49..130, so a name starting with 1 has a
three-digit patient number) in ``Data/Brain/{Positiv,Negativ}`` and ``Data/Bone/...``, and
``DataPreprocessing/hemorrhage_diagnosis.csv``. Its folder names are swapped (``Positiv``
holds the slices without a bleed): the labels come from the CSV only.

This writes ``OUT/Patients_CT/<pid:03d>/{brain,bone}/<slice>.jpg`` and
``OUT/hemorrhage_diagnosis.csv``, the layout ``triage-node train --format physionet-ich`` reads.
Files are hard-linked where possible (copied otherwise). Keep OUT outside the repository:
the images are patient data.

    python scripts/ctich_from_flat_copy.py --src /path/to/MultiModal2 --out /data/ct-ich
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path


def parse_name(stem: str) -> tuple[int, int]:
    """``"4914"`` -> (49, 14); ``"10010"`` -> (100, 10)."""
    if not re.fullmatch(r"\d{3,6}", stem):
        raise ValueError(f"not a <patient><slice> name: {stem!r}")
    cut = 3 if stem.startswith("1") else 2
    return int(stem[:cut]), int(stem[cut:])


def place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, required=True, help="checkout of the flat copy (holds Data/ and DataPreprocessing/)")
    ap.add_argument("--out", type=Path, required=True, help="folder to write the PhysioNet layout into")
    args = ap.parse_args(argv)
    csv_src = args.src / "DataPreprocessing" / "hemorrhage_diagnosis.csv"
    with open(csv_src, newline="", encoding="utf-8-sig") as fh:
        rows = {(int(r["PatientNumber"]), int(r["SliceNumber"])) for r in csv.DictReader(fh)}
    seen: dict[str, set[tuple[int, int]]] = {"brain": set(), "bone": set()}
    for kind, folder in (("brain", "Brain"), ("bone", "Bone")):
        for f in sorted((args.src / "Data" / folder).glob("*/*.jpg")):
            pid, n = parse_name(f.stem)
            if (pid, n) in seen[kind]:
                print(f"duplicate slice {pid}/{n} ({f})", file=sys.stderr)
                return 1
            seen[kind].add((pid, n))
            place(f, args.out / "Patients_CT" / f"{pid:03d}" / kind / f"{n}.jpg")
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(csv_src, args.out / "hemorrhage_diagnosis.csv")
    missing = sorted(rows - seen["brain"])
    extra = sorted(seen["brain"] - rows)
    patients = {p for p, _ in seen["brain"]}
    print(f"{len(seen['brain'])} brain and {len(seen['bone'])} bone slices of {len(patients)} patients; "
          f"CSV rows without an image: {len(missing)}; images without a CSV row: {len(extra)} {extra[:5]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

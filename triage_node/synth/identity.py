"""Who and what a synthetic study is: deterministic UIDs and made-up demographics.

`synthetic_uid` hashes the seed, study index, role and instance into a 2.25
UUID-derived UID (PS3.5 B.2), so that the same seed writes the same UIDs on every
machine; `study_header` draws the patient, study and equipment attributes of one study
(an RSNA-style anonymous one for the ``rsna`` profile). Kept apart from
``triage_node.synth.study``, which renders and writes the series: none of this touches
pixels, and the names are plainly fictional.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np

from triage_node.synth.dicom_writer import StudyHeader

__all__ = ["series_time", "study_header", "synthetic_uid"]

_SURNAMES = ("DOE", "SMITH", "GARCIA", "MUELLER", "ROSSI", "NGUYEN", "KOWALSKI", "JOHANSSON", "DUBOIS",
             "OKAFOR", "TANAKA", "SILVA", "MARTIN", "BROWN", "IVANOVA", "HANSEN", "MORALES", "PATEL",
             "KIM", "LEHMANN", "BERG", "COSTA", "NOVAK", "WALSH")
_GIVEN = {"F": ("JANE", "MARIA", "ANNA", "SOFIA", "EMMA", "LENA", "CLARA", "AMINA", "YUKI", "EVA"),
          "M": ("JOHN", "PETER", "LUCAS", "AHMED", "KENJI", "MARCO", "JONAS", "DAVID", "IVAN", "OMAR")}


def synthetic_uid(seed: int, *parts) -> str:
    """A deterministic UID under the 2.25 root (PS3.5 B.2: UUID-derived UIDs).

    ``pydicom.uid.generate_uid(prefix=None)`` ignores ``entropy_srcs`` and returns a
    random UUID4, so the UUID is built here from a SHA-256 of the entropy sources,
    with the RFC 9562 version-4/variant bits set as ``uuid.UUID(version=4)`` does.
    """
    digest = hashlib.sha256("\x1f".join(["ich-triage-synth", str(seed), *map(str, parts)]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


def study_header(rng: np.random.Generator, seed: int, index: int, profile: str) -> StudyHeader:
    """Patient, study and equipment attributes of study ``index``; the ``rsna`` profile has no PatientName."""
    sex = str(rng.choice(["F", "M"]))
    age = int(rng.integers(22, 92))
    year = int(rng.integers(2023, 2027))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    hh, mm, ss = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    if profile == "rsna":
        pid = "ID_" + "".join(rng.choice(list("0123456789abcdef"), size=9))
        name = ""
    else:
        pid = f"PID{int(rng.integers(1, 10**7)):07d}"
        name = f"{rng.choice(_SURNAMES)}^{rng.choice(_GIVEN[sex])}"
    return StudyHeader(
        study_uid=synthetic_uid(seed, index, "study"),
        frame_uid=synthetic_uid(seed, index, "frame"),
        patient_name=name,
        patient_id=pid,
        birth_date=f"{year - age:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}",
        sex=sex,
        age=f"{age:03d}Y",
        study_date=f"{year:04d}{month:02d}{day:02d}",
        study_time=f"{hh:02d}{mm:02d}{ss:02d}",
        accession=f"ACC{int(rng.integers(1, 10**8)):08d}",
        study_id=str(int(rng.integers(1000, 99999))),
        institution="Synthetic General Hospital",
        station=str(rng.choice(["CTHEAD01", "CT02", "ERCT"])),
        model=str(rng.choice(["Phantom CT 64", "Phantom CT 128", "Phantom Dual 256"])),
        profile=profile,
    )


def series_time(study_time: str, minutes: int) -> str:
    """SeriesTime ``minutes`` after ``study_time`` (both HHMMSS), wrapping at midnight."""
    h, m, s = int(study_time[:2]), int(study_time[2:4]), int(study_time[4:6])
    total = (h * 3600 + m * 60 + s + minutes * 60) % 86400
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"

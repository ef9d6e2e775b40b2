"""The spool: UID validation before paths, atomic durable writes, permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from triage_node.ingest.spool import InvalidUID, Spool, validate_uid

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.mark.parametrize(
    "bad",
    ["", "../../x", "1.2/../3", "1.2.3/4", "1.2.a", "1..2", ".1.2", "1.2.", "1 2",
     "1." + "2" * 63, None, 12345, "1.2\n3", "~/1.2"],
)
def test_validate_uid_rejects_non_uids(bad: object) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(bad)


@pytest.mark.parametrize("good", ["1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3\x00", "2.25." + "9" * 59])
def test_validate_uid_accepts_uids_and_strips_padding(good: str) -> None:
    assert validate_uid(good) == good.rstrip("\x00")


def test_write_is_complete_with_private_modes_and_no_temp_files_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = os.urandom(100_000)
    path = spool.write(STUDY, SERIES, SOP, data, version=1)
    assert path == tmp_path / "spool" / STUDY / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent, tmp_path / "spool"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_versions_get_their_own_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    first = spool.write(STUDY, SERIES, SOP, b"one", version=1)
    second = spool.write(STUDY, SERIES, SOP, b"two", version=2)
    assert second.name == f"{SOP}.v2.dcm"
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"


def test_uids_are_checked_before_anything_touches_the_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.write(STUDY, "../../../etc", SOP, b"x")
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == [".incoming"]
    assert list(spool.incoming.iterdir()) == []
    assert not (tmp_path / "etc").exists()


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    with pytest.raises(TypeError):
        spool.write(STUDY, SERIES, SOP, object(), version=1)  # type: ignore[arg-type]
    assert list(spool.incoming.iterdir()) == []
    assert not (tmp_path / STUDY).exists()


def test_remove_refuses_paths_outside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "keep.txt"
    outside.write_text("x")
    with pytest.raises(ValueError):
        spool.remove(outside)
    assert outside.exists()


def test_stage_then_publish_or_discard(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    staged = spool.stage(b"payload")
    assert staged.parent == tmp_path / ".incoming" and staged.name.startswith(".incoming-")
    assert staged.stat().st_mode & 0o777 == 0o600
    final = spool.publish(staged, STUDY, SERIES, SOP, version=3)
    assert final == tmp_path / STUDY / SERIES / f"{SOP}.v3.dcm" and final.read_bytes() == b"payload"
    assert not staged.exists()
    dropped = spool.stage(b"other")
    spool.discard(dropped)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    assert list(spool.incoming.iterdir()) == []


def test_stale_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.write(STUDY, SERIES, SOP, b"kept")
    spool.stage(b"interrupted")  # as if the process died before publish
    assert Spool(tmp_path).remove_stale_temp_files() == 1
    assert [p.name for p in kept.parent.iterdir()] == [kept.name]


def test_a_staged_file_leaves_the_page_cache_only_after_its_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)  # its folders are made (and fsynced) first
    calls: list[tuple[str, int]] = []
    real_fsync, real_fadvise = os.fsync, os.posix_fadvise

    def fsync(fd: int) -> None:
        calls.append(("fsync", fd))
        real_fsync(fd)

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append(("fadvise", advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    staged = spool.stage(b"x" * 8192)
    assert [name for name, _ in calls] == ["fsync", "fadvise"]
    assert calls[1][1] == os.POSIX_FADV_DONTNEED
    assert staged.read_bytes() == b"x" * 8192


def test_refused_page_cache_advice_does_not_fail_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    spool = Spool(tmp_path)
    path = spool.write(STUDY, SERIES, SOP, b"data")
    assert path.read_bytes() == b"data"
    assert list(spool.incoming.iterdir()) == []

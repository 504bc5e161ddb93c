"""Output paths: umask-honouring atomic writes, kept modes, and the checks before any work."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from hwgen import fsutil
from hwgen.errors import HwgenError
from hwgen.fsutil import (
    atomic_write_bytes,
    check_output,
    is_mount_point,
    make_temp_dir,
    replace_dir,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(
    ("mask", "file_mode", "dir_mode"), [(0o027, 0o640, 0o750), (0o002, 0o664, 0o775)]
)
def test_new_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    f = atomic_write_bytes(tmp_path / "a" / "f.bin", b"data")
    d = make_temp_dir(tmp_path, "out")
    assert f.read_bytes() == b"data"
    assert _mode(f) == file_mode and _mode(d) == dir_mode and _mode(tmp_path / "a") == dir_mode
    assert d.parent == tmp_path and d.name.startswith(".out.")
    assert _tree(tmp_path) == sorted(["a", "a/f.bin", d.name])  # no temporary left behind


def test_existing_modes_are_kept(tmp_path, umask):
    umask(0o022)
    f = tmp_path / "f.bin"
    f.write_bytes(b"old")
    f.chmod(0o600)
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o711)
    atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new" and _mode(f) == 0o600
    new = make_temp_dir(tmp_path, "out")
    (new / "x").write_bytes(b"x")
    replace_dir(new, tmp_path / "out")
    assert _mode(tmp_path / "out") == 0o711 and _tree(tmp_path) == ["f.bin", "out", "out/x"]


def test_check_output_accepts_new_and_existing_outputs(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "f.hwq").write_bytes(b"x")
    assert check_output(tmp_path / "a" / "b" / "out", "folder") == tmp_path / "a" / "b" / "out"
    check_output(tmp_path / "dir", "folder")
    check_output(tmp_path / "dir", "folder", replaced=False)
    check_output(tmp_path / "f.hwq", "file")
    assert _tree(tmp_path) == ["dir", "f.hwq"]  # checking writes nothing


def _read_only(monkeypatch) -> None:
    def refuse(folder: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(fsutil, "_probe_writable", refuse)


@pytest.mark.parametrize(
    ("rel", "kind", "replaced", "message"),
    [
        ("afile", "folder", True, "output {p}/afile is a file, not a folder"),
        ("dir", "file", True, "output {p}/dir is a folder: give a file name"),
        ("afile/x/y", "folder", True, "cannot create output {p}/afile/x/y: {p}/afile is a file"),
        ("afile/x.hwq", "file", True, "cannot create output {p}/afile/x.hwq: {p}/afile is a file"),
        ("mnt", "folder", True, "output {p}/mnt is a mount point and hwgen replaces its output"),
        ("new", "folder", True, "cannot write output {p}/new: {p}: read-only file system"),
        ("dir", "folder", False, "cannot write output {p}/dir: {p}/dir: read-only file system"),
    ],
)
def test_check_output_refuses(tmp_path, monkeypatch, rel, kind, replaced, message):
    (tmp_path / "afile").write_bytes(b"")
    (tmp_path / "dir").mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(fsutil, "_mount_points", lambda: {os.path.realpath(tmp_path / "mnt")})
    if "read-only" in message:
        _read_only(monkeypatch)
    before = _tree(tmp_path)
    with pytest.raises(HwgenError) as e:
        check_output(tmp_path / rel, kind, replaced=replaced)
    assert str(e.value).startswith(message.format(p=tmp_path)), str(e.value)
    assert _tree(tmp_path) == before


def test_a_mount_point_written_into_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "_mount_points", lambda: {os.path.realpath(tmp_path)})
    check_output(tmp_path, "folder", replaced=False)


def test_mount_points_are_found():
    assert is_mount_point(Path("/"))
    assert not is_mount_point(Path(__file__).parent)

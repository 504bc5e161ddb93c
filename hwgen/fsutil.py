"""Output paths: checked before any work, written atomically (a temporary sibling, then a
rename) so nothing is ever half-written, with the permissions the user's umask asks for.

Files are created with mode 0o666 and folders with 0o777 and the kernel applies the umask
(and any default ACL), as ``open``/``mkdir`` would; ``tempfile``'s private 0o600/0o700 modes
must not leak into the outputs. Replacing an existing file or folder keeps its mode.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import shutil
import stat
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np

from hwgen.errors import HwgenError

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: identical content gives identical files


def existing_mode(path: Path) -> int | None:
    """The permission bits of an existing ``path``, else None."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


def _mount_points() -> set[str]:
    """Mount points from /proc/self/mountinfo (bind mounts included); empty elsewhere."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return set()
    # Field 5 is the mount point, with space, tab, newline and backslash escaped in octal.
    unescape = {"\\040": " ", "\\011": "\t", "\\012": "\n", "\\134": "\\"}
    points = set()
    for line in lines:
        field = line.split(" ")[4]
        for code, char in unescape.items():
            field = field.replace(code, char)
        points.add(field)
    return points


def is_mount_point(path: Path) -> bool:
    """True if ``path`` is where a file system is mounted (a bind mount too)."""
    return os.path.ismount(path) or os.path.realpath(path) in _mount_points()


def _probe_writable(folder: Path) -> None:
    """Create and remove an empty file in ``folder``: a real write is the test that also
    holds for root (permission bits do not stop root; a read-only file system does)."""
    probe = folder / f".hwgen-probe.{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    os.close(fd)
    probe.unlink()


def check_output(
    path: str | os.PathLike, kind: Literal["file", "folder"], *, replaced: bool = True
) -> Path:
    """Refuse, before any work, an output path hwgen could not write or must not replace.

    ``kind`` is what the command writes at ``path``; ``replaced``: whether an existing one
    is replaced as a whole (renamed over) or, for a folder, written into. Refused, each in
    one line: a folder where a file goes or a file where a folder goes, a path under a file,
    a mount point that would be replaced, and a place that cannot be written (read-only file
    system, no permission) -- found by creating and removing an empty file there. Whether
    an existing output may be replaced is the command's own check.
    """
    path = Path(path)
    if path.is_dir() and kind == "file":
        raise HwgenError(f"output {path} is a folder: give a file name")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise HwgenError(f"output {path} is a file, not a folder")
    if path.exists() and replaced and is_mount_point(path):
        raise HwgenError(
            f"output {path} is a mount point and hwgen replaces its output as a whole: "
            "give a path inside it"
        )
    # Written into: the folder itself. Replaced: the temporary sibling goes in the parent,
    # and missing folders are made in the nearest one that exists.
    where = path if path.is_dir() and not replaced else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise HwgenError(f"cannot create output {path}: {where} is a file")
    try:
        _probe_writable(where)
    except OSError as e:
        reason = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
        raise HwgenError(f"cannot write output {path}: {where}: {reason}") from None
    return path


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty folder in ``parent`` (created), mode from the umask, to become
    ``parent / name`` once complete (:func:`replace_dir`)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f".{name}.{secrets.token_hex(4)}"
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder ``new`` in place of ``out``; an existing ``out``'s mode is
    kept (applied last, so that a read-only mode does not stop the writing)."""
    mode = existing_mode(out)
    if mode is not None:
        new.chmod(mode)
        shutil.rmtree(out)
    new.rename(out)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders. A new file's mode
    comes from the umask; an existing file's mode is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = existing_mode(path)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic ``.npz`` (sorted keys, fixed timestamps, no pickling) as bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", _ZIP_DATE), arr.getvalue())
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    """A deterministic zip archive of named byte strings."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, _ZIP_DATE), data)
    return buf.getvalue()

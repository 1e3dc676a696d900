"""Every file we create goes through here: written whole to a new temporary file beside the
target (O_CREAT | O_EXCL | O_NOFOLLOW, so no symlink planted at its name is followed), then
renamed over the target, which replaces a symlink itself rather than what it points to. A reader
sees the old file or the new one, never half of one; a full disk leaves the old file intact."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A fresh path to write; on success it becomes `target` atomically, on failure it is gone."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(tmp, NEW_FILE, 0o644))  # ours alone: created here, never a planted link
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_file(target: Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `target` whole, atomically and without following links."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with replacing(Path(target)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    return Path(target)


def open_lock_file(path: Path) -> int:
    """The run lock's descriptor: created if absent, but a symlink (or anything not a regular
    file) at its name is refused instead of being opened and truncated."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
    except OSError:
        if os.path.islink(path):
            raise UserError(
                f"{path}: is a symbolic link; the run lock must be a plain file (remove the link)"
            ) from None
        if not os.path.lexists(path) or os.path.isfile(path):
            raise
        fd = -1
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, or a pipe or device opened without blocking
        if fd >= 0:
            os.close(fd)
        raise UserError(f"{path}: not a regular file; the run lock must be a plain file (remove it)")
    return fd


def is_regular_file(path: Path) -> bool:
    """A plain file (not a pipe, socket, device or a link to one): safe to read to the end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False

"""Atomic file replacement: write beside the target, fsync, rename, clean up orphans."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; orphans are judged by age alone
    fcntl = None  # type: ignore[assignment]


def _fsync_folder(folder: Path) -> None:
    """Flush a folder's entry table to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temp_names(target: Path) -> re.Pattern[str]:
    """Match the names of the temporary files that saves of ``target`` create."""
    return re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{16}}\.tmp")


def _open_temp(target: Path) -> tuple[Path, BinaryIO]:
    """Create a new, locked temporary file beside ``target``, with the mode open() gives."""
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    handle = os.fdopen(os.open(temp, flags, 0o666), "wb")  # the umask applies, as for open()
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # released when the writer dies
    return temp, handle


def _keep_mode(target: Path, temp: Path) -> None:
    """Give ``temp`` the permissions of the file it replaces, if there is one."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(temp, stat.S_IMODE(os.stat(target).st_mode))


def _remove_if_orphan(path: Path, started: float) -> None:
    """Delete ``path`` if it was last written before ``started`` and no live save holds it."""
    with contextlib.suppress(OSError), open(path, "rb") as probe:
        if os.stat(probe.fileno()).st_mtime >= started:
            return
        if fcntl is not None:  # fails while the writing process is alive
            fcntl.flock(probe.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        os.unlink(path)


def _remove_orphans(target: Path, started: float) -> None:
    """Delete the temporary files that killed saves of ``target`` left; touch nothing else."""
    names = _temp_names(target)
    try:
        orphans = [entry.path for entry in os.scandir(target.parent) if names.fullmatch(entry.name)]
    except OSError:
        return
    for orphan in orphans:
        _remove_if_orphan(Path(orphan), started)


def write_atomically(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temporary file beside ``target``, fsync it, rename it over ``target``.

    A crash at any moment leaves either the old ``target`` or the new one. The temporary
    file is removed if ``write`` fails; temporary files that killed writers of the same
    target left behind are removed after a successful write.
    """
    started = time.time()
    temp, handle = _open_temp(target)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            _keep_mode(target, temp)
            if os.name != "nt":  # renamed while locked: no other save takes it for an orphan
                os.replace(temp, target)
        if os.name == "nt":  # Windows cannot rename an open file
            os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_folder(target.parent)
    _remove_orphans(target, started)

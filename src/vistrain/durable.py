"""Files that are replaced whole: a reader, or a run restarted after a crash, finds the old file or the new one,
complete, never a part.

Every file vistrain replaces goes the same way (checkpoint pointers, run-folder records, sample grids and .npz
files, the caches): its bytes are written under a temporary name in the same folder, flushed and fsynced, and
renamed over the file with one ``os.replace``; then the folder is fsynced, so that the rename itself survives a
power cut. The temporary name, ``.tmp-<name>-<pid>-<random>``, is hidden, says what it was for, and is unique
per writer. A writer that fails or is interrupted by an exception removes its temporary file; one killed
outright leaves it, under that name only (`remove_stale_temps` clears those of writers that are gone).

One policy, always fsync: the caches too, because their readers trust a file that exists (a cache emptied by a
power cut would stop the next run instead of being recomputed), and no file here is written often enough for
the fsyncs to cost anything measurable.

A leaf module: it imports nothing of vistrain, so data/, eval/ and engine/ all use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Union

TEMP_PREFIX = ".tmp-"  # an entry named so is incomplete; engine/checkpoint_files.py names its temporary folders alike
_TEMP_RE = re.compile(r"^\.tmp-.+-(\d+)-[0-9a-f]{8}$")
_NAME_KEPT = 200  # characters of the file's name kept in the temporary name: it must stay under NAME_MAX (255)


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path`, recognisable and unique per writer (pid, random part)."""
    return path.with_name(f"{TEMP_PREFIX}{path.name[:_NAME_KEPT]}-{os.getpid()}-{secrets.token_hex(4)}")


class AtomicFile:
    """A binary file, written in pieces through `.file`, that appears under `path` only when committed.

    As a context manager it commits when the block ends normally and discards the file on any exception (also
    KeyboardInterrupt). `path`'s folder must exist.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self.temp = temp_path(self.path)
        # O_EXCL: never write into another writer's file; 0o666 less the umask, as open() would create it
        fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file = os.fdopen(fd, "wb")

    def commit(self) -> None:
        """Make the bytes durable and put them in place of `path` in one rename."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_path(self.path.parent)

    def discard(self) -> None:
        """Remove the temporary file; `path` is left as it was."""
        with contextlib.suppress(OSError):  # a flush that fails on close: the file is dropped anyway
            self.file.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def write_atomic(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Replace `path` with `data` (text is written as UTF-8), durably and in one piece."""
    with AtomicFile(path) as f:
        f.file.write(data.encode("utf-8") if isinstance(data, str) else data)


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (names created, renamed, removed), to disk. Folders cannot be
    opened on Windows; there the rename itself is the best there is."""
    if os.name == "nt" and Path(path).is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` whose writer no longer runs on this machine (killed mid-write);
    those of live writers are kept. Returns the removed paths."""
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _TEMP_RE.match(entry.name)
            if match and entry.is_file(follow_symlinks=False) and not _running(int(match.group(1))):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        return True
    return True

"""The run folder: one run at a time, never replaced by accident, and left as it was by a start that fails.

Rank 0 holds an exclusive POSIX record lock (`lockf`) on `<out_dir>/.lock` for the life of the run; the
file names the holder (pid, host) for the error message a second run prints, and is removed when the run
ends. The kernel drops the lock when the process dies, however it dies, so a lock left by a killed run never
blocks the next one. (A `flock` would not do: data-loader workers forked from the run share it and outlive
a SIGKILL by seconds; record locks belong to the process alone.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Optional

from vistrain.durable import remove_stale_temps, write_atomic

LOCK_FILE = ".lock"
_FLOCK = "hhlli"  # Linux's struct flock, see _locking_pid
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")  # any of these: the folder holds a run
# Folders that only the run holding the lock writes into: a writer killed there leaves a temporary file that the
# next run removes. Not eval/: eval jobs, possibly on other machines, write their results there while a run starts.
OWN_FOLDERS = (".", "samples")


class RunDirError(RuntimeError):
    """The run folder cannot be used; the message names it and says what to do."""


def holds_a_run(out_dir: Path) -> bool:
    return any((Path(out_dir) / name).exists() for name in RUN_MARKERS)


class RunDir:
    def __init__(self, out_dir: Path) -> None:
        self.path = Path(out_dir)
        self._fd: Optional[int] = None
        self._created = False

    def acquire(self) -> None:
        """Create the folder if needed and lock it; refuse a folder another live run holds. Then remove what
        killed writers left in it (checkpoints/ cleans its own at each save)."""
        path, lock = self.path, self.path / LOCK_FILE
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run.out_dir={path} is a file, not a folder; choose a folder path")
        try:
            if not path.exists():
                path.mkdir(parents=True)
                self._created = True
            while self._fd is None:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    holder = os.read(fd, 4096).decode(errors="replace")
                    os.close(fd)
                    if err.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    raise RunDirError(
                        f"run.out_dir={path} is in use by another vistrain run ({_describe(holder)}); two runs in "
                        "one folder would overwrite each other's checkpoints. Wait for it to end, or choose "
                        "another run.out_dir."
                    ) from None
                if _same_file(fd, lock):
                    self._fd = fd
                else:  # the previous holder removed the file just before we locked it: lock the new one
                    os.close(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(info) + "\n").encode())
            for folder in OWN_FOLDERS:
                remove_stale_temps(path / folder)
        except OSError as err:
            self.release(failed=True)
            raise RunDirError(f"cannot write to run.out_dir={path}: {err.strerror}") from None

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failed start, also remove the folder if this run created it and left it empty."""
        if self._fd is not None:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None
        if failed and self._created:
            try:
                self.path.rmdir()
            except OSError:  # not empty: something was written after all; keep it
                pass


def lock_holder(out_dir: Path) -> Optional[dict]:
    """The live run that holds `out_dir`'s lock: {"pid", "host", "started"} (what it wrote into the lock file, with
    the kernel's pid), or None when no run holds it (none started, ended, or killed: the kernel dropped its lock).

    Asks the kernel with F_GETLK, which takes no lock, so a run starting at that moment is never turned away."""
    try:
        fd = os.open(Path(out_dir) / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        pid = _locking_pid(fd)
        if pid is None:
            return None
        try:
            info = json.loads(os.read(fd, 4096).decode(errors="replace"))
        except ValueError:  # the holder has locked the file and not yet written its name
            info = {}
        info = info if isinstance(info, dict) else {}
        return {**info, "pid": pid or info.get("pid")}
    finally:
        os.close(fd)


def _locking_pid(fd: int) -> Optional[int]:
    """The pid of the process holding a record lock on the file (0 when the kernel cannot tell, as over NFS),
    or None when none does."""
    if sys.platform != "linux":  # struct flock's layout differs; the lock file's pid, if that process lives
        try:
            pid = int(json.loads(os.pread(fd, 4096, 0))["pid"])
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return pid
    # Linux's struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (off_t is a
    # long); the buffer is padded, since the kernel writes sizeof(struct flock), which has trailing padding.
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0).ljust(64, b"\0")
    l_type, _, _, _, pid = struct.unpack_from(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    return None if l_type == fcntl.F_UNLCK else pid


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file of a run folder (creating its folder) so that a reader -- another process: an eval
    job's result, the trainer's job records -- sees the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)

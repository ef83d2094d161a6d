"""Where a command may write: one check of an output path (a result file, a new folder, a run folder), made
before any work, so that a bad path costs seconds rather than a finished computation.

Every message names the flag or key and says what to do. A leaf module: it imports nothing of vistrain but
the error type.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from vistrain.errors import ConfigError

# What marks a folder whose files vistrain checksums and reads back (resume, export, eval, sample): a
# checkpoint or model folder (checksums.json, or config.json beside model.safetensors) and a run's
# checkpoints/ (its `latest` pointer). Nothing is ever written into one by hand: it would break it.
_CHECKSUMS = "checksums.json"
_MODEL_FILES = ("config.json", "model.safetensors")
_CHECKPOINTS_DIR, _LATEST = "checkpoints", "latest"
_DEFAULT_NAME_MAX, _DEFAULT_PATH_MAX = 255, 4096


def check_path_length(path: str | os.PathLike, what: str) -> Path:
    """Refuse a path the file system cannot hold (a name over NAME_MAX, the whole over PATH_MAX), which would
    otherwise fail deep inside as `OSError: File name too long`. `what` names the flag or key."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    existing = _nearest_existing(absolute)
    name_max = _pathconf(existing, "PC_NAME_MAX", _DEFAULT_NAME_MAX)
    for part in absolute.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ConfigError(f"{what}={_shown(path)}: the name {part[:24]}... is {size} bytes long; this file system "
                              f"allows at most {name_max} per name: choose a shorter path")
    size, path_max = len(os.fsencode(str(absolute))), _pathconf(existing, "PC_PATH_MAX", _DEFAULT_PATH_MAX)
    if size >= path_max:
        raise ConfigError(f"{what}={_shown(path)}: the path is {size} bytes long; this file system allows fewer than "
                          f"{path_max}: choose a shorter path")
    return path


def check_output_file(path: str | os.PathLike, what: str, example: str = "result.json") -> Path:
    """A file a command will write (or overwrite): its place must be writable and outside any checkpoint."""
    path = check_path_length(path, what)
    if path.is_dir():
        inside = _checkpoint_folder_holding(Path(os.path.abspath(path)))
        advice = (f"a file outside {inside}, which holds checkpoints" if inside else
                  f"a file name, e.g. {path / example}")
        raise ConfigError(f"{what} {path} is a folder; give {advice}")
    _check_place(path, what)
    return path


def check_output_folder(path: str | os.PathLike, what: str) -> Path:
    """A new folder a command will create: absent or empty, its place writable and outside any checkpoint."""
    path = check_path_length(path, what)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; give the path of a new folder")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{what} {path} already exists and is not empty; give the path of a new folder")
    _check_place(path, what)
    return path


def _check_place(path: Path, what: str) -> None:
    absolute = Path(os.path.abspath(path))
    existing = _nearest_existing(absolute.parent)
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, so nothing can be written under it; choose "
                          "another path")
    inside = _checkpoint_folder_holding(absolute)
    if inside is not None:
        raise ConfigError(f"{what} {path} is inside {inside}, whose files vistrain checksums and reads back (resume, "
                          "sample, eval, export): writing there would damage it. Choose a path outside it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path}: {existing} is not writable; choose another path")


def _checkpoint_folder_holding(path: Path) -> Optional[Path]:
    """The nearest existing folder above (or at) `path` that is a checkpoint, a model folder or a run's
    checkpoints/, or None."""
    for folder in [path, *path.parents]:
        if not folder.is_dir():
            continue
        if (folder / _CHECKSUMS).is_file() or all((folder / name).is_file() for name in _MODEL_FILES):
            return folder
        if folder.name == _CHECKPOINTS_DIR and (folder / _LATEST).is_file():
            return folder
    return None


def _shown(path: Path) -> str:
    """A path as a message shows it: a path too long for the file system is too long to read in full, too."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:60]}...{text[-40:]}"


def _nearest_existing(path: Path) -> Path:
    while path != path.parent:
        try:
            if path.exists():
                break
        except OSError:  # a name too long to look up exists nowhere
            pass
        path = path.parent
    return path


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path if path.is_dir() else path.parent, name)
    except (OSError, ValueError, AttributeError):  # not every platform or file system answers
        return default

"""What made a checkpoint or model folder: the code, the command, the machines and the config.

Every checkpoint and every model folder (import, export) holds `provenance.json`, one record::

    {"action": "train" | "import" | "export",
     "time": "2025-01-31T12:00:00Z", "host": "node7",             # when it began (training: the process's start)
     "command": "python -m vistrain train configs/gan/digits.yaml train.max_steps=100", "cwd": "/home/me/vistrain",
     "vistrain": {"version": "0.1.0", "source": ".../src/vistrain",
                  "commit": "55530cd...", "dirty": true, "changed_files": ["src/vistrain/cli.py"]},
     "python": "3.12.3", "torch": "2.6.0", "cuda": "12.4" | null,
     "world_size": 8, "devices": {"NVIDIA H100 80GB HBM3": 8},   # training only
     "config": {...},                                             # training: the run's config, as config.yaml
     "best_metric": {"name": "fd_judge", "mode": "min"},          # training: what picks the `best` checkpoint
     "from": {...}}                                               # export: the record of the checkpoint exported

`commit`, `dirty` and `changed_files` are there only when vistrain runs from a git checkout (its source files
are tracked there); `dirty` counts changes to tracked files, not untracked ones. An export keeps the record of
the training that made its checkpoint under "from", so a released folder still names the commit and the
config that produced it.

The facts about the code and the machine are collected once per process; nothing here fails when git, the
checkout or CUDA is absent. A leaf module (it imports nothing of vistrain but its version), used by the engine
and the faces alike.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import vistrain

FILE = "provenance.json"
_MAX_CHANGED_FILES = 50  # enough to see what differs; a tree with more changes is simply very dirty
_GIT_TIMEOUT_S = 10


def collect(action: str, **facts: Any) -> dict:
    """A provenance record of this process doing `action` (train | import | export); `facts` adds what only
    the caller knows (world_size, devices, config, best_metric, from)."""
    record = {"action": action, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": socket.gethostname(), "command": command_line(sys.argv), "cwd": os.getcwd()}
    record.update(_code_and_libraries())
    record.update({key: value for key, value in facts.items() if value is not None})
    return record


def to_bytes(record: dict) -> bytes:
    # default=str: a config may hold paths (pathlib.Path), which config.yaml shows as text too
    return (json.dumps(record, indent=2, default=str) + "\n").encode()


def read(folder: Path) -> Optional[dict]:
    """The record in `folder`/provenance.json; None when there is none or it cannot be read (an older or
    foreign folder: provenance is information, never a reason to refuse a checkpoint)."""
    try:
        record = json.loads((Path(folder) / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def command_line(argv: list[str]) -> str:
    """`argv` as one shell line, with vistrain's own entry points shown as a user types them."""
    if not argv:
        return ""
    program = argv[0]
    if Path(program).name == "__main__.py" and Path(program).parent.name == "vistrain":
        program = "python -m vistrain"
    elif Path(program).name == "vistrain":
        program = "vistrain"
    else:
        program = shlex.quote(program)
    return " ".join([program, *map(shlex.quote, argv[1:])])


def device_name(device: Any) -> str:
    """What a torch.device is, in words: the GPU's model name, else the device type and the machine."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()})"


def device_counts(names: list[str]) -> dict[str, int]:
    """{device name: how many ranks ran on one}, in the order first seen."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def describe(record: dict, indent: str = "") -> list[str]:
    """The record in a few lines of text (no config: it is long, and shown apart where wanted)."""
    code = record.get("vistrain") or {}
    lines = [f"{indent}made by: vistrain {record.get('action', '?')}, {record.get('time', '?')} on "
             f"{record.get('host', '?')}",
             f"{indent}code: vistrain {code.get('version', '?')}, {_commit_text(code)}",
             f"{indent}command: {record.get('command', '?')}  (in {record.get('cwd', '?')})",
             f"{indent}libraries: torch {record.get('torch', '?')}, CUDA {record.get('cuda') or 'none'}, "
             f"Python {record.get('python', '?')}"]
    if "world_size" in record:
        devices = ", ".join(f"{count} x {name}" for name, count in (record.get("devices") or {}).items())
        lines.append(f"{indent}ranks: {record['world_size']} ({devices or 'devices unknown'})")
    best = record.get("best_metric")
    if isinstance(best, dict):
        lines.append(f"{indent}best checkpoint by: {best.get('name')} ({best.get('mode')})")
    if isinstance(record.get("from"), dict):
        lines.append(f"{indent}from:")
        lines += describe(record["from"], indent + "  ")
    return lines


def training_config(record: dict) -> Optional[dict]:
    """The run config of the training behind a record: its own, or that of the record it came from."""
    while isinstance(record, dict):
        if isinstance(record.get("config"), dict):
            return record["config"]
        record = record.get("from")
    return None


def _commit_text(code: dict) -> str:
    if not code.get("commit"):
        return f"not from a git checkout ({code.get('source', '?')})"
    if not code.get("dirty"):
        return f"commit {code['commit']} (clean) at {code.get('source', '?')}"
    changed = code.get("changed_files") or []
    return f"commit {code['commit']} + uncommitted changes ({len(changed)} files) at {code.get('source', '?')}"


@functools.lru_cache(maxsize=None)
def _code_and_libraries() -> dict:
    """Once per process: the code that runs (and its commit) and the libraries under it."""
    import torch

    return {"vistrain": _code(Path(vistrain.__file__).resolve().parent), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def _code(source: Path) -> dict:
    code: dict[str, Any] = {"version": vistrain.__version__, "source": str(source)}
    # Only a checkout that tracks vistrain's own files names its commit: an installed copy inside some other
    # repository (a venv in a project folder) must not borrow that project's commit.
    if _git(source, "ls-files", "--error-unmatch", "__init__.py") is None:
        return code
    commit = _git(source, "rev-parse", "HEAD")
    status = _git(source, "status", "--porcelain", "--untracked-files=no")
    if commit is None or status is None:
        return code
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    code.update(commit=commit.strip(), dirty=bool(changed), changed_files=changed[:_MAX_CHANGED_FILES])
    return code


def _git(folder: Path, *args: str) -> Optional[str]:
    """git's output in `folder`, or None when git is missing or fails (not a checkout, not trusted, ...)."""
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take the index lock of a tree someone may be working in
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", *args], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None

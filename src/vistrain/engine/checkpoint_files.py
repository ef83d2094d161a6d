"""Checkpoint folders on disk: writing them atomically, checksums, finding and reading them (what goes into them,
for any parallelism, is engine/checkpointer.py's job).

Layout (a contract shared with the CLI and the docs, see docs/engine.md, "Output folder")::

    checkpoints/
      step_00001000/
        model.safetensors   all networks, keys prefixed by name ("G.", "D.", "G_ema.", ...), full tensors
        config.json         model config, enough to rebuild the networks alone
        train_state.pt      optimizers, scalers, data position, RNG states, step (read weights_only)
        train_state/        under FSDP: the optimizers' sharded state, one file per rank (torch DCP)
        checksums.json      sha256 of every file above: a bit flip is caught before anything is loaded
        metrics.json        optional: the metrics known when the checkpoint was written
        provenance.json     what made it: code and commit, command, machines, config (vistrain/provenance.py)
      latest                text file: "step_00001000"
      best                  text file: name of the best folder by the task's metric

Why so careful: a training job can be killed at any instant (preemption, OOM killer, Ctrl-C). A folder
named ``step_*`` must therefore only ever appear complete: everything is written under a ``.tmp-*``
name, flushed and fsynced, then renamed in one ``os.replace``. ``latest`` and ``best`` are replaced the
same way, so a reader sees either the old or the new name, never a half-written one. Leftover
``.tmp-*`` entries can only come from a killed writer and are removed at the next save.

Writing is ``begin_checkpoint`` (rank 0 makes the temporary folder), every rank writing its files into it,
then ``commit_checkpoint`` (rank 0: checksums, fsync, rename, ``latest``); ``save_checkpoint`` does all of
it for a single writer.

Security: weights go through safetensors and ``train_state.pt`` is always read with
``torch.load(weights_only=True)``, which is why the writer refuses train states holding anything but
plain data. The FSDP shard folder is read by torch.distributed.checkpoint, whose metadata file is a
pickle: resume sharded runs only from folders you trust.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from vistrain import provenance
from vistrain.durable import TEMP_PREFIX, fsync_path, write_atomic

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.pt"
SHARDS_DIR = "train_state"
CHECKSUMS_FILE = "checksums.json"
METRICS_FILE = "metrics.json"  # rewritten when `best` learns a metric, so it has no checksum
LATEST_FILE = "latest"
BEST_FILE = "best"
TMP_PREFIX = TEMP_PREFIX  # the durable writes' temporary files start alike, so a killed one is cleaned too

_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")

# Plain types that torch.load(weights_only=True) accepts. Exact types on purpose: numpy scalars
# subclass float and would pass isinstance, yet pickle as numpy objects that weights_only refuses.
_PLAIN_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or read. The message names the folder or file and says
    what to do next."""


# ----------------------------------------------------------------------------------------------------
# names


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint taken after `step` optimizer steps; zero-padded so that names sort
    like numbers in file browsers."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    return f"step_{step:08d}"


def _step_of(name: str) -> Optional[int]:
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_step(folder: Path) -> Optional[int]:
    """The step of a step_* checkpoint folder; None for any other folder (an exported or imported model)."""
    return _step_of(Path(folder).name)


def _step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p.name) is not None]
    return sorted(found, key=lambda p: _step_of(p.name))  # type: ignore[arg-type, return-value]


def _read_pointer(root: Path, pointer: str) -> Optional[str]:
    """The folder name stored in `root/latest` or `root/best`; None if that file does not exist."""
    path = root / pointer
    if not path.is_file():
        return None
    try:
        name = path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise CheckpointError(f"Cannot read {path}: {err}.") from err
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CheckpointError(
            f"{path} should hold the name of a checkpoint folder such as 'step_00001000', but holds "
            f"{name!r}. Fix or delete that file."
        )
    return name


# ----------------------------------------------------------------------------------------------------
# durable writes


def _write_file(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)`, then flush and fsync so the bytes are on disk before any rename."""
    with open(path, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale_tmp(root: Path) -> None:
    """Remove `.tmp-*` entries: only a writer killed mid-way leaves them, so they are never complete."""
    for entry in root.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _own_storage(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors that each own their memory. safetensors refuses tensors sharing storage
    (tied embeddings, views); a copy of each is written and load_state_dict re-ties them on load."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in weights.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"checkpoint weights must map str -> Tensor; key {key!r} holds {type(value).__name__}"
            )
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        shares = ptr != 0 and ptr in seen
        whole = t.data_ptr() == ptr and t.numel() * t.element_size() == t.untyped_storage().nbytes()
        if shares or not whole:
            t = t.clone()
        if ptr != 0:
            seen.add(ptr)
        out[key] = t
    return out


def _check_weights_only(value: Any, where: str) -> None:
    """Refuse, before writing, anything that torch.load(weights_only=True) would refuse on resume.
    Failing at save time names the offending entry; failing at resume time would lose the run."""
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, torch.nn.Parameter):
            raise TypeError(
                f"{where} is a {type(value).__name__}; store a plain tensor instead "
                "(e.g. gather a DTensor with .full_tensor())"
            )
        return
    if type(value) in _PLAIN_TYPES:
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_weights_only(item, f"{where}[{i}]")
        return
    if type(value) in (dict, OrderedDict):
        for k, item in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_weights_only(item, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
        "torch.load(weights_only=True) cannot read back; convert it to tensors, numbers, strings, "
        "lists or dicts (numpy: torch.from_numpy(x) or float(x))"
    )


def tmp_dir(root: Path, step: int) -> Path:
    # No pid in the name: under FSDP every rank writes its shards into the same temporary folder.
    return root / f"{TMP_PREFIX}{step_dir_name(step)}"


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 2**20
    except OSError:
        return False


def write_error(err: BaseException, root: Path, name: str) -> BaseException:
    """A write failure in words a user can act on; other errors are passed through unchanged."""
    full = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or _nearly_full(root)
    if full:  # torch.save reports a full disk as "unexpected pos ..." from its zip writer
        kept = latest_checkpoint(root)
        return CheckpointError(
            f"no space left on the device of {root} while writing checkpoint {name}; nothing of it was kept, "
            f"and the last checkpoint ({kept or 'none yet'}) is intact. Free some space (train.keep_last "
            "prunes old checkpoints) or point run.out_dir at a larger disk, then rerun to resume."
        )
    if isinstance(err, PermissionError) or (isinstance(err, OSError) and err.errno == errno.EROFS):
        return CheckpointError(f"cannot write checkpoint {name} into {root}: {err.strerror}")
    return err


def begin_checkpoint(root: Path, step: int) -> Path:
    """Make the empty temporary folder that the files of checkpoint `step` are written into."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(root)
        tmp = tmp_dir(root, step)
        tmp.mkdir()
    except OSError as err:
        raise write_error(err, root, step_dir_name(step)) from err
    return tmp


def write_checkpoint_files(
    tmp: Path,
    weights: dict[str, Tensor],
    model_config: dict,
    train_state: Optional[dict],
    metrics: Optional[dict[str, float]] = None,
    assets: Optional[dict[str, bytes]] = None,
) -> None:
    """Write the single-writer files of a checkpoint into `tmp` (rank 0's part).

    `weights`: flat state dict of all networks, keys already prefixed ("G.", "D.", "G_ema."), full tensors.
    `model_config`: JSON-serialisable dict, enough to rebuild the networks (config.json).
    `train_state`: everything else needed to continue bit-for-bit (None for a model folder). It is read back with
    torch.load(weights_only=True), so it may hold only tensors, int, float, bool, str, bytes, None,
    torch.dtype / torch.device / torch.Size, and lists, tuples and dicts (str or int keys) of these.
    Anything else (numpy arrays or scalars, custom objects) raises TypeError here, naming the entry.
    `metrics`: optional {name: value}, written to metrics.json (update_best reads it).
    `assets`: optional {relative path: bytes}, files the model needs beside its weights (a tokenizer).
    """
    if train_state is not None:
        _check_weights_only(train_state, "train_state")
    try:
        config_text = json.dumps(model_config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"model_config is not JSON-serialisable: {err}") from err
    tensors = _own_storage(weights)
    # One metadata key only: safetensors writes metadata from a hash map in no fixed order, so a second key
    # would make two saves of the same weights differ byte for byte. The step is in the folder name.
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    fsync_path(tmp / MODEL_FILE)
    _write_file(tmp / CONFIG_FILE, lambda f: f.write(config_text + "\n"), mode="w")
    if train_state is not None:  # a model folder (import, export) has none
        _write_file(tmp / TRAIN_STATE_FILE, lambda f: torch.save(train_state, f))
    for rel, data in (assets or {}).items():
        target = tmp / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts or rel in (MODEL_FILE, CONFIG_FILE, TRAIN_STATE_FILE):
            raise ValueError(f"asset name {rel!r} must be a new relative path inside the checkpoint")
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_file(target, lambda f, data=data: f.write(data))
    if metrics is not None:
        text = json.dumps({k: float(v) for k, v in metrics.items()}, indent=2, sort_keys=True)
        _write_file(tmp / METRICS_FILE, lambda f: f.write(text + "\n"), mode="w")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksummed_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name not in (CHECKSUMS_FILE, METRICS_FILE)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _write_checksums(folder: Path) -> None:
    """checksums.json over every file of `folder`, then fsync the folder tree: ready to be renamed."""
    sums = {p.relative_to(folder).as_posix(): _sha256(p) for p in _checksummed_files(folder)}
    _write_file(folder / CHECKSUMS_FILE, lambda f: f.write(json.dumps(sums, indent=2, sort_keys=True) + "\n"),
                mode="w")
    for sub in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        fsync_path(sub)


def write_model_folder(folder: Path, weights: dict[str, Tensor], model_config: dict,
                       assets: Optional[dict[str, bytes]] = None, provenance_record: Optional[dict] = None) -> Path:
    """A model folder for users and `vistrain sample` (imported or exported weights): model.safetensors,
    config.json, provenance.json (`provenance_record`, see vistrain/provenance.py) and checksums.json, appearing
    only when complete. Refuses a folder that is not empty."""
    return write_new_folder(folder, lambda tmp: write_checkpoint_files(tmp, weights, model_config, None, assets=assets),
                            provenance_record)


def write_new_folder(folder: Path, fill: Callable[[Path], None], provenance_record: Optional[dict] = None) -> Path:
    """A new folder that appears only complete: `fill(tmp)` writes its files into a temporary folder beside it,
    provenance.json (`provenance_record`) and checksums.json are added, and the folder is renamed into place.
    Refuses a folder that is not empty."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckpointError(f"{folder} already exists and is not an empty folder; choose a new --out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if provenance_record is not None:
            _write_file(tmp / provenance.FILE, lambda f: f.write(provenance.to_bytes(provenance_record)))
        _write_checksums(tmp)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.replace(tmp, folder)
        fsync_path(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def commit_checkpoint(root: Path, step: int) -> Path:
    """Checksum every file of the temporary folder, make it durable, rename it to `step_*`, move `latest`."""
    root = Path(root)
    tmp, name = tmp_dir(root, step), step_dir_name(step)
    final = root / name
    try:
        _write_checksums(tmp)
        if final.exists():
            # A run restarted from an earlier checkpoint reached this step again. os.replace cannot overwrite
            # a non-empty folder: move the old one aside first. Between the two renames the step folder is
            # briefly absent; a crash then leaves `latest` naming a missing folder, which is reported clearly.
            old = root / f"{TMP_PREFIX}old-{name}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
        write_atomic(root / LATEST_FILE, name + "\n")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise write_error(err, root, name) from err
        raise
    return final


def abort_checkpoint(root: Path, step: int) -> None:
    """Remove the temporary folder of a checkpoint that failed part-way."""
    shutil.rmtree(tmp_dir(Path(root), step), ignore_errors=True)


def finish_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, Tensor],
    model_config: dict,
    train_state: dict,
    metrics: Optional[dict[str, float]] = None,
    assets: Optional[dict[str, bytes]] = None,
) -> Path:
    """Rank 0's part after begin_checkpoint (and any shards): write its files, then commit the folder.

    A failure removes the temporary folder, so nothing of this checkpoint is left; the previous is intact.
    """
    try:
        write_checkpoint_files(tmp_dir(Path(root), step), weights, model_config, train_state, metrics, assets)
    except BaseException as err:
        abort_checkpoint(root, step)
        if isinstance(err, Exception):
            raise write_error(err, Path(root), step_dir_name(step)) from err
        raise
    return commit_checkpoint(root, step)


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, Tensor],
    model_config: dict,
    train_state: dict,
    metrics: Optional[dict[str, float]] = None,
) -> Path:
    """Write `root/step_XXXXXXXX/` atomically as the only writer, point `root/latest` at it, return it.

    See write_checkpoint_files for what may go in. Refused input raises before anything is written.
    """
    _check_weights_only(train_state, "train_state")
    begin_checkpoint(root, step)
    return finish_checkpoint(root, step, weights, model_config, train_state, metrics)


# ----------------------------------------------------------------------------------------------------
# best / prune


def _read_metric(ckpt: Path, metric_name: str) -> Optional[float]:
    try:
        value = json.loads((ckpt / METRICS_FILE).read_text(encoding="utf-8"))[metric_name]
        return float(value)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def merge_metrics(ckpt: Path, metrics: dict[str, float]) -> None:
    """Add `metrics` to checkpoint folder `ckpt`'s metrics.json (replacing values of the same name)."""
    try:
        known = json.loads((ckpt / METRICS_FILE).read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    known.update({k: float(v) for k, v in metrics.items()})
    write_atomic(ckpt / METRICS_FILE, json.dumps(known, indent=2, sort_keys=True) + "\n")


def update_best(root: Path, ckpt: Path, metric_name: str, value: float, mode: str = "min") -> bool:
    """Point `root/best` at `ckpt` if `value` beats the current best (lower for mode "min", higher for
    "max") or if there is no usable best yet. Returns whether `best` changed.

    The previous best value is read from the metrics.json of the folder `best` names; a best whose
    folder or metric is gone is treated as absent. `value` is merged into ckpt's metrics.json when it is
    not there yet, so the next comparison can read it. A NaN value never becomes best.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"best checkpoint mode must be 'min' or 'max', got {mode!r}")
    root, ckpt = Path(root), Path(ckpt)
    if not (root / ckpt.name).is_dir() or _step_of(ckpt.name) is None:
        raise CheckpointError(
            f"update_best: {ckpt} is not a step_* checkpoint folder inside {root}; pass the path that "
            "save_checkpoint returned."
        )
    value = float(value)
    if math.isnan(value):
        return False

    if _read_metric(root / ckpt.name, metric_name) != value:
        merge_metrics(root / ckpt.name, {metric_name: value})

    best_name = _read_pointer(root, BEST_FILE)
    previous = _read_metric(root / best_name, metric_name) if best_name else None
    if previous is not None and not math.isnan(previous):
        better = value < previous if mode == "min" else value > previous
        if not better:
            return False
    write_atomic(root / BEST_FILE, ckpt.name + "\n")
    return True


def prune_checkpoints(root: Path, keep_last: int, keep: frozenset[str] = frozenset()) -> list[Path]:
    """Delete all but the newest `keep_last` step folders (by step number); the folders named by
    `best` and `latest`, and those in `keep` (say, awaiting an eval job), are always kept. keep_last <= 0
    keeps everything. Returns the deleted paths.

    Each folder is first renamed to a `.tmp-*` name, so a crash mid-delete never leaves a partial
    `step_*` folder behind (the next save removes the remainder).
    """
    root = Path(root)
    if keep_last <= 0:
        return []
    keep = {p.name for p in _step_dirs(root)[-keep_last:]} | set(keep)
    keep.update(n for n in (_read_pointer(root, BEST_FILE), _read_pointer(root, LATEST_FILE)) if n)
    deleted = []
    for path in _step_dirs(root):
        if path.name in keep:
            continue
        doomed = root / f"{TMP_PREFIX}del-{path.name}-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    return deleted


# ----------------------------------------------------------------------------------------------------
# finding a checkpoint


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The folder `root/latest` names, or None when there is no checkpoint yet.

    Without a `latest` file (a crash right after the folder rename) the newest step folder is used:
    step folders only ever appear complete. `latest` naming a missing folder raises CheckpointError.
    """
    root = Path(root)
    found = _pointed_checkpoint(root, LATEST_FILE)
    if found is None:
        dirs = _step_dirs(root)
        return dirs[-1] if dirs else None
    return found


def _pointed_checkpoint(root: Path, pointer: str) -> Optional[Path]:
    """The folder `root/<pointer>` names (e.g. `best`), None without that file."""
    name = _read_pointer(root, pointer)
    if name is None:
        return None
    path = root / name
    if not path.is_dir():
        raise CheckpointError(
            f"{root / pointer} names checkpoint folder {path}, which does not exist (deleted, or "
            "the run was interrupted while replacing it)."
        )
    return path


def find_checkpoint(path: Path, which: str = LATEST_FILE) -> Path:
    """A step folder from a step, checkpoints or run folder; `which` (latest | best) picks for the latter."""
    if which not in (LATEST_FILE, BEST_FILE):
        raise ValueError(f"which={which!r}: expected {LATEST_FILE!r} or {BEST_FILE!r}")
    return _checkpoint_in(Path(path), str(path), pointer=which)


def _is_step_dir(path: Path) -> bool:
    return _step_of(path.name) is not None or (path / MODEL_FILE).exists() or (
        path / TRAIN_STATE_FILE
    ).exists()


def _checkpoint_in(path: Path, asked: str, pointer: str = LATEST_FILE, advice: str = "") -> Path:
    """Resolve a user-given path (step folder, checkpoints folder, run folder or a file inside a step
    folder) to a step folder; for a run or checkpoints folder, the one `pointer` (latest | best) names."""
    if not path.exists():
        raise CheckpointError(
            f"{asked}: {path} does not exist. Give a run folder, its checkpoints/ folder or a step_* "
            f"folder{advice}."
        )
    if path.is_file():
        if _is_step_dir(path.parent):
            return path.parent
        raise CheckpointError(f"{asked}: {path} is a file; give the step_* folder that holds it.")
    if _is_step_dir(path):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = latest_checkpoint(root) if pointer == LATEST_FILE else _pointed_checkpoint(root, pointer)
    if found is None:
        raise CheckpointError(
            f"{asked}: no checkpoint found in {root}; give a run folder that has checkpoints, or a step_* "
            "folder."
        )
    return found


def resolve_resume(out_dir: Path, resume: str) -> Optional[Path]:
    """The checkpoint folder to resume from, per `run.resume`:
    "never" -> None; "auto" -> the latest under `out_dir/checkpoints`, None if there is none yet;
    a path -> that step folder, or the latest checkpoint of a run folder or checkpoints folder.
    """
    choice = str(resume).strip()
    if choice.lower() == "never":
        return None
    if choice.lower() == "auto":
        return latest_checkpoint(Path(out_dir) / "checkpoints")
    if not choice:
        raise CheckpointError("run.resume is empty; use auto, never, or the path of a checkpoint.")
    return _checkpoint_in(Path(choice).expanduser(), f"run.resume={choice}",
                          advice=", or use run.resume=auto / run.resume=never")


# ----------------------------------------------------------------------------------------------------
# loading (never deletes or rewrites anything)


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint file {path} is incomplete or corrupt ({type(err).__name__}: {err})."
    )


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} is missing.")
    return path


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint folder {path} does not exist.")
    return path


def damaged_files(ckpt: Path, only: Optional[tuple[str, ...]] = None) -> list[tuple[str, str]]:
    """(file, what is wrong) for the files of `ckpt` that differ from checksums.json (all, or those in `only`);
    empty when all match."""
    listing = ckpt / CHECKSUMS_FILE
    try:
        sums = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        sums = None
    if not isinstance(sums, dict):
        return [(CHECKSUMS_FILE, "is missing or unreadable (the checkpoint was not completely written)")]
    damaged = []
    for rel, digest in sorted(sums.items()):
        if only is not None and rel not in only:
            continue
        path = ckpt / rel
        if not path.is_file():
            damaged.append((rel, "is missing"))
        elif _sha256(path) != digest:
            damaged.append((rel, "is corrupt: its bytes differ from the checksum recorded when it was written "
                                 "(truncated, damaged on disk, or edited)"))
    return damaged


def newest_intact_checkpoint(root: Path, skip: Path) -> Optional[Path]:
    """The newest step folder under `root` other than `skip` whose files all match their checksums."""
    for ckpt in reversed(_step_dirs(Path(root))):
        if ckpt.name != Path(skip).name and not damaged_files(ckpt):
            return ckpt
    return None


def verify_checkpoint(ckpt: Path, only: Optional[tuple[str, ...]] = None) -> None:
    """Raise CheckpointError naming the first damaged file and the newest intact checkpoint, if any.

    A model folder written by a model's own save_pretrained (no train_state.pt, no checksums.json) has nothing
    to verify against and passes; a training checkpoint always has its checksums.
    """
    ckpt = _require_dir(Path(ckpt))
    if not (ckpt / CHECKSUMS_FILE).exists() and not (ckpt / TRAIN_STATE_FILE).exists():
        return
    damaged = damaged_files(ckpt, only)
    if not damaged:
        return
    rel, what = damaged[0]
    intact = newest_intact_checkpoint(ckpt.parent, skip=ckpt)
    advice = f"The newest intact checkpoint is {intact}." if intact else "No intact checkpoint is left beside it."
    raise CheckpointError(f"Checkpoint file {ckpt / rel} {what}. {advice}")


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    try:
        return load_file(str(_require_file(path)), device=device)
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError, plus OSError
        raise _corrupt(path, err) from err


def _load_json(path: Path) -> dict:
    try:
        value = json.loads(_require_file(path).read_text(encoding="utf-8"))
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise _corrupt(path, err) from err
    if not isinstance(value, dict):
        raise _corrupt(path, ValueError(f"expected a JSON object, found {type(value).__name__}"))
    return value


def load_train_state(path: Path, map_location: Union[str, torch.device] = "cpu") -> dict:
    """train_state.pt of a step folder, read with weights_only=True."""
    state_path = _require_file(Path(path) / TRAIN_STATE_FILE)
    try:
        train_state = torch.load(state_path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, or objects weights_only refuses
        raise _corrupt(state_path, err) from err
    if not isinstance(train_state, dict):
        raise _corrupt(state_path, ValueError(f"expected a dict, found {type(train_state).__name__}"))
    return train_state


def load_checkpoint(
    path: Path, map_location: Union[str, torch.device] = "cpu"
) -> tuple[dict[str, Tensor], dict, dict]:
    """Verify and read a step folder: (weights, model_config, train_state). Any missing, truncated, corrupt
    or altered file raises CheckpointError naming that file."""
    path = _require_dir(Path(path))
    verify_checkpoint(path)
    weights = load_safetensors(path / MODEL_FILE, device=str(torch.device(map_location)))
    return weights, _load_json(path / CONFIG_FILE), load_train_state(path, map_location)


def load_weights(path: Path, which: str = LATEST_FILE) -> dict[str, Tensor]:
    """Only the weights (model.safetensors) of a checkpoint, verified, on CPU: for sampling and for users.
    `path` may be a step folder, a checkpoints folder or a run folder (`which` picks latest or best)."""
    ckpt = find_checkpoint(Path(path), which)
    verify_checkpoint(ckpt, only=(MODEL_FILE,))
    return load_safetensors(ckpt / MODEL_FILE)


def load_model_config(path: Path, which: str = LATEST_FILE) -> dict:
    """config.json of a checkpoint (step, checkpoints or run folder), verified: enough to rebuild the model."""
    ckpt = find_checkpoint(Path(path), which)
    verify_checkpoint(ckpt, only=(CONFIG_FILE,))
    return _load_json(ckpt / CONFIG_FILE)

"""The Checkpointer: gathers and restores the whole run state, in one place, for any parallelism (the folder
format it writes through is engine/checkpoint_files.py).

Networks and optimizers go through torch.distributed.checkpoint's state-dict helpers (get / set model and
optimizer state dicts), the same code for a plain network, DDP and FSDP2; their keys are the plain model's
parameter names. What lands where:

    model.safetensors    full weights of every network that is part of the run (all but `external` ones),
                         gathered to rank 0: what users and `vistrain sample` load
    train_state.pt       step, seed, every rank's RNG, task counters and data position, GradScalers, the
                         optimizers' param groups -- and, unless sharded, the optimizers' state
    train_state/         under FSDP: the optimizers' state as each rank's shards (torch.distributed.checkpoint);
                         it reshards on load, so a run saved on 2 ranks resumes on 1 and vice versa

With `async_save` the state is copied to host memory on the training thread, and the files are written by a
background thread: the next step does not wait for the disk. One save is in flight at a time; the atomic
rules of checkpoint_files.py hold either way (a folder appears only complete, `latest` moves only then).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext, barrier, broadcast_object

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _host_copy(tree: Any) -> Any:
    """`tree` with every tensor copied to host memory: a snapshot that training cannot change any more."""
    if isinstance(tree, Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _host_copy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(v) for v in tree)
    return tree


class Checkpointer:
    def __init__(
        self,
        root: Path,
        dist_ctx: DistContext,
        nets: dict[str, nn.Module],
        saved: tuple[str, ...],
        optimizers: dict[str, tuple[torch.optim.Optimizer, str]],  # name -> (optimizer, network it steps)
        scalers: dict[str, Optional[torch.amp.GradScaler]],
        sharded: bool,
        async_save: bool,
        keep_last: int,
        protected: Callable[[], set[str]] = set,
    ) -> None:
        """`protected()` names checkpoint folders that pruning must keep for now (eval jobs still read them)."""
        self.root = Path(root)
        self.dist = dist_ctx
        self.nets, self.saved = nets, saved
        self.optimizers, self.scalers = optimizers, scalers
        self.sharded, self.async_save, self.keep_last = sharded, async_save, keep_last
        self.protected = protected
        # `best` is moved by the save thread and, for eval job results, by the training thread: one at a time
        self._best_lock = threading.Lock()
        # Sharded saves run collectives; in the background they get a gloo group of their own, so they never
        # interleave with the training thread's collectives.
        self._group = dist.new_group(backend="gloo") if sharded and dist.is_initialized() else None
        self._pending: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.last_saved: Optional[Path] = None
        # Metrics of a checkpoint whose save is still in flight (its eval ran after the save began): the save
        # thread records them once the folder is committed. Both guarded by _best_lock.
        self._in_flight: Optional[Path] = None
        self._late_metrics: Optional[tuple[dict[str, float], Optional[tuple[str, str]]]] = None

    # ------------------------------------------------------------------------------------------- saving

    def save(self, step: int, run_state: dict, model_config: dict, metrics: Optional[dict[str, float]],
             best: Optional[tuple[str, str]], assets: Optional[dict[str, bytes]] = None) -> Path:
        """Write checkpoint `step` (all ranks call this); returns its path (being written, if async)."""
        self.wait()
        main = self.dist.is_main
        weights = self._weights(copy=self.async_save) if main or self.sharded else {}
        optim_states, shards = self._optimizer_states(copy=self.async_save)
        train_state = dict(run_state)
        train_state["optimizers"] = optim_states
        train_state["scalers"] = {n: (s.state_dict() if s is not None else {}) for n, s in self.scalers.items()}
        train_state["sharded"] = self.sharded

        if main:
            ckpt_lib.begin_checkpoint(self.root, step)
        future: Optional[Future] = None
        if self.sharded:
            import torch.distributed.checkpoint as dcp

            barrier(self.dist)  # the temporary folder exists before any rank writes into it
            target = ckpt_lib.tmp_dir(self.root, step) / ckpt_lib.SHARDS_DIR
            if self.async_save:  # stages (copies) the shards now, writes them in the background
                future = dcp.async_save(shards, checkpoint_id=str(target), process_group=self._group)
            else:
                dcp.save(shards, checkpoint_id=str(target), process_group=self._group)

        def finish() -> None:
            if future is not None:
                future.result()  # on rank 0: every rank's shards and the metadata are written
            if main:
                self._write_and_commit(step, weights, model_config, train_state, metrics, best, assets)

        path = self.root / ckpt_lib.step_dir_name(step)
        if main:
            with self._best_lock:
                self._in_flight, self._late_metrics = path, None
        if self.async_save:
            self._pending = threading.Thread(target=self._background, args=(finish,), daemon=True,
                                             name=f"checkpoint-{step}")
            self._pending.start()
        else:
            finish()
            barrier(self.dist)
        self.last_saved = path
        return path

    def _background(self, finish) -> None:
        try:
            finish()
        except BaseException as err:  # reported by the next wait(), on the training thread
            self._error = err

    def _write_and_commit(self, step, weights, model_config, train_state, metrics, best, assets) -> None:
        try:
            path = ckpt_lib.finish_checkpoint(self.root, step, weights, model_config, train_state, metrics, assets)
        except BaseException:
            with self._best_lock:
                self._in_flight = self._late_metrics = None
            raise
        with self._best_lock:
            self._in_flight, late = None, self._late_metrics
            if best is not None and metrics and best[0] in metrics:
                ckpt_lib.update_best(self.root, path, best[0], metrics[best[0]], mode=best[1])
            if late is not None:
                self._record(path, *late)
            ckpt_lib.prune_checkpoints(self.root, self.keep_last, keep=frozenset(self.protected()))

    def record_metrics(self, path: Path, metrics: dict[str, float], best: Optional[tuple[str, str]]) -> None:
        """Eval metrics of checkpoint `path`, measured after its save began (the trainer saves a step before
        evaluating it, so a crash in eval never loses the step): merged into its metrics.json and offered for
        `best`, now or, while its save is in flight, as soon as it is committed. The main rank only."""
        with self._best_lock:
            if self._in_flight == path:
                self._late_metrics = (metrics, best)
                return
            if path.is_dir():
                self._record(path, metrics, best)

    def _record(self, path: Path, metrics: dict[str, float], best: Optional[tuple[str, str]]) -> None:
        ckpt_lib.merge_metrics(path, metrics)
        if best is not None and best[0] in metrics:
            ckpt_lib.update_best(self.root, path, best[0], metrics[best[0]], mode=best[1])

    def update_best(self, path: Path, metric: str, value: float, mode: str) -> bool:
        """Offer a metric that arrived later (an eval job's) for `best`; the main rank only."""
        with self._best_lock:
            if not path.is_dir():
                return False  # pruned meanwhile (it was not best then, nor protected)
            return ckpt_lib.update_best(self.root, path, metric, value, mode=mode)

    def wait(self) -> None:
        """Finish the save in flight, if any; a failure of it is raised here."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
            if self.async_save:
                barrier(self.dist)
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _weights(self, copy: bool) -> dict[str, Tensor]:
        weights = {}
        for name in self.saved:
            state = get_model_state_dict(self.nets[name], options=_FULL)  # a collective under FSDP
            if self.dist.is_main:
                state = _host_copy(state) if copy else state
                weights.update({f"{name}.{key}": value for key, value in state.items()})
        return weights

    def _optimizer_states(self, copy: bool) -> tuple[dict, dict]:
        """(what goes into train_state.pt, what goes into the shard folder) for every optimizer."""
        states, shards = {}, {}
        for name, (opt, net) in self.optimizers.items():
            if not opt.state:
                # Never stepped (say, a lazy phase not reached yet). The state-dict helper would initialise the
                # state with a zero step, which changes Adam's bias correction; keep it lazy instead.
                states[name] = {"fresh": True}
                continue
            if not (self.sharded or self.dist.is_main):
                continue
            osd = get_optimizer_state_dict(self.nets[net], opt)
            if self.sharded:
                shards[name] = osd["state"]
                states[name] = {"param_groups": osd["param_groups"]}
            else:
                states[name] = _host_copy(osd) if copy else osd
        return states, shards

    # ------------------------------------------------------------------------------------------ loading

    def load(self, path: Path) -> dict:
        """Restore networks, optimizers and scalers from checkpoint `path` (verified with
        verify_on_main_rank); return the rest of its state. Every rank calls this."""
        path = Path(path)
        train_state = ckpt_lib.load_train_state(path)
        weights = ckpt_lib.load_safetensors(path / ckpt_lib.MODEL_FILE)
        for name in self.saved:
            prefix = name + "."
            own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            _check_matches(self.nets[name], own, name, path)
            set_model_state_dict(self.nets[name], own, options=StateDictOptions(full_state_dict=True))
        del weights
        self._load_optimizers(path, train_state)
        for name, scaler in self.scalers.items():
            if scaler is not None and train_state["scalers"].get(name):
                scaler.load_state_dict(train_state["scalers"][name])
        return train_state

    def _load_optimizers(self, path: Path, train_state: dict) -> None:
        saved = train_state["optimizers"]
        missing = [name for name in self.optimizers if name not in saved]
        if missing:
            raise ckpt_lib.CheckpointError(f"checkpoint {path} has no state for optimizer(s) {missing}")
        stepped = {name: pair for name, pair in self.optimizers.items() if not saved[name].get("fresh")}
        # Not strict: a parameter that has never had a gradient (a quantizer's residual that the model's scales
        # never use, say) has no optimizer state to save, and gets none back. The weights' own keys are checked.
        lenient = StateDictOptions(strict=False)
        if (path / ckpt_lib.SHARDS_DIR).is_dir():
            import torch.distributed.checkpoint as dcp

            # The template's layout (sharded or full) is this run's; DCP reshards the saved shards into it.
            template = {name: get_optimizer_state_dict(self.nets[net], opt)["state"]
                        for name, (opt, net) in stepped.items()}
            dcp.load(template, checkpoint_id=str(path / ckpt_lib.SHARDS_DIR), process_group=self._group)
            for name, (opt, net) in stepped.items():
                osd = {"state": template[name], "param_groups": saved[name]["param_groups"]}
                set_optimizer_state_dict(self.nets[net], opt, osd, options=lenient)
        else:
            for name, (opt, net) in stepped.items():
                set_optimizer_state_dict(self.nets[net], opt, saved[name],
                                         options=StateDictOptions(full_state_dict=True, strict=False))


def verify_on_main_rank(path: Path, dist_ctx: DistContext) -> None:
    """Rank 0 checks every file of checkpoint `path` against its checksum (reading it all once, not once per
    rank); a damaged file raises the same CheckpointError, naming it, on every rank."""
    problem = None
    if dist_ctx.is_main:
        try:
            ckpt_lib.verify_checkpoint(path)
        except ckpt_lib.CheckpointError as err:
            problem = str(err)
    problem = broadcast_object(problem, dist_ctx)
    if problem:
        raise ckpt_lib.CheckpointError(problem)


def _check_matches(net: nn.Module, weights: dict[str, Tensor], name: str, path: Path) -> None:
    """Refuse weights of another architecture, listing the first differences instead of a cut-off trace."""
    expected = {k: tuple(v.shape) for k, v in get_model_state_dict(net).items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: checkpoint {given[k]} vs model {expected[k]}" for k in expected
              if k in given and given[k] != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing in the checkpoint", missing), ("not in the model", unexpected),
                         ("of another shape", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{len(items)} key(s) {label}: {', '.join(items[:5])}{more}")
    raise ckpt_lib.CheckpointError(
        f"checkpoint {path} does not match network {name!r} of this config (was the model config changed?): "
        + "; ".join(parts)
    )

"""The one training loop under every task.

Per step the trainer runs the task's phases in order. Each phase step draws its micro-batches with `next()`,
runs forward and backward on each (gradient sync only on the last), divides the gradients by the count of
units summed over micro-batches and ranks, clips, and steps the optimizer -- or skips the step when the
loss or gradients are not finite, a decision every rank shares. Around that: schedules, metrics,
evaluation, checkpoints (one Checkpointer), exact resume and preemption.

Bit-exact resume rests on three things: the data streams are pure functions of (seed, position) and their
positions are saved, every sample's augmentation is seeded by its key rather than by a worker's RNG, and
every rank's global RNG state is saved with the checkpoint and restored before the next step.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor

from vistrain import provenance
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine import config_sections as engine_config
from vistrain.engine.checkpointer import Checkpointer, verify_on_main_rank
from vistrain.engine.dist import DistContext, all_reduce_sum, any_rank, broadcast_object, gather_objects
from vistrain.engine.evaljobs import EvalCommand, EvalJobs, LocalLauncher, SlurmLauncher
from vistrain.engine.images import save_png
from vistrain.engine.loggers import LoggerGroup, build_loggers
from vistrain.engine.meters import DeviceTimer, MetricAccumulator, device_peak_tflops, peak_memory_mb
from vistrain.engine.optim import apply_schedule, build_optimizer, freeze_zero_lr
from vistrain.engine.parallel import Parallel
from vistrain.engine.precision import Precision
from vistrain.engine.rng import capture_rng_state, restore_rng_state, seed_everything
from vistrain.engine.rundir import RunDir, holds_a_run, write_text_atomic
from vistrain.engine.task import Phase, Task, TaskEnv, to_device
from vistrain.errors import ConfigError

# Exit status after a preemption checkpoint: EX_TEMPFAIL, which schedulers can be told to requeue on.
EXIT_REQUEUE = 75


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived; a checkpoint of the last finished step was written."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: saved {checkpoint}; rerun the same command to continue")
        self.checkpoint = checkpoint


class AlreadyDone(Exception):
    """The run folder's checkpoint is at or past train.max_steps: there is nothing to train."""


class DataExhausted(Exception):
    """A finite data stream ran out on some rank; every rank stops at the same step."""


class Trainer:
    def __init__(self, cfg: Any, build_task: Callable[[TaskEnv], Task], dist_ctx: DistContext,
                 eval_command: Optional[EvalCommand] = None):
        """`cfg` names its `task` and has the engine's `run` and `train` sections, optionally `eval` (and the
        task's own sections, which only the task reads); `build_task` makes the task once the seed is set;
        `eval_command(checkpoint, result_file)` is the command line of an eval job (eval.mode local | slurm)."""
        self.eval_cfg = getattr(cfg, "eval", None)
        engine_config.validate(cfg.run, cfg.train, self.eval_cfg)
        self.cfg = cfg
        self._eval_command = eval_command
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.accum = engine_config.gradient_accumulation(
            cfg.train.batch_size, cfg.train.micro_batch_size, dist_ctx.world_size
        )
        self.micro_batch_size = cfg.train.batch_size // (dist_ctx.world_size * self.accum)
        self.precision = Precision(cfg.train.precision, self.device)
        self.run_dir = RunDir(self.out_dir)
        if dist_ctx.is_main:
            self.run_dir.acquire()
        try:
            self._start(build_task)
        except BaseException:
            self.run_dir.release(failed=True)  # a start that fails leaves the folder as it was
            raise

    # ----------------------------------------------------------------------------------------- set-up

    def _start(self, build_task: Callable[[TaskEnv], Task]) -> None:
        cfg = self.cfg
        resume_path = ckpt_lib.resolve_resume(self.out_dir, cfg.run.resume)
        if str(cfg.run.resume).strip().lower() == "never" and holds_a_run(self.out_dir):
            raise ConfigError(
                f"run.resume=never, but run.out_dir={self.out_dir} holds a run (config.yaml, metrics or "
                "checkpoints), which a new run would overwrite. Continue it with run.resume=auto, start the "
                "new run in another run.out_dir, or delete that folder yourself."
            )
        saved = self._read_resume_state(resume_path) if resume_path else None
        self.seed = self._resolve_seed(saved, resume_path)
        cfg.run.seed = self.seed

        # The same seed on every rank while building, so every rank starts from identical weights.
        seed_everything(self.seed)
        env = TaskEnv(dist=self.dist, seed=self.seed, max_steps=cfg.train.max_steps,
                      batch_size=cfg.train.batch_size, micro_batch_size=self.micro_batch_size,
                      out_dir=self.out_dir, resume_from=resume_path)
        self.task = task = build_task(env)
        self._check_task(task)

        for spec in task.optimizers.values():
            freeze_zero_lr(task.nets[spec.net], spec.config)
        ev = self.eval_cfg
        # the metric that picks `best`: eval.best when set, else the task's choice
        self.best = (ev.best, ev.best_mode) if ev is not None and ev.best else task.best_metric
        self.eval_jobs = self._build_eval_jobs()
        # What makes this run, for the checkpoints' provenance.json, collected now: the code as it was loaded, not as
        # the checkout may be by the first save. Every rank names its device (a collective).
        devices = provenance.device_counts(gather_objects(provenance.device_name(self.device), self.dist))
        best = {"name": self.best[0], "mode": self.best[1]} if self.best else None
        self._provenance = provenance.collect("train", world_size=self.dist.world_size, devices=devices,
                                              best_metric=best) if self.dist.is_main else {}
        self.parallel = Parallel(task.nets, task.trainable, cfg.train, self.dist)
        self.optimizers = {name: build_optimizer(task.nets[spec.net], spec.config)
                           for name, spec in task.optimizers.items()}
        self.scalers = {name: self.precision.make_scaler() for name in task.optimizers}
        # Parameters each optimizer owns; only these are ever switched back to requires_grad=True.
        self._params = {name: [p for g in opt.param_groups for p in g["params"]]
                        for name, opt in self.optimizers.items()}
        self._trains = {phase.name: (task.optimizers[phase.optimizer].net,) for phase in task.phases}
        self.checkpointer = Checkpointer(
            self.ckpt_root, self.dist, task.nets,
            saved=tuple(name for name in task.nets if name not in task.external),
            optimizers={name: (opt, task.optimizers[name].net) for name, opt in self.optimizers.items()},
            scalers=self.scalers, sharded=self.parallel.fsdp, async_save=cfg.train.async_checkpoint,
            keep_last=cfg.train.keep_last,
            protected=self.eval_jobs.protected if self.eval_jobs is not None else set,
        )

        self.step = 0
        self.nonfinite_streak = 0
        if resume_path is not None:
            self._restore(resume_path)
        else:  # noise, dropout and augmentation differ per rank: seed + rank (restored exactly on resume)
            seed_everything(self.seed + self.dist.rank)

        self.metrics = MetricAccumulator()
        self._schedule_values: dict[str, float] = {}
        self._loggers: Optional[LoggerGroup] = None  # built at the first log event: a failed start writes nothing
        self._stop_requested = False
        self._last_eval: Optional[tuple[int, dict]] = None
        self._drawn: dict[str, list[Any]] = {}
        self._fwd_bwd = DeviceTimer(self.device)
        self._window_steps = 0
        self._peak_tflops = cfg.train.peak_tflops or device_peak_tflops(self.device, cfg.train.precision)

    def _build_eval_jobs(self) -> Optional[EvalJobs]:
        """The eval jobs beside training (eval.mode local | slurm), on the main rank; None otherwise."""
        ev = self.eval_cfg
        if ev is None or ev.mode == "sync" or not self.dist.is_main:
            return None
        if self._eval_command is None:
            raise ConfigError(f"eval.mode={ev.mode}: this trainer was built without an eval command (the "
                              "`vistrain train` command gives one); pass eval_command, or set eval.mode=sync")
        if ev.mode == "local":
            # training on the CPU shares its cores with the jobs: one thread each keeps them from fighting
            launcher, poll_every_s = LocalLauncher(threads=1 if self.device.type == "cpu" else None), 1.0
        else:  # slurm: state queries go to the scheduler, so ask less often
            launcher, poll_every_s = SlurmLauncher(self.out_dir / "eval" / "slurm", ev.slurm, ev.slurm.cluster), 10.0
        return EvalJobs(self.out_dir, self._eval_command, launcher, ev.max_jobs, self._log_eval_result,
                        poll_every_s=poll_every_s)

    def _log_eval_result(self, step: int, checkpoint: Path, metrics: dict) -> None:
        """An eval job's results: logged at the step of the checkpoint it evaluated, offered for `best`."""
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.loggers.log_metrics(step, "eval", values)
        if self.best is not None and self.best[0] in values:
            metric, mode = self.best
            if self.checkpointer.update_best(checkpoint, metric, values[metric], mode):
                print(f"best is now {checkpoint.name} ({metric} {values[metric]:.4g})", flush=True)

    def _read_resume_state(self, path: Path) -> dict:
        """Verify the checkpoint (every file against its checksum) and read its small train state."""
        try:
            verify_on_main_rank(path, self.dist)
            state = ckpt_lib.load_train_state(path)
            saved_task = ckpt_lib.load_model_config(path).get("task")
        except ckpt_lib.CheckpointError as err:
            raise ckpt_lib.CheckpointError(f"{err} {_RESUME_ADVICE}") from None
        if saved_task != self.cfg.task:
            raise ckpt_lib.CheckpointError(
                f"{path} is a checkpoint of task {saved_task!r}, and this config trains task {self.cfg.task!r}: "
                f"point run.resume at a checkpoint of task {self.cfg.task!r}, or train with the config of that run."
            )
        if int(state["step"]) >= self.cfg.train.max_steps:
            raise AlreadyDone(
                f"{path} is at step {int(state['step'])}, and train.max_steps={self.cfg.train.max_steps}: the run "
                "is already there, nothing was changed. Raise train.max_steps to train further."
            )
        return state

    def _resolve_seed(self, saved: Optional[dict], path: Optional[Path]) -> int:
        seed = self.cfg.run.seed
        if saved is not None:
            if seed != "random" and int(seed) != int(saved["seed"]):
                raise ConfigError(
                    f"run.seed={seed}, but {path} was trained with run.seed={saved['seed']}; a resumed run keeps "
                    f"its seed (data order and random streams depend on it). Set run.seed={saved['seed']}, or "
                    "start a new run in another run.out_dir."
                )
            return int(saved["seed"])
        if seed == "random":
            drawn = int(torch.randint(0, 10_000, ()).item()) if self.dist.is_main else None
            return int(broadcast_object(drawn, self.dist))
        return int(seed)

    def _check_task(self, task: Task) -> None:
        kind = type(task).__name__
        for attribute in ("nets", "optimizers", "phases"):
            if not isinstance(getattr(task, attribute, None), (dict, list)):
                raise ConfigError(f"task {self.cfg.task!r} ({kind}) has no `{attribute}`: its __init__ must set "
                                  f"self.{attribute} (see vistrain/engine/task.py, class Task)")
        for name, spec in task.optimizers.items():
            if spec.net not in task.trainable:
                raise ValueError(f"optimizer {name!r} steps network {spec.net!r}, which is not in task.trainable")
        for phase in task.phases:
            if phase.optimizer not in task.optimizers:
                raise ValueError(f"phase {phase.name!r} names optimizer {phase.optimizer!r}, which the task lacks")

    def _restore(self, path: Path) -> None:
        state = self.checkpointer.load(path)
        self.task.load_state_dict(state.get("task", {}))
        self.step = int(state["step"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank], self.device)
        else:  # a different world size cannot replay the same streams; stay deterministic at least
            seed_everything(self.seed + self.dist.rank + self.step)
            if self.dist.is_main:
                print(f"warning: {path} was saved with {len(rng)} ranks, now {self.dist.world_size}: the data "
                      "order is kept, the random streams are reseeded", flush=True)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self) -> Path:
        """Train to train.max_steps; returns the final checkpoint. However it ends, pending saves finish,
        loggers close and the run folder is unlocked."""
        failed = True
        try:
            with self._preemption_signals():
                try:
                    final = self._fit()
                    failed = False
                    return final
                finally:
                    try:
                        self.checkpointer.wait()
                        if self.eval_jobs is not None and not failed and self.eval_cfg.wait_at_end:
                            self.eval_jobs.wait()
                    finally:
                        if self.eval_jobs is not None:
                            self.eval_jobs.report_pending()
                        if self._loggers is not None:
                            self._loggers.close()
        finally:
            self.run_dir.release(failed=failed and self.checkpointer.last_saved is None)

    def _fit(self) -> Path:
        cfg = self.cfg.train
        profiler = None
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            if cfg.profile and self.step == cfg.profile_start:
                profiler = self._start_profiler()
            t0 = time.perf_counter()
            try:
                data_s = self._train_step()
            except DataExhausted:
                if self.dist.is_main:
                    print(f"the training data ran out after step {self.step}; stopping there", flush=True)
                if not self._saved_this_step():
                    self.save_checkpoint()
                break
            self.step += 1
            self._window_steps += 1
            self.metrics.add("time/data_s", data_s)
            self.metrics.add("time/step_s", time.perf_counter() - t0)
            if profiler is not None and self.step == cfg.profile_start + cfg.profile_steps:
                self._stop_profiler(profiler)
                profiler = None

            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log_train(time.perf_counter() - window_start)
                window_start = time.perf_counter()
            # The step's checkpoint comes before its eval: an eval that crashes (or is killed) loses no training.
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                saved = self.save_checkpoint()
                if self.eval_jobs is not None:
                    self.eval_jobs.submit(self.step, saved)
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                self._evaluate()
            if self.eval_jobs is not None:
                self.eval_jobs.poll()  # start queued jobs, log the results that arrived
            if any_rank(self._stop_requested, self.dist):
                if not self._saved_this_step():
                    self.save_checkpoint()
                self.checkpointer.wait()
                raise Preempted(self.checkpointer.last_saved)
        if profiler is not None:
            self._stop_profiler(profiler)
        return self.checkpointer.last_saved

    def _saved_this_step(self) -> bool:
        last = self.checkpointer.last_saved
        return last is not None and last.name == ckpt_lib.step_dir_name(self.step)

    def _train_step(self) -> float:
        """All phases of one training step; returns the seconds spent waiting for data."""
        step, max_steps = self.step, self.cfg.train.max_steps
        for name, opt in self.optimizers.items():
            config = self.task.optimizers[name].config
            lr, wd = apply_schedule(opt, config, step, max_steps)
            self._schedule_values[f"lr/{name}"], self._schedule_values[f"wd/{name}"] = lr, wd
            for prefix, mult in config.lr_mult.items():  # parts with their own lr (a VLM's projector, say)
                self._schedule_values[f"lr/{name}/{prefix}"] = lr * mult
        data_s = 0.0
        for phase in self.task.phases:
            if not phase.runs_at(step):
                continue
            for _ in range(phase.repeats):
                t0 = time.perf_counter()
                micro_batches = self._draw(phase)
                data_s += time.perf_counter() - t0
                self._optimizer_step(phase, micro_batches)
        self.task.on_step_end(step + 1)
        return data_s

    def _draw(self, phase: Phase) -> list[Any]:
        if phase.same_data_as is not None:
            if phase.same_data_as not in self._drawn:
                raise ValueError(f"phase {phase.name!r} reuses the data of phase {phase.same_data_as!r}, "
                                 "which has not drawn any yet (it must come earlier in task.phases)")
            return self._drawn[phase.same_data_as]
        batches = []
        try:
            for _ in range(self.accum):
                batches.append(to_device(next(phase.data), self.device, self.cfg.train.channels_last))
        except StopIteration:
            if not phase.finite_data:
                raise RuntimeError(f"the data of phase {phase.name!r} ran out; a stream that can end needs "
                                   "Phase(finite_data=True)") from None
        # A finite stream may end on one rank first: every rank learns it here, before any forward.
        if phase.finite_data and any_rank(len(batches) < self.accum, self.dist):
            raise DataExhausted
        self._drawn[phase.name] = batches
        return batches

    def _optimizer_step(self, phase: Phase, micro_batches: list[Any]) -> None:
        opt = self.optimizers[phase.optimizer]
        scaler = self.scalers[phase.optimizer]
        trains = self._trains[phase.name]
        self._set_requires_grad(phase.optimizer)
        nets = self.parallel.views(trains)
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        self._fwd_bwd.start()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # The backward too runs inside: FSDP decides in it whether to reduce-scatter the gradients.
            with self.parallel.gradient_sync(trains, enabled=last):
                with self.precision.autocast():
                    out = phase.loss(nets, batch)
                loss = out.loss_sum.float()
                (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.detach()
            count += out.count
            for key, value in out.metrics.items():
                value, weight = value if isinstance(value, tuple) else (value, out.count)
                self.metrics.add(key, value.detach().float() if isinstance(value, Tensor) else value, weight=weight)
            if out.samples is not None:
                self.metrics.add_total("samples", out.samples)
            if out.tokens is not None:
                self.metrics.add_total("tokens", out.tokens)
        self._fwd_bwd.stop()
        # One all-reduce: the step's count over all ranks (the normaliser) and its loss (for the skip decision).
        total = all_reduce_sum(torch.stack([count, loss_sum]), self.dist)
        # DDP and FSDP average gradients over ranks; times world size over the global count gives the
        # gradient of the mean loss over every unit of the global batch.
        scale = self.dist.world_size / total[0].clamp(min=1.0)
        if scaler is not None:
            scaler.unscale_(opt)
        grad_norm = _normalise_and_clip(self._params[phase.optimizer], scale, self.cfg.train.grad_clip)
        self.metrics.add(f"grad_norm/{phase.name}", grad_norm)
        # One host sync per optimizer step: a skipped step must be known now. The loss is all-reduced and
        # the grad norm is of the synchronised gradients, so every rank takes the same decision.
        finite = bool(torch.isfinite(grad_norm + total[1]))
        if scaler is not None:
            scaler.step(opt)  # skips by itself when the unscaled gradients hold inf / nan
            scaler.update()
            diverged = not finite and scaler.get_scale() < 1.0  # still overflowing at a tiny scale
        else:
            if finite:
                opt.step()
            diverged = not finite
        opt.zero_grad(set_to_none=True)
        self.metrics.add(f"skipped/{phase.name}", 0.0 if finite else 1.0)
        self._count_nonfinite(phase, diverged)

    def _count_nonfinite(self, phase: Phase, bad: bool) -> None:
        self.nonfinite_streak = self.nonfinite_streak + 1 if bad else 0
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            self.checkpointer.wait()
            latest = ckpt_lib.latest_checkpoint(self.ckpt_root)
            raise TrainingDiverged(
                f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: phase {phase.name!r} at step {self.step}); stopping. "
                f"The last good checkpoint is {latest or 'none yet'} and is untouched. "
                "Try a lower learning rate, train.grad_clip, or train.precision=bf16 instead of fp16."
            )

    def _set_requires_grad(self, optimizer: str) -> None:
        for name, params in self._params.items():
            flag = name == optimizer
            for p in params:
                p.requires_grad_(flag)

    # ---------------------------------------------------------------------- logging, eval, checkpoints

    @property
    def loggers(self) -> LoggerGroup:
        if self._loggers is None:
            names = list(self.cfg.run.loggers) if self.dist.is_main else []
            cfg = self.cfg
            self._loggers = build_loggers(
                names, self.out_dir, OmegaConf.to_container(OmegaConf.structured(cfg)), cfg.train.max_steps,
                wandb_project=cfg.run.wandb_project, wandb_mode=cfg.run.wandb_mode,
                run_name=cfg.run.name or self.out_dir.name,
            )
        return self._loggers

    def _log_train(self, elapsed: float) -> None:
        # forward + backward seconds per step, over the window (one device sync here, none per step)
        self.metrics.add("time/fwd_bwd_s", self._fwd_bwd.total() / max(self._window_steps, 1))
        self._window_steps = 0
        values = self.metrics.reduce()
        elapsed = max(elapsed, 1e-9)
        for unit in ("samples", "tokens"):
            if unit in values:
                values[f"{unit}_per_s"] = values.pop(unit) / elapsed
        per_unit = (("tokens_per_s", self.task.flops_per_token), ("samples_per_s", self.task.flops_per_sample))
        for rate, flops in per_unit:
            if flops and self._peak_tflops and rate in values:
                values["mfu"] = flops * values[rate] / (self._peak_tflops * 1e12 * self.dist.world_size)
                break
        values.update(self._schedule_values)  # the values in force at this step, not a window mean
        memory = peak_memory_mb(self.device)
        if memory is not None:
            values["peak_mem_mb"] = memory
        self.loggers.log_metrics(self.step, "train", values)

    def _evaluate(self) -> None:
        with self.parallel.gathered():  # under FSDP, generation may call any method, any number of times
            result = self.task.evaluate(self.step)
        self._last_eval = (self.step, result.metrics)
        if not self.dist.is_main:
            return
        if result.metrics:
            self.loggers.log_metrics(self.step, "val", result.metrics)
            if self._saved_this_step():  # saved just before this eval: its metrics.json and `best` learn them
                self.checkpointer.record_metrics(self.checkpointer.last_saved, result.metrics, self.best)
        for tag, grid in result.images.items():
            name = f"step_{self.step:08d}.png" if tag == "samples" else f"{tag}_step_{self.step:08d}.png"
            save_png(self.out_dir / "samples" / name, grid)
            self.loggers.log_images(self.step, tag, grid)

    def save_checkpoint(self) -> Path:
        if self.dist.is_main and "config" not in self._provenance:  # the run's first save
            # Only now: a run that never gets this far must not replace an earlier run's config.
            config = OmegaConf.structured(self.cfg)
            write_text_atomic(self.out_dir / "config.yaml", OmegaConf.to_yaml(config))
            self._provenance["config"] = OmegaConf.to_container(config)  # the same config, in provenance.json
        run_state = {
            "step": self.step,
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "rng": gather_objects(capture_rng_state(self.device), self.dist),
            "task": self.task.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
        }
        metrics = self._last_eval[1] if self._last_eval and self._last_eval[0] == self.step else None
        assets = ({**self.task.assets(), provenance.FILE: provenance.to_bytes(self._provenance)}
                  if self.dist.is_main else None)
        return self.checkpointer.save(self.step, run_state, self.task.model_config(), metrics,
                                      best=self.best, assets=assets)

    # ------------------------------------------------------------------------ profiling, preemption

    def _start_profiler(self):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        prof = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True)
        prof.start()
        return prof

    def _stop_profiler(self, prof) -> None:
        prof.stop()
        folder = self.out_dir / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        first = self.cfg.train.profile_start
        trace = folder / f"trace_rank{self.dist.rank}_steps{first}-{self.step}.json"
        prof.export_chrome_trace(str(trace))
        if self.dist.is_main:
            print(f"profiler trace written to {trace} (open in https://ui.perfetto.dev)", flush=True)

    @contextlib.contextmanager
    def _preemption_signals(self):
        """SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with EXIT_REQUEUE.

        The handlers stay in place until the checkpoint is written and the loggers are closed, so a second
        signal during the preemption save only sets the flag again.
        """

        def request_stop(signum, frame):
            self._stop_requested = True

        wanted = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])
        previous = {}
        for sig in wanted:
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): no handler
                pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


_RESUME_ADVICE = ("Resume from an earlier checkpoint with run.resume=<path of a step_* folder>, or start a new "
                  "run in another run.out_dir.")


def _normalise_and_clip(params: list[Tensor], scale: Tensor, max_norm: float) -> Tensor:
    """Multiply the gradients by `scale` (the count normaliser), clipped to `max_norm` if > 0, in one pass.

    Returns the norm of the normalised gradients before clipping. Gradients may be DTensors (FSDP): their
    norm is then gathered over the shards, so every rank sees the same value.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=scale.device)
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    norm = norm * scale
    factor = scale
    if max_norm > 0:
        factor = scale * (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, factor.to(grads[0].device))
    return norm


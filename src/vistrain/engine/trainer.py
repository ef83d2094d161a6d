"""The one training loop under every task.

Per iteration the trainer fetches one loader batch, then runs the task's phases in order; each phase is
one optimizer step: micro-batches with DDP sync only on the last, autocast, loss scaling, clipping, the step
(or a skip when gradients are not finite). Around that: schedules, metrics, evaluation, atomic checkpoints,
exact resume and preemption.

Bit-exact resume rests on three things: the sampler is a pure function of the number of batches consumed,
every sample's augmentation is seeded by its key rather than by a worker's RNG, and every rank's global RNG
state is saved with the checkpoint and restored before the next step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from vistrain import config as config_lib
from vistrain.data.loader import build_train_loader, check_enough_data
from vistrain.engine import checkpoint as ckpt_lib
from vistrain.engine.dist import DistContext, any_rank, barrier, broadcast_object, gather_objects
from vistrain.engine.images import save_png
from vistrain.engine.loggers import build_loggers
from vistrain.engine.metrics import MetricAccumulator, peak_memory_mb
from vistrain.engine.optim import apply_schedule
from vistrain.engine.precision import Precision
from vistrain.engine.rng import capture_rng_state, restore_rng_state, seed_everything
from vistrain.tasks.base import Phase, TaskEnv

# Exit status after a preemption checkpoint: EX_TEMPFAIL, which schedulers can be told to requeue on.
EXIT_REQUEUE = 75


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


class Preempted(Exception):
    """SIGTERM / SIGUSR1 arrived; a checkpoint of the last finished step was written."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"preempted: saved {checkpoint}; rerun the same command to continue")
        self.checkpoint = checkpoint


class Trainer:
    def __init__(self, cfg, dist_ctx: DistContext):
        self.cfg = cfg
        self.dist = dist_ctx
        self.device = dist_ctx.device
        self.out_dir = Path(cfg.run.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.accum = config_lib.gradient_accumulation(
            cfg.train.batch_size, cfg.train.micro_batch_size, dist_ctx.world_size
        )
        self.batch_per_rank = cfg.train.batch_size // dist_ctx.world_size
        self.precision = Precision(cfg.train.precision, self.device)

        # Resume first: a resumed run takes its seed from the checkpoint, so data order and RNG match.
        resume_path = ckpt_lib.resolve_resume(self.out_dir, cfg.run.resume)
        self.resumed = ckpt_lib.load_checkpoint(resume_path) if resume_path else None
        self.seed = self._resolve_seed()
        cfg.run.seed = self.seed

        # The same seed on every rank while building, so every rank starts from identical weights.
        seed_everything(self.seed)
        env = TaskEnv(dist=dist_ctx, max_steps=cfg.train.max_steps, batch_size=cfg.train.batch_size,
                      out_dir=self.out_dir)
        self.task = config_lib.task_module(cfg.task).Task(cfg, env)
        self.loader_batch = cfg.train.batch_size * self.task.batch_multiplier
        check_enough_data(self.task.train_set, self.loader_batch, f"the {cfg.data.name} training set",
                          source=f"train.batch_size x {self.task.batch_multiplier} updates per iteration")
        if self.dist.is_main:  # only now: a run that cannot start must not overwrite an earlier run's config
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(config_lib.to_yaml(cfg))

        # Parameters each optimizer owns; only these are ever switched back to requires_grad=True.
        self._trainable_params = {name: [p for p in self.task.nets[name].parameters() if p.requires_grad]
                                  for name in self.task.trainable}
        self._phase_params = {phase.name: [p for net in phase.trains for p in self._trainable_params[net]]
                              for phase in self.task.phases}
        self.scalers = {name: self.precision.make_scaler() for name in self.task.optimizers}
        self.step = 0
        self.nonfinite_streak = 0
        if self.resumed is not None:
            self._load_state(*self.resumed, path=resume_path)
        self.views_train, self.views_frozen = self._wrap_networks()
        # Dropout, noise and augmentation differ per rank: seed + rank (restored exactly on resume).
        if self.resumed is None:
            seed_everything(self.seed + dist_ctx.rank)
        self.resumed = None  # the loaded tensors are not needed any more

        self.metrics = MetricAccumulator()
        self._schedule_values: dict[str, float] = {}
        names = list(cfg.run.loggers) if dist_ctx.is_main else []
        self.loggers = build_loggers(
            names, self.out_dir, config_lib.to_dict(cfg), cfg.train.max_steps,
            wandb_project=cfg.run.wandb_project, wandb_mode=cfg.run.wandb_mode,
            run_name=cfg.run.name or self.out_dir.name,
        )
        self._stop_requested = False
        self._last_eval: Optional[tuple[int, dict]] = None

    # ----------------------------------------------------------------------------------------- set-up

    def _resolve_seed(self) -> int:
        if self.resumed is not None and "seed" in self.resumed[2]:
            return int(self.resumed[2]["seed"])
        seed = self.cfg.run.seed
        if seed == "random":
            seed = int(torch.randint(0, 10_000, ()).item()) if self.dist.is_main else None
            seed = broadcast_object(seed, self.dist)
        return int(seed)

    def _wrap_networks(self):
        """DDP (and torch.compile) from outside: models stay plain nn.Modules."""
        train, frozen = {}, {}
        for name, net in self.task.nets.items():
            frozen[name] = torch.compile(net) if self.cfg.train.compile else net
            if name not in self.task.trainable:
                continue
            view: nn.Module = net
            if self.dist.distributed:
                view = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            train[name] = torch.compile(view) if self.cfg.train.compile else view
        return train, frozen

    def _load_state(self, weights, model_config, state, path: Path) -> None:
        for name, net in self.task.nets.items():
            prefix = name + "."
            sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise ckpt_lib.CheckpointError(
                    f"checkpoint {path} does not match network {name!r} of this config "
                    f"(was the model config changed?): {str(e).splitlines()[0]}"
                ) from None
        for name, (opt, _) in self.task.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, scaler in self.scalers.items():
            if scaler is not None and state["scalers"].get(name):
                scaler.load_state_dict(state["scalers"][name])
        self.task.load_state_dict(state.get("task", {}))
        self.step = int(state["step"])
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng_state(rng[self.dist.rank], self.device)
        else:  # a different world size cannot replay the same streams; stay deterministic at least
            seed_everything(self.seed + self.dist.rank + self.step)
            if self.dist.is_main:
                print(f"warning: {path} was saved with {len(rng)} ranks, now {self.dist.world_size}: "
                      "data order is kept, random streams are reseeded", flush=True)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ------------------------------------------------------------------------------------------- loop

    def fit(self) -> Path:
        """Train to train.max_steps; returns the final checkpoint. Loggers are closed however it ends."""
        try:
            return self._fit()
        finally:
            self.loggers.close()

    def _fit(self) -> Path:
        cfg = self.cfg.train
        loader = build_train_loader(
            self.task.train_set, self.loader_batch, self.dist.rank, self.dist.world_size,
            self.seed, start_batch=self.step, num_workers=self.cfg.data.num_workers,
        )
        batches = iter(loader)
        profiler = None
        last_saved: Optional[Path] = None
        window_start, window_steps = time.perf_counter(), 0
        with self._preemption_signals():
            while self.step < cfg.max_steps:
                if cfg.profile and self.step == cfg.profile_start:
                    profiler = self._start_profiler()
                t0 = time.perf_counter()
                batch = next(batches)
                t_data = time.perf_counter() - t0
                self._train_iteration(batch)
                self.step += 1
                window_steps += 1
                self.metrics.add("time/data_s", t_data)
                self.metrics.add("time/step_s", time.perf_counter() - t0)
                if profiler is not None and self.step == cfg.profile_start + cfg.profile_steps:
                    self._stop_profiler(profiler)
                    profiler = None

                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    self._log_train(window_steps, elapsed)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    self._evaluate()
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    last_saved = self.save_checkpoint()
                if any_rank(self._stop_requested, self.dist):
                    if last_saved is None or not last_saved.name.endswith(f"{self.step:08d}"):
                        last_saved = self.save_checkpoint()
                    raise Preempted(last_saved)
        if profiler is not None:
            self._stop_profiler(profiler)
        return last_saved if last_saved is not None else self.save_checkpoint()

    def _train_iteration(self, batch: dict) -> None:
        step, max_steps = self.step, self.cfg.train.max_steps
        for name, (opt, opt_cfg) in self.task.optimizers.items():
            lr, wd = apply_schedule(opt, opt_cfg, step, max_steps)
            self._schedule_values[f"lr/{name}"], self._schedule_values[f"wd/{name}"] = lr, wd
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        for phase in self.task.phases:
            if step % phase.every:
                continue
            for r in range(phase.repeats):
                rows = slice(r * self.batch_per_rank, (r + 1) * self.batch_per_rank)
                self._run_phase(phase, {k: v[rows] for k, v in batch.items()})
        self.task.on_step_end(step + 1)

    def _run_phase(self, phase: Phase, batch: dict) -> None:
        opt, _ = self.task.optimizers[phase.optimizer]
        scaler = self.scalers[phase.optimizer]
        params = self._phase_params[phase.name]
        self._set_requires_grad(phase.trains)
        nets = {name: self.views_train[name] if name in phase.trains else self.views_frozen[name]
                for name in self.task.nets}
        micro = self.batch_per_rank // self.accum
        loss_sum = torch.zeros((), device=self.device)
        step_logs: dict[str, torch.Tensor] = {}
        for i in range(self.accum):
            rows = slice(i * micro, (i + 1) * micro)
            with self._no_sync(phase.trains, last=i == self.accum - 1), self.precision.autocast():
                loss, logs = phase.loss(nets, {k: v[rows] for k, v in batch.items()})
            loss = loss.float() / self.accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_sum += loss.detach()
            for key, value in logs.items():  # the mean over micro-batches, still on the device
                step_logs[key] = step_logs.get(key, 0.0) + value.detach().float() / self.accum
        for key, value in step_logs.items():
            self.metrics.add(key, value)
        if scaler is not None:
            scaler.unscale_(opt)
        max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        self.metrics.add(f"grad_norm/{phase.name}", grad_norm)
        # One host sync per optimizer step: a skipped step must be known now. Gradients are identical on
        # every rank after DDP's all-reduce, so every rank takes the same decision without talking.
        finite = bool(torch.isfinite(grad_norm + loss_sum))
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
            latest = ckpt_lib.latest_checkpoint(self.ckpt_root)
            raise TrainingDiverged(
                f"{self.nonfinite_streak} optimizer steps in a row had a non-finite loss or gradient "
                f"(last: phase {phase.name!r} at step {self.step}); stopping. "
                f"The last good checkpoint is {latest or 'none yet'} and is untouched. "
                "Try a lower learning rate, train.grad_clip, or train.precision=bf16 instead of fp16."
            )

    def _set_requires_grad(self, trains: tuple[str, ...]) -> None:
        for name, params in self._trainable_params.items():
            flag = name in trains
            for p in params:
                p.requires_grad_(flag)

    def _no_sync(self, trains, last: bool):
        """DDP gradient all-reduce only on the last micro-batch of an optimizer step."""
        stack = contextlib.ExitStack()
        if not last and self.dist.distributed:
            for name in trains:
                stack.enter_context(_ddp_of(self.views_train[name]).no_sync())
        return stack

    # ---------------------------------------------------------------------- logging, eval, checkpoints

    def _log_train(self, steps: int, elapsed: float) -> None:
        values = self.metrics.reduce()
        values.update(self._schedule_values)  # the values in force at this step, not a window mean
        values["samples_per_s"] = self.cfg.train.batch_size * steps / max(elapsed, 1e-9)
        memory = peak_memory_mb(self.device)
        if memory is not None:
            values["peak_mem_mb"] = memory
        self.loggers.log_metrics(self.step, "train", values)

    def _evaluate(self) -> None:
        result = self.task.evaluate(self.step)
        self._last_eval = (self.step, result.metrics)
        if not self.dist.is_main:
            return
        if result.metrics:
            self.loggers.log_metrics(self.step, "val", result.metrics)
        for tag, grid in result.images.items():
            name = f"step_{self.step:08d}.png" if tag == "samples" else f"{tag}_step_{self.step:08d}.png"
            save_png(self.out_dir / "samples" / name, grid)
            self.loggers.log_images(self.step, tag, grid)

    def save_checkpoint(self) -> Path:
        rng_states = gather_objects(capture_rng_state(self.device), self.dist)
        path = self.ckpt_root / ckpt_lib.step_dir_name(self.step)
        if self.dist.is_main:
            metrics = self._last_eval[1] if self._last_eval and self._last_eval[0] == self.step else None
            path = ckpt_lib.save_checkpoint(
                self.ckpt_root, self.step, self._weights(), self.task.model_config(),
                self._train_state(rng_states), metrics=metrics,
            )
            best = self.task.best_metric
            if best is not None and metrics and best[0] in metrics:
                ckpt_lib.update_best(self.ckpt_root, path, best[0], metrics[best[0]], mode=best[1])
            ckpt_lib.prune_checkpoints(self.ckpt_root, self.cfg.train.keep_last)
        barrier(self.dist)
        return path

    def _weights(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": value.detach()
                for name, net in self.task.nets.items() for key, value in net.state_dict().items()}

    def _train_state(self, rng_states: list) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "optimizers": {name: opt.state_dict() for name, (opt, _) in self.task.optimizers.items()},
            "scalers": {name: (s.state_dict() if s is not None else {}) for name, s in self.scalers.items()},
            "rng": rng_states,
            "task": self.task.state_dict(),
            "nonfinite_streak": self.nonfinite_streak,
        }

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
        """SIGTERM / SIGUSR1: finish the current step, checkpoint, exit with EXIT_REQUEUE."""

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


def _ddp_of(view: nn.Module) -> DDP:
    module = getattr(view, "_orig_mod", view)  # torch.compile wraps the DDP module
    return module

"""VAR side by side with the original (FoundationVision/VAR): the full training step, the tokenizer's encoding
of a batch (teacher forcing) and class-conditional sampling, at the same shapes, precision, batch, weights and
data. Prints a table per depth and ends with the line `vistrain/original: X.XX` (training images/s of
vistrain over the original's, at the first depth).

    python benchmarks/vs_var.py --ref /path/to/VAR     # CPU: VAR-d4 at 64 px, fp32 (~2 min on 2 cores)
    python benchmarks/vs_var.py --ref /path/to/VAR     # GPU: VAR-d16 and d20, 256 px, bf16, batch 32
    python benchmarks/vs_var.py                        # vistrain's half alone (no checkout needed)
    python benchmarks/vs_var.py --ref VAR --token-cache --json out.json   # and the token cache's trade-off

--ref is a checkout of https://github.com/FoundationVision/VAR that you fetched; nothing of it is part of
vistrain. It is imported from there at run time, in its own process, where two stand-ins go into sys.modules
first: `utils.misc` (its loggers, which import `tap` and run git when imported; its trainer names them only in
type hints, and gets no-op loggers here) and, only when it is not installed, `huggingface_hub` (a mixin of a
hub-upload class). Its set-up helpers print through the print its train.py installs, which takes extra
keywords; they run with a print that drops everything. Its model, trainer and sampling code run unchanged.

What each side runs, step by step as its own training does:
  original  a DataLoader batch -> .to(device); its lr / wd schedule (lr_wd_annealing); VARTrainer.train_step:
            the frozen tokenizer encodes the batch (img_to_idxBl, idxBl_to_var_input), forward under its
            AmpOptimizer's autocast, cross entropy, backward, clip 2.0, fused AdamW (backward_clip_step); the
            model uncompiled, as its train.py default (--tfast=0); on CUDA TF32 and cuDNN's autotuner on, as
            its arg_util sets them; its loggers log at no step;
  vistrain  vistrain.engine.Trainer.fit() on the VAR task: its data stream, teacher forcing with the frozen
            tokenizer, forward and backward under the engine's autocast, count normalisation, clip 2.0, fused
            AdamW (as the original's), schedules, metrics; logging, checkpoints and evals set far apart;
            train.compile=blocks on CUDA, as the recipes.
Both start from the same seeded weights (a vistrain model folder, converted to the official names for the
original), read the same images (the digits, upsampled and made RGB: no data set needs to be present), and use
SDPA attention (the original's own choice when neither flash-attn nor xformers is installed; the table says
which one it found). Sampling: `autoregressive_infer_cfg` against vistrain's sampling path (`vistrain sample`),
cfg 1.5, top-k 900, top-p 0.96, decoding to images included; bf16 runs both under bf16 autocast.

Each side runs in a process of its own (on a CPU a fresh one per measurement), so that peak memory is its own:
CUDA's peak allocation, or on a CPU the growth of the process's peak resident set over the measurement. Rounds
alternate between the sides, and the table reports medians over rounds. MFU counts the VAR task's training FLOPs
(6N per token plus attention) against the card's bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Optional

import torch

SCHEDULES = {256: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 128: [1, 2, 3, 4, 5, 6, 8], 64: [1, 2, 3, 4]}
NUM_CLASSES = 1000  # ImageNet's; the digits' labels 0-9 are among them
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)  # the VAR paper's FID settings


@dataclass
class Shape:
    depth: int
    resolution: int
    batch: int  # images per training step: the global batch, one process
    precision: str  # fp32 | bf16
    vae_ch: int  # the tokenizer's base width (160: the official one)
    sample_batch: int  # images per sampling call (each runs 2x as many rows: guidance)
    vocab_size: int = 4096
    z_channels: int = 32

    @property
    def patch_nums(self) -> list[int]:
        return SCHEDULES[self.resolution]

    @property
    def tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def name(self) -> str:
        return f"VAR-d{self.depth}, {self.resolution} px, batch {self.batch}, {self.precision}"


@dataclass
class Plan:
    warmup: int  # steps before the first timed round (torch.compile, allocator, caches)
    steps: int  # training steps per round
    rounds: int
    calls: int  # encoding or sampling calls per round (after one untimed call)
    encoder_precision: str  # vistrain's var.encoder_precision
    attn_impl: str  # vistrain's model.attn_impl
    compile: bool  # vistrain: train.compile=blocks, compiled teacher forcing and sampling
    threads: Optional[int] = None  # CPU threads per process (None: torch's default)
    clock: str = "wall"  # wall | cpu: the seconds a round takes, or the CPU seconds its process spends in it


def defaults(device: torch.device) -> tuple[list[int], dict]:
    """Depths and shape with no flags: the GPU shapes on CUDA, a small fp32 shape on a CPU."""
    if device.type == "cuda":
        return [16, 20], dict(resolution=256, batch=32, precision="bf16", vae_ch=160, sample_batch=32)
    return [4], dict(resolution=64, batch=8, precision="fp32", vae_ch=32, sample_batch=4)


# ---------------------------------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Memory:
    """Peak memory of what runs between start() and peak_mib(): CUDA's peak allocation, or on a CPU the growth of
    the process's peak resident set over its resident set at start()."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_mib = 0.0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/statm") as f:
                self.base_mib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base_mib  # ru_maxrss: KiB


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Done(Exception):
    """The last timed round is over: leave the loop (for the engine: no final checkpoint or eval)."""


class Gate:
    """Where a side reports each round and waits for the next. This one records (one side, in this process);
    a child process's PipeGate reports to the parent, which decides who runs next."""

    def __init__(self) -> None:
        self.rounds: list[float] = []

    def warm(self) -> None:
        pass

    def wait(self) -> None:
        pass

    def report(self, seconds: float) -> None:
        self.rounds.append(seconds)


class PipeGate(Gate):
    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def warm(self) -> None:
        self.conn.send(("warm", None))

    def wait(self) -> None:
        if self.conn.recv() != "go":
            raise RuntimeError("the benchmark's parent process sent something other than 'go'")

    def report(self, seconds: float) -> None:
        self.conn.send(("round", seconds))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class RoundClock:
    """Splits the calls of a loop into a warm-up and timed rounds of `per_round` calls, reporting each round's
    seconds to the gate; raises Done after the last one. A round runs from its first call to the call after its
    last, with the device synchronised at both ends, so it covers all the loop does between calls."""

    def __init__(self, warmup: int, per_round: int, plan: Plan, gate: Gate, device: torch.device):
        self.warmup, self.per_round, self.rounds = warmup, per_round, plan.rounds
        self.gate, self.device, self.clock = gate, device, CLOCKS[plan.clock]
        self.calls, self.t0 = 0, 0.0

    def tick(self) -> None:
        """Call before each call of the loop's body."""
        timed = self.calls - self.warmup  # calls already made in timed rounds
        if timed >= 0 and timed % self.per_round == 0:
            sync(self.device)
            if timed == 0:
                self.gate.warm()
            else:
                self.gate.report(self.clock() - self.t0)
                if timed // self.per_round == self.rounds:
                    raise Done
            self.gate.wait()
            self.t0 = self.clock()
        self.calls += 1


def run_rounds(body: Callable[[], Any], clock: RoundClock) -> None:
    with contextlib.suppress(Done):
        while True:
            clock.tick()
            body()


def write_models(shape: Shape, folder: Path) -> Path:
    """Seeded tokenizer and transformer as a vistrain model folder (the layout `vistrain import var` writes)."""
    from vistrain.engine.checkpoint_files import write_model_folder
    from vistrain.models.var import VAR, VARConfig
    from vistrain.models.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    vae_cfg = VQVAEConfig(vocab_size=shape.vocab_size, z_channels=shape.z_channels, ch=shape.vae_ch,
                          patch_nums=shape.patch_nums)
    var_cfg = VARConfig(depth=shape.depth, num_classes=NUM_CLASSES, vocab_size=shape.vocab_size,
                        z_channels=shape.z_channels, patch_nums=shape.patch_nums, init_adaln_gamma=1e-3)
    vae, var = VQVAE(vae_cfg, shape.resolution), VAR(var_cfg)
    weights = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    weights.update({f"var.{k}": v for k, v in var.state_dict().items()})
    config = {"task": "var", "model": dataclasses.asdict(var_cfg), "vae": dataclasses.asdict(vae_cfg),
              "tokenizer": None}
    return write_model_folder(folder, weights, config)


def digits(shape: Shape):
    """The training images of both sides: the digits at the shape's resolution, RGB."""
    from vistrain.data.digits import DigitsDataset

    return DigitsDataset("train", shape.resolution, channels=3)


def fixed_images(shape: Shape, n: int, device: torch.device) -> torch.Tensor:
    data = digits(shape)
    return torch.stack([data[i]["image"] for i in range(n)]).to(device)


# ---------------------------------------------------------------------------------------------------
# vistrain's side


class ClockedStream:
    """The task's micro-batch stream with a RoundClock ticking at each draw (one draw per step)."""

    def __init__(self, stream, clock: RoundClock):
        self.stream, self.clock = stream, clock

    def __iter__(self):
        return self

    def __next__(self):
        self.clock.tick()
        return next(self.stream)


class Vistrain:
    def __init__(self, shape: Shape, models: Path, plan: Plan, device: torch.device, token_cache: bool = False):
        from vistrain.engine import trainer  # noqa: F401  (imported before any memory baseline)
        from vistrain.tasks import var  # noqa: F401

        self.shape, self.models, self.plan, self.device = shape, models, plan, device
        self.token_cache = token_cache
        self.label = "vistrain, var.token_cache" if token_cache else "vistrain"
        self.attention = plan.attn_impl

    def config(self, out_dir: Path):
        from vistrain.config import load_config

        s, p = self.shape, self.plan
        far = 10**9  # logging, checkpoints and evals never come up during the timed steps
        return load_config(None, [
            "task=var", f"run.out_dir={out_dir}", "run.loggers=[]", "run.resume=never",
            f"train.max_steps={far}", f"train.batch_size={s.batch}", f"train.micro_batch_size={s.batch}",
            f"train.precision={s.precision}", "train.grad_clip=2.0",
            f"train.compile={'blocks' if p.compile else 'false'}",
            f"train.log_every={far}", f"train.eval_every={far}", f"train.ckpt_every={far}",
            "data.name=digits", f"data.resolution={s.resolution}", "data.channels=3", "data.num_workers=0",
            f"model.depth={s.depth}", f"model.num_classes={NUM_CLASSES}", f"model.vocab_size={s.vocab_size}",
            f"model.z_channels={s.z_channels}", f"model.patch_nums={s.patch_nums}", f"model.attn_impl={p.attn_impl}",
            f"var.tokenizer={self.models}", f"var.init={self.models}", "eval.metrics=[]",
            "optim.fused=true",  # the original's AdamW is fused on every device (its --afuse default)
            f"var.encoder_precision={p.encoder_precision}", f"var.token_cache={str(self.token_cache).lower()}",
        ])

    def _trainer(self, out_dir: Path, instrument: Callable[[Any], None]):
        from vistrain.engine.dist import DistContext
        from vistrain.engine.trainer import Trainer
        from vistrain.registry import get_spec

        cfg = self.config(out_dir)

        def build(env):
            task = get_spec("var").build(cfg, env)
            instrument(task)
            return task

        return Trainer(cfg, build, DistContext(0, 1, 0, self.device))

    def train(self, gate: Gate) -> dict:
        """Timed training steps through the engine."""
        memory, built = Memory(self.device), {}

        def instrument(task) -> None:
            clock = RoundClock(self.plan.warmup, self.plan.steps, self.plan, gate, self.device)
            task.phases[0].data = ClockedStream(task.phases[0].data, clock)
            built["cache_s"] = getattr(task, "token_cache_build_s", None)
            built["images"] = len(task.train_set)

        with tempfile.TemporaryDirectory() as out_dir:
            memory.start()
            trainer = self._trainer(Path(out_dir) / "run", instrument)
            with contextlib.suppress(Done):
                trainer.fit()
            result = {"peak_mib": memory.peak_mib(), **built}
            del trainer
        return result

    def encode(self, gate: Gate) -> dict:
        """Timed teacher forcing of one batch (the task's own, as in its loss)."""
        from vistrain.engine.dist import DistContext
        from vistrain.engine.task import TaskEnv
        from vistrain.registry import get_spec

        memory = Memory(self.device)
        with tempfile.TemporaryDirectory() as out_dir:
            cfg, s = self.config(Path(out_dir)), self.shape
            env = TaskEnv(dist=DistContext(0, 1, 0, self.device), seed=0, max_steps=cfg.train.max_steps,
                          batch_size=s.batch, micro_batch_size=s.batch, out_dir=Path(out_dir))
            task = get_spec("var").build(cfg, env)
            images = fixed_images(s, s.batch, self.device)
            memory.start()
            with autocast(self.device, s.precision):  # the engine's autocast, around the task's loss
                run_rounds(lambda: task.teacher_forcing(images),
                           RoundClock(1, self.plan.calls, self.plan, gate, self.device))
        return {"peak_mib": memory.peak_mib()}

    def sample(self, gate: Gate) -> dict:
        """Timed sampling with the path of `vistrain sample`."""
        from vistrain.engine.checkpoint_files import load_model_config, load_weights
        from vistrain.tasks.var import generate_images, sampling_models

        memory = Memory(self.device)
        memory.start()
        var, vae = sampling_models(load_model_config(self.models), load_weights(self.models), self.device,
                                   compile=self.plan.compile)
        label_B = torch.arange(self.shape.sample_batch, device=self.device) % NUM_CLASSES
        generator = torch.Generator(self.device).manual_seed(0)

        def call() -> None:
            with autocast(self.device, self.shape.precision):
                generate_images(var, vae, label_B, generator=generator, **SAMPLING)

        run_rounds(call, RoundClock(1, self.plan.calls, self.plan, gate, self.device))
        return {"peak_mib": memory.peak_mib()}


# ---------------------------------------------------------------------------------------------------
# the original's side


def import_original(ref: Path) -> types.SimpleNamespace:
    """The original's modules, imported from its checkout (the stand-ins: see the module docstring)."""
    sys.path.insert(0, str(ref))
    misc = types.ModuleType("utils.misc")
    misc.MetricLogger = misc.TensorboardLogger = object  # trainer.py's type hints
    sys.modules["utils.misc"] = misc
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = hub
    import models  # the original's top-level packages
    import models.basic_var
    import trainer
    from utils import amp_sc, lr_control

    return types.SimpleNamespace(models=models, basic_var=models.basic_var, trainer=trainer, amp_sc=amp_sc,
                                 lr_control=lr_control)


@contextlib.contextmanager
def quiet_print():
    """The original's set-up messages go through the print its train.py installs, which takes extra keywords
    (`force`, `clean`); this print takes and drops everything."""
    import builtins

    original = builtins.print
    builtins.print = lambda *args, **kwargs: None
    try:
        yield
    finally:
        builtins.print = original


class _NoLog:
    """The original's MetricLogger / TensorboardLogger, logging at no iteration."""

    log_iters: frozenset = frozenset()

    def update(self, *args, **kwargs) -> None:
        pass


class Original:
    label = "original"

    def __init__(self, shape: Shape, models: Path, plan: Plan, device: torch.device, ref: Path):
        from vistrain.interop import var_official  # noqa: F401  (imported before any memory baseline)

        self.shape, self.models, self.plan, self.device = shape, models, plan, device
        self.var = import_original(ref)
        if device.type == "cuda":  # what its arg_util sets up before training: TF32 (--tf32) and cuDNN's autotuner
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True
        b = self.var.basic_var
        self.attention = "flash-attn" if b.flash_attn_func else "xformers" if b.memory_efficient_attention else "sdpa"

    def build(self):
        """Tokenizer and transformer as its train.py builds them, holding our seeded weights in the files
        `vistrain export --format var-official` writes."""
        from vistrain.engine.checkpoint_files import load_model_config, load_weights
        from vistrain.interop.var_official import export_official
        from vistrain.models.var import VARConfig
        from vistrain.models.vqvae import VQVAEConfig

        s = self.shape
        config, weights = load_model_config(self.models), load_weights(self.models)
        var_state = {k[len("var."):]: v for k, v in weights.items() if k.startswith("var.")}
        vae_state = {k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")}
        vae_file, var_file = export_official(VARConfig(**config["model"]), VQVAEConfig(**config["vae"]), var_state,
                                             vae_state).values()
        with quiet_print():  # its constructors print their settings
            vae, var = self.var.models.build_vae_var(
                device=self.device, patch_nums=tuple(s.patch_nums), V=s.vocab_size, Cvae=s.z_channels,
                ch=s.vae_ch, share_quant_resi=4, num_classes=NUM_CLASSES, depth=s.depth, shared_aln=False,
                attn_l2_norm=True, flash_if_available=True, fused_if_available=True, init_adaln_gamma=1e-3)
        vae.load_state_dict(vae_file, strict=True)
        var.load_state_dict(var_file, strict=True)
        return vae.to(self.device), var.to(self.device)

    def train(self, gate: Gate) -> dict:
        s, device, o = self.shape, self.device, self.var
        memory = Memory(device)
        memory.start()
        vae, var = self.build()
        # its optimizer as train.py builds it: no weight decay for its no-decay names, fused AdamW, clip 2.0
        nowd = {"cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul"}
        with quiet_print():
            names, paras, groups = o.lr_control.filter_params(var, nowd_keys=nowd)
        peak_lr = 1e-4 * s.batch / 256
        opt = torch.optim.AdamW(groups, lr=peak_lr, weight_decay=0, betas=(0.9, 0.95), fused=True)
        amp_opt = o.amp_sc.AmpOptimizer(mixed_precision=2 if s.precision == "bf16" else 0, optimizer=opt,
                                        names=names, paras=paras, grad_clip=2.0, n_gradient_accumulation=1)
        with quiet_print():  # `var` stands for train.py's NullDDP wrapper: the model itself
            trainer = o.trainer.VARTrainer(device=device, patch_nums=tuple(s.patch_nums),
                                           resos=tuple(16 * p for p in s.patch_nums), vae_local=vae,
                                           var_wo_ddp=var, var=var, var_opt=amp_opt, label_smooth=0.0)
        loader = torch.utils.data.DataLoader(digits(s), batch_size=s.batch, shuffle=True, drop_last=True,
                                             num_workers=0, collate_fn=_images_and_labels)
        batches, log, max_it = _endless(loader), _NoLog(), 10**6

        def step(iteration=count()) -> None:
            it = next(iteration)
            inp, label = next(batches)
            inp, label = inp.to(device, non_blocking=True), label.to(device, non_blocking=True)
            o.lr_control.lr_wd_annealing("lin0", opt, peak_lr, 0.05, 0.05, it, 0, max_it, wp0=0.005, wpe=0.1)
            trainer.train_step(it=it, g_it=it + 1, stepping=True, metric_lg=log, tb_lg=log, inp_B3HW=inp,
                               label_B=label, prog_si=-1, prog_wp_it=1.0)

        run_rounds(step, RoundClock(self.plan.warmup, self.plan.steps, self.plan, gate, device))
        return {"peak_mib": memory.peak_mib()}

    def encode(self, gate: Gate) -> dict:
        """Its trainer's teacher forcing: img_to_idxBl, then idxBl_to_var_input (fp32: outside its autocast)."""
        vae, _ = self.build()
        images = fixed_images(self.shape, self.shape.batch, self.device)
        memory = Memory(self.device)
        memory.start()

        def call() -> None:
            with torch.no_grad():  # its trainer's step runs the frozen tokenizer (no grads) outside any autocast
                vae.quantize.idxBl_to_var_input(vae.img_to_idxBl(images))

        run_rounds(call, RoundClock(1, self.plan.calls, self.plan, gate, self.device))
        return {"peak_mib": memory.peak_mib()}

    def sample(self, gate: Gate) -> dict:
        memory = Memory(self.device)
        memory.start()
        vae, var = self.build()
        var.eval()
        label_B = torch.arange(self.shape.sample_batch, device=self.device) % NUM_CLASSES
        seeds = count()

        def call() -> None:
            with autocast(self.device, self.shape.precision):
                var.autoregressive_infer_cfg(len(label_B), label_B, g_seed=next(seeds), **SAMPLING)

        run_rounds(call, RoundClock(1, self.plan.calls, self.plan, gate, self.device))
        return {"peak_mib": memory.peak_mib()}


def _images_and_labels(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i["image"] for i in items]), torch.stack([i["label"] for i in items])


def _endless(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------------
# the driver: each side in a process of its own, rounds alternating


def make_side(side: str, shape: Shape, models: Path, plan: Plan, device: torch.device, ref: Optional[Path]):
    if side == "original":
        return Original(shape, models, plan, device, ref)
    return Vistrain(shape, models, plan, device, token_cache=side == "vistrain_cached")


MEASUREMENTS = ("train", "encode", "sample")


def _serve(conn, side: str, whats: list[str], shape: Shape, models: Path, plan: Plan, device: str,
           ref: Optional[Path]) -> None:
    """A child process: build one side, then run its measurements in turn, each when the parent says "start",
    reporting through the pipe."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    runner = make_side(side, shape, models, plan, device, ref)
    for what in whats:
        if conn.recv() != "start":
            raise RuntimeError("the benchmark's parent process sent something other than 'start'")
        result = getattr(runner, what)(PipeGate(conn))
        conn.send(("done", {"label": runner.label, "attention": runner.attention, **result}))


class Child:
    def __init__(self, side: str, whats: list[str], shape: Shape, models: Path, plan: Plan, device: torch.device,
                 ref: Optional[Path]):
        self.side = side
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_serve,
                                   args=(child_conn, side, whats, shape, models, plan, str(device), ref))
        self.process.start()

    def expect(self, kind: str):
        try:
            got, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the benchmark's {self.side} process ended (its error is above)") from None
        if got != kind:
            raise RuntimeError(f"the benchmark's {self.side} process answered {got!r}, not {kind!r}")
        return value

    def close(self) -> None:
        self.process.join(60)
        if self.process.is_alive():
            self.process.terminate()


def alternate(jobs: dict[str, list[str]], rounds: int, **kw) -> dict[str, dict[str, dict]]:
    """Each side in a process of its own, running its measurements (`jobs`: side -> measurements) in the order of
    MEASUREMENTS. For each measurement the sides taking part warm up one after the other, then run the rounds
    alternately (who goes first alternates too), so no side's warm-up (compiling) overlaps another's rounds."""
    children = {side: Child(side, whats, **kw) for side, whats in jobs.items()}  # they start up side by side
    results: dict[str, dict[str, dict]] = {side: {} for side in jobs}
    try:
        for what in MEASUREMENTS:
            taking_part = [children[side] for side, whats in jobs.items() if what in whats]
            for child in taking_part:
                child.conn.send("start")
                child.expect("warm")
            times: list[list[float]] = [[] for _ in taking_part]
            for r in range(rounds):
                for i in (range(len(taking_part)) if r % 2 == 0 else reversed(range(len(taking_part)))):
                    taking_part[i].conn.send("go")
                    times[i].append(taking_part[i].expect("round"))
            for child, t in zip(taking_part, times):
                results[child.side][what] = {"rounds": t, **child.expect("done")}
    finally:
        for child in children.values():
            child.close()
    return results


def inline(jobs: dict[str, list[str]], rounds: int, **kw) -> dict[str, dict[str, dict]]:
    """vistrain's half alone: its measurements one after the other in this process (no process to start)."""
    results: dict[str, dict[str, dict]] = {side: {} for side in jobs}
    for what in MEASUREMENTS:
        for side, whats in jobs.items():
            if what in whats:
                runner, gate = make_side(side, **kw), Gate()
                result = getattr(runner, what)(gate)
                results[side][what] = {"rounds": gate.rounds, "label": runner.label, "attention": runner.attention,
                                       **result}
    return results


# ---------------------------------------------------------------------------------------------------
# the table


def training_flops_per_image(shape: Shape) -> float:
    """6N per token (forward + backward matmuls) plus attention over L keys: the VAR task's count for `mfu`."""
    from vistrain.models.var import VAR, VARConfig

    with torch.device("meta"):
        model = VAR(VARConfig(depth=shape.depth, num_classes=NUM_CLASSES, vocab_size=shape.vocab_size,
                              z_channels=shape.z_channels, patch_nums=shape.patch_nums))
    n_params = sum(p.numel() for p in model.parameters())
    return shape.tokens * (6 * n_params + 12 * shape.depth * model.width * shape.tokens)


def row(what: str, result: dict, per_round: int, images_per_call: int, mfu_flops: Optional[float] = None) -> dict:
    call_s = statistics.median(result["rounds"]) / per_round
    ips = images_per_call / call_s
    return {"what": what, "side": result["label"], "attention": result["attention"], "ms": 1e3 * call_s,
            "images_per_s": ips, "peak_mib": result["peak_mib"], "mfu": mfu_flops * ips if mfu_flops else None}


def ratio(rows: list[dict], what: str, side: str = "vistrain") -> Optional[float]:
    found = {r["side"]: r["images_per_s"] for r in rows if r["what"] == what}
    return found[side] / found["original"] if "original" in found and side in found else None


def print_table(title: str, rows: list[dict], device: torch.device) -> None:
    memory = "peak MiB (CUDA allocated)" if device.type == "cuda" else "peak MiB (RSS growth)"
    print(f"\n{title}\n")
    print(f"| | side | attention | ms | images/s | {memory} | MFU | vistrain / original |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        x = ratio(rows, r["what"], r["side"]) if r["side"] != "original" else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['what']} | {r['side']} | {r['attention']} | {r['ms']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['peak_mib']:.0f} | {mfu} | {'' if x is None else f'{x:.2f}'} |")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"


def measure(shape: Shape, plan: Plan, device: torch.device, ref: Optional[Path], token_cache: bool,
            measurements: tuple[str, ...] = MEASUREMENTS) -> tuple[list[dict], list[str]]:
    """Train, encode and sample, each side by side: rows for the table, and notes to print below it."""
    from vistrain.engine.meters import device_peak_tflops

    peak = device_peak_tflops(device, shape.precision)
    train_flops = training_flops_per_image(shape) / (peak * 1e12) if peak else None
    with tempfile.TemporaryDirectory() as tmp, _cache_dir(Path(tmp) / "cache"):
        kw = dict(shape=shape, models=write_models(shape, Path(tmp) / "models"), plan=plan, device=device, ref=ref)
        jobs = {side: list(measurements) for side in ["original"] * (ref is not None) + ["vistrain"]}
        if token_cache and "train" in measurements:  # its cache is built as it starts: never in a timed step
            jobs["vistrain_cached"] = ["train"]
        if ref is None:
            results = inline(jobs, plan.rounds, **kw)
        elif device.type == "cuda":  # one process per side: CUDA's peak is reset for each measurement
            results = alternate(jobs, plan.rounds, **kw)
        else:  # a fresh process per side and measurement: a CPU's peak resident set cannot be reset
            results = {side: {} for side in jobs}
            for what in MEASUREMENTS:
                part = alternate({side: [what] for side, whats in jobs.items() if what in whats}, plan.rounds, **kw)
                for side, measured in part.items():
                    results[side].update(measured)
    b = shape.batch
    rows = [row("train step", r["train"], plan.steps, b, train_flops) for r in results.values() if "train" in r]
    rows += [row(f"encode batch {b} (teacher forcing)", r["encode"], plan.calls, b)
             for r in results.values() if "encode" in r]
    rows += [row(f"sample batch {shape.sample_batch}", r["sample"], plan.calls, shape.sample_batch)
             for r in results.values() if "sample" in r]
    notes = [_cache_note(results["vistrain_cached"]["train"], rows, b)] if "vistrain_cached" in results else []
    return rows, notes


@contextlib.contextmanager
def _cache_dir(folder: Path):
    """vistrain's cache (var.token_cache) in the benchmark's temporary folder, for this process and its children."""
    before = os.environ.get("VISTRAIN_CACHE_DIR")
    os.environ["VISTRAIN_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VISTRAIN_CACHE_DIR")
        else:
            os.environ["VISTRAIN_CACHE_DIR"] = before


def _cache_note(cached: dict, rows: list[dict], batch: int) -> str:
    """The token cache's trade-off: what building it cost against what each step saves."""
    step_ms = {r["side"]: r["ms"] for r in rows if r["what"] == "train step"}
    saved_ms = step_ms["vistrain"] - step_ms["vistrain, var.token_cache"]
    build_ms_per_image = 1e3 * cached["cache_s"] / cached["images"]
    note = (f"var.token_cache: built once in {cached['cache_s']:.1f} s for {cached['images']} images "
            f"({build_ms_per_image:.2f} ms per image); each step saves {saved_ms:.1f} ms "
            f"({saved_ms / batch:.2f} ms per image)")
    if saved_ms > 0:
        note += f": it pays for itself after {build_ms_per_image / (saved_ms / batch):.1f} epochs"
    return note


def main(argv: Optional[list[str]] = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    depths, shape_defaults = defaults(device)
    cuda = device.type == "cuda"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", type=Path, help="a checkout of FoundationVision/VAR (without it: vistrain alone)")
    parser.add_argument("--depth", type=int, nargs="+", default=depths)
    parser.add_argument("--resolution", type=int, choices=sorted(SCHEDULES), default=shape_defaults["resolution"])
    parser.add_argument("--batch", type=int, default=shape_defaults["batch"])
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=shape_defaults["precision"])
    parser.add_argument("--vae-ch", type=int, default=shape_defaults["vae_ch"], help="tokenizer width (160: official)")
    parser.add_argument("--sample-batch", type=int, default=shape_defaults["sample_batch"])
    parser.add_argument("--steps", type=int, default=10 if cuda else 4, help="training steps per round")
    parser.add_argument("--calls", type=int, default=3, help="encoding / sampling calls per round")
    parser.add_argument("--rounds", type=int, default=3 if cuda else 5)
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1, help="training steps before the rounds")
    parser.add_argument("--attn", choices=("sdpa", "flex", "auto"), default="sdpa", help="vistrain's model.attn_impl")
    parser.add_argument("--encoder-precision", choices=("fp32", "bf16"), default="fp32",
                        help="vistrain's var.encoder_precision")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                        help="vistrain: train.compile=blocks, compiled teacher forcing and sampling (default: CUDA)")
    parser.add_argument("--measure", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                        help="what to time: the training step, teacher forcing, sampling (default: all three)")
    parser.add_argument("--token-cache", action="store_true", help="also train vistrain with var.token_cache")
    parser.add_argument("--threads", type=int, help="CPU threads per process (default: torch's; on a machine that "
                        "other work keeps busy, 1 spares each side threads that wait for one another)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall: seconds; cpu: the CPU seconds "
                        "of the side's process (all its threads), which a busy CPU changes less (CPU only)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.ref is not None and not (args.ref / "models" / "var.py").is_file():
        parser.error(f"--ref {args.ref}: not a checkout of FoundationVision/VAR (it has no models/var.py)")
    if args.clock == "cpu" and cuda:
        parser.error("--clock cpu: a GPU works while the CPU waits; time a GPU with --clock wall")
    if args.threads:
        torch.set_num_threads(args.threads)

    plan = Plan(warmup=args.warmup, steps=args.steps, rounds=args.rounds, calls=args.calls,
                encoder_precision=args.encoder_precision, attn_impl=args.attn, compile=args.compile,
                threads=args.threads, clock=args.clock)
    all_rows = []
    for depth in args.depth:
        shape = Shape(depth=depth, resolution=args.resolution, batch=args.batch, precision=args.precision,
                      vae_ch=args.vae_ch, sample_batch=args.sample_batch)
        rows, notes = measure(shape, plan, device, args.ref, args.token_cache,
                              tuple(m for m in MEASUREMENTS if m in args.measure))
        print_table(f"{shape.name()}, tokenizer ch {shape.vae_ch}, {device_description(device)}, torch "
                    f"{torch.__version__}, vistrain compile {'on' if plan.compile else 'off'}; medians of "
                    f"{plan.rounds} alternating rounds of {plan.steps} steps / {plan.calls} calls"
                    f"{', CPU time' if plan.clock == 'cpu' else ''}", rows, device)
        for note in notes:
            print(f"\n{note}")
        all_rows += [{"shape": shape.name(), **r} for r in rows]
    if args.json:
        args.json.write_text(json.dumps({"device": device_description(device), "torch": torch.__version__,
                                         "rows": all_rows}, indent=2) + "\n")
    if args.ref is not None:
        first = [r for r in all_rows if r["shape"] == all_rows[0]["shape"]]
        headline = "train step" if "train" in args.measure else first[0]["what"]
        print(f"\nvistrain/original: {ratio(first, headline):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The GAN's whole training iteration through the engine, beside a bare PyTorch loop doing the same computation.

    python benchmarks/gan_step.py                           # GPU: ResNet pair at 128 and 256 px, bf16, 4 variants
    python benchmarks/gan_step.py --shape cpu               # the default without a GPU (under a minute)
    python benchmarks/gan_step.py --variants eager,compile --json out.json --time-budget 120

One iteration is what `train.max_steps` counts for a GAN: a D step (G's fakes under no_grad, D on reals and fakes
in one forward, hinge loss, Adam) and a G step (G forward, D on the fakes with D's weights frozen, hinge, Adam),
then the EMA update of G_ema; the ResNet pair of models/gan.py (`resnet`: SNGAN / BigGAN-like, spectral norm in
D, class-conditional on the digits' 10 classes), on the digits upsampled to RGB at the resolution (no data set to
fetch; the same images and stream on both sides).
  engine  `vistrain.engine.Trainer.fit()` on the gan task: its data stream, phases, autocast, count normalisation,
          grad norms, the shared finiteness check, schedules, the EMA update; logging, evals and checkpoints set
          far apart.
  bare    the same models, losses (tasks/gan_losses.py), Adam settings (fused on CUDA, as the engine's) and EMA
          update, written as a plain loop over the same stream: zero_grad, forward, backward, step.
Variants (--variants): eager, channels_last (train.channels_last: kernels and images NHWC), compile (each of
G's and D's blocks compiled, train.compile=blocks), channels_last+compile. The bare loop gets each the same way.

Timing: each side runs in a process of its own (peak memory is then its own), building each case (resolution x
variant) once: --warmup iterations (compiling, with compile), then --rounds timed rounds of --steps iterations,
the rounds alternating between the sides (who goes first alternates too), the device synchronised only at both
ends of a round: a loop that never waits for the GPU is timed as it runs, and the engine's one host sync per
optimizer step counts against it. (A side is not rebuilt between rounds: spectral norm makes a class per layer,
so every new D would be compiled anew.) The table gives medians over rounds: images/s (real images per
iteration, the batch, over seconds), ms per iteration, peak CUDA memory of the side's case (its models,
optimizers, data and steps; n/a on a CPU), each variant's speed over the eager one of the same side, and engine /
bare. It ends with one line: `engine/bare: X.XX` (the lowest ratio measured) and the fastest variant.
--time-budget S starts no case that would end past S seconds (judged by the longest case so far); the ones left
out are listed as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

NUM_CLASSES = 10  # the digits'


@dataclass(frozen=True)
class Shape:
    name: str
    resolutions: tuple[int, ...]
    batches: tuple[int, ...]  # the batch at each resolution
    base_channels: int  # G's and D's width multiplier (models/gan.py: 8x this at 4x4)
    z_dim: int
    precision: str
    workers: int  # data loader workers of both sides
    warmup: int  # iterations before the timed ones, each round
    steps: int  # timed iterations per round
    rounds: int


SHAPES = {
    "gpu": Shape("gpu", (128, 256), (64, 32), base_channels=64, z_dim=128, precision="bf16", workers=4, warmup=3,
                 steps=10, rounds=2),
    "cpu": Shape("cpu", (32,), (16,), base_channels=16, z_dim=64, precision="fp32", workers=0, warmup=2, steps=5,
                 rounds=3),
    "tiny": Shape("tiny", (16,), (4,), base_channels=4, z_dim=16, precision="fp32", workers=0, warmup=1, steps=2,
                  rounds=1),
}


@dataclass(frozen=True)
class Variant:
    name: str
    channels_last: bool
    compile: bool


VARIANTS = {v.name: v for v in (Variant("eager", False, False), Variant("channels_last", True, False),
                                Variant("compile", False, True), Variant("channels_last+compile", True, True))}
SIDES = ("bare", "engine")


@dataclass(frozen=True)
class Case:
    shape: Shape
    resolution: int
    batch: int
    variant: Variant

    @property
    def label(self) -> str:
        return f"{self.resolution} px, batch {self.batch}"


# ------------------------------------------------------------------------------------------------ measuring


class Done(Exception):
    """The conductor ended the case: leave the loop (the engine's too: no final checkpoint or eval)."""


class Rounds:
    """Ticked after every iteration of a side's loop: after the warm-up it reports "warm", after each round of
    `steps` iterations the round's seconds, and then waits for the conductor: "go" starts the next round, "end"
    leaves the loop (Done). The device is synchronised at both ends of a round and nowhere in between."""

    def __init__(self, warmup: int, steps: int, device: torch.device, conn):
        if warmup < 1 or steps < 1:
            raise ValueError("at least one warm-up and one timed iteration")
        self.warmup, self.steps, self.device, self.conn = warmup, steps, device, conn
        self.iterations, self.t0 = 0, 0.0

    def tick(self) -> None:
        self.iterations += 1
        timed = self.iterations - self.warmup
        if timed < 0 or timed % self.steps:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.conn.send(("warm", None) if timed == 0 else ("round", time.perf_counter() - self.t0))
        if self.conn.recv() == "end":
            raise Done
        self.t0 = time.perf_counter()


def config(case: Case, out_dir: Path):
    """The gan task's config for the case: what the engine runs, and where the bare loop reads its settings."""
    from vistrain.config import load_config

    far, s = 10**9, case.shape  # logging, evals and checkpoints never come up
    return load_config(None, [
        "task=gan", f"run.out_dir={out_dir}", "run.loggers=[]", "run.resume=never", f"train.max_steps={far}",
        f"train.batch_size={case.batch}", f"train.precision={s.precision}",
        f"train.compile={'blocks' if case.variant.compile else 'false'}",
        f"train.channels_last={str(case.variant.channels_last).lower()}",
        f"train.log_every={far}", f"train.eval_every={far}", f"train.ckpt_every={far}",
        "data.name=digits", f"data.resolution={case.resolution}", "data.channels=3", f"data.num_workers={s.workers}",
        "model.generator.name=resnet", "model.discriminator.name=resnet", f"model.generator.z_dim={s.z_dim}",
        f"model.generator.base_channels={s.base_channels}", f"model.discriminator.base_channels={s.base_channels}",
        "gan.loss=hinge", "gan.num_samples=8",
    ])


def engine_iterations(case: Case, device: torch.device, rounds: Rounds) -> None:
    """`Trainer.fit()` on the gan task, the rounds ticking at the end of every step (after the EMA update)."""
    from vistrain.engine.dist import DistContext
    from vistrain.engine.trainer import Trainer
    from vistrain.registry import get_spec

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(case, Path(tmp) / "run")
        spec = get_spec("gan")

        def build(env):
            task = spec.build(cfg, env)
            step_end = task.on_step_end

            def timed_step_end(step: int) -> None:
                step_end(step)
                rounds.tick()

            task.on_step_end = timed_step_end
            return task

        Trainer(cfg, build, DistContext(0, 1, 0, device)).fit()


def bare_iterations(case: Case, device: torch.device, rounds: Rounds) -> None:
    """The same iteration as a plain loop: the task's models, losses, Adam settings and EMA, nothing else."""
    from vistrain.data.loader import MicroBatchStream, build_image_dataset
    from vistrain.data.sampler import StreamOrder
    from vistrain.engine.ema import ema_beta, update_ema
    from vistrain.models.gan import build_discriminator, build_generator
    from vistrain.tasks.gan_losses import discriminator_loss, generator_loss

    cfg = config(case, Path("unused"))
    dataset = build_image_dataset(cfg.data, "train")
    stream = MicroBatchStream(dataset, StreamOrder(len(dataset), seed=0), case.batch, 0, 1, case.shape.workers)
    shape = dict(resolution=case.resolution, channels=3, num_classes=NUM_CLASSES)
    G = build_generator(cfg.model.generator, **shape).to(device)
    D = build_discriminator(cfg.model.discriminator, **shape).to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    layout = torch.channels_last if case.variant.channels_last else torch.preserve_format
    if case.variant.channels_last:
        G.to(memory_format=torch.channels_last)
        D.to(memory_format=torch.channels_last)
    if case.variant.compile:
        for block in [*G.blocks, *D.blocks]:
            block.compile()
        # as the engine does: torch.compile's 8 graphs per function would leave the blocks past them eager
        limit = 4 * max(len(G.blocks), len(D.blocks))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)

    def adam(net, o):
        return torch.optim.Adam(net.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                fused=True if device.type == "cuda" else None)

    opt_g, opt_d = adam(G, cfg.optim.g), adam(D, cfg.optim.d)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.shape.precision == "bf16")
    loss, z_dim, gan = cfg.gan.loss, cfg.model.generator.z_dim, cfg.gan
    images_seen = 0
    while True:
        batch = next(stream)
        real = batch["image"].to(device, non_blocking=True, memory_format=layout)
        labels = batch["label"].to(device, non_blocking=True)
        B = len(labels)
        D.requires_grad_(True)
        with autocast:
            with torch.no_grad():
                fake = G(torch.randn(B, z_dim, device=device), labels)
            real_logits, fake_logits = D(torch.cat([real, fake]), torch.cat([labels, labels])).float().chunk(2)
            d_loss = discriminator_loss(loss, real_logits, fake_logits)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        D.requires_grad_(False)
        with autocast:
            g_loss = generator_loss(loss, D(G(torch.randn(B, z_dim, device=device), labels), labels).float())
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()

        images_seen += B
        update_ema(G_ema, G, ema_beta(B, gan.ema_half_life_kimg, gan.ema_rampup, images_seen))
        rounds.tick()


RUNNERS: dict[str, Callable[[Case, torch.device, Rounds], None]] = {"bare": bare_iterations,
                                                                     "engine": engine_iterations}


def serve(side: str, device: str, threads: Optional[int], conn) -> None:
    """A side's process: each case the conductor sends is built, warmed up and run round by round; its peak memory
    (MiB, None on a CPU) goes back at the end. None ends the process."""
    from vistrain.engine.meters import peak_memory_mb

    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    while (case := conn.recv()) is not None:
        gc.collect()  # the last case, its loader workers too, is gone before this one's peak is counted
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with contextlib.suppress(Done):
            RUNNERS[side](case, device, Rounds(case.shape.warmup, case.shape.steps, device, conn))
        conn.send(("done", peak_memory_mb(device)))


class Side:
    """The conductor's end of a side's process."""

    def __init__(self, side: str, device: torch.device, threads: Optional[int]):
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        self.side = side
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(side, str(device), threads, child), daemon=True)
        self.process.start()

    def ask(self, message, expect: str):
        self.conn.send(message)
        try:
            got, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"gan_step.py: the {self.side} side's process ended (its error is above)") from None
        if got != expect:
            raise RuntimeError(f"gan_step.py: the {self.side} side answered {got!r}, not {expect!r}")
        return value

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()


def measure(case: Case, sides: dict[str, Side]) -> list[dict]:
    """Both sides of one case: warm-ups one after the other (compiling does not overlap), then alternating rounds;
    a row per side (medians over rounds)."""
    for side in SIDES:
        sides[side].ask(case, "warm")
    seconds: dict[str, list[float]] = {side: [] for side in SIDES}
    for r in range(case.shape.rounds):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            seconds[side].append(sides[side].ask("go", "round"))
        print(f"[{case.label}, {case.variant.name}] round {r + 1}/{case.shape.rounds}: "
              + ", ".join(f"{side} {1e3 * seconds[side][-1] / case.shape.steps:.1f} ms" for side in SIDES), flush=True)
    peaks = {side: sides[side].ask("end", "done") for side in SIDES}
    rows = []
    for side in SIDES:
        per_iteration = statistics.median(seconds[side]) / case.shape.steps
        rows.append({"resolution": case.resolution, "batch": case.batch, "variant": case.variant.name, "side": side,
                     "ms_per_iteration": 1e3 * per_iteration, "images_per_s": case.batch / per_iteration,
                     "peak_mib": peaks[side],
                     "ms_per_iteration_each_round": [1e3 * s / case.shape.steps for s in seconds[side]]})
    return rows


def run_cases(cases: list[Case], device: torch.device, budget_s: Optional[float], threads: Optional[int],
              measured: Callable[[list[dict]], None]) -> tuple[list[dict], list[str]]:
    """Rows of every case measured, and the labels of those the time budget left out; `measured` gets the rows so
    far after each case."""
    rows, skipped, longest = [], [], 0.0
    start = time.perf_counter()
    sides: dict[str, Side] = {}
    try:
        for case in cases:
            if budget_s is not None and time.perf_counter() - start + longest >= budget_s:
                skipped.append(f"{case.label}, {case.variant.name}")
                continue
            t0 = time.perf_counter()
            if not sides:  # started at the first case measured: none when the budget leaves out every case
                sides = {side: Side(side, device, threads) for side in SIDES}
            rows += measure(case, sides)
            longest = max(longest, time.perf_counter() - t0)
            measured(rows)
    finally:
        for side in sides.values():
            side.close()
    return rows, skipped


# ------------------------------------------------------------------------------------------------ the table


def ratio(rows: list[dict], row: dict, side: str, variant: str) -> Optional[float]:
    """`row`'s images/s over that of the row of `side` and `variant` at its resolution (None if not measured)."""
    for other in rows:
        if (other["resolution"], other["side"], other["variant"]) == (row["resolution"], side, variant):
            return row["images_per_s"] / other["images_per_s"]
    return None


def summary(rows: list[dict]) -> dict:
    engine = [r for r in rows if r["side"] == "engine"]
    ratios = [ratio(rows, r, "bare", r["variant"]) for r in engine]
    if not engine:
        return {"engine_over_bare": None, "fastest": None}
    fastest = max(engine, key=lambda r: (r["resolution"], r["images_per_s"]))  # at the largest resolution
    return {"engine_over_bare": min(ratios), "cases": len(engine),
            "fastest": {"resolution": fastest["resolution"], "variant": fastest["variant"],
                        "images_per_s": fastest["images_per_s"], "over_eager": ratio(rows, fastest, "engine", "eager")}}


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[dict], skipped: list[str], title: str) -> None:
    print(f"\n{title}\n")
    print("| resolution, batch | variant | side | images/s | ms/iteration | peak MiB | x eager (same side) "
          "| engine / bare |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        x_eager = fmt(ratio(rows, r, r["side"], "eager"), ".2f") if r["variant"] != "eager" else ""
        x_bare = fmt(ratio(rows, r, "bare", r["variant"]), ".2f") if r["side"] == "engine" else ""
        print(f"| {r['resolution']} px, batch {r['batch']} | {r['variant']} | {r['side']} | {r['images_per_s']:,.1f} "
              f"| {r['ms_per_iteration']:.1f} | {fmt(r['peak_mib'], ',.0f')} | {x_eager} | {x_bare} |")
    for label in skipped:
        print(f"| {label} | | skipped: over --time-budget | | | | | |")


def summary_line(s: dict) -> str:
    if s["engine_over_bare"] is None:
        return "engine/bare: n/a (no case measured)"
    f = s["fastest"]
    over_eager = f", {f['over_eager']:.2f}x eager" if f["over_eager"] is not None else ""
    return (f"engine/bare: {s['engine_over_bare']:.2f} (lowest of {s['cases']} cases); "
            f"fastest at {f['resolution']} px: "
            f"{f['variant']}, {f['images_per_s']:,.0f} images/s through the engine{over_eager}")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f})"


def main(argv: Optional[list[str]] = None) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), help="default: gpu on CUDA, else cpu")
    parser.add_argument("--resolution", type=int, nargs="+", help="default: the shape's (gpu: 128 256)")
    parser.add_argument("--batch", type=int, nargs="+", help="one per resolution (default: the shape's)")
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(VARIANTS)} (default: all on CUDA; "
                        "eager,channels_last on a CPU, where compiling takes minutes)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--steps", type=int, help="timed iterations per round")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workers", type=int, help="data loader workers (default 4 on CUDA, 0 on a CPU)")
    parser.add_argument("--time-budget", type=float, metavar="S", help="start no case that would end past S seconds")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the rows and the summary here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape or ("gpu" if device.type == "cuda" else "cpu")]
    changes = {k: v for k, v in dict(precision=args.precision, warmup=args.warmup, steps=args.steps,
                                     rounds=args.rounds, workers=args.workers).items() if v is not None}
    if args.resolution:
        changes["resolutions"] = tuple(args.resolution)
        changes["batches"] = tuple(args.batch or [shape.batches[-1]] * len(args.resolution))
    elif args.batch:
        changes["batches"] = tuple(args.batch)
    shape = dataclasses.replace(shape, **changes)
    if len(shape.batches) != len(shape.resolutions):
        parser.error(f"--batch: one per resolution ({len(shape.resolutions)}), got {len(shape.batches)}")
    names = (args.variants.split(",") if args.variants
             else list(VARIANTS) if device.type == "cuda" else ["eager", "channels_last"])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    # cheapest first, so that a time budget leaves out compiled cases rather than whole resolutions
    cases = [Case(shape, r, b, VARIANTS[n]) for n in names for r, b in zip(shape.resolutions, shape.batches)]

    def write(rows: list[dict], skipped: Optional[list[str]] = None) -> None:
        """The JSON, rewritten after every case: a run stopped from outside (the GPU suite's timeout) keeps the
        cases it measured. It is final once `skipped` is known."""
        if args.json:
            partial = args.json.with_name(args.json.name + ".partial")  # renamed whole: never read half-written
            partial.write_text(json.dumps({
                "device": device_description(device), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                "shape": dataclasses.asdict(shape), "rows": rows, "skipped": skipped, "summary": summary(rows),
                "complete": skipped is not None}, indent=2) + "\n")
            partial.replace(args.json)

    rows, skipped = run_cases(cases, device, args.time_budget, args.threads, write)
    write(rows, skipped)
    title = (f"GAN iteration (D + G step, hinge, Adam, EMA) of the ResNet pair, through the engine and in a bare "
             f"loop, on {device_description(device)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; "
             f"{shape.precision}, width {shape.base_channels}; medians of {shape.rounds} alternating rounds of "
             f"{shape.steps} iterations after {shape.warmup} warm-up")
    print_table(rows, skipped, title)
    print(f"\n{summary_line(summary(rows))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

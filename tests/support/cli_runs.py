"""What the command-line tests share: `vistrain ...` called in-process, a folder's bytes to prove that a refused
command changed nothing, and the overrides that make the digits GAN demo a run of seconds."""

from __future__ import annotations

from pathlib import Path

from vistrain import cli

REPO = Path(__file__).resolve().parents[2]
GAN_DIGITS = REPO / "configs" / "gan" / "digits.yaml"
# 16 px, 8 base channels, 32 images for FID-like stats; steps, checkpoints and evals are each test's own choice
TINY_GAN = ["data.resolution=16", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
            "gan.fd_samples=32", "gan.num_samples=16", "data.num_workers=0", "train.batch_size=16",
            "run.loggers=[jsonl]"]


def vistrain(*args) -> int:
    """The exit code of `vistrain ARGS`, run in this process (paths may be Path objects)."""
    return cli.main([str(a) for a in args])


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

"""What a trained model can do beyond training: the capabilities a task offers to the faces.

A task lists the ones it has in its TaskSpec (`capabilities=(...)`); a face asks `spec.capability(Kind)` and
gets the task's object, or None when the task cannot do that:

    ImageSampler     `vistrain sample`, and the class-balanced samples `vistrain eval` scores (GAN, VAR)
    Reconstructor    `vistrain eval --metrics rfid,psnr,ssim` of a tokenizer's val reconstructions (VQ-VAE)
    PromptAnswerer   `vistrain generate`: an answer to a prompt about images (VLM)
    Exporter         `vistrain export --format NAME`: another project's files (VLM: transformers; VAR: the
                     official .pth)

Each is a small class: subclass it, implement its abstract methods (keyword arguments, documented here), and
override the defaults that do not fit. Models arrive as the files of a checkpoint or model folder: its
config.json (`model_config`) and its weights (prefixed by network name, as model.safetensors holds them).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from vistrain.errors import ConfigError

# ------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SampleOption:
    """A task's own flag of `vistrain sample` and `vistrain eval`, e.g. VAR's `--top-k`; a bool type makes a
    switch. The task that declares a flag says which values it accepts: `valid(value)`, and `rule` in words."""

    flag: str
    type: type
    default: Any
    help: str
    valid: Optional[Callable[[Any], bool]] = None
    rule: str = ""  # e.g. "must be >= 0 (0 = off)"

    @property
    def dest(self) -> str:
        """The option's key in SampleRequest.options (argparse's dest)."""
        return self.flag.lstrip("-").replace("-", "_")

    def check(self, value: Any) -> None:
        """Refuse a value the task cannot use, naming the flag (None: not given, nothing to check)."""
        if value is not None and self.valid is not None and not self.valid(value):
            raise ConfigError(f"{self.flag} {value}: {self.rule}")


@dataclass
class SampleRequest:
    """What is asked of an ImageSampler: `num` images, in chunks of at most `batch_size`."""

    num: int
    labels: Optional[list[int]]  # class ids to cycle through; None: the sampler's own choice (all classes)
    seed: int
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)  # the task's own SampleOptions, by dest name


class ImageSampler(ABC):
    """Images from a trained generator."""

    options: tuple[SampleOption, ...] = ()  # the task's own flags of `vistrain sample` / `eval`

    @abstractmethod
    def sample(self, model_config: dict, weights: dict[str, Tensor], request: SampleRequest,
               device: torch.device) -> Iterator[Tensor]:
        """Chunks of at most request.batch_size images in [-1, 1] (N x C x H x W, on the CPU), `count(...)`
        images in all. The first images of a seed must not depend on how many are asked for."""

    def num_classes(self, model_config: dict) -> int:
        """The classes of a conditional generator (`vistrain eval` asks for them in turn); 0: unconditional."""
        return 0

    def count(self, model_config: dict, request: SampleRequest) -> int:
        """How many images `sample` yields for `request`, when the task's own options decide (VAR's
        --num-per-class); raises ConfigError for options that contradict each other."""
        return request.num

    def grid_columns(self, model_config: dict, request: SampleRequest) -> Optional[int]:
        """Images per row of a .png grid; None: a square grid."""
        return None


# ------------------------------------------------------------------------------------ reconstruction


class Reconstructor(ABC):
    """A tokenizer's reconstructions of its val images."""

    @abstractmethod
    def val_images(self, model_config: dict) -> Any:
        """The val set the reconstructions are of (indexable, items with an "image" in [-1, 1]); built once by the
        caller and handed to `reconstruct`."""

    @abstractmethod
    def reconstruct(self, model_config: dict, weights: dict[str, Tensor], *, val_set: Any, first: int, count: int,
                    batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunks of (originals, reconstructions) of val images first .. first + count - 1, in [-1, 1] on the CPU."""


# ----------------------------------------------------------------------------------------- prompts


@dataclass
class Prompt:
    """A question about images, as `vistrain generate` asks it."""

    text: str
    images: list[str]  # image files, in the order the text refers to them
    max_new_tokens: int = 32
    greedy: bool = True  # the most likely token each time; else sampled with the settings below
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 0.0  # 0: off
    seed: int = 0


class PromptAnswerer(ABC):
    """Answers a prompt about images with a trained vision-language model."""

    @abstractmethod
    def answer(self, folder: Path, prompt: Prompt, device: torch.device) -> str:
        """The answer of the model in `folder` (a checkpoint or model folder). Raises ConfigError for a request the
        model cannot honour (more new tokens than its context holds), ValueError for unreadable images."""


# ----------------------------------------------------------------------------------------- exports


class Exporter(ABC):
    """Writes a trained model in the files another project loads."""

    formats: tuple[str, ...] = ()  # the values of `vistrain export --format` this exporter writes

    @abstractmethod
    def export(self, fmt: str, folder: Path, out: Path, provenance: dict) -> Path:
        """Write the model of checkpoint or model folder `folder` as format `fmt` into the new folder `out`
        (`provenance`: the export's record, to keep beside the files). Raises ConfigError, naming the reason,
        for a model that format cannot hold."""


__all__ = ["Exporter", "ImageSampler", "Prompt", "PromptAnswerer", "Reconstructor", "SampleOption",
           "SampleRequest"]

"""GAN training in the imaginaire / StyleGAN2 mould: alternating D and G updates, lazy R1, EMA generator.

Phases per step: `d` (dis_step optimizer steps, each on a fresh batch of real images), `g` (gen_step steps,
on the labels of D's last batch, as imaginaire's generator update reuses the discriminator's data), and `r1`
every `r1_interval` steps when `gan.loss_weight.r1_gamma > 0` (on D's last batch of reals). Losses are
reported per image: summed over the micro-batch, with the number of images as the count.

Every eval logs `fd_pixels` (a cheap Fréchet distance on 8x8 grey pixels, on any data) and, in the loop
(`eval.mode: sync`), `eval.metrics` of `eval.num_samples` class-balanced images of G_ema: the digits default
asks for the digits judge (`fd_judge`, `class_acc`, `is_judge`), an ImageNet run for `fid` etc. `best` is
chosen by eval.best, else by the first of fid / fd_judge / kid / IS that eval.metrics computes, else fd_pixels.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.config import ConfigError, ExperimentConfig
from vistrain.data.data_config import ImageDataConfig
from vistrain.data.loader import MicroBatchStream, build_image_dataset, check_enough_data
from vistrain.data.sampler import StreamOrder
from vistrain.engine.ema import ema_beta, update_ema
from vistrain.engine.images import make_grid
from vistrain.engine.optim import OptimConfig
from vistrain.engine.task import EvalResult, OptimizerSpec, Phase, PhaseLoss, Task, TaskEnv
from vistrain.eval.frechet import frechet_distance
from vistrain.eval.score import balanced_share, default_best, in_loop_scorer
from vistrain.models.diffaugment import diff_augment
from vistrain.models.gan import DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator
from vistrain.registry import TaskSpec, register
from vistrain.tasks.capabilities import ImageSampler, SampleRequest
from vistrain.tasks.gan_losses import LOSSES, discriminator_loss, generator_loss, r1_penalty


@dataclass
class GanModelConfig:
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    conditional: bool = True  # class-conditional when the data set has classes


@dataclass
class GanLossWeights:
    adversarial: float = 1.0
    r1_gamma: float = 0.0  # R1 penalty gamma/2 * |grad D(x)|^2 on reals; 0 disables the r1 phase


@dataclass
class GanTrainConfig:
    loss: str = "hinge"  # hinge | non_saturating | least_squares | wasserstein
    dis_step: int = 1
    gen_step: int = 1
    r1_interval: int = 16  # lazy regularisation: the r1 phase runs every this many steps
    loss_weight: GanLossWeights = field(default_factory=GanLossWeights)
    ema_half_life_kimg: float = 10.0  # G_ema half-life in thousands of images
    ema_rampup: Optional[float] = 0.05  # half-life <= images_seen * rampup early on; null disables
    augment: str = ""  # DiffAugment policy, e.g. "color,translation,cutout"
    num_samples: int = 64  # images in the fixed-noise sample grid (conditional: one column per class)
    fd_samples: int = 512  # generated images for val/fd_pixels (Fréchet distance on 8x8 pixels)


def _default_optim() -> OptimConfig:
    return OptimConfig(name="adam", lr=2e-4, betas=[0.0, 0.99])


@dataclass
class GanOptimConfig:
    g: OptimConfig = field(default_factory=_default_optim)
    d: OptimConfig = field(default_factory=_default_optim)


@dataclass
class GanConfig(ExperimentConfig):
    task: str = "gan"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: GanModelConfig = field(default_factory=GanModelConfig)
    gan: GanTrainConfig = field(default_factory=GanTrainConfig)
    optim: GanOptimConfig = field(default_factory=GanOptimConfig)


def lazy_regularization(cfg: OptimConfig, interval: int) -> OptimConfig:
    """StyleGAN2: when R1 runs every `interval` steps, scale lr and betas by interval / (interval + 1)."""
    ratio = interval / (interval + 1)
    return dataclasses.replace(cfg, lr=cfg.lr * ratio, betas=[b**ratio for b in cfg.betas])


class GanTask(Task):
    def __init__(self, cfg: GanConfig, env: TaskEnv):
        gan = cfg.gan
        if gan.loss not in LOSSES:
            raise ConfigError(f"gan.loss={gan.loss!r}: expected one of {', '.join(LOSSES)}")
        if gan.dis_step < 1 or gan.gen_step < 1 or gan.r1_interval < 1:
            raise ConfigError("gan.dis_step, gan.gen_step and gan.r1_interval must be at least 1")
        self.cfg, self.env = cfg, env
        self.device = env.dist.device
        self.train_set = build_image_dataset(cfg.data, "train")
        self.val_set = build_image_dataset(cfg.data, "val")
        check_enough_data(self.train_set, env.batch_size, f"the {cfg.data.name} training set")
        self.num_classes = self.train_set.num_classes if cfg.model.conditional else 0
        shape = dict(resolution=cfg.data.resolution, channels=cfg.data.channels, num_classes=self.num_classes)
        G = build_generator(cfg.model.generator, **shape).to(self.device)
        D = build_discriminator(cfg.model.discriminator, **shape).to(self.device)
        G_ema = copy.deepcopy(G).eval().requires_grad_(False)
        self.nets: dict[str, nn.Module] = {"G": G, "D": D, "G_ema": G_ema}
        self.trainable = ("G", "D")
        self.z_dim = G.z_dim

        r1_on = gan.loss_weight.r1_gamma > 0
        d_optim = lazy_regularization(cfg.optim.d, gan.r1_interval) if r1_on else cfg.optim.d
        self.optimizers = {"d": OptimizerSpec("D", d_optim), "g": OptimizerSpec("G", cfg.optim.g)}
        dist = env.dist
        self.reals = MicroBatchStream(self.train_set, StreamOrder(len(self.train_set), env.seed),
                                      env.micro_batch_size, dist.rank, dist.world_size, cfg.data.num_workers)
        self.phases = [
            Phase("d", optimizer="d", loss=self.dis_loss, data=self.reals, repeats=gan.dis_step),
            Phase("g", optimizer="g", loss=self.gen_loss, same_data_as="d", repeats=gan.gen_step),
        ]
        if r1_on:
            self.phases.append(Phase("r1", optimizer="d", loss=self.r1_loss, same_data_as="d",
                                     every=gan.r1_interval))
        # built now: a missing detector fails before step 1
        self.scorer = in_loop_scorer(cfg.eval, env.dist, cfg.data.name)
        self.best_metric = default_best(cfg.eval.metrics) or ("fd_pixels", "min")
        self.images_seen = 0
        self._real_features: Optional[Tensor] = None  # fd_pixels features of the validation set

        # Fixed noise and labels for the sample grid: the same images at every eval, independent of the run.
        g = torch.Generator().manual_seed(1234)
        self.fixed_z = torch.randn(gan.num_samples, self.z_dim, generator=g).to(self.device)
        self.fixed_labels = self._labels_for(torch.arange(gan.num_samples))

    # ----------------------------------------------------------------------------------- the phases

    def _labels_for(self, labels_B: Tensor) -> Optional[Tensor]:
        return (labels_B % self.num_classes).to(self.device) if self.num_classes else None

    def _augment(self, x_BCHW: Tensor) -> Tensor:
        return diff_augment(x_BCHW, self.cfg.gan.augment) if self.cfg.gan.augment else x_BCHW

    def _noise(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, self.z_dim, device=self.device)

    # The loss functions compute batch means (gan_losses.py); times the batch size B they are the sums over
    # images the engine wants, and B is the count it divides by after summing over micro-batches and ranks.

    def dis_loss(self, nets, batch) -> PhaseLoss:
        real_BCHW = batch["image"]
        B = real_BCHW.shape[0]
        labels_B = batch["label"] if self.num_classes else None
        with torch.no_grad():
            fake_BCHW = nets["G"](self._noise(B), labels_B)
        # One D forward over reals and fakes together: half the launches, and one spectral-norm update.
        both = torch.cat([self._augment(real_BCHW), self._augment(fake_BCHW)])
        both_labels = torch.cat([labels_B, labels_B]) if labels_B is not None else None
        real_logits_B, fake_logits_B = nets["D"](both, both_labels).float().chunk(2)
        loss = (self.cfg.gan.loss_weight.adversarial
                * discriminator_loss(self.cfg.gan.loss, real_logits_B, fake_logits_B))
        metrics = {"d_loss": loss * B, "d_real": real_logits_B.sum(), "d_fake": fake_logits_B.sum()}
        return PhaseLoss(loss * B, count=B, metrics=metrics, samples=B)

    def gen_loss(self, nets, batch) -> PhaseLoss:
        B = batch["image"].shape[0]
        labels_B = batch["label"] if self.num_classes else None
        fake_BCHW = nets["G"](self._noise(B), labels_B)
        fake_logits_B = nets["D"](self._augment(fake_BCHW), labels_B).float()
        loss = self.cfg.gan.loss_weight.adversarial * generator_loss(self.cfg.gan.loss, fake_logits_B)
        return PhaseLoss(loss * B, count=B, metrics={"g_loss": loss * B})

    def r1_loss(self, nets, batch) -> PhaseLoss:
        real_BCHW = batch["image"].detach().requires_grad_(True)
        B = real_BCHW.shape[0]
        labels_B = batch["label"] if self.num_classes else None
        real_logits_B = nets["D"](self._augment(real_BCHW), labels_B).float()
        penalty = r1_penalty(real_logits_B, real_BCHW)
        gamma, interval = self.cfg.gan.loss_weight.r1_gamma, self.cfg.gan.r1_interval
        # x0 keeps every D parameter in the graph (the last bias has no input gradient), which DDP requires.
        loss = gamma / 2 * penalty * interval + 0.0 * real_logits_B.sum()
        return PhaseLoss(loss * B, count=B, metrics={"r1_penalty": penalty * B})

    def on_step_end(self, step: int) -> None:
        self.images_seen += self.env.batch_size
        gan = self.cfg.gan
        beta = ema_beta(self.env.batch_size, gan.ema_half_life_kimg, gan.ema_rampup, self.images_seen)
        update_ema(self.nets["G_ema"], self.nets["G"], beta)

    # ------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        G_ema = self.nets["G_ema"]
        metrics = self._score_samples(G_ema) if self.scorer is not None else {}  # every rank: its share
        if not self.env.dist.is_main:
            return EvalResult(metrics=metrics)
        metrics["fd_pixels"] = self._fd_pixels(G_ema)
        # Conditional: one column per class, so a glance shows whether the labels are obeyed.
        grid = make_grid(G_ema(self.fixed_z, self.fixed_labels).float().cpu(), nrow=self.num_classes or 8)
        return EvalResult(metrics=metrics, images={"samples": grid})

    def _score_samples(self, G: nn.Module) -> dict[str, float]:
        """`eval.metrics` of `eval.num_samples` class-balanced images of G from fixed noise (the same images at
        every eval, and on any number of ranks: each rank generates its slice of them)."""
        ev, ctx = self.cfg.eval, self.env.dist
        classes_N = balanced_share(ev.num_samples, self.num_classes, ctx)
        per_rank = len(classes_N)
        z_all = torch.randn(per_rank * ctx.world_size, self.z_dim, generator=torch.Generator().manual_seed(4321))
        z_NZ = z_all[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]

        def chunks():
            for i in range(0, len(classes_N), ev.batch_size):
                classes_B = classes_N[i:i + ev.batch_size] if self.num_classes else None
                labels_B = self._labels_for(classes_B) if classes_B is not None else None
                yield G(z_NZ[i:i + ev.batch_size].to(self.device), labels_B), classes_B

        return self.scorer.score_samples(chunks())

    def _fd_pixels(self, G: nn.Module) -> float:
        """Fréchet distance between generated and validation images, both pooled to 8x8 grey pixels.

        Not FID (no Inception network may be downloaded here), but cheap, deterministic and it falls as
        samples start to look like the data: the metric the best checkpoint is chosen by.
        """
        if self._real_features is None:  # the validation images never change: decode them once
            real = torch.stack([self.val_set[i]["image"] for i in range(len(self.val_set))])
            self._real_features = _pixel_features(real)
        n = self.cfg.gan.fd_samples
        g = torch.Generator().manual_seed(4321)
        z = torch.randn(n, self.z_dim, generator=g)
        labels = self._labels_for(torch.randint(0, max(self.num_classes, 1), (n,), generator=g))
        fake = generate(G, z, labels, self.device)
        return frechet_distance(_pixel_features(fake), self._real_features)

    # ------------------------------------------------------------------------------- state and export

    def model_config(self) -> dict:
        return {
            "task": "gan",
            "generator": dataclasses.asdict(self.cfg.model.generator),
            "discriminator": dataclasses.asdict(self.cfg.model.discriminator),
            "resolution": self.cfg.data.resolution,
            "channels": self.cfg.data.channels,
            "num_classes": self.num_classes,
        }

    def state_dict(self) -> dict:
        return {"images_seen": self.images_seen, "reals": self.reals.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.images_seen = int(state["images_seen"])
        self.reals.load_state_dict(state["reals"])


@torch.no_grad()
def generate(G: nn.Module, z_NZ: Tensor, labels_N: Optional[Tensor], device: torch.device,
             batch_size: int = 256) -> Tensor:
    """G's images for all of z (and labels), in chunks of batch_size, as float32 N x C x H x W on the CPU."""
    out = []
    for i in range(0, len(z_NZ), batch_size):
        labels = None if labels_N is None else labels_N[i:i + batch_size].to(device)
        out.append(G(z_NZ[i:i + batch_size].to(device), labels).float().cpu())
    return torch.cat(out)


def _pixel_features(images_BCHW: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(images_BCHW.mean(1, keepdim=True), 8).flatten(1)


def load_generator(model_config: dict, weights: dict[str, Tensor], device: torch.device) -> nn.Module:
    """The EMA generator of a GAN checkpoint (the raw G when no EMA copy was saved), ready to sample."""
    G = build_generator(
        GeneratorConfig(**model_config["generator"]), resolution=model_config["resolution"],
        channels=model_config["channels"], num_classes=model_config["num_classes"],
    )
    prefix = "G_ema." if any(k.startswith("G_ema.") for k in weights) else "G."
    G.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    return G.to(device).eval().requires_grad_(False)


class GanSampler(ImageSampler):
    def num_classes(self, model_config: dict) -> int:
        return model_config["num_classes"]

    def sample(self, model_config: dict, weights: dict[str, Tensor], request: SampleRequest,
               device: torch.device) -> Iterator[Tensor]:
        """Images from the EMA generator; labels cycle over the given list (all classes when none).

        Noise is drawn chunk by chunk from one generator seeded by `request.seed`, so memory stays bounded for
        any number of images, and the first images do not depend on how many are asked for.
        """
        num_classes = model_config["num_classes"]
        labels = request.labels
        if labels and not num_classes:
            raise ValueError("--labels given, but this generator is unconditional")
        if labels:
            bad = [c for c in labels if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"--labels {bad} out of range: this generator has classes 0..{num_classes - 1}")
        G = load_generator(model_config, weights, device)
        g = torch.Generator().manual_seed(request.seed)
        for start in range(0, request.num, request.batch_size):
            n = min(request.batch_size, request.num - start)
            z = torch.randn(n, G.z_dim, generator=g)
            index = torch.arange(start, start + n)
            y = None
            if num_classes:
                y = torch.tensor(labels)[index % len(labels)] if labels else index % num_classes
            yield generate(G, z, y, device, batch_size=n)


register(TaskSpec(name="gan", config=GanConfig, build=GanTask, capabilities=(GanSampler(),), smoke_overrides=(
    "data.resolution=16", "model.generator.base_channels=8", "model.discriminator.base_channels=8",
    "gan.num_samples=16", "gan.fd_samples=32",
)))

"""Training VAR's multi-scale residual VQ tokenizer -- the part the original never released.

Phases per step: `ae` (reconstruction + VQ/commitment [+ perceptual] [+ adversarial, with VQGAN's adaptive
weight, from `vqvae.adversarial_start`]) and, from that step on, `d` (the GAN task's discriminators and losses
on reals against the reconstructions of the same batch). Losses are reported per image.

Codebook health: codes no image used during the last `vqvae.restart_every` steps are restarted at encoder
features of the current batch (chosen on rank 0, broadcast, so replicas stay identical), the usual remedy for
dead codes; usage per scale and perplexity are logged at every eval.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vistrain.config import ExperimentConfig
from vistrain.data.data_config import ImageDataConfig
from vistrain.data.loader import MicroBatchStream, build_image_dataset, check_enough_data
from vistrain.data.sampler import StreamOrder
from vistrain.engine.images import make_grid
from vistrain.engine.optim import OptimConfig
from vistrain.engine.task import EvalResult, OptimizerSpec, Phase, PhaseLoss, Task, TaskEnv
from vistrain.errors import ConfigError
from vistrain.models.gan import DiscriminatorConfig, build_discriminator
from vistrain.models.lpips import load_lpips
from vistrain.models.vqvae import VQVAE, VQVAEConfig
from vistrain.registry import TaskSpec, register
from vistrain.tasks.capabilities import ImageSampler, Reconstructor, SampleRequest
from vistrain.tasks.gan_losses import LOSSES, discriminator_loss, generator_loss


@dataclass
class PerceptualConfig:
    weight: float = 0.0  # LPIPS-style VGG distance; > 0 needs both files below (nothing is downloaded)
    vgg: Optional[str] = None  # torchvision's vgg16 state dict (.pth)
    lin: Optional[str] = None  # the lpips package's vgg.pth (linear heads)


@dataclass
class AdversarialConfig:
    weight: float = 0.0  # 0: no discriminator
    start: int = 0  # step from which the discriminator trains and its loss reaches the autoencoder
    adaptive: bool = True  # VQGAN: scale by |grad of reconstruction| / |grad of adversarial| at the last layer
    loss: str = "hinge"  # as in the GAN task
    discriminator: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(name="resnet"))


@dataclass
class VQVAETrainConfig:
    recon: str = "l1"  # l1 | l2, per pixel
    vq_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    restart_every: int = 200  # steps; codes unused for that long are restarted (0: never)
    num_samples: int = 16  # val images shown beside their reconstructions at each eval
    val_images: int = 1024  # at most this many val images for the metrics


def _ae_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=2e-4, betas=[0.5, 0.9])


@dataclass
class VQVAEOptimConfig:
    ae: OptimConfig = field(default_factory=_ae_optim)
    d: OptimConfig = field(default_factory=_ae_optim)


@dataclass
class VQVAEExperimentConfig(ExperimentConfig):
    task: str = "vqvae"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: VQVAEConfig = field(default_factory=VQVAEConfig)
    vqvae: VQVAETrainConfig = field(default_factory=VQVAETrainConfig)
    optim: VQVAEOptimConfig = field(default_factory=VQVAEOptimConfig)


def build_vqvae(model: VQVAEConfig, data: ImageDataConfig) -> VQVAE:
    """The tokenizer for the data's images: their channels decide in_channels, their size is checked."""
    try:
        return VQVAE(dataclasses.replace(model, in_channels=data.channels), resolution=data.resolution)
    except ValueError as e:
        raise ConfigError(str(e).replace("vqvae.", "model.")) from None


class VQVAETask(Task):
    def __init__(self, cfg: VQVAEExperimentConfig, env: TaskEnv):
        self.cfg, self.env = cfg, env
        t = cfg.vqvae
        if t.recon not in ("l1", "l2"):
            raise ConfigError(f"vqvae.recon={t.recon!r}: expected l1 or l2")
        if t.adversarial.loss not in LOSSES:
            raise ConfigError(f"vqvae.adversarial.loss={t.adversarial.loss!r}: expected one of {', '.join(LOSSES)}")
        if cfg.train.parallel == "fsdp" and (t.restart_every or (t.adversarial.weight > 0 and t.adversarial.adaptive)):
            raise ConfigError("train.parallel=fsdp: the tokenizer's code restarts and the adaptive adversarial weight "
                              "need whole parameters; set vqvae.restart_every=0 and vqvae.adversarial.adaptive=false, "
                              "or use train.parallel=ddp (the tokenizer is small)")
        self.device = env.dist.device
        self.train_set = build_image_dataset(cfg.data, "train")
        self.val_set = build_image_dataset(cfg.data, "val")
        check_enough_data(self.train_set, env.batch_size, f"the {cfg.data.name} training set")
        vae = build_vqvae(cfg.model, cfg.data).to(self.device)
        self.nets: dict[str, nn.Module] = {"vae": vae}
        self.trainable = ("vae",)
        self.optimizers = {"ae": OptimizerSpec("vae", cfg.optim.ae)}
        if t.perceptual.weight > 0:
            try:
                lpips = load_lpips(t.perceptual.vgg, t.perceptual.lin, "vqvae.perceptual")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.nets["lpips"] = lpips.to(self.device)
            self.external = ("lpips",)  # its own weights file, not part of this run
        dist_ctx = env.dist
        self.images = MicroBatchStream(self.train_set, StreamOrder(len(self.train_set), env.seed),
                                       env.micro_batch_size, dist_ctx.rank, dist_ctx.world_size, cfg.data.num_workers)
        self.phases = [Phase("ae", optimizer="ae", loss=self.ae_loss, data=self.images)]
        adv = t.adversarial
        if adv.weight > 0:
            D = build_discriminator(adv.discriminator, resolution=cfg.data.resolution, channels=cfg.data.channels,
                                    num_classes=0).to(self.device)
            self.nets["D"] = D
            self.trainable = ("vae", "D")
            self.optimizers["d"] = OptimizerSpec("D", cfg.optim.d)
            self.phases.append(Phase("d", optimizer="d", loss=self.d_loss, same_data_as="ae", start=adv.start))
        self.best_metric = ("psnr", "max")
        self.step = 0
        V = cfg.model.vocab_size
        self.hits_V = torch.zeros(V, device=self.device)  # code uses since the last restart check
        self._last_images: Optional[Tensor] = None  # the last micro-batch: its features are restart candidates

    # ----------------------------------------------------------------------------------------- phases

    def _recon_per_image(self, recon_BCHW: Tensor, real_BCHW: Tensor) -> Tensor:
        diff = recon_BCHW.float() - real_BCHW.float()
        per_pixel = diff.abs() if self.cfg.vqvae.recon == "l1" else diff.square()
        return per_pixel.flatten(1).mean(1)

    def ae_loss(self, nets, batch) -> PhaseLoss:
        t = self.cfg.vqvae
        real_BCHW = batch["image"]
        B = real_BCHW.shape[0]
        recon_BCHW, vq_loss, idx_list = nets["vae"](real_BCHW)
        rec_B = self._recon_per_image(recon_BCHW, real_BCHW)
        metrics = {"rec_loss": rec_B.sum(), "vq_loss": vq_loss.detach() * B}
        loss_B = rec_B + t.vq_weight * vq_loss
        if t.perceptual.weight > 0:
            lp_B = nets["lpips"](recon_BCHW.float(), real_BCHW.float())
            loss_B = loss_B + t.perceptual.weight * lp_B
            metrics["lpips"] = lp_B.sum()
        adv = t.adversarial
        if adv.weight > 0 and self.step >= adv.start:
            g_loss = generator_loss(adv.loss, nets["D"](recon_BCHW, None).float())
            weight = adv.weight * (self._adaptive_weight(loss_B.mean(), g_loss) if adv.adaptive else 1.0)
            loss_B = loss_B + weight * g_loss
            metrics["g_loss"] = g_loss.detach() * B
            metrics["adv_weight"] = torch.as_tensor(weight, device=self.device) * B
        with torch.no_grad():
            for idx_Bl in idx_list:
                self.hits_V += torch.bincount(idx_Bl.flatten(), minlength=self.hits_V.numel())
            self._last_images = real_BCHW
        return PhaseLoss(loss_B.sum(), count=B, metrics=metrics, samples=B)

    def _adaptive_weight(self, nll: Tensor, g_loss: Tensor) -> Tensor:
        """VQGAN: balance the adversarial gradient against the reconstruction one at the decoder's last layer."""
        last = self.nets["vae"].last_layer
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def d_loss(self, nets, batch) -> PhaseLoss:
        real_BCHW = batch["image"]
        B = real_BCHW.shape[0]
        with torch.no_grad():
            recon_BCHW = nets["vae"](real_BCHW)[0]
        logits = nets["D"](torch.cat([real_BCHW, recon_BCHW.to(real_BCHW.dtype)]), None).float()
        real_logits_B, fake_logits_B = logits.chunk(2)
        loss = discriminator_loss(self.cfg.vqvae.adversarial.loss, real_logits_B, fake_logits_B)
        return PhaseLoss(loss * B, count=B, metrics={"d_loss": loss.detach() * B})

    def on_step_end(self, step: int) -> None:
        self.step = step
        every = self.cfg.vqvae.restart_every
        if every and step % every == 0:
            self._restart_dead_codes()

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        """Codes unused since the last check get encoder features of the current batch (rank 0's, broadcast)."""
        hits_V = self.hits_V
        if dist.is_initialized() and self.env.dist.world_size > 1:
            dist.all_reduce(hits_V)
        dead_V = hits_V == 0
        n_dead = int(dead_V.sum())
        if n_dead and self._last_images is not None:
            vae = self.nets["vae"]
            f_BChw = vae.encode(self._last_images.float())
            features_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
            embedding = vae.quantize.embedding.weight
            pick = torch.randint(0, len(features_NC), (n_dead,), device=features_NC.device)
            new_NC = features_NC[pick].to(embedding.dtype)
            if dist.is_initialized() and self.env.dist.world_size > 1:
                dist.broadcast(new_NC, src=0)
            embedding[dead_V] = new_NC
        hits_V.zero_()

    # ------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        if not self.env.dist.is_main:
            return EvalResult()
        vae = self.nets["vae"]
        was_training = vae.training
        vae.eval()
        n = min(len(self.val_set), self.cfg.vqvae.val_images)
        rec_sum, psnr_sum, V = 0.0, 0.0, self.cfg.model.vocab_size
        counts_SV = torch.zeros(len(self.cfg.model.patch_nums), V)
        for start in range(0, n, 64):
            real = torch.stack([self.val_set[i]["image"] for i in range(start, min(n, start + 64))]).to(self.device)
            idx_list = vae.img_to_idx(real)
            recon = vae.idx_to_img(idx_list)
            rec_sum += float(self._recon_per_image(recon, real).sum())
            # PSNR on [0, 1] pixels, per image, averaged
            mse_B = ((recon - real) / 2).square().flatten(1).mean(1)
            psnr_sum += float((10 * torch.log10(1.0 / mse_B.clamp_min(1e-10))).sum())
            for si, idx_Bl in enumerate(idx_list):
                counts_SV[si] += torch.bincount(idx_Bl.flatten().cpu(), minlength=V)
        vae.train(was_training)
        metrics = {"rec_loss": rec_sum / n, "psnr": psnr_sum / n}
        for si, counts_V in enumerate(counts_SV):
            metrics[f"usage/scale_{si}"] = 100.0 * float((counts_V > 0).float().mean())
        p_V = counts_SV.sum(0) / counts_SV.sum()
        metrics["perplexity"] = math.exp(float(-(p_V * p_V.clamp_min(1e-12).log()).sum()))
        metrics["usage"] = 100.0 * float((counts_SV.sum(0) > 0).float().mean())
        return EvalResult(metrics=metrics, images={"samples": self._pairs_grid(vae)})

    def _pairs_grid(self, vae: VQVAE):
        k = min(self.cfg.vqvae.num_samples, len(self.val_set))
        real = torch.stack([self.val_set[i]["image"] for i in range(k)]).to(self.device)
        return make_grid(interleave(real, vae.idx_to_img(vae.img_to_idx(real))), nrow=pairs_per_row(k) * 2)

    # ---------------------------------------------------------------------------------- state, export

    def model_config(self) -> dict:
        model = dataclasses.asdict(dataclasses.replace(self.cfg.model, in_channels=self.cfg.data.channels))
        return {"task": "vqvae", "model": model, "data": dataclasses.asdict(self.cfg.data)}

    def state_dict(self) -> dict:
        return {"step": self.step, "images": self.images.state_dict(), "hits": self.hits_V.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.images.load_state_dict(state["images"])
        self.hits_V.copy_(state["hits"])


def interleave(a_BCHW: Tensor, b_BCHW: Tensor) -> Tensor:
    """a0, b0, a1, b1, ...: each image beside its reconstruction, on the CPU."""
    return torch.stack([a_BCHW.cpu(), b_BCHW.cpu()], dim=1).flatten(0, 1).float()


def pairs_per_row(n: int) -> int:
    return max(1, min(8, round(math.sqrt(n))))


def load_vqvae(model_config: dict, weights: dict[str, Tensor], device: torch.device, prefix: str = "vae.") -> VQVAE:
    """A tokenizer from a model config section and its prefixed weights, frozen, in eval mode."""
    vae = VQVAE(VQVAEConfig(**model_config))
    own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    vae.load_state_dict(own, strict=True)
    return vae.to(device).eval().requires_grad_(False)


def val_images(model_config: dict):
    return build_image_dataset(ImageDataConfig(**model_config["data"]), "val")


def reconstruct(model_config: dict, weights: dict[str, Tensor], val_set, first: int, count: int, batch_size: int,
                device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """(originals, reconstructions) of val images first .. first + count - 1, in chunks, on the CPU."""
    vae = load_vqvae(model_config["model"], weights, device)
    if first + count > len(val_set):
        raise ValueError(f"images {first}..{first + count - 1} asked for: the val set has {len(val_set)}")
    with torch.no_grad():
        for start in range(first, first + count, batch_size):
            real = torch.stack([val_set[i]["image"] for i in range(start, min(first + count, start + batch_size))])
            yield real, vae.idx_to_img(vae.img_to_idx(real.to(device))).float().cpu()


class TokenizerReconstructions(Reconstructor, ImageSampler):
    """`vistrain eval` scores the reconstructions of the val split; `vistrain sample` shows val images, each
    followed by its reconstruction."""

    def val_images(self, model_config: dict):
        return val_images(model_config)

    def reconstruct(self, model_config: dict, weights: dict[str, Tensor], *, val_set, first: int, count: int,
                    batch_size: int, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        return reconstruct(model_config, weights, val_set, first, count, batch_size, device)

    def sample(self, model_config: dict, weights: dict[str, Tensor], request: SampleRequest,
               device: torch.device) -> Iterator[Tensor]:
        if request.labels:
            raise ValueError("--labels: a tokenizer reconstructs val images; it takes no class labels")
        val_set = val_images(model_config)
        if request.num > 2 * len(val_set):
            raise ValueError(f"--num {request.num}: the val set has {len(val_set)} images, so at most "
                             f"{2 * len(val_set)}")
        pairs = (request.num + 1) // 2
        done = 0
        for real, recon in reconstruct(model_config, weights, val_set, 0, pairs, max(1, request.batch_size // 2),
                                       device):
            both = interleave(real, recon)
            yield both[: request.num - 2 * done]
            done += len(real)

    def grid_columns(self, model_config: dict, request: SampleRequest) -> int:
        return 2 * pairs_per_row(request.num)


register(TaskSpec(
    name="vqvae", config=VQVAEExperimentConfig, build=VQVAETask, capabilities=(TokenizerReconstructions(),),
    smoke_overrides=("data.resolution=16", "model.ch=32", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1",
                     "model.vocab_size=64", "model.z_channels=8", "model.patch_nums=[1,2,4]",
                     "vqvae.num_samples=4", "vqvae.val_images=32"),
))

"""VAR: class-conditional next-scale prediction on a frozen multi-scale VQ tokenizer.

One phase, `main`: the tokenizer (loaded from its own run, `var.tokenizer`; not part of this run's
checkpoints) turns each image into its token maps on the fly, the transformer predicts every scale from the
ones before (teacher forcing), and the loss is the cross entropy over all tokens, reported per image (summed
over the batch, counted in images) so that the engine's global-batch mean is VAR's mean. Progressive
training (pg, pg0, pgwp) and the lr rule (base lr x global batch / 256) follow the reference.

Teacher forcing encodes each batch on the fly, so random crops and flips keep working: the tokenizer's
convolutions in channels-last memory and in fp32 (the original's tokens; `var.encoder_precision=bf16` is faster
on tensor cores and moves a few), compiled with encoder and quantizer in one graph where training compiles on
CUDA. `var.token_cache` encodes the training set once instead (var_tokens.py) and gives up the augmentation.

Every eval logs the teacher-forced val metrics (Lm, Lt, Accm, Acct, per scale) and, in the loop (`eval.mode:
sync`), `eval.metrics` of `eval.num_samples` class-balanced samples: the digits default asks for the digits
judge. `best` is chosen by eval.best, else by the first of fid / fd_judge / kid / IS that eval.metrics
computes, else by the val Lt.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.config import ExperimentConfig
from vistrain.data.data_config import ImageDataConfig
from vistrain.data.loader import MicroBatchStream, build_image_dataset, check_enough_data
from vistrain.data.sampler import StreamOrder
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.images import make_grid
from vistrain.engine.optim import OptimConfig
from vistrain.engine.schedule import ScheduleConfig, warmup_length
from vistrain.engine.task import EvalResult, OptimizerSpec, Phase, PhaseLoss, Task, TaskEnv
from vistrain.errors import ConfigError
from vistrain.eval.score import balanced_share, default_best, in_loop_scorer
from vistrain.interop.var_official import export_official
from vistrain.models.var import VAR, VARConfig
from vistrain.models.vqvae import VQVAE, VQVAEConfig
from vistrain.registry import TaskSpec, register
from vistrain.tasks import var_tokens
from vistrain.tasks.capabilities import Exporter, ImageSampler, SampleOption, SampleRequest
from vistrain.tasks.vqvae import load_vqvae

# VAR's no-weight-decay names (besides biases, 1-D parameters, embeddings and norms, which never decay)
NO_DECAY = ["pos_start", "pos_1LC", "lvl_embed", "scale_mul", "gamma", "beta", "ada_gss"]


@dataclass
class VARTrainConfig:
    tokenizer: Optional[str] = None  # a vqvae run or checkpoint folder, or an imported VAR model folder (required)
    init: Optional[str] = None  # start the transformer from a model folder or checkpoint (fine-tuning)
    base_lr: float = 1e-4  # the peak lr is base_lr x train.batch_size / 256; optim.lr is set from it
    label_smoothing: float = 0.0
    pg: float = 0.0  # progressive training over this fraction of the run (0: off)
    pg0: int = 4  # the scale index progressive training starts at
    pgwp: float = 1 / 300  # the newest scale's loss weight ramps 0.01 -> 1 over this fraction of the run
    sample_cfg: float = 1.5  # the eval grid's sampling: classifier-free guidance, top-k, top-p
    sample_top_k: int = 900
    sample_top_p: float = 0.96
    num_samples: int = 40  # images in the eval grid (one column per class)
    val_images: int = 1024  # at most this many val images for the val metrics
    # The frozen tokenizer's encoder in teacher forcing, whatever train.precision: fp32 (the original's tokens) or
    # bf16 (faster on tensor cores, but 3% of the digits tokenizer's indices differ from fp32's: see docs/var.md)
    encoder_precision: str = "fp32"
    token_cache: bool = False  # encode the training images once and keep their tokens on disk (no augmentation)


def _var_optim() -> OptimConfig:
    return OptimConfig(name="adamw", betas=[0.9, 0.95], weight_decay=0.05, no_decay=list(NO_DECAY),
                       schedule=ScheduleConfig(name="lin0", warmup_frac=0.02, warmup_start_ratio=0.005,
                                               end_ratio=0.01))


@dataclass
class VARExperimentConfig(ExperimentConfig):
    task: str = "var"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: VARConfig = field(default_factory=VARConfig)
    var: VARTrainConfig = field(default_factory=VARTrainConfig)
    optim: OptimConfig = field(default_factory=_var_optim)


def encoder_bf16(encoder_precision: str) -> bool:
    """Whether teacher forcing encodes in bf16 (var.encoder_precision)."""
    if encoder_precision not in ("fp32", "bf16"):
        raise ConfigError(f"var.encoder_precision={encoder_precision!r}: must be fp32 (the default: the tokens of an "
                          "fp32 encoder) or bf16 (faster on tensor cores; a few percent of the tokens differ)")
    return encoder_precision == "bf16"


def load_tokenizer(path: Optional[str], device: torch.device) -> tuple[VQVAE, dict]:
    """The frozen tokenizer of a vqvae run / checkpoint, or of an imported VAR model folder, and its config."""
    if not path:
        raise ConfigError("var.tokenizer is not set: point it at the run folder of a vqvae training "
                          "(configs/vqvae/*.yaml) or at an imported VAR model folder (vistrain import var)")
    try:
        model_config = ckpt_lib.load_model_config(Path(path))
        weights = ckpt_lib.load_weights(Path(path))
    except ckpt_lib.CheckpointError as e:
        raise ConfigError(f"var.tokenizer={path}: {e}") from None
    kind = model_config.get("task")
    if kind == "vqvae":
        vae_config = model_config["model"]
    elif kind == "var" and any(k.startswith("vae.") for k in weights):
        vae_config = model_config["vae"]
    else:
        raise ConfigError(f"var.tokenizer={path} holds a {kind!r} model, not a tokenizer: give a vqvae run or an "
                          "imported VAR model folder")
    return load_vqvae(vae_config, weights, device), vae_config


class VARTask(Task):
    def __init__(self, cfg: VARExperimentConfig, env: TaskEnv):
        self.cfg, self.env = cfg, env
        self.device = env.dist.device
        t = cfg.var
        if t.token_cache:
            var_tokens.refuse_augmentation(cfg.data)
        self.vae, vae_config = load_tokenizer(t.tokenizer, self.device)
        self.vae.channels_last()  # frozen: it encodes (teacher forcing) and decodes (samples) only
        self.vae_config = vae_config
        self._check_shapes(cfg, vae_config)
        self.encoder_bf16 = encoder_bf16(t.encoder_precision)
        # Compiled where training compiles, on CUDA: one graph of encoder and quantizer (and one of the inputs
        # made from cached tokens).
        self._targets, self._inputs = self.vae.img_to_var_targets, self.vae.quantize.idx_to_var_input
        if cfg.train.compile and self.device.type == "cuda":
            self._targets = torch.compile(self._targets, dynamic=False)
            self._inputs = torch.compile(self._inputs, dynamic=False)
        self.train_set = build_image_dataset(cfg.data, "train")
        self.val_set = build_image_dataset(cfg.data, "val")
        check_enough_data(self.train_set, env.batch_size, f"the {cfg.data.name} training set")
        var = VAR(cfg.model).to(self.device)
        if t.init:
            _load_transformer(var, t.init)
        self.nets: dict[str, nn.Module] = {"var": var, "vae": self.vae}
        self.trainable = ("var",)
        self.external = ("vae",)  # loaded from its own run; not saved again in every VAR checkpoint
        lr = t.base_lr * env.batch_size / 256
        self.optimizers = {"main": OptimizerSpec("var", dataclasses.replace(cfg.optim, lr=lr))}
        dist_ctx = env.dist
        patch_nums = cfg.model.patch_nums
        self.L = sum(p * p for p in patch_nums)
        train_items = self._token_maps() if t.token_cache else self.train_set
        self.images = MicroBatchStream(train_items, StreamOrder(len(train_items), env.seed),
                                       env.micro_batch_size, dist_ctx.rank, dist_ctx.world_size, cfg.data.num_workers)
        self.phases = [Phase("main", optimizer="main", loss=self.loss, data=self.images)]
        # built now: a missing detector fails before step 1
        self.scorer = in_loop_scorer(cfg.eval, env.dist, cfg.data.name)
        self.best_metric = default_best(cfg.eval.metrics) or ("Lt", "min")
        self.ends = [sum(p * p for p in patch_nums[: i + 1]) for i in range(len(patch_nums))]  # token end per scale
        n_params = sum(p.numel() for p in var.parameters())
        C = 64 * cfg.model.depth
        # 6N per token for the matmuls (forward + backward), plus attention over L keys (as torchtitan counts it)
        self.flops_per_token = 6 * n_params + 12 * cfg.model.depth * C * self.L
        self.step = 0

    @staticmethod
    def _check_shapes(cfg: VARExperimentConfig, vae_config: dict) -> None:
        pairs = [("model.vocab_size", cfg.model.vocab_size, "vocab_size"),
                 ("model.z_channels", cfg.model.z_channels, "z_channels"),
                 ("model.patch_nums", list(cfg.model.patch_nums), "patch_nums"),
                 ("data.channels", cfg.data.channels, "in_channels")]
        for key, mine, theirs in pairs:
            if mine != vae_config[theirs]:
                raise ConfigError(f"{key}={mine} does not match the tokenizer's {theirs}={vae_config[theirs]} "
                                  f"(var.tokenizer={cfg.var.tokenizer})")
        latent = vae_config["patch_nums"][-1] * 2 ** (len(vae_config["ch_mult"]) - 1)
        if cfg.data.resolution != latent:
            raise ConfigError(f"data.resolution={cfg.data.resolution}, but the tokenizer encodes {latent} px images")

    # ------------------------------------------------------------------------------------- progressive

    def progressive_scale(self, step: int) -> int:
        """The last scale trained at `step` (-1: all), as the reference grows it from pg0 over pg of the run."""
        t, last = self.cfg.var, len(self.cfg.model.patch_nums) - 1
        if t.pg <= 0:
            return -1
        max_steps = self.env.max_steps
        warmup = warmup_length(self.cfg.optim.schedule, max_steps)
        end = max_steps * t.pg
        if step <= warmup:
            si = t.pg0
        elif step >= end:
            si = last
        else:
            si = t.pg0 + round(min(max((step - warmup) / max(end - warmup, 1), 0.0), 1.0) * (last - t.pg0))
        return -1 if si >= last else si

    def _newest_scale_weight(self, step: int, si: int) -> float:
        """The loss weight of the newest scale: 0.01 -> 1 over pgwp of the run since that scale arrived."""
        if si < 0 or si == self.cfg.var.pg0:  # no ramp without progression, nor in the first stage
            return 1.0
        # the scale index grows monotonically until it reaches `si`: binary-search the step it arrived at
        since = step - bisect.bisect_left(range(step + 1), si, key=self.progressive_scale)
        ramp = max(1, round(self.cfg.var.pgwp * self.env.max_steps))
        return max(min(since / ramp, 1.0), 0.01)

    def _token_maps(self) -> var_tokens.TokenMaps:
        """var.token_cache: the training set's tokens, read from the cache (encoded into it first if needed)."""
        cfg, env = self.cfg, self.env
        key = var_tokens.cache_key(self.vae, self.vae_config, self.encoder_bf16, cfg.data, self.train_set)
        path = var_tokens.cache_path(key)
        dtype = var_tokens.token_dtype(cfg.model.vocab_size, cfg.model.num_classes + 1)
        seconds = var_tokens.build(path, self.train_set, lambda image: self.teacher_forcing(image)[0], self.L, dtype,
                                   self.device, env.micro_batch_size, cfg.data.num_workers, env.dist)
        self.token_cache_build_s = seconds  # None: it was there already
        if env.dist.is_main:
            done = "reading" if seconds is None else f"encoded {len(self.train_set)} images in {seconds:.1f} s into"
            print(f"var.token_cache: {done} {path}", flush=True)
        return var_tokens.TokenMaps(path)

    # ----------------------------------------------------------------------------------------- loss

    @torch.no_grad()
    def teacher_forcing(self, image_BCHW: Tensor) -> tuple[Tensor, Tensor]:
        """Targets (B, L) and transformer inputs (B, L - 1, Cvae) of a batch, from the frozen tokenizer."""
        return self._targets(image_BCHW.float(), encoder_bf16=self.encoder_bf16)

    @torch.no_grad()
    def cached_teacher_forcing(self, tokens_BL: Tensor) -> tuple[Tensor, Tensor]:
        """The same from cached targets: only the inputs are made, from the codes (no encoder)."""
        idx_list = list(tokens_BL.split([p * p for p in self.cfg.model.patch_nums], dim=1))
        return tokens_BL, self._inputs(idx_list)

    def loss(self, nets, batch) -> PhaseLoss:
        if "tokens" in batch:
            gt_BL, x_BLCv = self.cached_teacher_forcing(batch["tokens"])
        else:
            gt_BL, x_BLCv = self.teacher_forcing(batch["image"])
        label_B = batch["label"]
        B = gt_BL.shape[0]
        si = self.progressive_scale(self.step)
        ed = self.ends[si] if si >= 0 else self.L
        logits_BLV = nets["var"](label_B, x_BLCv[:, : ed - 1], prog_si=si).float()
        gt_BL = gt_BL[:, :ed]
        smoothing = self.cfg.var.label_smoothing
        ce_BL = _cross_entropy_BL(logits_BLV, gt_BL, smoothing)
        # Every token weighs 1/L (so a sample's loss is its mean CE); the newest scale ramps in when progressive.
        weight_L = torch.full((ed,), 1.0 / self.L, device=ce_BL.device)
        if si >= 0:
            begin = self.ends[si - 1] if si > 0 else 0
            weight_L[begin:ed] *= self._newest_scale_weight(self.step, si)
        loss_B = (ce_BL * weight_L).sum(1)
        # the metrics' plain cross entropy is the loss's own when there is no smoothing: not computed twice
        metrics = self._token_metrics(logits_BLV.detach(), gt_BL, full=si < 0,
                                      ce_BL=ce_BL.detach() if smoothing == 0 else None)
        return PhaseLoss(loss_B.sum(), count=B, metrics=metrics, samples=B, tokens=B * ed)

    def _token_metrics(self, logits_BLV: Tensor, gt_BL: Tensor, full: bool,
                       ce_BL: Optional[Tensor] = None) -> dict[str, Tensor]:
        """VAR's Lm, Accm (all tokens), Lt, Acct (the last scale) and per-scale ones, summed over samples."""
        if ce_BL is None:
            ce_BL = _cross_entropy_BL(logits_BLV, gt_BL)
        hit_BL = (logits_BLV.argmax(-1) == gt_BL).float() * 100
        metrics = {"Lm": ce_BL.mean(1).sum(), "Accm": hit_BL.mean(1).sum()}
        begin = 0
        for si, end in enumerate(self.ends[: len(self.ends) if full else None]):
            if end > gt_BL.shape[1]:
                break
            metrics[f"loss/scale_{si}"] = ce_BL[:, begin:end].mean(1).sum()
            metrics[f"acc/scale_{si}"] = hit_BL[:, begin:end].mean(1).sum()
            begin = end
        if full:
            last = self.ends[-2]
            metrics["Lt"] = ce_BL[:, last:].mean(1).sum()
            metrics["Acct"] = hit_BL[:, last:].mean(1).sum()
        return metrics

    def on_step_end(self, step: int) -> None:
        self.step = step

    # ------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> EvalResult:
        """Teacher-forced val metrics (no label dropout) over every rank's shard, and a class-conditional grid.

        Every rank takes part: under FSDP the transformer's forward is a collective.
        """
        var = self.nets["var"]
        was_training = var.training
        var.eval()
        rank, world = self.env.dist.rank, self.env.dist.world_size
        n = min(len(self.val_set), self.cfg.var.val_images)
        sums: dict[str, Tensor] = {}
        mine = list(range(rank, n, world))
        for start in range(0, max(len(mine), 1), 64):
            items = [self.val_set[i] for i in mine[start:start + 64]] or [self.val_set[0]]  # same calls per rank
            weight = 1.0 if mine[start:start + 64] else 0.0
            image = torch.stack([item["image"] for item in items]).to(self.device)
            label = torch.stack([item["label"] for item in items]).to(self.device)
            gt_BL, x_BLCv = self.teacher_forcing(image)
            logits = var(label, x_BLCv).float()
            for key, value in self._token_metrics(logits, gt_BL, full=True).items():
                sums[key] = sums.get(key, 0.0) + value * weight
        keys = sorted(sums)
        total = torch.stack([torch.as_tensor(sums[k], device=self.device, dtype=torch.float32) for k in keys])
        if dist.is_initialized() and world > 1:
            dist.all_reduce(total)
        metrics = {k: float(v) / n for k, v in zip(keys, total.tolist())}
        grid = self._sample_grid(var)
        if self.scorer is not None:
            metrics.update(self._score_samples(var))
        var.train(was_training)
        return EvalResult(metrics=metrics, images={"samples": grid} if self.env.dist.is_main else {})

    def _score_samples(self, var: nn.Module) -> dict[str, float]:
        """`eval.metrics` of `eval.num_samples` class-balanced samples (the grid's cfg / top-k / top-p), each
        rank generating its share with its own fixed seed. Every rank makes the same number of calls: under
        FSDP generation is a collective."""
        t, ev = self.cfg.var, self.cfg.eval
        classes_N = balanced_share(ev.num_samples, self.cfg.model.num_classes, self.env.dist)
        generator = torch.Generator(self.device).manual_seed(4321 + self.env.dist.rank)

        def chunks():
            for i in range(0, len(classes_N), ev.batch_size):
                classes_B = classes_N[i:i + ev.batch_size]
                images = generate_images(var, self.vae, classes_B.to(self.device), cfg=t.sample_cfg,
                                         top_k=t.sample_top_k, top_p=t.sample_top_p, generator=generator)
                yield images, classes_B

        return self.scorer.score_samples(chunks())

    def _sample_grid(self, var: nn.Module):
        t = self.cfg.var
        classes = self.cfg.model.num_classes
        label_B = (torch.arange(t.num_samples) % classes).to(self.device)
        generator = torch.Generator(self.device).manual_seed(1234)
        images = generate_images(var, self.vae, label_B, cfg=t.sample_cfg, top_k=t.sample_top_k,
                                 top_p=t.sample_top_p, generator=generator)
        return make_grid(images.float().cpu(), nrow=min(classes, t.num_samples))

    # ---------------------------------------------------------------------------------- state, export

    def model_config(self) -> dict:
        return {"task": "var", "model": dataclasses.asdict(self.cfg.model), "vae": self.vae_config,
                "tokenizer": str(Path(self.cfg.var.tokenizer).resolve())}

    def state_dict(self) -> dict:
        return {"step": self.step, "images": self.images.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.images.load_state_dict(state["images"])


def _cross_entropy_BL(logits_BLV: Tensor, gt_BL: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-token cross entropy (B, L), over rows of logits laid out (B*L, V): softmax over contiguous memory."""
    B, L, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(B * L, V), gt_BL.reshape(B * L), reduction="none",
                           label_smoothing=label_smoothing).view(B, L)


def _load_transformer(var: VAR, path: str) -> None:
    try:
        weights = ckpt_lib.load_weights(Path(path))
    except ckpt_lib.CheckpointError as e:
        raise ConfigError(f"var.init={path}: {e}") from None
    own = {k[len("var."):]: v for k, v in weights.items() if k.startswith("var.")}
    try:
        var.load_state_dict(own, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"var.init={path} does not fit model.* of this config: "
                          f"{' '.join(str(e).split())[:400]}") from None


def load_transformer(model_config: dict, weights: dict[str, Tensor], device: torch.device) -> VAR:
    var = VAR(VARConfig(**model_config["model"]))
    var.load_state_dict({k[len("var."):]: v for k, v in weights.items() if k.startswith("var.")}, strict=True)
    return var.to(device).eval().requires_grad_(False)


def sample_labels(model_config: dict, request: SampleRequest) -> Tensor:
    """The class of every requested image: --num-per-class K gives K of each class in turn, else --labels cycle."""
    classes = model_config["model"]["num_classes"]
    per_class = request.options.get("num_per_class")  # None: not given
    if per_class is not None and request.labels:
        raise ConfigError("--num-per-class and --labels both choose the classes: give one (--num-per-class K: K "
                          "images of every class; --labels: cycle through the given classes)")
    if per_class is not None:
        return torch.arange(classes).repeat_interleave(per_class)
    if request.labels:
        bad = [c for c in request.labels if not 0 <= c < classes]
        if bad:
            raise ConfigError(f"--labels {bad} out of range: this model has classes 0..{classes - 1}")
        return torch.tensor(request.labels)[torch.arange(request.num) % len(request.labels)]
    return torch.arange(request.num) % classes


def sampling_models(model_config: dict, weights: dict[str, Tensor], device: torch.device,
                    compile: Optional[bool] = None) -> tuple[VAR, VQVAE]:
    """The transformer and its tokenizer of a run or model folder, for sampling. compile (None: wherever
    torch.compile has a GPU back end, i.e. on CUDA with Triton) compiles each block with dynamic shapes -- one
    graph serves every scale and KV-cache length -- and the tokenizer's decoder."""
    var = load_transformer(model_config, weights, device)
    if any(k.startswith("vae.") for k in weights):  # an imported model folder carries its tokenizer
        vae = load_vqvae(model_config["vae"], weights, device)
    else:
        vae = load_tokenizer(model_config["tokenizer"], device)[0]
    vae.channels_last()
    if compile if compile is not None else _compiles_fast(device):
        compile_for_sampling(var, vae)
    return var, vae


def compile_for_sampling(var: VAR, vae: VQVAE, backend: str | Callable = "inductor") -> None:
    """torch.compile each transformer block with dynamic shapes (the scales' token counts and the KV cache's
    length vary: one graph serves them all, after the first scale's), and the tokenizer's decoder."""
    for block in var.blocks:
        block.compile(dynamic=True, backend=backend)
    vae.decoder.compile(backend=backend)


def _compiles_fast(device: torch.device) -> bool:
    if device.type != "cuda":
        return False  # torch.compile on a CPU builds C++ for minutes and gains little at sampling sizes
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def generate_images(var: VAR, vae: VQVAE, label_B: Tensor, cfg: float, top_k: int, top_p: float,
                    more_smooth: bool = False, generator: Optional[torch.Generator] = None) -> Tensor:
    """Class-conditional images in [-1, 1] (B, C, H, W): VAR's scale-by-scale sampling with guidance, top-k /
    top-p and a KV cache, then the tokenizer's decoder."""
    f_hat = var.generate(vae, label_B, cfg=cfg, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                         generator=generator)
    return vae.fhat_to_img(f_hat)


def sample(model_config: dict, weights: dict[str, Tensor], request: SampleRequest,
           device: torch.device) -> Iterator[Tensor]:
    """Class-conditional images with CFG, top-k / top-p and a KV cache, in chunks of --batch-size."""
    var, vae = sampling_models(model_config, weights, device, compile=False if request.options.get("eager") else None)
    labels = sample_labels(model_config, request)
    options = request.options
    generator = torch.Generator(device).manual_seed(request.seed)
    for start in range(0, len(labels), request.batch_size):
        label_B = labels[start:start + request.batch_size].to(device)
        yield generate_images(var, vae, label_B, cfg=options["cfg"], top_k=options["top_k"], top_p=options["top_p"],
                              more_smooth=options["more_smooth"], generator=generator).float().cpu()


class VARSampler(ImageSampler):
    """Class-conditional images: `sample` above, with VAR's own flags."""

    options = (
        SampleOption("--cfg", float, 1.5, "classifier-free guidance at the last scale (ramps up from 0)",
                     valid=lambda v: math.isfinite(v) and v >= 0, rule="must be a finite number >= 0"),
        SampleOption("--top-k", int, 900, "sample among the k most likely codes (0 = off, 1 = greedy)",
                     valid=lambda v: v >= 0, rule="must be >= 0 (0 = off, 1 = greedy)"),
        SampleOption("--top-p", float, 0.96, "nucleus sampling mass (0 = off)",
                     valid=lambda v: 0 <= v <= 1, rule="must be in [0, 1] (0 = off)"),  # nan fails too
        SampleOption("--more-smooth", bool, False, "the reference's smooth Gumbel option (for visuals, not FID)"),
        SampleOption("--num-per-class", int, None, "K images of every class (a class-balanced set; sets --num)",
                     valid=lambda v: v >= 1, rule="must be at least 1"),
        SampleOption("--eager", bool, False, "no torch.compile (on CUDA it compiles the blocks and decoder, which "
                     "takes a minute and pays off over many images)"),
    )

    def sample(self, model_config: dict, weights: dict[str, Tensor], request: SampleRequest,
               device: torch.device) -> Iterator[Tensor]:
        return sample(model_config, weights, request, device)

    def num_classes(self, model_config: dict) -> int:
        return model_config["model"]["num_classes"]

    def count(self, model_config: dict, request: SampleRequest) -> int:
        return len(sample_labels(model_config, request))

    def grid_columns(self, model_config: dict, request: SampleRequest) -> int:
        # --num-per-class: one row per class; labels cycling over the classes: one column per class
        return request.options.get("num_per_class") or min(model_config["model"]["num_classes"], 10)


class OfficialExport(Exporter):
    """`vistrain export --format var-official`: the two files of FoundationVision/VAR (vae_ch*v*z*.pth and
    var_d*.pth, named as the released ones) that its build_vae_var + load_state_dict take. A run's tokenizer is
    read from var.tokenizer's folder; an imported model folder carries its own."""

    formats = ("var-official",)

    def export(self, fmt: str, folder: Path, out: Path, provenance: dict) -> Path:
        model_config, weights = ckpt_lib.load_model_config(folder), ckpt_lib.load_weights(folder)
        if any(k.startswith("vae.") for k in weights):
            vae_config = model_config["vae"]
            vae_state = {k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")}
        else:
            vae, vae_config = load_tokenizer(model_config["tokenizer"], torch.device("cpu"))
            vae_state = vae.state_dict()
        var_state = {k[len("var."):]: v for k, v in weights.items() if k.startswith("var.")}
        files = export_official(VARConfig(**model_config["model"]), VQVAEConfig(**vae_config), var_state, vae_state)

        def fill(tmp: Path) -> None:
            for name, state in files.items():
                torch.save(state, tmp / name)

        return ckpt_lib.write_new_folder(out, fill, provenance_record=provenance)


register(TaskSpec(name="var", config=VARExperimentConfig, build=VARTask,
                  capabilities=(VARSampler(), OfficialExport()),
                  smoke_overrides=("model.depth=2", "var.num_samples=4", "var.val_images=16")))

"""Scoring images for any list of metric names: what `vistrain eval` and the tasks' in-loop evals share.

    fid, kid, is, pr     generated images against reference statistics, through the feature detector
    judge                the digits judge: fd_judge, is_judge and (given labels) class_acc
    rfid, psnr, ssim     reconstructions against their originals (tokenizers)

A scorer loads everything it needs when it is built -- the detector, the reference statistics, the judge -- so
a missing file fails in seconds, before any image is generated. Images come in as they are made: chunks in
[-1, 1], N x C x H x W, each rank its own share; every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor

from vistrain.engine.dist import DistContext, barrier, gather_objects
from vistrain.errors import ConfigError
from vistrain.eval.detector import load_detector
from vistrain.eval.digits_judge import DigitsJudge, judge_metrics
from vistrain.eval.frechet import frechet_distance
from vistrain.eval.stats import reference_features

DETECTOR_METRICS = ("fid", "kid", "is", "pr")
JUDGE = "judge"
RECONSTRUCTION_METRICS = ("rfid", "psnr", "ssim")
SAMPLE_METRICS = DETECTOR_METRICS + (JUDGE,)
NEEDS_REF = ("fid", "kid", "pr")
JUDGE_MAX_RESOLUTION = 64  # the judge knows digits; bigger images are not what it was made for


def balanced_share(num: int, num_classes: int, dist_ctx: Optional[DistContext]) -> Tensor:
    """This rank's images of `num` class-balanced ones: the class of each (image i asks for class i mod C; -1
    for an unconditional model). Every rank gets ceil(num / ranks) images, so ranks that generate together
    (FSDP) make the same calls; the total may exceed `num` by fewer than the number of ranks."""
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
    per_rank = -(-num // world)
    index = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return index % num_classes if num_classes else torch.full_like(index, -1)


# The metric that picks `best` when eval.best is not set: the first of these that eval.metrics computes.
_BEST_BY = {"fid": ("fid", "min"), "judge": ("fd_judge", "min"), "kid": ("kid_mean", "min"), "is": ("is_mean", "max")}


def default_best(metrics: list[str]) -> Optional[tuple[str, str]]:
    """(metric, min|max) for `best` from a metric list, or None when it has nothing to choose by."""
    return next((_BEST_BY[m] for m in _BEST_BY if m in metrics), None)


def check_judge_data(metrics: list[str], data_name: Optional[str], metrics_key: str, trained: str) -> None:
    """The digits judge only knows digits: refuse it for a model of any other data, or of data nobody recorded
    (its scores would be meaningless numbers). `trained` says what the model was trained on, for the message."""
    if JUDGE in metrics and data_name != "digits":
        raise ConfigError(f"{metrics_key} has `judge`, the digits judge, but {trained}: the judge only knows digits. "
                          "Use fid / kid / is / pr (with a reference of real images) instead")


def in_loop_scorer(eval_cfg, dist_ctx: DistContext, data_name: str) -> Optional["ImageScorer"]:
    """The scorer of `eval.metrics` for `eval.mode: sync`, or None. Tasks build it with themselves, so a missing
    detector or reference, or a judge asked to score what it does not know, fails before the first step."""
    check_judge_data(eval_cfg.metrics, data_name, "eval.metrics", f"this run trains on data.name={data_name}")
    if eval_cfg.mode != "sync" or not eval_cfg.metrics:
        return None
    scorer = ImageScorer(list(eval_cfg.metrics), ref=eval_cfg.ref, detector=eval_cfg.detector,
                         device=dist_ctx.device, batch_size=eval_cfg.batch_size, dist_ctx=dist_ctx)
    scorer.check_num_images(eval_cfg.num_samples, "eval.num_samples")
    return scorer


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] images -> uint8 N x 3 x H x W, the detector's input (grey images repeated to three channels)."""
    out = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return out.expand(-1, 3, -1, -1) if out.shape[1] == 1 else out


class ImageScorer:
    def __init__(self, metrics: list[str], *, ref: Optional[str] = None, detector: Optional[str] = None,
                 device: torch.device = torch.device("cpu"), batch_size: int = 64,
                 dist_ctx: Optional[DistContext] = None, reconstructions: bool = False):
        """`metrics` from SAMPLE_METRICS, or RECONSTRUCTION_METRICS when `reconstructions`; `ref` a folder of
        images or a stats .npz (fid, kid, pr of samples); `detector` the Inception TorchScript file (none: the
        torch hub cache, downloaded when online)."""
        allowed = RECONSTRUCTION_METRICS if reconstructions else SAMPLE_METRICS
        unknown = [m for m in metrics if m not in allowed]
        if unknown or not metrics:
            kind = "reconstructions (a tokenizer)" if reconstructions else "generated samples"
            raise ConfigError(f"metrics {','.join(unknown) or '(none)'}: for {kind} choose from {', '.join(allowed)}")
        self.metrics, self.dist = list(metrics), dist_ctx
        self.detector = None
        if any(m in DETECTOR_METRICS or m == "rfid" for m in metrics):
            self.detector = load_detector(detector, device, batch_size=batch_size)
        self.ref = None
        if any(m in NEEDS_REF for m in metrics):
            if not ref:
                raise ConfigError(f"{', '.join(m for m in metrics if m in NEEDS_REF)} compare with real images: "
                                  "give --ref (eval.ref): a folder of images or a statistics .npz")
            self.ref = self._main_rank_first(lambda: reference_features(ref, self.detector, batch_size))
            self._check_reference_size()
        self.judge = None
        if JUDGE in metrics:
            self.judge = self._main_rank_first(DigitsJudge.load)

    def _fewest(self, side: int) -> tuple[int, str]:
        """(the fewest images, the metric that needs them) of the generated (side 0) or reference (side 1) set."""
        # here: eval/image_metrics.py needs the optional `eval` extra
        from vistrain.eval.image_metrics import MIN_IMAGES

        needs = {**MIN_IMAGES, JUDGE: (2, 0)}
        return max(((needs[m][side], m) for m in self.metrics if m in needs), default=(0, ""))

    def _check_reference_size(self) -> None:
        fewest, metric = self._fewest(1)
        if self.ref.count < fewest:
            raise ConfigError(f"reference {self.ref.source} holds {self.ref.count} images; {metric} needs at least "
                              f"{fewest}: give a reference of more real images (--ref, eval.ref)")

    def check_num_images(self, num: int, key: str) -> None:
        """Refuse, before any image is generated, a sample count too small for the metrics (`key` names it)."""
        fewest, metric = self._fewest(0)
        if num < fewest:
            raise ConfigError(f"{key} {num}: {metric} needs at least {fewest} generated images")

    def _main_rank_first(self, load):
        """`load()` on rank 0, which computes and caches (a folder's statistics, the judge) the first time;
        then on the other ranks, which read the cache."""
        ctx = self.dist
        if ctx is None or not ctx.distributed:
            return load()
        value = load() if ctx.is_main else None
        barrier(ctx)
        return value if ctx.is_main else load()

    # ---------------------------------------------------------------------------------------- samples

    def score_samples(self, chunks: Iterable[tuple[Tensor, Optional[Tensor]]]) -> dict[str, float]:
        """Metrics of generated images: `chunks` of (images in [-1, 1], the classes they were asked for or
        None), this rank's share."""
        judged: list[tuple[Tensor, Optional[Tensor]]] = []

        def for_detector() -> Iterator[Tensor]:
            for images, labels in chunks:
                if not bool(torch.isfinite(images).all()):
                    raise ValueError("the model generated non-finite pixel values (nan or inf): its weights are "
                                     "damaged or diverged, so there is nothing to score")
                if self.judge is not None:
                    if images.shape[-1] > JUDGE_MAX_RESOLUTION:
                        raise ConfigError(f"the digits judge scores digits (at most {JUDGE_MAX_RESOLUTION} px), "
                                          f"not {images.shape[-1]} px images: drop `judge` from the metrics")
                    judged.append((images.float().cpu(), labels))
                yield to_uint8(images)

        out: dict[str, float] = {}
        detector_metrics = [m for m in self.metrics if m in DETECTOR_METRICS]
        if detector_metrics:
            # here: eval/image_metrics.py needs torchmetrics (the `eval` extra), which a run without FID & co. may lack
            from vistrain.eval.image_metrics import compute_image_metrics

            out.update(compute_image_metrics(detector_metrics, for_detector(), self.ref, self.detector, self.dist))
        else:
            for _ in for_detector():
                pass
        if self.judge is not None:
            out.update(self._judge(judged))
        return self._finite(out)

    def _judge(self, judged: list[tuple[Tensor, Optional[Tensor]]]) -> dict[str, float]:
        shares = gather_objects(judged, self.dist) if self.dist is not None else [judged]
        images = torch.cat([im for share in shares for im, _ in share])
        labels = [lb for share in shares for _, lb in share]
        labels = torch.cat(labels) if labels and all(lb is not None for lb in labels) else None
        return judge_metrics(self.judge, images, labels)

    # -------------------------------------------------------------------------------- reconstructions

    def score_reconstructions(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """rfid, psnr (dB, on [0, 1] pixels, per image) and ssim (per image) of (originals, reconstructions)."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, images
        real_feats, fake_feats = [], []
        for real, recon in pairs:
            real01, recon01 = (real.float().clamp(-1, 1) + 1) / 2, (recon.float().clamp(-1, 1) + 1) / 2
            mse = (real01 - recon01).square().flatten(1).mean(1).clamp_min(1e-10)
            sums[0] += float((10 * torch.log10(1.0 / mse)).sum())
            ssim = structural_similarity_index_measure(recon01, real01, data_range=1.0, reduction="none")
            sums[1] += float(ssim.sum())
            sums[2] += len(real)
            if self.detector is not None:
                real_feats.append(self.detector.features(to_uint8(real)).cpu())
                fake_feats.append(self.detector.features(to_uint8(recon)).cpu())
        shares = gather_objects((sums, real_feats, fake_feats), self.dist) if self.dist is not None else [
            (sums, real_feats, fake_feats)]
        total = sum(share[0] for share in shares)
        if total[2] < 1:
            raise ValueError("no images were reconstructed")
        out = {"psnr": float(total[0] / total[2]), "ssim": float(total[1] / total[2])}
        if self.detector is not None:
            real = torch.cat([f for share in shares for f in share[1]])
            fake = torch.cat([f for share in shares for f in share[2]])
            out["rfid"] = frechet_distance(fake, real)
        return self._finite({m: out[m] for m in self.metrics})

    def _finite(self, scores: dict[str, float]) -> dict[str, float]:
        """Every score that leaves a scorer is a number: a nan or inf is an error naming what it was computed from
        (the inputs are checked where they enter -- reference statistics, detector outputs, generated images --
        so one that still gets here is a numerical failure of the metric itself)."""
        bad = {name: value for name, value in scores.items() if not math.isfinite(value)}
        if bad:
            inputs = [f"reference {self.ref.source}" if self.ref is not None else "",
                      f"detector {self.detector.identity}" if self.detector is not None else "",
                      "the digits judge" if self.judge is not None else ""]
            raise ValueError(f"non-finite scores {bad}, computed from {', '.join(i for i in inputs if i)}: "
                             "not a result; check those inputs")
        return scores

"""FID, KID, IS and precision/recall of generated images against reference statistics (the training loop's
meters are engine/meters.py).

Flow: every rank runs the detector over its own generated batches; the features (and for IS the class logits)
are gathered on rank 0, put in a canonical order, scored there, and the numbers are broadcast so every rank
returns the same dict. The canonical order (rows sorted by a fixed random projection) makes the random subsets
of KID and the splits of IS depend only on which images were generated, not on how they were sharded over
ranks: N samples on 2 ranks score the same as the same N samples on 1 rank.

FID, KID and IS are torchmetrics' implementations. torchmetrics takes a custom `feature` module and calls it
on whatever `update()` receives; here that module passes already-computed features through (`_Given`), so one
detector pass serves every metric and the gathering over ranks stays ours (torchmetrics' own syncing is off:
only rank 0 computes, and a collective that other ranks never join would hang).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from vistrain.engine.dist import DistContext, broadcast_object
from vistrain.errors import ConfigError
from vistrain.eval.detector import Detector
from vistrain.eval.stats import RefStats

# metric name -> the keys it reports
METRICS = {"fid": ("fid",), "kid": ("kid_mean", "kid_std"), "is": ("is_mean", "is_std"),
           "pr": ("precision", "recall")}
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # as the StyleGAN metrics
IS_SPLITS = 10
PR_NEIGHBOURS = 3  # k of the k-NN manifolds, as in Kynkaanniemi et al. and the StyleGAN metrics
# metric -> the fewest (generated, reference) images it can be computed from: checked before any image is made
MIN_IMAGES = {"fid": (2, 2), "kid": (2, 2), "is": (IS_SPLITS, 0), "pr": (PR_NEIGHBOURS + 1, PR_NEIGHBOURS + 1)}


class _Given(nn.Module):
    """torchmetrics feature module for features computed beforehand: passes them through as float64.

    `num_features` spares FID its dummy forward (without the attribute it runs the module on a random
    1 x 3 x 299 x 299 uint8 image to learn the width). float64 out, because FID returns its value in the dtype
    of the features it was given.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


def check_metrics(metrics: list[str], ref: Optional[RefStats], detector: Detector) -> list[str]:
    """Validate the metric names (config key `eval.metrics`) and what they need, before any image is generated."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ConfigError(f"eval.metrics: unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"valid ones are {', '.join(METRICS)}")
    needs_ref = [m for m in metrics if m in ("fid", "kid", "pr")]
    if needs_ref and ref is None:
        raise ConfigError(f"eval.metrics: {', '.join(needs_ref)} need reference statistics (eval.ref)")
    needs_features = [m for m in metrics if m in ("kid", "pr")]
    if needs_features and ref is not None and ref.features is None:
        raise ConfigError(f"reference statistics {ref.source} hold mu/sigma/count only, which support fid alone; "
                          f"{', '.join(needs_features)} need the reference features: point eval.ref at the image "
                          "folder or at an .npz saved with features")
    if ref is not None and ref.mu.shape[0] != detector.num_features:
        raise ConfigError(f"reference statistics {ref.source} have {ref.mu.shape[0]} features, the detector "
                          f"{detector.identity} gives {detector.num_features} (eval.detector)")
    if "is" in metrics and not detector.can_classify:
        raise ConfigError(f"eval.metrics: 'is' needs class logits, but detector {detector.identity} gives features "
                          "only (eval.detector)")
    return list(dict.fromkeys(metrics))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """KID's subsets and IS's splits come from torch's global RNG: fork it so scores are reproducible and the
    caller's random stream is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fid_from_features(fake: Tensor, ref: RefStats) -> float:
    """FID of fake features (N x D) against the reference, through torchmetrics.

    With reference features, torchmetrics accumulates them itself. With mu / sigma / count only, its real-side
    states are seeded so that its compute() recovers exactly mu and sigma:
      real_features_sum = n mu,  real_features_cov_sum = sum x x^T = (n - 1) sigma + n mu mu^T
    (its covariance is (cov_sum - n mu mu^T) / (n - 1), the unbiased one that sigma is).
    """
    metric = FrechetInceptionDistance(feature=_Given(fake.shape[1]), sync_on_compute=False)
    if ref.features is not None:
        metric.update(torch.from_numpy(ref.features), real=True)
    else:
        n, mu, sigma = ref.count, torch.from_numpy(ref.mu), torch.from_numpy(ref.sigma)
        metric.real_features_sum.copy_(n * mu)
        metric.real_features_cov_sum.copy_((n - 1) * sigma + n * torch.outer(mu, mu))
        metric.real_features_num_samples.fill_(n)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_from_features(fake: Tensor, real: Tensor, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over random subsets), torchmetrics' polynomial-kernel MMD; subsets of min(1000, N) rows."""
    subset = min(KID_SUBSET_SIZE, fake.shape[0], real.shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=_Given(fake.shape[1]), subsets=KID_SUBSETS, subset_size=subset,
                                         sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with _seeded(seed):
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score_from_logits(logits: Tensor, seed: int = 0) -> tuple[float, float]:
    """IS (mean, std over 10 splits), torchmetrics'; it softmaxes the logits (log-probabilities work as well)."""
    if logits.shape[0] < IS_SPLITS:
        raise ValueError(f"the Inception Score needs at least {IS_SPLITS} images (one per split), got "
                         f"{logits.shape[0]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=IS_SPLITS, sync_on_compute=False)
    metric.update(logits)
    with _seeded(seed):
        mean, std = metric.compute()
    return float(mean), float(std)


def _rows_per_block(columns: int) -> int:
    return max(1, 20_000_000 // max(columns, 1))  # a distance block of ~160 MB in float64


def _kth_neighbour_radii(points: Tensor, k: int) -> Tensor:
    """Distance from each point to its k-th nearest other point: the radius of its ball in the k-NN manifold."""
    radii = []
    for rows in points.split(_rows_per_block(points.shape[0])):
        # k + 1: a point is its own nearest neighbour, at distance 0
        radii.append(torch.cdist(rows, points).kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _share_inside(queries: Tensor, points: Tensor, radii: Tensor) -> float:
    """Share of `queries` inside at least one ball (points[j], radii[j])."""
    inside = [(torch.cdist(rows, points) <= radii).any(1) for rows in queries.split(_rows_per_block(points.shape[0]))]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of two feature sets (N x D, M x D).

    Each set stands for a manifold: the union of balls around its points, each as wide as the distance to its
    k-th nearest neighbour. Precision: share of fake points inside the real manifold (are samples realistic?);
    recall: share of real points inside the fake manifold (is the real variety covered?).
    """
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] <= k:
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} samples, got {x.shape[0]}")
    real, fake = real.double(), fake.double()
    precision = _share_inside(fake, real, _kth_neighbour_radii(real, k))
    recall = _share_inside(real, fake, _kth_neighbour_radii(fake, k))
    return precision, recall


def _canonical_order(x: Tensor) -> Tensor:
    """Rows sorted by a fixed random projection: an order that depends on the rows only, not on which rank
    produced them. (Two different rows tie only if they project to the same float64, which does not happen
    for real features; identical rows may come in any order, which changes nothing.)"""
    if x.shape[0] < 2:
        return x
    direction = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x[torch.argsort(x @ direction, stable=True)]


def _gather_on_main(x: Tensor, ctx: DistContext) -> Optional[Tensor]:
    """All ranks' rows concatenated in rank order on rank 0 (None elsewhere). Ranks hold different numbers of
    rows, and gloo's gather wants equal shapes, so rows are padded to the longest and cut back after."""
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]), group=ctx.cpu_group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)] if ctx.is_main else None
    dist.gather(padded, parts, dst=0, group=ctx.cpu_group)
    if not ctx.is_main:
        return None
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])


def _total_count(n: int, ctx: Optional[DistContext]) -> int:
    if ctx is None or not ctx.distributed:
        return n
    total = torch.tensor([n])
    dist.all_reduce(total, group=ctx.cpu_group)
    return int(total.item())


def _score(names: list[str], fake: Optional[Tensor], logits: Optional[Tensor], ref: Optional[RefStats],
           seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    real = torch.from_numpy(ref.features) if ref is not None and ref.features is not None else None
    if "fid" in names:
        out["fid"] = fid_from_features(fake, ref)
    if "kid" in names:
        out["kid_mean"], out["kid_std"] = kid_from_features(fake, real, seed)
    if "is" in names:
        out["is_mean"], out["is_std"] = inception_score_from_logits(logits, seed)
    if "pr" in names:
        out["precision"], out["recall"] = precision_recall(real, fake)
    return out


def compute_image_metrics(metrics: list[str], fake_uint8_batches: Iterable[Tensor], ref: Optional[RefStats],
                          detector: Detector, dist_ctx: Optional[DistContext] = None,
                          seed: int = 0) -> dict[str, float]:
    """Score the generated images: `metrics` from fid, kid, is, pr; keys fid, kid_mean, kid_std, is_mean,
    is_std, precision, recall.

    `fake_uint8_batches`: this rank's share of the generated images, uint8 N x 3 x H x W batches (consumed
    once, lazily, so a generator that samples on the fly works). `ref` is needed for fid / kid / pr on every
    rank (the checks run everywhere so all ranks fail together); only rank 0's is used for scoring. Every rank
    returns the same dict. `seed` fixes KID's subsets and IS's splits.
    """
    names = check_metrics(metrics, ref, detector)
    wants_features = any(m in names for m in ("fid", "kid", "pr"))
    feats, logits = [], []
    for batch in fake_uint8_batches:
        if wants_features:
            feats.append(detector.features(batch))
        if "is" in names:
            logits.append(detector.logits(batch))
    fake = torch.cat(feats) if feats else torch.zeros(0, detector.num_features, dtype=torch.float64)
    fake_logits = torch.cat(logits) if logits else torch.zeros(0, detector.num_classes, dtype=torch.float64)
    # every rank learns the total, so too few samples fail on all ranks alike instead of hanging the others
    total = _total_count(fake.shape[0] if wants_features else fake_logits.shape[0], dist_ctx)
    if total < 2:
        raise ValueError(f"image metrics need at least 2 generated images, got {total}")

    if dist_ctx is None or not dist_ctx.distributed:
        return _score(names, _canonical_order(fake), _canonical_order(fake_logits), ref, seed)

    # (the same collectives on every rank: `names` is the same everywhere)
    fake = _gather_on_main(fake, dist_ctx) if wants_features else fake
    fake_logits = _gather_on_main(fake_logits, dist_ctx) if "is" in names else fake_logits
    result: object = None
    if dist_ctx.is_main:
        try:
            result = _score(names, _canonical_order(fake), _canonical_order(fake_logits), ref, seed)
        except Exception as e:
            broadcast_object(f"{type(e).__name__}: {e}", dist_ctx)  # let the other ranks fail with the reason
            raise
    result = broadcast_object(result, dist_ctx)
    if isinstance(result, str):
        raise RuntimeError(f"rank 0 failed to compute the image metrics: {result}")
    return result

"""The digits judge: a small CNN trained on vistrain's digits train split that scores generated digits.

Generated digits are judged the way FID judges ImageNet samples, with a network that knows the data, only
a tiny one that is trained here rather than downloaded: every image, whatever its size (8..64 px) and
channels (1 or 3), is averaged to grey, area-pooled to the digits' native 8x8 and clamped to [-1, 1]; then
two 3x3 convolutions, a max pool and a 64-unit layer (the *features*) feed a 10-way linear head.

- `fd_judge`: the Fréchet distance between the judge's features of generated and of real val images
  (an FID analogue; 0 for the val images against themselves);
- `class_acc`: the percentage of class-conditional samples the judge classifies as the class they were
  asked for (the judge's own val accuracy, about 99%, is the ceiling);
- `is_judge`: an inception-style score exp(E_x KL(p(y|x) || p(y))) of the judge's softmax: 1 for samples that
  are all alike or unreadable, at most 10 for confident samples spread evenly over the ten digits.

Training is deterministic -- a fixed seed, one CPU thread, the global RNG untouched -- and takes a few
seconds; the weights are cached in `$VISTRAIN_CACHE_DIR` (default ~/.cache/vistrain) as
``digits_judge-v<VERSION>.safetensors``, written atomically and checked by a checksum on load (a damaged
or stale file is retrained and replaced). Bump VERSION whenever the recipe or the architecture changes.
Weights bit-identical across machines are not promised (CPU kernels may differ); on one machine they are.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.cachedir import default_cache_dir
from vistrain.data.digits import DigitsDataset
from vistrain.durable import write_atomic
from vistrain.eval.frechet import frechet_distance

VERSION = 1
NUM_CLASSES = 10
FEATURE_DIM = 64
_SEED = 0
_EPOCHS = 30
_BATCH = 64
_LR = 2e-3
_AUG_RESOLUTION = 32  # shifted copies are rendered at this size and pooled back to 8x8 (sub-pixel shifts)
_MAX_SHIFT = 2  # pixels at _AUG_RESOLUTION: up to half a pixel of the 8x8 grid
_EXACT_FRACTION = 0.3  # share of each epoch's images given as the exact 8x8 digits, unshifted


def cache_path(cache_dir: Union[str, Path, None] = None) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"digits_judge-v{VERSION}.safetensors"


def to_judge_input(images_BCHW: Tensor) -> Tensor:
    """Images in [-1, 1], any size and channel count -> B x 1 x 8 x 8 grey, area-pooled, clamped to [-1, 1]."""
    if images_BCHW.ndim != 4:
        raise ValueError(f"the digits judge takes B x C x H x W images, got shape {tuple(images_BCHW.shape)}")
    x = images_BCHW.detach().float().mean(1, keepdim=True)
    return F.adaptive_avg_pool2d(x, 8).clamp(-1.0, 1.0)


class DigitsJudge(nn.Module):
    """The judge network (always in eval mode, frozen). Build it with `DigitsJudge.load()`."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self._real_features: dict[tuple[int, str], Tensor] = {}  # val features by resolution (and device)
        self.train_seconds: Optional[float] = None  # set when this instance was trained rather than read

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, cache_dir: Union[str, Path, None] = None) -> "DigitsJudge":
        """The cached judge, trained (and cached) first when the file is missing, stale or damaged."""
        path = cache_path(cache_dir)
        judge = cls()
        if path.exists():
            try:
                judge.load_state_dict(_read_weights(path))
                return judge._frozen()
            except Exception as e:  # noqa: BLE001 -- any unreadable cache is retrained, never trusted
                warnings.warn(f"the digits judge cache {path} is unusable ({type(e).__name__}: {e}); retraining it",
                              stacklevel=2)
        start = time.perf_counter()
        state = train_weights()
        judge.load_state_dict(state)
        judge.train_seconds = time.perf_counter() - start
        try:
            _write_weights(path, state)
        except OSError as e:
            warnings.warn(f"could not cache the digits judge at {path} ({e}); it will be retrained next time",
                          stacklevel=2)
        return judge._frozen()

    def _frozen(self) -> "DigitsJudge":
        return self.eval().requires_grad_(False)

    # ------------------------------------------------------------------------------------------ scoring

    def _device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def features(self, images_BCHW: Tensor) -> Tensor:
        """The penultimate layer (B x 64) of images in [-1, 1]; the result is on the judge's device."""
        return self.body(to_judge_input(images_BCHW).to(self._device()))

    @torch.no_grad()
    def logits(self, images_BCHW: Tensor) -> Tensor:
        return self.head(self.features(images_BCHW))

    def forward(self, images_BCHW: Tensor) -> Tensor:
        return self.logits(images_BCHW)

    @torch.no_grad()
    def real_features(self, resolution: int = 8) -> Tensor:
        """Features of the real val digits rendered at `resolution` (as DigitsDataset renders them), cached."""
        key = (int(resolution), str(self._device()))
        if key not in self._real_features:
            self._real_features[key] = self.features(_split_tensors("val", resolution)[0])
        return self._real_features[key]

    @torch.no_grad()
    def accuracy_on_val(self, resolution: int = 8) -> float:
        """Fraction (0..1) of the real val digits, rendered at `resolution`, the judge classifies correctly."""
        images, labels = _split_tensors("val", resolution)
        return float((self.logits(images).argmax(1).cpu() == labels).float().mean())


def judge_metrics(judge: DigitsJudge, fake_BCHW: Tensor, labels_B: Optional[Tensor] = None,
                  real_BCHW: Optional[Tensor] = None) -> dict[str, float]:
    """`fd_judge`, `is_judge` and, given the requested labels, `class_acc` (%) of generated images.

    The reference for `fd_judge` is `real_BCHW` when given, else the real val digits at the resolution of
    the fakes (their features computed once per judge and resolution).
    """
    if real_BCHW is None:
        real_feats = judge.real_features(fake_BCHW.shape[-1])
    else:
        real_feats = judge.features(real_BCHW)
    fake_feats = judge.features(fake_BCHW)
    probs_BK = judge.head(fake_feats).double().softmax(-1)
    metrics = {"fd_judge": frechet_distance(fake_feats, real_feats), "is_judge": inception_score(probs_BK)}
    if labels_B is not None:
        labels_B = labels_B.to(probs_BK.device)
        if labels_B.shape != probs_BK.shape[:1]:
            raise ValueError(f"{len(labels_B)} labels for {len(probs_BK)} images")
        metrics["class_acc"] = 100.0 * float((probs_BK.argmax(1) == labels_B).double().mean())
    return metrics


def inception_score(probs_BK: Tensor) -> float:
    """exp(mean_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the set; in [1, K]."""
    p = probs_BK.double()
    marginal_K = p.mean(0, keepdim=True)
    kl_B = (p * (p.clamp_min(1e-30).log() - marginal_K.clamp_min(1e-30).log())).sum(1)
    return float(kl_B.mean().exp())


# ---------------------------------------------------------------------------------------------- training


def _split_tensors(split: str, resolution: int) -> tuple[Tensor, Tensor]:
    """All images (N x 1 x R x R, in [-1, 1]) and labels of a digits split."""
    ds = DigitsDataset(split, resolution, 1)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


def _shifted(x_N1HW: Tensor, dx_N: Tensor, dy_N: Tensor, pad: int) -> Tensor:
    """Each image moved by (dx, dy) pixels, the background (-1) filling in."""
    H, W = x_N1HW.shape[-2:]
    padded = F.pad(x_N1HW, (pad, pad, pad, pad), value=-1.0)
    out = torch.empty_like(x_N1HW)
    for sy in range(-pad, pad + 1):
        for sx in range(-pad, pad + 1):
            m = (dx_N == sx) & (dy_N == sy)
            out[m] = padded[m, :, pad - sy:pad - sy + H, pad - sx:pad - sx + W]
    return out


def train_weights(seed: int = _SEED) -> dict[str, Tensor]:
    """Train the judge on the digits train split (never val); the same weights on every call (one machine).

    Each epoch sees every train digit once: 30% as the exact 8x8 digits, the rest rendered at 32 px, shifted
    by up to 2 px there (half a pixel of the 8x8 grid) and pooled back -- so smooth, upsampled and slightly
    off-centre digits, which generators produce, are in its training distribution.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the reduction order, so the weights, cannot depend on the machine load
    try:
        # Callers may be inside no_grad / inference_mode / autocast (an eval loop): training needs none of them.
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast("cpu", enabled=False):  # fork_rng: the caller's global RNG is left as it was
            torch.manual_seed(seed)
            net = DigitsJudge()
            g = torch.Generator().manual_seed(seed)
            x8, labels = _split_tensors("train", 8)
            x_big = _split_tensors("train", _AUG_RESOLUTION)[0]
            n = len(labels)
            steps_per_epoch = (n + _BATCH - 1) // _BATCH
            opt = torch.optim.AdamW(net.parameters(), lr=_LR, weight_decay=1e-4)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, _LR, total_steps=_EPOCHS * steps_per_epoch)
            for _ in range(_EPOCHS):
                dx, dy = (torch.randint(-_MAX_SHIFT, _MAX_SHIFT + 1, (n,), generator=g) for _ in range(2))
                x = to_judge_input(_shifted(x_big, dx, dy, _MAX_SHIFT))
                exact = torch.rand(n, generator=g) < _EXACT_FRACTION
                x[exact] = x8[exact]
                order = torch.randperm(n, generator=g)
                for i in range(0, n, _BATCH):
                    idx = order[i:i + _BATCH]
                    loss = F.cross_entropy(net.head(net.body(x[idx])), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
            return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ cache


def _checksum(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def _read_weights(path: Path) -> dict[str, Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("version") != str(VERSION):
        raise ValueError(f"version {meta.get('version')!r}, expected {VERSION}")
    if meta.get("sha256") != _checksum(state):
        raise ValueError("checksum mismatch")
    return state


def _write_weights(path: Path, state: dict[str, Tensor]) -> None:
    """Replace `path` whole (vistrain.durable): readers never see half a file. The judge is small: its bytes are
    built in memory."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save(state, metadata={"version": str(VERSION), "sha256": _checksum(state)}))

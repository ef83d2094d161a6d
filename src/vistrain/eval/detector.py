"""The feature network behind FID / KID / IS / precision-recall, loaded as a TorchScript file.

The standard detector is the FID Inception-v3 ("inception-2015-12-05", the TensorFlow graph of the original FID
code) in the TorchScript form that the StyleGAN2-ADA and StyleGAN3 metrics load with `torch.jit.load`. Its calling
convention, as those metrics use it:

- input: uint8 images, N x 3 x H x W, values 0..255, any H x W (it resizes to 299 x 299 itself, so images go in
  exactly as generated or as stored on disk; one-channel images are repeated to three channels by the caller);
- `net(images, return_features=True)` -> N x 2048 float32 pool3 features (FID, KID);
- `net(images, no_output_bias=True)` -> N x 1008 softmax *probabilities* over its classes, without the bias of
  the last layer, as the original Inception Score code computed them (IS).

`Detector` wraps any module with the interface "uint8 N x 3 x H x W in, N x D float out". The Inception keywords
are passed only to networks whose forward declares them, see `_forward_arguments`.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from vistrain.errors import ConfigError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILE = "inception-2015-12-05.pt"
DETECTOR_SETTING = "eval.detector=PATH (CLI --detector PATH)"

# Size of the dummy batch that measures the output widths: 299 x 299 is what the Inception sees anyway, and a
# batch of 2 catches networks that squeeze the batch dimension away.
_PROBE_SHAPE = (2, 3, 299, 299)


def _forward_arguments(net: nn.Module) -> set[str]:
    """Names of the arguments of `net.forward`.

    A TorchScript method has no Python signature (`inspect.signature` raises on it), but it carries its exact
    `FunctionSchema`, so the schema is read for scripted networks and the signature for eager ones. Reading the
    declaration, rather than calling with the keyword and catching TypeError, never mistakes a TypeError raised
    inside forward (a wrong dtype, a bug) for "this network does not take the keyword".
    """
    schema = getattr(net.forward, "schema", None)
    if schema is not None:
        return {arg.name for arg in schema.arguments}
    try:
        return set(inspect.signature(net.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _looks_like_probabilities(out: Tensor) -> bool:
    return bool((out >= 0).all()) and bool(torch.allclose(out.double().sum(1), torch.ones(out.shape[0],
                                                                                         dtype=torch.float64),
                                                          atol=1e-3))


class Detector(nn.Module):
    """uint8 images in, float64 features (and, when the network has them, class logits) out.

    It is itself a torchmetrics-compatible feature module: `forward(uint8 N x 3 x H x W) -> N x num_features`
    and an int `num_features` attribute, so `FrechetInceptionDistance(feature=detector)` works as well.

    Two kinds of network are understood:
    - two-headed, like the Inception: forward takes `return_features`; features come with `return_features=True`
      and the class output without it (with `no_output_bias=True` when the network takes that keyword). A class
      output that is a probability distribution (non-negative rows summing to 1, as the Inception's softmax) is
      turned into log-probabilities, which are logits for the same distribution.
    - one-headed: forward gives features only; IS is refused for it (`can_classify` is False).
    """

    def __init__(self, net: nn.Module, identity: str, device: Union[str, torch.device] = "cpu",
                 batch_size: int = 64):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"detector batch size must be at least 1, got {batch_size}")
        self.net = net.eval().to(device)
        self.identity = identity  # goes into reference-statistics cache keys
        self.device = torch.device(device)
        self.batch_size = batch_size
        args = _forward_arguments(net)
        self._feature_kwargs = {"return_features": True} if "return_features" in args else {}
        self.can_classify = "return_features" in args
        self._class_kwargs = {"no_output_bias": True} if "no_output_bias" in args else {}
        probe = torch.zeros(_PROBE_SHAPE, dtype=torch.uint8)
        feats = self._run(probe, self._feature_kwargs)
        if feats.dim() != 2 or feats.shape[0] != _PROBE_SHAPE[0]:
            raise ConfigError(f"detector {identity}: a batch of {_PROBE_SHAPE[0]} images gave an output of shape "
                              f"{tuple(feats.shape)}; expected {_PROBE_SHAPE[0]} x D features")
        self.num_features: int = int(feats.shape[1])
        self.num_classes = 0
        self._class_output_is_prob = False
        if self.can_classify:
            out = self._run(probe, self._class_kwargs)
            self.num_classes = int(out.shape[1])
            self._class_output_is_prob = _looks_like_probabilities(out)

    @torch.no_grad()
    def _run(self, images: Tensor, kwargs: dict) -> Tensor:
        out = self.net(images.to(self.device), **kwargs)
        if not bool(torch.isfinite(out).all()):  # uint8 images in: a nan or inf out is the network's own doing
            raise ConfigError(f"detector {self.identity} outputs non-finite values (nan or inf) for "
                              f"{len(images)} images: it is damaged or not a feature network; check "
                              f"{DETECTOR_SETTING}")
        return out.double()

    @staticmethod
    def _check(images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"the detector takes uint8 images N x 3 x H x W (0..255); got {images.dtype} "
                             f"{tuple(images.shape)}")
        # grey images: the Inception expects three channels, so repeat the one (as the StyleGAN metrics do)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def forward(self, images: Tensor) -> Tensor:
        """Features of one batch, float64, on the detector's device (the torchmetrics feature-module call)."""
        return self._run(self._check(images), self._feature_kwargs)

    def features(self, images: Tensor) -> Tensor:
        """N x num_features float64 features on the CPU, computed `batch_size` images at a time."""
        images = self._check(images)
        chunks = [self._run(chunk, self._feature_kwargs).cpu() for chunk in images.split(self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.num_features, dtype=torch.float64)

    def logits(self, images: Tensor) -> Tensor:
        """N x num_classes float64 class logits on the CPU (log-probabilities for the Inception)."""
        if not self.can_classify:
            raise ConfigError(f"detector {self.identity} gives features only (its forward takes no "
                              "`return_features` keyword), so it has no class logits for the Inception Score")
        images = self._check(images)
        chunks = []
        for chunk in images.split(self.batch_size):
            out = self._run(chunk, self._class_kwargs).cpu()
            # log of a softmax output: the tiny floor keeps a probability that underflowed to 0 from becoming
            # -inf, which would turn IS's p * log p into nan instead of 0
            chunks.append(out.clamp_min(torch.finfo(torch.float64).tiny).log() if self._class_output_is_prob else out)
        return torch.cat(chunks) if chunks else torch.zeros(0, self.num_classes, dtype=torch.float64)


def _file_identity(path: str) -> str:
    """Name + content hash: the same network under another path shares cached statistics, a changed one not."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{os.path.basename(path)}:{digest.hexdigest()[:16]}"


def _jit_load(path: str, what: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            # torch.jit is deprecated in recent torch, but TorchScript is the format the detector is published in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location="cpu")
    except Exception as e:  # a truncated download, an HTML error page, a pickle: all unreadable here
        raise ConfigError(f"{what}: cannot load {path} as a TorchScript module ({type(e).__name__}: {e})") from e


def default_detector_path() -> str:
    """Where the downloaded Inception lives: the torch hub cache, shared with other torch tools."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)


def load_detector(path: Optional[str], device: Union[str, torch.device] = "cpu", download: bool = True,
                  batch_size: int = 64) -> Detector:
    """The detector from `path` (config key `eval.detector`, CLI `--detector`), else the FID Inception.

    Without a path the Inception is taken from the torch hub cache, downloaded there first when `download` is
    allowed. Callers load the detector before generating any image, so a missing network fails in seconds rather
    than after an hour of sampling.
    """
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"eval.detector / --detector: {path} does not exist or is not a file")
        net = _jit_load(path, "eval.detector / --detector")
        try:
            return Detector(net, _file_identity(path), device, batch_size)
        except ConfigError:
            raise
        except Exception as e:  # the probe forward failed: not the "uint8 images in, features out" interface
            raise ConfigError(f"eval.detector / --detector: {path} does not map uint8 N x 3 x H x W images to N x D "
                              f"features ({type(e).__name__}: {e})") from e
    cached = default_detector_path()
    if not os.path.isfile(cached):
        if not download:
            raise ConfigError(f"no detector: eval.detector is not set, {cached} does not exist and downloading is "
                              f"off; download {INCEPTION_URL} and pass {DETECTOR_SETTING}")
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        try:
            # looked up at call time (not imported by name) so tests can replace it; writes to a temporary file
            # and renames, so a failed download leaves no partial file behind
            torch.hub.download_url_to_file(INCEPTION_URL, cached, progress=True)
        except Exception as e:
            raise ConfigError(f"no detector: eval.detector is not set and downloading the FID Inception from "
                              f"{INCEPTION_URL} failed ({type(e).__name__}: {e}); download it on a machine with "
                              f"network access and pass {DETECTOR_SETTING}") from e
    return Detector(_jit_load(cached, f"the downloaded detector ({DETECTOR_SETTING} to use another file)"),
                    _file_identity(cached), device, batch_size)

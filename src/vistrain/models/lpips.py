"""An LPIPS-style perceptual distance: VGG16 features, unit-normalised per channel, squared differences
weighted by learned 1x1 convolutions, averaged over space and summed over five depths (Zhang et al. 2018).

No weights are downloaded: `load_lpips` reads two local files that users have or can fetch once --
torchvision's VGG16 state dict (keys `features.{i}.weight`) and the LPIPS linear heads (keys
`lin{k}.model.1.weight`, as in the lpips package's `vgg.pth`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# torchvision's vgg16 `features`: conv widths, "M" for max-pooling. LPIPS taps the ReLU after the last conv
# of each of the five stages (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # indices of those ReLUs in `features`
_WIDTHS = (64, 128, 256, 512, 512)
# LPIPS' input scaling for images in [-1, 1]
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for item in _VGG16:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, item, 3, padding=1), nn.ReLU(inplace=False)]
            c_in = item
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _WIDTHS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x_BCHW: Tensor) -> list[Tensor]:
        h, taps = (x_BCHW - self.shift) / self.scale, []
        for i, layer in enumerate(self.features[: _TAPS[-1] + 1]):
            h = layer(h)
            if i in _TAPS:
                taps.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return taps

    def forward(self, x_BCHW: Tensor, y_BCHW: Tensor) -> Tensor:
        """Per-image distance (B,) between images in [-1, 1]; grey images are compared as RGB."""
        if x_BCHW.shape[1] == 1:
            x_BCHW, y_BCHW = x_BCHW.expand(-1, 3, -1, -1), y_BCHW.expand(-1, 3, -1, -1)
        dist_B = torch.zeros(x_BCHW.shape[0], device=x_BCHW.device)
        for lin, fx, fy in zip(self.lins, self._taps(x_BCHW), self._taps(y_BCHW)):
            dist_B = dist_B + lin((fx - fy).square()).mean(dim=(1, 2, 3))
        return dist_B


def load_lpips(vgg_path: str, lin_path: str, key: str) -> LPIPS:
    """LPIPS from the two weight files; errors name the config `key` and the file. Frozen, in eval mode."""
    model = LPIPS()
    vgg = _load(vgg_path, f"{key}.vgg")
    features = {k[len("features."):]: v for k, v in vgg.items() if k.startswith("features.")}
    lin = _load(lin_path, f"{key}.lin")
    heads = {f"{k}.weight": lin.get(f"lin{k}.model.1.weight") for k in range(len(_WIDTHS))}
    missing = [f"lin{k[0]}.model.1.weight" for k, v in heads.items() if v is None]
    if missing:
        raise ValueError(f"{key}.lin={lin_path}: not LPIPS linear heads (missing {', '.join(missing)})")
    try:
        model.features.load_state_dict(features)
        model.lins.load_state_dict(heads)
    except RuntimeError as e:
        raise ValueError(f"{key}.vgg={vgg_path} / {key}.lin={lin_path} do not fit LPIPS-VGG16: "
                         f"{str(e).splitlines()[0]} {' '.join(str(e).split())[:300]}") from None
    return model.eval().requires_grad_(False)


def _load(path: str, key: str) -> dict[str, Tensor]:
    if not path:
        raise ValueError(f"{key} is not set: the perceptual loss needs this local weight file (nothing is "
                         "downloaded at run time)")
    if not Path(path).is_file():
        raise ValueError(f"{key}={path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one that needs unpickling of arbitrary objects
        raise ValueError(f"{key}={path}: cannot be read as a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{key}={path}: expected a state dict, found {type(state).__name__}")
    return state

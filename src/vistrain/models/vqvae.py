"""Multi-scale residual VQ-VAE: the image tokenizer of VAR (Tian et al. 2024, FoundationVision/VAR).

    encode(img_BCHW in [-1, 1]) -> f_BChw             (h = w = patch_nums[-1])
    quantize.f_to_idx(f_BChw)   -> [idx_Bl per scale]  (l = pn * pn, row-major, small scale first)
    idx_to_img(idx list)        -> img_BCHW in [-1, 1]
    forward(img_BCHW)           -> (recon_BCHW, vq_loss, idx list)   (training)

An image is encoded to one latent map f (B, Cvae, h, w) and then described coarse to fine: scale si
looks at what is still unexplained, `f_rest`, area-downsampled to pn x pn, picks the nearest code for
each of those pn*pn cells, and adds the codes back at full size (bicubic upsampling, then a 3x3 conv
"phi") to the running reconstruction f_hat. The last scale works at full size with no resizing. The
decoder sees only the final f_hat. VAR then predicts the codes of scale si+1 from everything before.

Compatibility with the official checkpoint (`vae_ch160v4096z32.pth`, a flat state dict): with the default
VQVAEConfig every parameter has the official name and shape, the operations are those of the original
in the same order, so its weights give the same numbers. Two names differ, and an importer maps them:

* the phi convs are `quantize.phi.{k}.weight/bias` here, `quantize.quant_resi.qresi_ls.{k}.*` there
  (with share_quant_resi=1 the original names its single conv `quantize.quant_resi.qresi.*`, with 0
  `quantize.quant_resi.{k}.*`);
* the original's buffer `quantize.ema_vocab_hit_SV` (code-usage statistics, only updated by its
  distributed training) does not exist here: drop it before loading.

Not supported: the original's `using_znorm` (cosine-similarity lookup; off in every released model),
progressive training (`prog_si`) and patch sizes that are not square.

Differences from the original that do not change any number: the training forward needs no
torch.distributed (the original's does), `next_input` returns a new f_hat instead of adding in place, and
every quantizer method computes in fp32 with autocast off, whatever the parameter dtype.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "VQVAEConfig",
    "VQVAE",
    "Encoder",
    "Decoder",
    "MultiScaleQuantizer",
    "ResnetBlock",
    "AttnBlock",
    "Downsample2x",
    "Upsample2x",
    "phi_indices",
    "validate",
]


@dataclass
class VQVAEConfig:
    """Sizes of the tokenizer. The defaults are the official ImageNet 256 px tokenizer (108,948,355 params)."""

    vocab_size: int = 4096  # V: codes in the codebook, shared by all scales
    z_channels: int = 32  # Cvae: channels of the latent map and of each code
    ch: int = 160  # base width; level i has ch * ch_mult[i] channels (GroupNorm(32) => multiple of 32)
    # One level per entry; the size halves between levels, so images are 2**(len - 1) x the latent size.
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    in_channels: int = 3  # image channels
    dropout: float = 0.0  # inside each residual block
    beta: float = 0.25  # weight of the commitment term (pulls the encoder towards its codes)
    quant_resi: float = 0.5  # phi(h) = (1 - r) h + r conv(h); 0 makes phi the identity
    share_quant_resi: int = 4  # K phi convs shared by the scales (nearest "tick"); 0 = one per scale
    patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])  # last = latent size
    attn: bool = True  # self-attention after each block of the lowest-resolution level
    mid_attn: bool = True  # self-attention between the two middle blocks


def validate(cfg: VQVAEConfig, resolution: int | None = None) -> None:
    """Check a config (and the image size, when known); messages name the `vqvae.` key at fault."""
    if cfg.vocab_size < 2:
        raise ValueError(f"vqvae.vocab_size must be >= 2, got {cfg.vocab_size}")
    if cfg.z_channels < 1:
        raise ValueError(f"vqvae.z_channels must be >= 1, got {cfg.z_channels}")
    if cfg.ch < 32 or cfg.ch % 32:
        raise ValueError(
            f"vqvae.ch must be a positive multiple of 32 (every level is normalised by GroupNorm with 32 "
            f"groups), got {cfg.ch}"
        )
    if len(cfg.ch_mult) < 1 or any(m < 1 for m in cfg.ch_mult):
        raise ValueError(f"vqvae.ch_mult must be a non-empty list of integers >= 1, got {list(cfg.ch_mult)}")
    if cfg.num_res_blocks < 1:
        raise ValueError(f"vqvae.num_res_blocks must be >= 1, got {cfg.num_res_blocks}")
    if cfg.in_channels < 1:
        raise ValueError(f"vqvae.in_channels must be >= 1, got {cfg.in_channels}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"vqvae.dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.beta < 0:
        raise ValueError(f"vqvae.beta must be >= 0, got {cfg.beta}")
    if not 0.0 <= cfg.quant_resi <= 1.0:
        raise ValueError(f"vqvae.quant_resi must be in [0, 1] (0 = phi is the identity), got {cfg.quant_resi}")
    if cfg.share_quant_resi < 0:
        raise ValueError(f"vqvae.share_quant_resi must be >= 0 (0 = one phi per scale), got {cfg.share_quant_resi}")
    pns = list(cfg.patch_nums)
    if not pns or pns[0] < 1 or any(b <= a for a, b in itertools.pairwise(pns)):
        raise ValueError(f"vqvae.patch_nums must be strictly increasing positive sizes, small first, got {pns}")
    if resolution is not None:
        factor = 2 ** (len(cfg.ch_mult) - 1)
        if resolution % factor or resolution // factor != pns[-1]:
            raise ValueError(
                f"vqvae.patch_nums ends at {pns[-1]}, but {resolution} px images give a "
                f"{resolution / factor:g} x {resolution / factor:g} latent (the encoder divides the size by "
                f"2**(len(vqvae.ch_mult)-1) = {factor}); make the last patch num {resolution / factor:g} "
                f"or resize the images to {pns[-1] * factor} px"
            )


# ---------------------------------------------------------------------------------------------------
# encoder / decoder building blocks (the attribute names are the official state-dict names)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _silu(x: Tensor) -> Tensor:
    """SiLU of a normalisation's fresh output: in place when no graph is recorded (VAR's frozen tokenizer, sampling),
    which spares an allocation per call; training needs the input kept for the backward."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus the input (1x1 conv if widths differ)."""

    def __init__(self, c_in: int, c_out: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        # A dropout module only when it does something, as in the original (it owns no state either way).
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h_BCHW = self.conv1(_silu(self.norm1(x_BCHW)))
        h_BCHW = self.conv2(self.dropout(_silu(self.norm2(h_BCHW))))
        return self.nin_shortcut(x_BCHW) + h_BCHW  # shortcut first: the original's addition order


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with one fused 1x1 conv making q, k and v."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.scale = int(channels) ** -0.5

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        # The fused conv's output channels are [q | k | v], each C wide.
        q_BCHW, k_BCHW, v_BCHW = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H, W).unbind(1)
        # Two plain bmm's rather than SDPA: the same kernels as the original, hence the same rounding.
        q_BLC = q_BCHW.reshape(B, C, H * W).transpose(1, 2).contiguous()
        k_BCL = k_BCHW.reshape(B, C, H * W).contiguous()
        v_BCL = v_BCHW.reshape(B, C, H * W).contiguous()
        attn_BLL = torch.softmax(torch.bmm(q_BLC, k_BCL) * self.scale, dim=2)  # [b, query, key]
        out_BCL = torch.bmm(v_BCL, attn_BLL.transpose(1, 2).contiguous())
        return x_BCHW + self.proj_out(out_BCL.view(B, C, H, W))


class Downsample2x(nn.Module):
    """Halve the size: pad one zero row/column at the bottom/right only, then a stride-2 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        # Asymmetric padding (taming-transformers' choice, kept by VAR): an even size S gives exactly S/2.
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample2x(nn.Module):
    """Double the size: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention if the level has any, then a resample.

    The original keeps these as plain containers and loops over their children from the encoder; here a
    level has its own forward, so that activation checkpointing, torch.compile and FSDP can wrap a level
    (VQVAE.blocks) and see it called.
    """

    def __init__(self, c_in: int, c_out: int, n_blocks: int, dropout: float, attn: bool, resample: str | None):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(n_blocks):
            self.block.append(ResnetBlock(c_in, c_out, dropout))
            c_in = c_out
            if attn:
                self.attn.append(AttnBlock(c_out))
        if resample == "down":
            self.downsample = Downsample2x(c_out)
        elif resample == "up":
            self.upsample = Upsample2x(c_out)
        self.resample = resample

    def forward(self, h_BCHW: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h_BCHW = block(h_BCHW)
            if len(self.attn):
                h_BCHW = self.attn[i](h_BCHW)
        if self.resample == "down":
            h_BCHW = self.downsample(h_BCHW)
        elif self.resample == "up":
            h_BCHW = self.upsample(h_BCHW)
        return h_BCHW


class _Mid(nn.Module):
    """block_1 -> attention (or nothing) -> block_2, at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, attn: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h_BCHW: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h_BCHW)))


class Encoder(nn.Module):
    """Image (B, in_channels, S, S) -> latent (B, z_channels, S / 2**(n-1), same), n = len(ch_mult)."""

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, z_channels: int,
                 dropout: float, attn: bool, mid_attn: bool):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = ch
        for i in range(n):
            last = i == n - 1
            c_out = ch * ch_mult[i]
            self.down.append(_Level(c_in, c_out, num_res_blocks, dropout, attn=attn and last,
                                    resample=None if last else "down"))
            c_in = c_out
        self.mid = _Mid(c_in, dropout, mid_attn)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 3, padding=1)

    def forward(self, img_BCHW: Tensor) -> Tensor:
        h_BCHW = self.conv_in(img_BCHW)
        for level in self.down:
            h_BCHW = level(h_BCHW)
        h_BCHW = self.mid(h_BCHW)
        return self.conv_out(_silu(self.norm_out(h_BCHW)))


class Decoder(nn.Module):
    """Latent (B, z_channels, s, s) -> image (B, in_channels, s * 2**(n-1), same); not clamped.

    `up[i]` mirrors `down[i]` (same width, one more residual block) and they run from the last
    (lowest resolution) to the first, as in the original.
    """

    def __init__(self, ch: int, ch_mult: list[int], num_res_blocks: int, in_channels: int, z_channels: int,
                 dropout: float, attn: bool, mid_attn: bool):
        super().__init__()
        n = len(ch_mult)
        c_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_in, 3, padding=1)
        self.mid = _Mid(c_in, dropout, mid_attn)
        levels: list[_Level] = [None] * n  # type: ignore[list-item]
        # Built in execution order: each level's input width is the output width of the one before.
        for i in reversed(range(n)):
            c_out = ch * ch_mult[i]
            levels[i] = _Level(c_in, c_out, num_res_blocks + 1, dropout, attn=attn and i == n - 1,
                               resample="up" if i != 0 else None)
            c_in = c_out
        self.up = nn.ModuleList(levels)  # stored by level index: state-dict order up.0, up.1, ...
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, in_channels, 3, padding=1)

    def forward(self, z_BChw: Tensor) -> Tensor:
        h_BCHW = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h_BCHW = level(h_BCHW)
        return self.conv_out(_silu(self.norm_out(h_BCHW)))


# ---------------------------------------------------------------------------------------------------
# multi-scale residual quantizer


def phi_indices(num_scales: int, share_quant_resi: int) -> list[int]:
    """Which of the K shared phi convs each scale uses (VAR's "tick" rule).

    The K convs sit at evenly spread ticks in [0, 1] and scale si, placed at si / (num_scales - 1), takes
    the nearest tick (the first on a tie). The original spreads the ticks over [1/(2K), 1 - 1/(2K)], but
    over [1/(3K), 1 - 1/(3K)] when K == 4 (its default, kept for compatibility). share_quant_resi == 0
    means one phi per scale, K = num_scales, which this rule maps to the identity. Tick values are
    computed as numpy.linspace does (start + i * step, last = stop) so that near-ties resolve alike.
    """
    K = num_scales if share_quant_resi == 0 else share_quant_resi
    if K == 1:
        return [0] * num_scales
    start = 1 / 3 / K if K == 4 else 1 / 2 / K
    stop = 1 - start
    step = (stop - start) / (K - 1)
    ticks = [start + i * step for i in range(K - 1)] + [stop]
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(min(range(K), key=lambda k: abs(ticks[k] - at)))  # min() keeps the first on ties
    return out


class _Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h): the residual "refiner" applied to each scale's upsampled codes."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, h_BChw: Tensor) -> Tensor:
        # Weights cast to the input's dtype (fp32 in the quantizer) so that bf16 parameters (FSDP) still
        # give an fp32 quantizer; `.to` is a no-op in plain fp32. Same operation order as the original.
        conv = F.conv2d(h_BChw, self.weight.to(h_BChw.dtype), self.bias.to(h_BChw.dtype), padding=1)
        return h_BChw.mul(1 - self.ratio) + conv.mul(self.ratio)


class MultiScaleQuantizer(nn.Module):
    """VAR's residual quantizer over `patch_nums` scales, with one codebook shared by all scales.

    Parameters: `embedding` (V, Cvae) and `phi` (K convs; the official `quant_resi.qresi_ls`, see the
    module docstring). The latent f and all f_hat are (B, Cvae, H, H) with H = patch_nums[-1]; every method
    computes in fp32 with autocast disabled.
    """

    def __init__(self, vocab_size: int, z_channels: int, patch_nums: list[int], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.z_channels, self.beta = vocab_size, z_channels, beta
        self.patch_nums = [int(p) for p in patch_nums]
        self.num_scales = len(self.patch_nums)
        n_phi = self.num_scales if share_quant_resi == 0 else share_quant_resi
        self.phi = nn.ModuleList(
            _Phi(z_channels, quant_resi) if quant_resi > 1e-6 else nn.Identity() for _ in range(n_phi)
        )
        self.embedding = nn.Embedding(vocab_size, z_channels)
        # Only matters when training from scratch (a checkpoint overwrites it). VAR released no tokenizer
        # training recipe; small uniform codes are taming-transformers' VQGAN choice.
        nn.init.uniform_(self.embedding.weight, -1.0 / vocab_size, 1.0 / vocab_size)
        self._phi_index = phi_indices(self.num_scales, share_quant_resi)  # computed once: phi_at is per step

    @property
    def latent_size(self) -> int:
        return self.patch_nums[-1]

    def phi_at(self, si: int) -> nn.Module:
        """The phi conv used by scale `si`."""
        return self.phi[self._phi_index[si]]

    # ---------------------------------------------------------------- helpers

    def _codebook_VC(self) -> Tensor:
        return self.embedding.weight.float()

    def _check_f(self, f_BChw: Tensor) -> None:
        H = self.latent_size
        if f_BChw.dim() != 4 or tuple(f_BChw.shape[1:]) != (self.z_channels, H, H):
            raise ValueError(
                f"the quantizer expects latents of shape [B, {self.z_channels}, {H}, {H}] (vqvae.z_channels, "
                f"vqvae.patch_nums[-1]), got {tuple(f_BChw.shape)}; images must be "
                f"patch_nums[-1] * 2**(len(ch_mult)-1) px"
            )

    def _check_idx(self, idx_list: list[Tensor], min_scales: int) -> int:
        if not min_scales <= len(idx_list) <= self.num_scales:
            raise ValueError(f"expected {min_scales} to {self.num_scales} index tensors (one per scale), "
                             f"got {len(idx_list)}")
        B = idx_list[0].shape[0]
        for si, idx_Bl in enumerate(idx_list):
            pn = self.patch_nums[si]
            if tuple(idx_Bl.shape) != (B, pn * pn):
                raise ValueError(f"scale {si} indices must have shape [{B}, {pn * pn}] (patch num {pn}), "
                                 f"got {tuple(idx_Bl.shape)}")
        return B

    @torch.no_grad()
    def _nearest_Bl(self, z_BCpp: Tensor) -> Tensor:
        """Index of the nearest code (squared L2) for each cell, row-major: (B, p*p). Never differentiable."""
        B, C, ph, pw = z_BCpp.shape
        z_NC = z_BCpp.permute(0, 2, 3, 1).reshape(-1, C)
        E_VC = self._codebook_VC().detach()
        # |z|^2 + |e|^2 - 2 z.e, with the last step one fused addmm: the original's arithmetic, so that
        # near-ties go the same way. argmin returns the first index on exact ties.
        dist_NV = z_NC.square().sum(dim=1, keepdim=True) + E_VC.square().sum(dim=1)
        dist_NV.addmm_(z_NC, E_VC.T, beta=1, alpha=-2)
        return dist_NV.argmin(dim=1).view(B, ph * pw)

    def _codes_BCpp(self, idx_Bl: Tensor, pn: int) -> Tensor:
        """Code vectors laid out as a (B, C, pn, pn) map (a channels-last view, as the original's)."""
        B = idx_Bl.shape[0]
        return F.embedding(idx_Bl, self._codebook_VC()).transpose(1, 2).view(B, self.z_channels, pn, pn)

    def _up(self, h_BCpp: Tensor, si: int) -> Tensor:
        """Bicubic to the latent size, except at the last scale, which already is."""
        if si == self.num_scales - 1:
            return h_BCpp
        H = self.latent_size
        return F.interpolate(h_BCpp, size=(H, H), mode="bicubic")

    @staticmethod
    def _area(x_BChw: Tensor, pn: int) -> Tensor:
        return F.interpolate(x_BChw, size=(pn, pn), mode="area")

    def _fp32(self, t: Tensor) -> torch.autocast:
        return torch.autocast(device_type=t.device.type, enabled=False)

    # ---------------------------------------------------------------- inference / VAR-side API

    @torch.no_grad()
    def f_to_idx_and_fhats(self, f_BChw: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Quantize a latent: the indices of each scale, and the cumulative f_hat after each scale."""
        self._check_f(f_BChw)
        with self._fp32(f_BChw):
            f_rest = f_BChw.detach().float().clone(memory_format=torch.contiguous_format)
            f_hat = torch.zeros_like(f_rest)
            idx_list, fhat_list = [], []
            for si, pn in enumerate(self.patch_nums):
                z = f_rest if si == self.num_scales - 1 else self._area(f_rest, pn)
                idx_Bl = self._nearest_Bl(z)
                h_BChw = self.phi_at(si)(self._up(self._codes_BCpp(idx_Bl, pn), si).contiguous())
                f_hat.add_(h_BChw)
                f_rest.sub_(h_BChw)
                idx_list.append(idx_Bl)
                fhat_list.append(f_hat.clone())
        return idx_list, fhat_list

    def f_to_idx(self, f_BChw: Tensor) -> list[Tensor]:
        """Quantize a latent to one LongTensor (B, pn*pn) per scale, small to large."""
        return self.f_to_idx_and_fhats(f_BChw)[0]

    def idx_to_fhat(self, idx_list: list[Tensor]) -> Tensor:
        """The latent described by the codes of the first len(idx_list) scales: sum of phi(upsampled codes)."""
        B = self._check_idx(idx_list, 1)
        H = self.latent_size
        with self._fp32(idx_list[0]):
            f_hat = torch.zeros(B, self.z_channels, H, H, dtype=torch.float32, device=idx_list[0].device)
            for si, idx_Bl in enumerate(idx_list):
                f_hat = f_hat + self.phi_at(si)(self._up(self._codes_BCpp(idx_Bl, self.patch_nums[si]), si))
        return f_hat

    def idx_to_var_input(self, idx_list: list[Tensor]) -> Tensor:
        """Teacher-forcing input of VAR: (B, L - pn0^2, Cvae) with L = sum(pn^2).

        Position block si+1 holds the cumulative f_hat of scales 0..si, area-downsampled to
        patch_nums[si+1], row-major: what the model has "seen" when it predicts scale si+1. The codes of the
        last scale are not needed (a list of num_scales - 1 tensors is accepted).
        """
        B = self._check_idx(idx_list, self.num_scales - 1)
        H, C = self.latent_size, self.z_channels
        with self._fp32(idx_list[0]):
            f_hat = torch.zeros(B, C, H, H, dtype=torch.float32, device=idx_list[0].device)
            pieces = []
            for si in range(self.num_scales - 1):
                f_hat = f_hat + self.phi_at(si)(self._up(self._codes_BCpp(idx_list[si], self.patch_nums[si]), si))
                nxt_BCpp = self._area(f_hat, self.patch_nums[si + 1])
                pieces.append(nxt_BCpp.view(B, C, -1).transpose(1, 2))
            if not pieces:
                return f_hat.new_zeros(B, 0, C)
            return torch.cat(pieces, dim=1)

    def next_input(self, si: int, f_hat_BChw: Tensor | None, h_BChw: Tensor) -> tuple[Tensor, Tensor]:
        """One step of VAR sampling: add scale si's codes h (B, Cvae, pn, pn) to f_hat.

        Returns the new f_hat (the input is not modified; None stands for zeros) and the next step's input:
        f_hat area-downsampled to patch_nums[si+1], or f_hat itself after the last scale.
        """
        with self._fp32(h_BChw):
            h_BChw = self.phi_at(si)(self._up(h_BChw.float(), si))
            if f_hat_BChw is None:
                f_hat_BChw = torch.zeros_like(h_BChw, memory_format=torch.contiguous_format)
            # Contiguous like the original's in-place sum into zeros: the area resize of a channels-last
            # tensor adds in another order (1 ulp apart).
            f_hat_BChw = (f_hat_BChw.float() + h_BChw).contiguous()
            if si == self.num_scales - 1:
                return f_hat_BChw, f_hat_BChw
            return f_hat_BChw, self._area(f_hat_BChw, self.patch_nums[si + 1])

    def idx_to_codes(self, idx_Bl: Tensor, si: int) -> Tensor:
        """The codes of scale si as a (B, Cvae, pn, pn) map: what `next_input` takes as h."""
        return self._codes_BCpp(idx_Bl, self.patch_nums[si])

    # ---------------------------------------------------------------- training

    def forward(self, f_BChw: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training quantization: (f_hat with a straight-through gradient to f, vq_loss, indices).

        Per scale the nearest code is searched without gradient, and h = phi(upsample(code)) joins
        f_hat = f_hat + h with its graph, so the codebook term mse(f_hat, f.detach()) trains the embedding
        and the phi convs; the commitment term beta * mse(f_hat.detach(), f) pulls the encoder towards its
        codes. Both are averaged over the scales. The output equals f_hat in value and passes the
        decoder's gradient to f unchanged.
        """
        self._check_f(f_BChw)
        with self._fp32(f_BChw):
            f = f_BChw.float()
            f_nograd = f.detach()
            f_rest = f_nograd.clone()
            f_hat = torch.zeros_like(f_rest)
            vq_loss: Tensor | float = 0.0
            idx_list = []
            for si, pn in enumerate(self.patch_nums):
                z = f_rest if si == self.num_scales - 1 else self._area(f_rest, pn)
                idx_Bl = self._nearest_Bl(z)
                h_BChw = self.phi_at(si)(self._up(self._codes_BCpp(idx_Bl, pn), si).contiguous())
                f_hat = f_hat + h_BChw
                # f_rest only feeds the argmin, which no gradient crosses: keep it out of the graph.
                f_rest.sub_(h_BChw.detach())
                vq_loss = vq_loss + (F.mse_loss(f_hat.detach(), f) * self.beta + F.mse_loss(f_hat, f_nograd))
                idx_list.append(idx_Bl)
            vq_loss = vq_loss * (1.0 / self.num_scales)
            f_hat_st = (f_hat.detach() - f_nograd) + f
        return f_hat_st, vq_loss, idx_list


# ---------------------------------------------------------------------------------------------------
# the whole tokenizer


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder. Images in [-1, 1].

    `resolution`, when given, is checked against the config (patch_nums[-1] * 2**(len(ch_mult)-1)).
    """

    def __init__(self, cfg: VQVAEConfig, resolution: int | None = None):
        super().__init__()
        validate(cfg, resolution)
        # Plain lists: an OmegaConf config may hand ListConfig objects.
        ch_mult, patch_nums = [int(m) for m in cfg.ch_mult], [int(p) for p in cfg.patch_nums]
        self.in_channels, self.z_channels, self.vocab_size = cfg.in_channels, cfg.z_channels, cfg.vocab_size
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.resolution = patch_nums[-1] * self.downsample_factor
        coder = dict(ch=cfg.ch, ch_mult=ch_mult, num_res_blocks=cfg.num_res_blocks, in_channels=cfg.in_channels,
                     z_channels=cfg.z_channels, dropout=cfg.dropout, attn=cfg.attn, mid_attn=cfg.mid_attn)
        # Registration order = the official state-dict order.
        self.encoder = Encoder(**coder)
        self.decoder = Decoder(**coder)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, patch_nums, beta=cfg.beta,
                                            quant_resi=cfg.quant_resi, share_quant_resi=cfg.share_quant_resi)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, padding=1)

    @property
    def patch_nums(self) -> list[int]:
        return self.quantize.patch_nums

    def channels_last(self) -> VQVAE:
        """Keep the encoder's and decoder's convolution weights in channels-last memory, for a frozen tokenizer:
        convolutions then run in the layout CPUs (oneDNN) and tensor cores prefer, and their outputs stay in it
        (about 25% faster encoding on a CPU). Values change by float rounding only. The quantizer keeps its
        layout, and with it its arithmetic (it takes its input contiguous)."""
        for part in (self.encoder, self.quant_conv, self.post_quant_conv, self.decoder):
            part.to(memory_format=torch.channels_last)
        return self

    @property
    def blocks(self) -> list[nn.Module]:
        """The levels, in execution order, for per-block activation checkpointing / compile / FSDP.

        A plain list, not a ModuleList: the levels are already registered under encoder/decoder, and a
        second registration would duplicate their state-dict keys.
        """
        return [*self.encoder.down, self.encoder.mid, self.decoder.mid, *reversed(self.decoder.up)]

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output conv weight, for VQGAN's adaptive adversarial weight."""
        return self.decoder.conv_out.weight

    def _check_img(self, img_BCHW: Tensor) -> None:
        r, c = self.resolution, self.in_channels
        if img_BCHW.dim() != 4 or tuple(img_BCHW.shape[1:]) != (c, r, r):
            raise ValueError(
                f"VQVAE: images must have shape [B, {c}, {r}, {r}] (vqvae.in_channels, and "
                f"vqvae.patch_nums[-1] * 2**(len(vqvae.ch_mult)-1) px), got {tuple(img_BCHW.shape)}"
            )

    def encode(self, img_BCHW: Tensor) -> Tensor:
        """Images in [-1, 1] -> latent f (B, Cvae, h, w), before quantization."""
        self._check_img(img_BCHW)
        return self.quant_conv(self.encoder(img_BCHW))

    def decode(self, f_hat_BChw: Tensor) -> Tensor:
        """Latent -> image, not clamped (for training losses)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw))

    def fhat_to_img(self, f_hat_BChw: Tensor) -> Tensor:
        """Latent -> image clamped to [-1, 1]."""
        return self.decode(f_hat_BChw).clamp(-1, 1)

    def img_to_idx(self, img_BCHW: Tensor) -> list[Tensor]:
        """Images -> one LongTensor (B, pn*pn) of code indices per scale."""
        return self.quantize.f_to_idx(self.encode(img_BCHW))

    @torch.no_grad()
    def img_to_var_targets(self, img_BCHW: Tensor, encoder_bf16: bool = False) -> tuple[Tensor, Tensor]:
        """VAR's teacher forcing for a batch of images: its targets (B, L), the indices of every scale in one
        row, and the transformer's inputs (B, L - pn0^2, Cvae) (quantize.idx_to_var_input).

        The encoder runs in fp32 with any autocast switched off, or with encoder_bf16 under bf16 autocast
        (several times faster on tensor cores; a few indices, whose nearest codes are almost tied, may then
        differ). The quantizer computes in fp32 either way.
        """
        with torch.autocast(img_BCHW.device.type, dtype=torch.bfloat16, enabled=encoder_bf16):
            f_BChw = self.encode(img_BCHW)
        idx_list = self.quantize.f_to_idx(f_BChw.float())
        return torch.cat(idx_list, dim=1), self.quantize.idx_to_var_input(idx_list)

    def idx_to_img(self, idx_list: list[Tensor]) -> Tensor:
        """Code indices of all scales -> images in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def forward(self, img_BCHW: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Training: (reconstruction, not clamped; vq_loss; indices per scale)."""
        f_hat_st, vq_loss, idx_list = self.quantize(self.encode(img_BCHW))
        return self.decode(f_hat_st), vq_loss, idx_list

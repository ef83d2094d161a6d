"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al. 2024), the transformer.

    logits_BLV = VAR(cfg)(label_B, x_BLCv)                          # teacher forcing, one pass
    f_hat_BChw = VAR(cfg).generate(tokenizer, label_B, cfg=1.5, ...)  # scale by scale, with a KV cache

An image is a sequence of token maps of growing size (patch_nums, 1x1 up to 16x16, L = sum pn^2 = 680
tokens). The transformer predicts all tokens of a scale at once from the class and every earlier scale:
attention is block-causal over scales (full inside a scale). Token p's input is the tokenizer's running
reconstruction downsampled to p's scale (`x_BLCv`, built by the tokenizer); position 0 is the start token,
made from the class embedding. Output position p predicts token p.

Written from the specification of the official FoundationVision/VAR code (notes/var_spec.md), to load its
checkpoints: parameter names and shapes are the official ones, and the math follows it op for op in fp32.
The official state dict also holds three recomputable buffers (lvl_1L, attn_bias_for_masking and every
blocks.{i}.attn.zero_k_bias); this module has no buffers, so an importer drops those keys (after checking that
zero_k_bias is all zeros). Deliberate differences from the original:

  * label dropout (classifier-free guidance training) only in train mode; the original drops labels in
    eval mode too, so its validation losses mix in 10 % unconditional samples;
  * the residual stream keeps the dtype it has: the original casts it to the autocast dtype before the
    blocks in teacher forcing (but not when sampling); here both paths do the same thing;
  * generation takes the tokenizer as an argument and returns the latent f_hat; randomness comes from an
    explicit `generator` (or the global RNG), not from a generator the model owns.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.models.attention import IMPLS, AttentionMask, attention

__all__ = ["KVCache", "VAR", "VARConfig", "VARTokenizer", "sample_top_k_top_p", "top_k_top_p_filter"]

# The cap on the learned per-head attention temperature, as the original computes it: log(100) in float32.
_LOG_100 = float(torch.tensor(100.0).log())


@dataclass
class VARConfig:
    depth: int = 16  # the one size knob: width = 64 * depth, heads = depth (head dim 64)
    num_classes: int = 1000  # class index num_classes is the null class of classifier-free guidance
    vocab_size: int = 4096  # tokenizer codebook size
    z_channels: int = 32  # tokenizer latent channels (Cv)
    patch_nums: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    mlp_ratio: float = 4.0
    drop_path_rate: float = -1.0  # -1: the depth rule 0.1 * depth / 24; linear from 0 (block 0) to this
    norm_eps: float = 1e-6
    shared_aln: bool = False  # one AdaLN projection shared by all blocks (the official 512px d36 model)
    cond_drop_rate: float = 0.1  # label dropout for classifier-free guidance (train mode only)
    attn_impl: str = "auto"  # auto | sdpa | flex (see models/attention.py)
    init_adaln: float = 0.5  # init_weights: scale/shift rows of every AdaLN projection
    init_adaln_gamma: float = 1e-5  # init_weights: gamma (branch gate) rows, so blocks start near identity
    init_head: float = 0.02  # init_weights: output head
    init_std: float = -1.0  # init_weights: std of Linear/Embedding weights; -1 = sqrt(1 / (3 * width))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key. VAR() calls it too (configs can change after init)."""

        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"VARConfig.{key} must be {want}, got {getattr(self, key)!r}.")

        for key in ("depth", "num_classes", "vocab_size", "z_channels"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "an integer >= 1")
        pn = self.patch_nums
        if (
            isinstance(pn, (str, bytes))
            or not hasattr(pn, "__len__")
            or len(pn) == 0
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in pn)
            or any(a >= b for a, b in itertools.pairwise(pn))
        ):
            raise bad("patch_nums", "a non-empty list of increasing integers >= 1 (token-map sizes, e.g. [1, 2, 4])")
        if not self.mlp_ratio > 0:
            raise bad("mlp_ratio", "> 0")
        if not (self.drop_path_rate == -1.0 or 0.0 <= self.drop_path_rate < 1.0):
            raise bad("drop_path_rate", "in [0, 1), or -1 for the depth rule 0.1 * depth / 24")
        if not self.norm_eps > 0:
            raise bad("norm_eps", "> 0")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise bad("cond_drop_rate", "in [0, 1]")
        if self.attn_impl not in IMPLS:
            raise bad("attn_impl", f"one of {', '.join(IMPLS)}")
        for key in ("init_adaln", "init_adaln_gamma", "init_head"):
            if not math.isfinite(getattr(self, key)):
                raise bad(key, "a finite number")
        if not (self.init_std < 0 or 0 < self.init_std < math.inf):
            raise bad("init_std", "> 0, or negative for the rule sqrt(1 / (3 * width))")

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def heads(self) -> int:
        return self.depth

    @property
    def drop_path_max(self) -> float:
        return 0.1 * self.depth / 24 if self.drop_path_rate == -1.0 else self.drop_path_rate


class VARTokenizer(Protocol):
    """What generate() needs of the multi-scale VQ tokenizer (models/vqvae.py): its quantizer, which has
    `embedding` (nn.Embedding(vocab_size, z_channels)) and `next_input(si, f_hat_BChw, h_BChw) -> (f_hat,
    next_BChw)` -- add scale si's code map to f_hat, return it and the next scale's input."""

    quantize: nn.Module


# ---------------------------------------------------------------------------------------------------
# sampling helpers


def top_k_top_p_filter(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """A copy of the logits with -inf outside the top-k and then outside the top-p nucleus.

    top_k > 0 keeps every logit >= the k-th largest (ties with it survive). top_p > 0 then drops the
    least likely tokens whose summed probability is <= 1 - top_p, i.e. keeps the smallest set with mass
    >= top_p, and always the most likely token.
    """
    V = logits_BlV.shape[-1]
    if top_k > 0:
        kth_Bl1 = logits_BlV.topk(min(top_k, V), dim=-1, largest=True, sorted=False).values.amin(-1, keepdim=True)
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth_Bl1, -math.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)  # ascending: the tail first
        drop_sorted = sorted_BlV.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1] = False  # the most likely token always stays
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order_BlV, drop_sorted)
        logits_BlV = logits_BlV.masked_fill(drop, -math.inf)
    return logits_BlV


def sample_top_k_top_p(
    logits_BlV: Tensor,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> Tensor:
    """Token indices (B, l, |num_samples|) drawn from softmax(top_k_top_p_filter(logits)).

    One torch.multinomial call for all B*l rows (so a seeded generator gives the same draws as the original).
    num_samples < 0 draws |num_samples| without replacement. top_k=1 is greedy, but still consumes the RNG.
    """
    B, length, V = logits_BlV.shape
    probs_NV = top_k_top_p_filter(logits_BlV, top_k, top_p).softmax(dim=-1).view(-1, V)
    idx_Nn = torch.multinomial(probs_NV, abs(num_samples), replacement=num_samples >= 0, generator=generator)
    return idx_Nn.view(B, length, abs(num_samples))


def _gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator | None) -> Tensor:
    """Soft Gumbel-softmax, as F.gumbel_softmax(hard=False) but with an optional generator."""
    gumbels = -torch.empty_like(logits).exponential_(generator=generator).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)


# ---------------------------------------------------------------------------------------------------
# layers


def drop_path_scales(batch: int, p: float, training: bool, device: torch.device) -> Tensor | None:
    """Stochastic depth for one block's two branches: per sample 0 (dropped, probability p) or 1/(1-p), as a
    (2, B, 1, 1) tensor; None when nothing is dropped. Drawn outside the block and handed to it, so that the
    block's code is the same for every block: torch.compile per block then builds one graph, not one per rate."""
    if p == 0.0 or not training:
        return None
    keep = 1.0 - p
    return torch.empty(2, batch, 1, 1, device=device).bernoulli_(keep).div_(keep)


@dataclass
class KVCache:
    """One block's keys (normalised) and values of every token seen so far in generation, (B, H, l, c) each.

    Handed to the block as an argument rather than kept in it: a block compiled with dynamic shapes then sees
    the growing length as an input of varying size (torch.compile fixes the sizes of module attributes)."""

    k_BHlc: Tensor | None = None
    v_BHlc: Tensor | None = None


class SelfAttention(nn.Module):
    """Multi-head self-attention on cosine similarities, with a learned per-head temperature.

    q and k are L2-normalised, q is multiplied by exp(min(scale_mul, log 100)), and the softmax scale is
    1: logits are bounded by the temperature, which keeps attention stable in deep models. The qkv
    projection has no bias of its own; q and v have learned biases and k none (a k bias would shift every
    logit of a query by the same amount and cancel in the softmax).
    """

    def __init__(self, width: int, heads: int, attn_impl: str):
        super().__init__()
        self.heads, self.head_dim, self.attn_impl = heads, width // heads, attn_impl
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: Tensor, mask: AttentionMask | None, cache: KVCache | None = None) -> Tensor:
        """cache (generation): the keys and values of the tokens before these; these are appended to it."""
        B, L, C = x_BLC.shape
        bias_3C = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv_BL3Hc = F.linear(x_BLC, self.mat_qkv.weight, bias_3C).view(B, L, 3, self.heads, self.head_dim)
        q_BHLc, k_BHLc, v_BHLc = qkv_BL3Hc.permute(2, 0, 3, 1, 4).unbind(0)
        temperature_1H11 = self.scale_mul_1H11.clamp_max(_LOG_100).exp()
        q_BHLc = F.normalize(q_BHLc, dim=-1) * temperature_1H11
        k_BHLc = F.normalize(k_BHLc, dim=-1)
        if cache is not None:
            if cache.k_BHlc is not None:
                k_BHLc = torch.cat((cache.k_BHlc, k_BHLc), dim=2)
                v_BHLc = torch.cat((cache.v_BHlc, v_BHLc), dim=2)
            cache.k_BHlc, cache.v_BHlc = k_BHLc, v_BHLc
        o_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask, scale=1.0, impl=self.attn_impl)
        return self.proj(o_BHLc.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x_BLC), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm transformer block whose norms and branch gates are set by the class (adaptive LayerNorm).

    From the condition come six C-vectors, in this order: gamma1, gamma2 (branch gates), scale1, scale2,
    shift1, shift2. Each branch sees LN(x) * (1 + scale) + shift and adds gamma * branch to the residual.
    The condition is projected by the block's own `ada_lin`, or (shared_aln) by the model's shared
    projection plus this block's learned offset `ada_gss`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float, norm_eps: float,
                 shared_aln: bool, attn_impl: str):
        super().__init__()
        self.width, self.drop_path_rate, self.shared_aln = width, drop_path, shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        self.attn = SelfAttention(width, heads, attn_impl)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)  # shared by both branches
        if not shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond_BD: Tensor) -> Tensor:
        """The six AdaLN vectors (B, 1, 6, C) of a condition (see forward)."""
        if self.shared_aln:
            return self.ada_gss + cond_BD
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.width)

    def forward(self, x_BLC: Tensor, cond_BD: Tensor | None, mask: AttentionMask | None,
                drop_2B11: Tensor | None = None, mod_B16C: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        """cond_BD: the class embedding (B, D), or with shared_aln the shared projection (B, 1, 6, C);
        drop_2B11: the stochastic-depth scales of the two branches (drop_path_scales), None for none;
        mod_B16C: modulation(cond_BD) computed beforehand, in place of cond_BD (generation: the class is the
        same at every scale, so its projection is made once, not once per scale); cache: generation's KV cache."""
        if mod_B16C is None:
            mod_B16C = self.modulation(cond_BD)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)  # each (B, 1, C)
        y_BLC = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        branch_BLC = self.attn(y_BLC, mask, cache).mul_(gamma1)
        x_BLC = x_BLC + (branch_BLC if drop_2B11 is None else branch_BLC * drop_2B11[0].to(branch_BLC.dtype))
        y_BLC = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        branch_BLC = self.ffn(y_BLC).mul_(gamma2)
        return x_BLC + (branch_BLC if drop_2B11 is None else branch_BLC * drop_2B11[1].to(branch_BLC.dtype))


class _SharedAdaLin(nn.Linear):
    """The shared AdaLN projection: D -> 6C, viewed as the six per-block vectors (B, 1, 6, C)."""

    def forward(self, cond_BD: Tensor) -> Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


class AdaLNBeforeHead(nn.Module):
    """The final norm: LN(x) * (1 + scale) + shift, with scale and shift (in that order) from the class."""

    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLC: Tensor, cond_BD: Tensor) -> Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale_B1C.add(1)).add_(shift_B1C)


# ---------------------------------------------------------------------------------------------------
# the model


class VAR(nn.Module):
    """Class-conditional next-scale prediction transformer over a multi-scale VQ tokenizer's codes."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, V, Cv = cfg.width, cfg.vocab_size, cfg.z_channels
        self.depth, self.width, self.num_classes, self.vocab_size = cfg.depth, C, cfg.num_classes, V
        self.patch_nums = [int(p) for p in cfg.patch_nums]
        self.cond_drop_rate = cfg.cond_drop_rate
        self.first_l = self.patch_nums[0] ** 2  # tokens made from the class (the start token when pn[0] = 1)
        self.begin_ends: list[tuple[int, int]] = []  # token range of each scale
        end = 0
        for pn in self.patch_nums:
            self.begin_ends.append((end, end + pn * pn))
            end += pn * pn
        self.L = end
        # Scale index of every token (the official lvl_1L). A plain CPU tensor, not a buffer: the mask
        # keeps its device copies, and checkpoints need not carry it.
        scale_ids_L = torch.cat(
            [torch.full((pn * pn,), si, dtype=torch.long, device="cpu") for si, pn in enumerate(self.patch_nums)]
        )
        self.attn_mask = AttentionMask.block_causal(scale_ids_L)

        std = (1 / (3 * C)) ** 0.5
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, C))
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_1LC, std=std)
        self.word_embed = nn.Linear(Cv, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), _SharedAdaLin(C, 6 * C)) if cfg.shared_aln else nn.Identity()
        )
        rates = torch.linspace(0, cfg.drop_path_max, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(C, cfg.heads, cfg.mlp_ratio, rates[i], cfg.norm_eps, cfg.shared_aln, cfg.attn_impl)
            for i in range(cfg.depth)
        )
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, V)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official initialisation for training from scratch (a loaded checkpoint overwrites all of it).

        Truncated-normal Linear and Embedding weights with zero biases; then the output head is shrunk
        (init_head), AdaLN scale/shift rows are halved (init_adaln) and the gamma rows nearly zeroed
        (init_adaln_gamma), so every block starts close to the identity; the residual branches' output
        layers are divided by sqrt(2 * depth) (GPT-2's rule: the residual stream's variance grows with depth).
        """
        cfg, C = self.cfg, self.width
        std = cfg.init_std if cfg.init_std > 0 else (1 / (3 * C)) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        self.head.weight.mul_(cfg.init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(cfg.init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if cfg.shared_aln:
                block.ada_gss[:, :, 2:].mul_(cfg.init_adaln)
                block.ada_gss[:, :, :2].mul_(cfg.init_adaln_gamma)
            else:
                lin = block.ada_lin[-1]
                lin.weight[2 * C:].mul_(cfg.init_adaln)  # scale1, scale2, shift1, shift2
                lin.weight[: 2 * C].mul_(cfg.init_adaln_gamma)  # gamma1, gamma2
                lin.bias.zero_()

    # ---- pieces shared by teacher forcing and generation

    def _level_pos_1LC(self) -> Tensor:
        """lvl_embed(scale of each token) + pos_1LC, summed before they are added to the tokens (as the original)."""
        rows = [self.lvl_embed.weight[si].expand(pn * pn, -1) for si, pn in enumerate(self.patch_nums)]
        return torch.cat(rows).unsqueeze(0) + self.pos_1LC

    def _block_cond(self, cond_BD: Tensor) -> Tensor:
        return self.shared_ada_lin(cond_BD)  # the class embedding itself unless shared_aln

    def _logits(self, x_BLC: Tensor, cond_BD: Tensor) -> Tensor:
        """Final AdaLN (on the raw class embedding) and head, in fp32 out."""
        return self.head(self.head_nm(x_BLC.float(), cond_BD).float()).float()

    def _check_labels(self, label_B: Tensor) -> None:
        if not isinstance(label_B, Tensor) or label_B.dim() != 1:
            got = tuple(label_B.shape) if isinstance(label_B, Tensor) else type(label_B).__name__
            raise ValueError(f"VAR: label_B must be a 1-d tensor of class indices, got {got}.")
        if label_B.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"VAR: label_B must hold integer class indices, got dtype {label_B.dtype}.")

    # ---- teacher forcing

    def forward(self, label_B: Tensor, x_BLCv: Tensor | None, prog_si: int = -1) -> Tensor:
        """Logits (B, l, V) for every token, all scales in one pass under the block-causal mask.

        x_BLCv: (B, L - first_l, Cv), the tokenizer's teacher-forcing input (the inputs of tokens first_l..L-1).
        prog_si >= 0 (progressive training) keeps only scales 0..prog_si: l = begin_ends[prog_si][1], and
        x_BLCv may then hold just the first l - first_l inputs (None for prog_si = 0).
        Labels are replaced by the null class with probability cond_drop_rate in train mode only.
        """
        self._check_labels(label_B)
        if not -1 <= prog_si < len(self.patch_nums):
            raise ValueError(f"VAR: prog_si must be -1 or a scale index < {len(self.patch_nums)}, got {prog_si}.")
        ed = self.begin_ends[prog_si][1] if prog_si >= 0 else self.L
        B = label_B.shape[0]
        n_in = ed - self.first_l
        if n_in > 0 and (
            x_BLCv is None or x_BLCv.dim() != 3 or x_BLCv.shape[0] != B or x_BLCv.shape[1] < n_in
            or x_BLCv.shape[2] != self.cfg.z_channels
        ):
            raise ValueError(
                f"VAR: x_BLCv must have shape [{B}, {n_in} (or more), {self.cfg.z_channels}], "
                f"got {None if x_BLCv is None else tuple(x_BLCv.shape)}."
            )

        # The stem runs outside autocast, in the parameters' dtype (fp32 unless FSDP gathers them in bf16).
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            if self.training and self.cond_drop_rate > 0:
                drop_B = torch.rand(B, device=label_B.device) < self.cond_drop_rate
                label_B = torch.where(drop_B, self.num_classes, label_B)
            cond_BD = self.class_emb(label_B)
            x_BLC = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start
            if n_in > 0:
                tokens_BlC = self.word_embed(x_BLCv[:, :n_in].to(self.word_embed.weight.dtype))
                x_BLC = torch.cat((x_BLC, tokens_BlC), dim=1)
            x_BLC = x_BLC + self._level_pos_1LC()[:, :ed]

        block_cond = self._block_cond(cond_BD)
        for block in self.blocks:
            drop_2B11 = drop_path_scales(B, block.drop_path_rate, self.training, x_BLC.device)
            x_BLC = block(x_BLC, block_cond, self.attn_mask, drop_2B11)
        logits_BLV = self._logits(x_BLC, cond_BD)
        if n_in == 0 and self.training:
            # word_embed took no part: add a zero that depends on it, or DDP waits for its gradient forever.
            logits_BLV = logits_BLV + 0 * (self.word_embed.weight[0, 0] + self.word_embed.bias[0])
        return logits_BLV

    # ---- generation

    @torch.no_grad()
    def generate(
        self,
        tokenizer: VARTokenizer,
        label_B: Tensor,
        cfg: float = 1.5,
        top_k: int = 0,
        top_p: float = 0.0,
        more_smooth: bool = False,
        generator: torch.Generator | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Sample scale by scale with classifier-free guidance; returns the tokenizer latent f_hat (B, Cv, h, w).

        Decode it with tokenizer.fhat_to_img. Call in eval mode (drop path is active in train mode).
        The batch is doubled: rows [0, B) carry the labels, rows [B, 2B) the null class. Guidance grows
        linearly over scales, t = cfg * si / (SN - 1), logits = (1 + t) * cond - t * uncond; then top-k, top-p
        and one multinomial draw per scale from `generator` (the global RNG when None). more_smooth replaces
        the hard code lookup by a Gumbel-softmax mix of codes (after the draw, which still consumes the RNG).
        Attention uses a KV cache and no mask: each scale sees itself and every earlier scale, which is the
        block-causal mask. return_logits also returns each scale's conditional logits (B, pn^2, V), before
        guidance and filtering (tests compare them with teacher forcing).
        """
        self._check_labels(label_B)
        if label_B.numel() and not 0 <= int(label_B.min()) <= int(label_B.max()) <= self.num_classes:
            raise ValueError(
                f"VAR.generate: labels must be in [0, {self.num_classes}] ({self.num_classes} = the null class)."
            )
        B, SN = label_B.shape[0], len(self.patch_nums)
        codebook_VCv = tokenizer.quantize.embedding.weight
        Cv = codebook_VCv.shape[1]
        side = self.patch_nums[-1]
        f_hat_BChw = torch.zeros(B, Cv, side, side, dtype=codebook_VCv.dtype, device=codebook_VCv.device)

        cond_2BD = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.num_classes))))
        block_cond = self._block_cond(cond_2BD)
        # Copied into tensors of their own: a block compiled with dynamic shapes then takes their batch size as it
        # comes (tested: as views of the projection's output, or preserving clones, they fix it).
        mods_2B16C = [block.modulation(block_cond).clone(memory_format=torch.contiguous_format)
                      for block in self.blocks]
        level_pos_1LC = self._level_pos_1LC()
        x_2BlC = cond_2BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start
        x_2BlC = x_2BlC + level_pos_1LC[:, : self.first_l]
        cond_logits: list[Tensor] = []
        caches = [KVCache() for _ in self.blocks]
        for si, pn in enumerate(self.patch_nums):
            ratio = si / (SN - 1) if SN > 1 else 0.0
            for block, mod_2B16C, cache in zip(self.blocks, mods_2B16C, caches):
                x_2BlC = block(x_2BlC, None, None, mod_B16C=mod_2B16C, cache=cache)
            logits_2BlV = self._logits(x_2BlC, cond_2BD)
            if return_logits:
                cond_logits.append(logits_2BlV[:B].clone())
            t = cfg * ratio
            logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
            logits_BlV = top_k_top_p_filter(logits_BlV, top_k, top_p)
            idx_Bl = sample_top_k_top_p(logits_BlV, generator=generator)[:, :, 0]
            if more_smooth:  # a soft mix of codes, from the already filtered logits
                tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
                soft_BlV = _gumbel_softmax(logits_BlV * (1 + ratio), tau, generator)
                h_BlCv = soft_BlV.to(codebook_VCv.dtype) @ codebook_VCv
            else:
                h_BlCv = codebook_VCv[idx_Bl]
            h_BChw = h_BlCv.transpose(1, 2).reshape(B, Cv, pn, pn)
            f_hat_BChw, next_BChw = tokenizer.quantize.next_input(si, f_hat_BChw, h_BChw)
            if si != SN - 1:
                bg, ed = self.begin_ends[si + 1]
                next_BlCv = next_BChw.reshape(B, Cv, -1).transpose(1, 2)
                x_BlC = self.word_embed(next_BlCv.to(self.word_embed.weight.dtype)) + level_pos_1LC[:, bg:ed]
                x_2BlC = x_BlC.repeat(2, 1, 1)  # the same input for the conditional and the null rows
        return (f_hat_BChw, cond_logits) if return_logits else f_hat_BChw

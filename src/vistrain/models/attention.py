"""One attention function for every model, with masks written once as functions of token indices.

    o_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask, scale=None, impl="auto")

A mask is a `mask_mod(b, h, q_idx, kv_idx) -> bool` (True = q may attend to kv), the form that
`torch.nn.attention.flex_attention` takes. The same function serves both back ends:

  * "flex": `create_block_mask` evaluates it per 128x128 tile and flex_attention skips the tiles that are
    fully masked (VAR's later scales never look forward; packed documents never look at each other).
  * "sdpa": evaluated on broadcast index grids it gives the dense boolean mask that
    `F.scaled_dot_product_attention` takes. This is the path for CPUs and for training with dropout.

So the two paths cannot disagree about what is masked. Two masks are provided:

  * `AttentionMask.block_causal(group_ids_L)`: q sees k iff group[k] <= group[q]. VAR's scales: full
    attention inside a scale and to every earlier scale.
  * `AttentionMask.document_causal(doc_ids_BL)`: q sees k iff k <= q and doc[b, k] == doc[b, q]. Several
    samples packed into one row, each causal and blind to the others (a VLM's packed batches).

In both every query sees itself, so no softmax row is ever all -inf (which would give NaN).

"auto" picks flex on CUDA when a mask is given and flex_attention imports, sdpa otherwise: with no mask
there are no tiles to skip and SDPA's flash kernel is the better choice. On CUDA flex_attention runs
through `torch.compile` (eager flex materialises the whole score matrix). On CPU it runs eagerly, slowly and
forward only (torch 2.13 has no CPU backward for it); it is there to check the masks, not to train.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # flex_attention appeared in torch 2.5; the engine only requires 2.4
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

    _FLEX_IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the installed torch
    BlockMask = Any  # type: ignore[misc,assignment]
    create_block_mask = flex_attention = None  # type: ignore[assignment]
    _FLEX_IMPORT_ERROR = f"{type(e).__name__}: {e}"

__all__ = ["IMPLS", "AttentionMask", "attention", "flex_available"]

IMPLS = ("auto", "sdpa", "flex")

# mask_mod(b, h, q_idx, kv_idx) -> bool tensor; the indices are int tensors (scalars under flex's vmap,
# broadcast grids for the dense mask).
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def flex_available() -> bool:
    """Whether torch.nn.attention.flex_attention could be imported."""
    return _FLEX_IMPORT_ERROR is None


class AttentionMask:
    """A self-attention mask over L tokens, defined by a mask_mod over integer ids held by the mask.

    `dense(device)` and `block_mask(device)` are computed on first use and cached per (device, length), so a
    model can keep one AttentionMask and ask it for every batch. `length` (<= L) takes the mask of the first
    `length` tokens, which for these masks is the mask of the truncated sequence (VAR's progressive training).
    """

    def __init__(self, kind: str, ids: Tensor, make_mod: Callable[[Tensor], MaskMod]):
        self.kind = kind
        self.ids = ids  # (L,) or (B, L) integer ids on the CPU; the device copies live in the cache
        self._make_mod = make_mod
        self._cache: dict[tuple[str, torch.device, int], Any] = {}

    # ---- constructors

    @classmethod
    def block_causal(cls, group_ids_L: Tensor) -> AttentionMask:
        """q may attend to k iff group[k] <= group[q] (groups numbered in sequence order, e.g. VAR's scales)."""
        ids = _check_ids("block_causal", "group_ids_L", group_ids_L, dims=1)

        def make_mod(group_L: Tensor) -> MaskMod:
            def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return group_L[kv_idx] <= group_L[q_idx]

            return mask_mod

        return cls("block_causal", ids, make_mod)

    @classmethod
    def document_causal(cls, doc_ids_BL: Tensor) -> AttentionMask:
        """Per batch row: q may attend to k iff k <= q and doc[k] == doc[q] (samples packed in one row)."""
        ids = _check_ids("document_causal", "doc_ids_BL", doc_ids_BL, dims=2)

        def make_mod(doc_BL: Tensor) -> MaskMod:
            def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return (kv_idx <= q_idx) & (doc_BL[b, kv_idx] == doc_BL[b, q_idx])

            return mask_mod

        return cls("document_causal", ids, make_mod)

    # ---- properties

    @property
    def length(self) -> int:
        return self.ids.shape[-1]

    @property
    def batch(self) -> int | None:
        """Rows of a per-sample mask, None when one mask serves the whole batch."""
        return self.ids.shape[0] if self.ids.dim() == 2 else None

    def __repr__(self) -> str:
        return f"AttentionMask.{self.kind}(ids shape {tuple(self.ids.shape)})"

    def __getstate__(self) -> dict:
        # Deep copies (an EMA model) and pickles start with an empty cache: cached BlockMasks hold closures.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    # ---- the mask in the forms the back ends take

    def mask_mod(self, device: torch.device | str, length: int | None = None) -> MaskMod:
        """The mask_mod with its ids on `device` (for flex_attention, or to combine with other masks)."""
        device, length = self._key(device, length)
        key = ("ids", device, length)
        if key not in self._cache:
            self._cache[key] = self.ids[..., :length].to(device)
        return self._make_mod(self._cache[key])

    def dense(self, device: torch.device | str, length: int | None = None) -> Tensor:
        """Boolean mask, True = attend: (1, 1, l, l) for block_causal, (B, 1, l, l) for document_causal."""
        device, length = self._key(device, length)
        key = ("dense", device, length)
        if key not in self._cache:
            rows = self.batch or 1
            b = torch.arange(rows, device=device).view(rows, 1, 1, 1)
            h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
            q_idx = torch.arange(length, device=device).view(1, 1, length, 1)
            kv_idx = torch.arange(length, device=device).view(1, 1, 1, length)
            m = self.mask_mod(device, length)(b, h, q_idx, kv_idx)
            self._cache[key] = m.expand(rows, 1, length, length).contiguous()
        return self._cache[key]

    def block_mask(self, device: torch.device | str, length: int | None = None) -> BlockMask:
        """flex_attention's BlockMask: which 128x128 tiles to compute, and the mask_mod inside them."""
        _require_flex()
        device, length = self._key(device, length)
        key = ("block", device, length)
        if key not in self._cache:
            self._cache[key] = create_block_mask(
                self.mask_mod(device, length), B=self.batch, H=None, Q_LEN=length, KV_LEN=length, device=device
            )
        return self._cache[key]

    def _key(self, device: torch.device | str, length: int | None) -> tuple[torch.device, int]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
            device = torch.device("cuda", torch.cuda.current_device())
        length = self.length if length is None else int(length)
        if not 1 <= length <= self.length:
            raise ValueError(f"{self!r}: length must be in [1, {self.length}], got {length}.")
        return device, length


def _check_ids(who: str, name: str, ids: Tensor, dims: int) -> Tensor:
    if not isinstance(ids, Tensor) or ids.dim() != dims or ids.shape[-1] == 0:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"AttentionMask.{who}: {name} must be a non-empty {dims}-d integer tensor, got {shape}.")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"AttentionMask.{who}: {name} must hold integer ids, got dtype {ids.dtype}.")
    return ids.detach().to("cpu", torch.long)


def _require_flex() -> None:
    if _FLEX_IMPORT_ERROR is not None:
        raise RuntimeError(
            "attention impl 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5), which failed to "
            f"import here ({_FLEX_IMPORT_ERROR}); use impl='sdpa'."
        )


_compiled_flex: Callable[..., Tensor] | None = None


def _eager_flex(*args: Any, **kwargs: Any) -> Tensor:
    # Eager flex on the CPU is a deliberate choice (mask checks, tests), so silence torch's advice to compile.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _flex_fn(device: torch.device) -> Callable[..., Tensor]:
    """flex_attention through torch.compile on accelerators (its fused kernel), eager on the CPU."""
    global _compiled_flex
    if torch.compiler.is_compiling():
        return flex_attention  # already inside a compiled region: dynamo builds the fused kernel
    if device.type == "cpu":
        return _eager_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def _choose_impl(impl: str, q: Tensor, mask: AttentionMask | None, dropout_p: float) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}, got {impl!r}.")
    if impl == "auto":
        use_flex = q.is_cuda and mask is not None and dropout_p == 0.0 and flex_available()
        return "flex" if use_flex else "sdpa"
    return impl


def attention(
    q_BHLc: Tensor,
    k_BHLc: Tensor,
    v_BHLc: Tensor,
    mask: AttentionMask | None = None,
    scale: float | None = None,
    impl: str = "auto",
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q k^T * scale, masked) v for (B, H, L, c) tensors; returns (B, H, Lq, c).

    `mask` None means every query sees every key (then Lq may differ from Lk: a KV cache). With a mask, q and
    k must have the same length l <= mask.length, and the mask of the first l tokens is used. `scale` None is
    1/sqrt(c). `dropout_p` (attention-probability dropout) is only possible with sdpa.
    """
    which = _choose_impl(impl, q_BHLc, mask, dropout_p)
    Lq, Lk = q_BHLc.shape[-2], k_BHLc.shape[-2]
    if mask is not None and Lq != Lk:
        raise ValueError(
            f"attention with {mask!r} needs queries and keys of one length (self-attention), got {Lq} and {Lk}."
        )
    if mask is not None and mask.batch is not None and mask.batch != q_BHLc.shape[0]:
        raise ValueError(f"{mask!r} has {mask.batch} rows but the batch has {q_BHLc.shape[0]}.")

    if which == "sdpa":
        attn_mask = None if mask is None else mask.dense(q_BHLc.device, Lq)
        return F.scaled_dot_product_attention(
            q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
        )

    _require_flex()
    if dropout_p != 0.0:
        raise ValueError(f"attention impl 'flex' has no dropout (dropout_p={dropout_p}); use impl='sdpa'.")
    if q_BHLc.device.type == "cpu" and torch.is_grad_enabled() and any(
        t.requires_grad for t in (q_BHLc, k_BHLc, v_BHLc)
    ):
        raise RuntimeError(
            "attention impl 'flex' runs forward only on the CPU (torch has no CPU backward for flex_attention); "
            "use impl='sdpa' (or 'auto') to train on the CPU, or call it under torch.no_grad()."
        )
    block_mask = None if mask is None else mask.block_mask(q_BHLc.device, Lq)
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHLc.shape[-1])
    return _flex_fn(q_BHLc.device)(q_BHLc, k_BHLc, v_BHLc, block_mask=block_mask, scale=scale)

"""One attention function for every model, with masks written once as functions of token indices.

    o_BHLc = attention(q_BHLc, k_BHLc, v_BHLc, mask, scale=None, impl="auto")

A mask is a `mask_mod(b, h, q_idx, kv_idx) -> bool` (True = q may attend to kv), the form that
`torch.nn.attention.flex_attention` takes. The same function serves both back ends:

  * "flex": `create_block_mask` evaluates it per 128x128 tile and flex_attention skips the tiles that are
    fully masked (VAR's later scales never look forward; packed documents never look at each other).
  * "sdpa": evaluated on broadcast index grids it gives the dense boolean mask that
    `F.scaled_dot_product_attention` takes. This is the path for CPUs and for training with dropout.

So the two paths cannot disagree about what is masked. Three masks are provided:

  * `AttentionMask.block_causal(group_ids_L)`: q sees k iff group[k] <= group[q]. VAR's scales: full
    attention inside a scale and to every earlier scale.
  * `AttentionMask.document_causal(doc_ids_BL)`: q sees k iff k <= q and doc[b, k] == doc[b, q]. Several
    samples packed into one row, each causal and blind to the others (a VLM's packed batches).
  * `AttentionMask.causal(length)`: q sees k iff k <= q (a decoder-only language model). SDPA takes it as
    `is_causal=True`, so no dense mask is built for it.

In all of them every query sees itself, so no softmax row is ever all -inf (which would give NaN).

With a KV cache the queries are the last Lq of Lk tokens: `attention(..., q_offset=Lk - Lq)` then uses rows
q_offset .. Lk-1 of the mask over the first Lk tokens.

"auto" picks flex on CUDA when a mask other than plain causal is given and flex_attention imports, sdpa
otherwise: with no mask there are no tiles to skip, and for a causal mask SDPA's flash kernel skips them
itself, so SDPA is the better choice there. On CUDA flex_attention runs through `torch.compile` (eager flex
materialises the whole score matrix). On CPU it runs eagerly, slowly and forward only (torch 2.13 has no CPU
backward for it); it is there to check the masks, not to train.
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
    def causal(cls, length: int) -> AttentionMask:
        """q may attend to k iff k <= q, over `length` tokens (any shorter length is its prefix)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"AttentionMask.causal: length must be an integer >= 1, got {length!r}.")

        def make_mod(pos_L: Tensor) -> MaskMod:
            def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                return kv_idx <= q_idx

            return mask_mod

        return cls("causal", torch.arange(length), make_mod)

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

    def dense(self, device: torch.device | str, length: int | None = None, q_offset: int = 0) -> Tensor:
        """Boolean mask, True = attend: (1, 1, lq, l) for block_causal and causal, (B, 1, lq, l) for
        document_causal, where lq = l - q_offset: the rows of the last lq tokens (a KV cache's queries)."""
        device, length = self._key(device, length, q_offset)
        key = ("dense", device, length, q_offset)
        if key not in self._cache:
            rows, lq = self.batch or 1, length - q_offset
            b = torch.arange(rows, device=device).view(rows, 1, 1, 1)
            h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
            q_idx = torch.arange(q_offset, length, device=device).view(1, 1, lq, 1)
            kv_idx = torch.arange(length, device=device).view(1, 1, 1, length)
            m = self.mask_mod(device, length)(b, h, q_idx, kv_idx)
            self._cache[key] = m.expand(rows, 1, lq, length).contiguous()
        return self._cache[key]

    def block_mask(self, device: torch.device | str, length: int | None = None, q_offset: int = 0) -> BlockMask:
        """flex_attention's BlockMask: which 128x128 tiles to compute, and the mask_mod inside them.
        q_offset > 0: the queries are the last length - q_offset tokens, as in dense()."""
        _require_flex()
        device, length = self._key(device, length, q_offset)
        key = ("block", device, length, q_offset)
        if key not in self._cache:
            mod = self.mask_mod(device, length)
            if q_offset:
                inner = mod

                def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
                    return inner(b, h, q_idx + q_offset, kv_idx)

            self._cache[key] = create_block_mask(
                mod, B=self.batch, H=None, Q_LEN=length - q_offset, KV_LEN=length, device=device
            )
        return self._cache[key]

    def _key(self, device: torch.device | str, length: int | None, q_offset: int = 0) -> tuple[torch.device, int]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one entry
            device = torch.device("cuda", torch.cuda.current_device())
        length = self.length if length is None else int(length)
        if not 1 <= length <= self.length:
            raise ValueError(f"{self!r}: length must be in [1, {self.length}], got {length}.")
        if not 0 <= q_offset < length:
            raise ValueError(f"{self!r}: q_offset must be in [0, {length - 1}] for length {length}, got {q_offset}.")
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
        use_flex = q.is_cuda and mask is not None and mask.kind != "causal" and dropout_p == 0.0 and flex_available()
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
    q_offset: int = 0,
) -> Tensor:
    """softmax(q k^T * scale, masked) v for (B, H, L, c) tensors; returns (B, H, Lq, c).

    `mask` None means every query sees every key (then Lq may differ from Lk: a KV cache). With a mask, q and
    k must have the same length l <= mask.length, and the mask of the first l tokens is used; or, with a KV
    cache, q_offset + Lq == Lk: the queries are the last Lq of the Lk tokens and get those rows of the mask.
    `scale` None is 1/sqrt(c). `dropout_p` (attention-probability dropout) is only possible with sdpa.
    """
    which = _choose_impl(impl, q_BHLc, mask, dropout_p)
    Lq, Lk = q_BHLc.shape[-2], k_BHLc.shape[-2]
    if mask is not None and q_offset + Lq != Lk:
        raise ValueError(
            f"attention with {mask!r} needs queries and keys of one length (self-attention), or q_offset + "
            f"queries = keys (a KV cache), got {Lq} queries, {Lk} keys and q_offset {q_offset}."
        )
    if mask is not None and mask.batch is not None and mask.batch != q_BHLc.shape[0]:
        raise ValueError(f"{mask!r} has {mask.batch} rows but the batch has {q_BHLc.shape[0]}.")

    if which == "sdpa":
        is_causal, attn_mask = False, None
        if mask is not None and mask.kind == "causal" and q_offset == 0:
            mask._key(q_BHLc.device, Lk)  # the length check of the other masks; then SDPA masks by itself
            is_causal = True
        elif mask is not None and not (mask.kind == "causal" and Lq == 1):  # a causal last row sees every key
            attn_mask = mask.dense(q_BHLc.device, Lk, q_offset)
        return F.scaled_dot_product_attention(
            q_BHLc, k_BHLc, v_BHLc, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
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
    block_mask = None if mask is None else mask.block_mask(q_BHLc.device, Lk, q_offset)
    if scale is None:
        scale = 1.0 / math.sqrt(q_BHLc.shape[-1])
    return _flex_fn(q_BHLc.device)(q_BHLc, k_BHLc, v_BHLc, block_mask=block_mask, scale=scale)

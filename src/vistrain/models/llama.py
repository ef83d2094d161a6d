"""A Llama-style decoder-only language model: the language half of a nanoVLM-style VLM (e.g. SmolLM2).

    logits_BTV = LanguageModel(cfg)(input_ids_BT)                            # causal, one pass
    logits_BTV = LanguageModel(cfg)(inputs_embeds_BTD=x_BTD, doc_ids_BT=d)   # packed rows (a VLM batch)
    loss_sum = LanguageModel(cfg)(input_ids_BT, labels_BT=labels_BT)          # training: no logits made
    new_ids_BN = LanguageModel(cfg).generate(input_ids_BT, max_new_tokens=N)  # with a KV cache

Each block: x + attn(RMSNorm(x)), then x + mlp(RMSNorm(x)). Attention is grouped-query (every kv head
serves num_heads / num_kv_heads query heads), q/k/v/o projections have no bias, and q and k are rotated by
rotary position embeddings in Llama's "rotate half" convention (dimension i pairs with i + c/2, not with
i + 1). The MLP is SwiGLU: down(silu(gate(x)) * up(x)). RMSNorm normalises in float32 and casts back
before the weight multiplies, like Llama, so bf16 runs round where the reference rounds.

Packed rows: several samples in one row of length T, told apart by `doc_ids_BT`. Each token then attends
only to earlier tokens of its own sample (AttentionMask.document_causal) and positions restart at 0 at
each sample (derived from doc_ids when position_ids are not given). Without the mask a later sample sees
the earlier ones: different logits (nanoVLM issue 201). The position reset alone does not fix that; with
the mask it changes only rounding (a RoPE score depends on q's and k's positions through their difference
only), but it keeps positions within the range the model was trained on, as for a sample alone.

Tied embeddings (tie_embeddings=True) are one Parameter: there is no lm_head module at all and the logits
are `h @ embed_tokens.weight.T`. So the state dict has one key (`embed_tokens.weight`), optimizers and
FSDP see one tensor, and safetensors (which refuses shared tensors) can save it. Untied models have
`lm_head` (nn.Linear without bias). `head_weight` is the output matrix either way.

Under the engine's train.compile=blocks the blocks take the mask as an argument, and masks cache their
tensors per length: packed rows of one fixed length compile the blocks twice (the first block builds the
dense mask, the others find it) and then never again, while every new packed length compiles them anew, so
pad packed rows to one length. Plain causal attention needs no mask tensor (SDPA's is_causal).

The loss (labels_BT given) is the cross entropy of the labelled next tokens, computed from the final hidden
states by linear_cross_entropy: only labelled positions reach the head, in chunks, so the (B, T, V) logits
(49k columns for SmolLM2) are never made; it equals F.cross_entropy of the logits to rounding.

Generation keeps keys and values in a KVCache of fixed capacity, written in place; each step attends to all of
it under a mask of the filled slots, so every decoding step has the same shapes. generate(compile=True)
compiles that step once (torch.compile, fullgraph; CUDA graphs on CUDA); by default it runs eagerly, and so do
blocks the engine compiled (torch.compiler.set_stance) for the prompt's pass, whose length is new each call.

Tensor suffixes: B batch, T new tokens, S keys (with a cache: its capacity), D hidden, H query heads, G kv
heads, c head dim, V vocabulary, N generated tokens (or rows of the loss), C rows of a loss chunk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vistrain.models.attention import IMPLS, AttentionMask, attention
from vistrain.models.var import top_k_top_p_filter

__all__ = ["KVCache", "LanguageModel", "LlamaConfig", "linear_cross_entropy", "positions_from_doc_ids"]


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 960
    intermediate_size: int = 2560
    num_layers: int = 32
    num_heads: int = 15
    num_kv_heads: int = 5  # grouped-query attention: num_heads must be a multiple of it
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 100000.0  # rotary base
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the output head is the token embedding (one Parameter)
    max_position_embeddings: int = 8192  # the context the weights were trained for (not enforced)
    attn_impl: str = "auto"  # auto | sdpa | flex (see models/attention.py)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad key. LanguageModel() calls it too (configs can change)."""

        def bad(key: str, want: str) -> ValueError:
            return ValueError(f"LlamaConfig.{key} must be {want}, got {getattr(self, key)!r}.")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                    "max_position_embeddings"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"a divisor of num_heads ({self.num_heads})")
        if not is_int(self.head_dim) or self.head_dim < 0 or self.head_dim % 2:
            raise bad("head_dim",
                      "an even integer >= 2 (rotary embeddings rotate pairs), or 0 for hidden_size // num_heads")
        if self.head_dim == 0 and (self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2):
            raise bad("hidden_size",
                      f"a multiple of num_heads ({self.num_heads}) with an even quotient when head_dim is 0")
        if not (isinstance(self.rope_theta, (int, float)) and 0 < self.rope_theta < math.inf):
            raise bad("rope_theta", "a finite number > 0")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < math.inf):
            raise bad("rms_norm_eps", "a finite number > 0")
        if not isinstance(self.tie_embeddings, bool):
            raise bad("tie_embeddings", "true or false")
        if self.attn_impl not in IMPLS:
            raise bad("attn_impl", f"one of {', '.join(IMPLS)}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


# ---------------------------------------------------------------------------------------------------
# positions, rotary embeddings, the KV cache


def positions_from_doc_ids(doc_ids_BT: Tensor) -> Tensor:
    """Each token's position inside its packed sample: 0 at t = 0 and wherever the doc id changes, then +1."""
    B, T = doc_ids_BT.shape
    t_BT = torch.arange(T, device=doc_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(doc_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    # the index of the latest start at or before t, by a running maximum
    return t_BT - torch.where(starts_BT, t_BT, 0).cummax(dim=1).values


def rotary_cos_sin(position_ids_BT: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin (B, 1, T, c) of the rotation angles, in float32.

    Frequency i (of c/2) is theta^(-2i/c); dimension d of a head uses frequency d mod c/2, so d and d + c/2
    form one rotated pair (Llama's convention). Computed in float32 from integer positions: bf16 angles
    would be off by whole radians at positions in the thousands.
    """
    exponent_h = torch.arange(0, head_dim, 2, device=position_ids_BT.device).float() / head_dim
    inv_freq_h = 1.0 / (theta**exponent_h)
    angles_BTh = position_ids_BT.float().unsqueeze(-1) * inv_freq_h
    angles_B1Tc = torch.cat((angles_BTh, angles_BTh), dim=-1).unsqueeze(1)
    return angles_B1Tc.cos(), angles_B1Tc.sin()


def _rotate(x_BHTc: Tensor, cos_B1Tc: Tensor, sin_B1Tc: Tensor) -> Tensor:
    """Rotate each pair (x[d], x[d + c/2]) by its angle: x cos + rotate_half(x) sin."""
    first, second = x_BHTc.chunk(2, dim=-1)
    return x_BHTc * cos_B1Tc + torch.cat((-second, first), dim=-1) * sin_B1Tc


class KVCache:
    """Keys and values of every layer for the tokens seen so far: prefill, then one token at a time.

    A layer's buffers (B, G, capacity, c) are allocated on its first update, with the dtype and device of its
    keys, and every pass writes its keys into them in place. Attention reads the whole buffers, with a mask of
    the slots each query may see (`mask`): so every decoding step has the same shapes, and one compiled graph
    serves them all (LanguageModel.generate(compile=...)). Keys are stored rotated and before the kv heads
    are repeated for grouped-query attention. The count of tokens held is kept twice: `length`, a Python
    int for checks on the host, and `position`, a device tensor that compiled code reads without baking its
    value in. The model advances both at the end of each pass (so all layers of one pass write at one offset).
    """

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"KVCache: capacity must be an integer >= 1, got {capacity!r}.")
        self.capacity = capacity
        self.length = 0
        self.position: Tensor | None = None  # (1,) long on the model's device, == length
        self.static_addresses = False  # mark the buffers static (compiled decoding: CUDA graphs replay them)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def mask(self, num_tokens: int, device: torch.device) -> Tensor:
        """(1, 1, T, capacity) bool for this pass's T queries: slot s is visible to query t iff s <= its slot."""
        if self.position is None:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
            self._mark_static(self.position)
        slots_T = self.position + torch.arange(num_tokens, device=device)
        return (torch.arange(self.capacity, device=device) <= slots_T[:, None])[None, None]

    def update(self, layer: int, k_BGTc: Tensor, v_BGTc: Tensor) -> tuple[Tensor, Tensor]:
        """Store this pass's keys and values of `layer`; return the layer's whole buffers (B, G, capacity, c)."""
        if layer == len(self.k):  # first pass: allocate this layer's buffers
            B, G, _, c = k_BGTc.shape
            self.k.append(self._mark_static(k_BGTc.new_zeros(B, G, self.capacity, c)))
            self.v.append(self._mark_static(v_BGTc.new_zeros(B, G, self.capacity, c)))
        elif layer > len(self.k):
            raise ValueError(f"KVCache: layer {layer} updated before layer {len(self.k)}.")
        if self.k[layer].shape[0] != k_BGTc.shape[0]:
            raise ValueError(f"KVCache: holds {self.k[layer].shape[0]} rows, got a batch of {k_BGTc.shape[0]}.")
        slots_T = self.position + torch.arange(k_BGTc.shape[2], device=k_BGTc.device)
        self.k[layer].index_copy_(2, slots_T, k_BGTc)
        self.v[layer].index_copy_(2, slots_T, v_BGTc)
        return self.k[layer], self.v[layer]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self.position.add_(num_tokens)

    def reset(self) -> None:
        """Empty, keeping its buffers: stale slots are never seen (the mask stops at the position)."""
        self.length = 0
        if self.position is not None:
            self.position.zero_()

    def _mark_static(self, t: Tensor) -> Tensor:
        # CUDA graphs replay fixed addresses: buffers written in place must be marked so, or torch.compile's
        # cudagraph trees decline the graph ("mutated inputs")
        if self.static_addresses:
            torch._dynamo.mark_static_address(t)
        return t


# ---------------------------------------------------------------------------------------------------
# the loss: the output head's cross entropy without the logits of every token


def linear_cross_entropy(h_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, ignore_index: int = -100,
                         chunk_size: int = 1024) -> Tensor:
    """Cross entropy of the logits h W^T, summed over the rows whose label is not ignore_index, in float32
    (float64 for float64 inputs): the value and the gradients of F.cross_entropy(F.linear(h, W).float(),
    labels, reduction="sum"), without its (N, V) logits.

    Two savings. Only labelled rows reach the head: a VLM labels its answers, a small part of each packed
    row (image tokens, questions and padding never). And those pass it chunk_size rows at a time, so the
    float32 logits (SmolLM2's 49k columns: 197 KB a row) exist for one chunk at a time. The gradients are
    computed in the forward pass, chunk by chunk, while each chunk's softmax is at hand; backward only
    scales them, so no matmul runs twice (checkpointed chunks would compute the logits again). Under
    autocast the matmuls run in the autocast dtype, as F.linear's would; the softmax always in float32.
    """
    rows = (labels_N != ignore_index).nonzero().squeeze(1)  # a host sync: the labelled rows size the work
    # under no_grad (evaluation) the gradients are not computed: the Function cannot tell, its inputs still
    # require grad
    return _LinearCrossEntropy.apply(h_ND.index_select(0, rows), weight_VD, labels_N.index_select(0, rows),
                                     chunk_size, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: Tensor, weight_VD: Tensor, labels_N: Tensor, chunk_size: int, grad: bool) -> Tensor:
        device = h_ND.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h_ND.dtype
        need_h, need_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        ctx.dtypes = h_ND.dtype, weight_VD.dtype
        exact = torch.promote_types(dtype, torch.float32)  # the softmax and the sums: float32, or float64
        with torch.autocast(device, enabled=False):
            h_ND, w_VD = h_ND.to(dtype), weight_VD.to(dtype)
            loss = torch.zeros((), dtype=exact, device=h_ND.device)
            grad_h_ND = torch.empty_like(h_ND) if need_h else None
            grad_w_VD = torch.zeros(w_VD.shape, dtype=exact, device=w_VD.device) if need_w else None
            for start in range(0, h_ND.shape[0], chunk_size):
                h_CD, labels_C = h_ND[start:start + chunk_size], labels_N[start:start + chunk_size]
                logits_CV = (h_CD @ w_VD.T).to(exact)
                lse_C = logits_CV.logsumexp(dim=-1)
                loss += (lse_C - logits_CV.gather(1, labels_C[:, None])[:, 0]).sum()
                if not (need_h or need_w):
                    continue
                # d loss / d logits = softmax - one_hot(label), made in place of the logits
                d_CV = logits_CV.sub_(lse_C[:, None]).exp_()
                d_CV[torch.arange(len(labels_C), device=d_CV.device), labels_C] -= 1.0
                d_CV = d_CV.to(dtype)
                if need_h:
                    grad_h_ND[start:start + chunk_size] = d_CV @ w_VD
                if need_w:
                    grad_w_VD += d_CV.T @ h_CD
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h_ND is None else (grad_h_ND * grad_loss.to(grad_h_ND.dtype)).to(h_dtype)
        grad_w = None if grad_w_VD is None else (grad_w_VD * grad_loss).to(w_dtype)
        return grad_h, grad_w, None, None, None


# ---------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    """x / rms(x) * weight; the normalisation in float32, cast back to x's dtype before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_BTD: Tensor) -> Tensor:
        x32_BTD = x_BTD.float()
        x32_BTD = x32_BTD * torch.rsqrt(x32_BTD.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32_BTD.to(x_BTD.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; no biases."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.attn_impl = layer, cfg.attn_impl
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        D, c = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(D, self.heads * c, bias=False)
        self.k_proj = nn.Linear(D, self.kv_heads * c, bias=False)
        self.v_proj = nn.Linear(D, self.kv_heads * c, bias=False)
        self.o_proj = nn.Linear(self.heads * c, D, bias=False)

    def forward(self, x_BTD: Tensor, cos_B1Tc: Tensor, sin_B1Tc: Tensor, mask: AttentionMask | Tensor | None,
                kv_cache: KVCache | None) -> Tensor:
        """mask: an AttentionMask (or None: causal) without a cache; with one, the cache's mask tensor."""
        B, T, _ = x_BTD.shape
        c = self.head_dim
        q_BHTc = self.q_proj(x_BTD).view(B, T, self.heads, c).transpose(1, 2)
        k_BGTc = self.k_proj(x_BTD).view(B, T, self.kv_heads, c).transpose(1, 2)
        v_BGTc = self.v_proj(x_BTD).view(B, T, self.kv_heads, c).transpose(1, 2)
        q_BHTc = _rotate(q_BHTc, cos_B1Tc, sin_B1Tc)
        k_BGTc = _rotate(k_BGTc, cos_B1Tc, sin_B1Tc)
        if kv_cache is not None:
            k_BGSc, v_BGSc = kv_cache.update(self.layer, k_BGTc, v_BGTc)
        else:
            k_BGSc, v_BGSc = k_BGTc, v_BGTc
        if kv_cache is not None:
            o_BHTc = _attend_to_cache(q_BHTc, k_BGSc, v_BGSc, mask)
        else:
            o_BHTc = attention(q_BHTc, _repeat_kv(k_BGSc, self.heads), _repeat_kv(v_BGSc, self.heads), mask,
                               impl=self.attn_impl)
        return self.o_proj(o_BHTc.transpose(1, 2).reshape(B, T, self.heads * c))


def _repeat_kv(x_BGSc: Tensor, heads: int) -> Tensor:
    """(B, G, S, c) -> (B, H, S, c): kv head g serves query heads g * rep .. (g + 1) * rep - 1."""
    rep = heads // x_BGSc.shape[1]
    return x_BGSc.repeat_interleave(rep, dim=1) if rep > 1 else x_BGSc


_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in torch 2.5


def _attend_to_cache(q_BHTc: Tensor, k_BGSc: Tensor, v_BGSc: Tensor, mask_11TS: Tensor) -> Tensor:
    """Attention to every slot of a KV cache, the empty and future ones masked. A tensor mask (an AttentionMask's
    offsets are Python ints) keeps the shapes and the graph of a decoding step fixed; SDPA's grouped-query mode
    reads the kv heads in place instead of repeating the whole cache at every step (12% faster decoding here)."""
    if _SDPA_GQA:
        return F.scaled_dot_product_attention(q_BHTc, k_BGSc, v_BGSc, attn_mask=mask_11TS, enable_gqa=True)
    heads = q_BHTc.shape[1]
    return F.scaled_dot_product_attention(q_BHTc, _repeat_kv(k_BGSc, heads), _repeat_kv(v_BGSc, heads),
                                          attn_mask=mask_11TS)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_BTD: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x_BTD: Tensor, cos_B1Tc: Tensor, sin_B1Tc: Tensor, mask: AttentionMask | Tensor | None,
                kv_cache: KVCache | None = None) -> Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_B1Tc, sin_B1Tc, mask, kv_cache)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


# ---------------------------------------------------------------------------------------------------
# the model


class LanguageModel(nn.Module):
    """Token embedding, `blocks`, final RMSNorm, output head (the embedding itself when tied)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # One causal mask, grown when a longer sequence comes: it keeps its device copies (and flex's block
        # masks) between calls. A plain attribute, not a buffer: nothing to checkpoint.
        self._causal_mask: AttentionMask | None = None
        self._decoders: dict[tuple[str, str], Callable] = {}  # generate(compile=...): compiled decoding steps
        self._caches: dict[tuple, KVCache] = {}  # ... and their caches, reused from call to call
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Llama's initialisation for training from scratch: N(0, std) Linear and embedding weights, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def head_weight(self) -> Tensor:
        """The output matrix (V, D): the embedding when tied (the same Parameter), else lm_head's."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids_BT: Tensor) -> Tensor:
        return self.embed_tokens(input_ids_BT)

    def logits(self, h_BTD: Tensor) -> Tensor:
        """The head on final hidden states (after the norm): (..., D) -> (..., V), in the compute dtype."""
        return F.linear(h_BTD, self.head_weight)

    # ---- the forward pass

    def forward(
        self,
        input_ids_BT: Tensor | None = None,
        inputs_embeds_BTD: Tensor | None = None,
        position_ids_BT: Tensor | None = None,
        doc_ids_BT: Tensor | None = None,
        kv_cache: KVCache | None = None,
        labels_BT: Tensor | None = None,
    ) -> Tensor:
        """Logits (B, T, V) for every token (see hidden_states() for the arguments); with labels_BT, instead,
        the summed cross entropy of the labelled next tokens (next_token_loss), which never builds the logits."""
        h_BTD = self.hidden_states(input_ids_BT, inputs_embeds_BTD, position_ids_BT, doc_ids_BT, kv_cache)
        return self.logits(h_BTD) if labels_BT is None else self.next_token_loss(h_BTD, labels_BT)

    def next_token_loss(self, h_BTD: Tensor, labels_BT: Tensor, ignore_index: int = -100) -> Tensor:
        """Cross entropy (float32) summed over the tokens whose next token is labelled: position t predicts
        labels_BT[:, t + 1], and labels equal to ignore_index (PyTorch's -100) count for nothing."""
        B, T, D = h_BTD.shape
        if labels_BT.shape != (B, T):
            raise ValueError(f"LanguageModel: labels_BT must have shape {(B, T)}, got {tuple(labels_BT.shape)}.")
        targets_BT = F.pad(labels_BT[:, 1:], (0, 1), value=ignore_index)  # the last token predicts nothing here
        return linear_cross_entropy(h_BTD.reshape(B * T, D), self.head_weight, targets_BT.reshape(B * T),
                                    ignore_index=ignore_index)

    def hidden_states(
        self,
        input_ids_BT: Tensor | None = None,
        inputs_embeds_BTD: Tensor | None = None,
        position_ids_BT: Tensor | None = None,
        doc_ids_BT: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Final hidden states (B, T, D), after the last norm.

        Give token ids or embeddings (B, T, D) (a VLM writes image features into them), not both.
        position_ids_BT: rotary positions; default 0..T-1 after any cached tokens, or, with doc_ids, restarting
        at 0 at each packed sample. doc_ids_BT: packed rows, each token attends only within its sample
        (document-causal); without it attention is plain causal. kv_cache: generation; this pass's keys and
        values are appended to it and attention also sees the cached ones (no doc_ids then).
        """
        x_BTD = self._input(input_ids_BT, inputs_embeds_BTD)
        B, T, _ = x_BTD.shape
        if position_ids_BT is not None and (position_ids_BT.dim() != 2 or position_ids_BT.shape[1] != T
                                            or position_ids_BT.shape[0] not in (1, B)):
            raise ValueError(f"LanguageModel: position_ids_BT must have shape {(B, T)}, "
                             f"got {tuple(position_ids_BT.shape)}.")
        if kv_cache is not None:
            if doc_ids_BT is not None:
                raise ValueError("LanguageModel: doc_ids_BT (packed rows) cannot be used with a kv_cache.")
            if kv_cache.length + T > kv_cache.capacity:
                raise ValueError(f"KVCache: {kv_cache.length + T} tokens do not fit "
                                 f"its capacity of {kv_cache.capacity}.")
            h_BTD = self._cached_pass(x_BTD, kv_cache, position_ids_BT)
            kv_cache.advance(T)
            return h_BTD
        if doc_ids_BT is not None:
            if not isinstance(doc_ids_BT, Tensor) or tuple(doc_ids_BT.shape) != (B, T):
                got = tuple(doc_ids_BT.shape) if isinstance(doc_ids_BT, Tensor) else type(doc_ids_BT).__name__
                raise ValueError(f"LanguageModel: doc_ids_BT must have shape {(B, T)}, got {got}.")
            mask = AttentionMask.document_causal(doc_ids_BT)
            if position_ids_BT is None:
                position_ids_BT = positions_from_doc_ids(doc_ids_BT.to(x_BTD.device))
        else:
            mask = self._causal(T)
            if position_ids_BT is None:
                position_ids_BT = torch.arange(T, device=x_BTD.device).expand(B, T)
        return self._blocks(x_BTD, position_ids_BT, mask, None)

    def _cached_pass(self, x_BTD: Tensor, cache: KVCache, position_ids_BT: Tensor | None = None) -> Tensor:
        """The blocks over T new tokens after the cached ones, reading the cache's offset from its position
        tensor; the caller advances the cache (compiled decoding must not touch its Python int)."""
        B, T, _ = x_BTD.shape
        mask_11TS = cache.mask(T, x_BTD.device)
        if position_ids_BT is None:
            position_ids_BT = (cache.position + torch.arange(T, device=x_BTD.device)).expand(B, T)
        return self._blocks(x_BTD, position_ids_BT, mask_11TS, cache)

    def _blocks(self, x_BTD: Tensor, position_ids_BT: Tensor, mask: AttentionMask | Tensor | None,
                kv_cache: KVCache | None) -> Tensor:
        cos_B1Tc, sin_B1Tc = rotary_cos_sin(position_ids_BT.to(x_BTD.device), self.cfg.resolved_head_dim,
                                            self.cfg.rope_theta)
        # Llama rotates in the dtype of the residual stream (float32 under autocast, bf16 for bf16 weights)
        cos_B1Tc, sin_B1Tc = cos_B1Tc.to(x_BTD.dtype), sin_B1Tc.to(x_BTD.dtype)
        for block in self.blocks:
            x_BTD = block(x_BTD, cos_B1Tc, sin_B1Tc, mask, kv_cache)
        return self.norm(x_BTD)

    def _input(self, input_ids_BT: Tensor | None, inputs_embeds_BTD: Tensor | None) -> Tensor:
        if (input_ids_BT is None) == (inputs_embeds_BTD is None):
            raise ValueError("LanguageModel: give exactly one of input_ids_BT and inputs_embeds_BTD.")
        if input_ids_BT is not None:
            if input_ids_BT.dim() != 2 or input_ids_BT.dtype.is_floating_point or input_ids_BT.shape[1] == 0:
                raise ValueError(f"LanguageModel: input_ids_BT must be (B, T) integer token ids with T >= 1, got "
                                 f"shape {tuple(input_ids_BT.shape)} of {input_ids_BT.dtype}.")
            return self.embed_tokens(input_ids_BT)
        D = self.cfg.hidden_size
        if inputs_embeds_BTD.dim() != 3 or inputs_embeds_BTD.shape[2] != D or inputs_embeds_BTD.shape[1] == 0:
            raise ValueError(f"LanguageModel: inputs_embeds_BTD must have shape (B, T >= 1, {D}), got "
                             f"{tuple(inputs_embeds_BTD.shape)}.")
        return inputs_embeds_BTD

    def _causal(self, length: int) -> AttentionMask:
        if self._causal_mask is None or self._causal_mask.length < length:
            self._causal_mask = AttentionMask.causal(max(length, 256))
        return self._causal_mask

    # ---- vocabulary

    @torch.no_grad()
    def resize_vocab(self, new_size: int, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Grow the vocabulary to new_size (a VLM adds image tokens): old rows stay bit-identical, new rows of
        the embedding (and of an untied head) are N(0, std), drawn on the CPU (so a seeded generator gives
        the same rows on any device). The Parameters are replaced: build optimizers afterwards."""
        old = self.cfg.vocab_size
        if isinstance(new_size, bool) or not isinstance(new_size, int) or new_size < old:
            raise ValueError(f"LanguageModel.resize_vocab: new_size must be an integer >= the current {old}, "
                             f"got {new_size!r}.")
        if new_size == old:
            return

        def grown(weight_VD: Tensor) -> nn.Parameter:
            rows_ND = torch.randn(new_size - old, weight_VD.shape[1], generator=generator, device="cpu") * std
            full = torch.cat((weight_VD.detach(), rows_ND.to(weight_VD.dtype).to(weight_VD.device)))
            return nn.Parameter(full, requires_grad=weight_VD.requires_grad)

        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = new_size
        if self.lm_head is not None:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = new_size
        self.cfg = dataclasses.replace(self.cfg, vocab_size=new_size)

    # ---- generation

    @torch.no_grad()
    def generate(
        self,
        input_ids_BT: Tensor | None = None,
        inputs_embeds_BTD: Tensor | None = None,
        *,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        greedy: bool = True,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 0.0,
        generator: torch.Generator | None = None,
        compile: bool | str = False,
    ) -> Tensor:
        """New token ids (B, N), N <= max_new_tokens, continuing the prompts (ids or embeddings, all of one
        length: no padding), with a KV cache: one pass over the prompt, then one token at a time.

        greedy: argmax. Else sample from softmax(logits / temperature) after top-k and top-p filtering
        (models/var.py's top_k_top_p_filter), with `generator` (or the global RNG). A row that has produced
        eos_token_id gets eos from then on; generation stops when every row has, so N can be shorter.

        compile: False decodes eagerly. True compiles the decoding step (embedding, every block, the head) as one
        graph with torch.compile (fullgraph; on CUDA with CUDA graphs, mode reduce-overhead): the cache's
        fixed shapes let one graph serve every step, and every later call whose prompt + max_new_tokens falls
        in the same 256-token bucket. A string is the torch.compile backend to use (tests: "eager"). If
        compiling fails, decoding goes on eagerly, with a warning.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        if not greedy and not temperature > 0:
            raise ValueError(f"generate: temperature must be > 0 for sampling, got {temperature!r}.")
        x_BTD = self._input(input_ids_BT, inputs_embeds_BTD)
        B, T, _ = x_BTD.shape
        if max_new_tokens == 0:
            return torch.zeros(B, 0, dtype=torch.long, device=x_BTD.device)

        capacity = T + max_new_tokens - 1  # the last new token is never fed back
        if compile:  # a bucket of capacities shares one compiled graph
            capacity = -(-capacity // DECODE_BUCKET) * DECODE_BUCKET
        decode, cuda_graphs = self._decode_step, False
        if compile:
            decode, cuda_graphs = self._compiled_decode(compile, x_BTD.device)
            cache = self._reused_cache(capacity, B, x_BTD)
        else:
            cache = KVCache(capacity)
        with _eager_even_if_compiled():  # the prompt's pass: its length is new at every call
            h_BTD = self.hidden_states(inputs_embeds_BTD=x_BTD, kv_cache=cache)
        logits_BV = self.logits(h_BTD[:, -1]).float()
        finished_B = torch.zeros(B, dtype=torch.bool, device=x_BTD.device)
        new: list[Tensor] = []
        with contextlib.nullcontext() if compile else _eager_even_if_compiled():
            for step in range(max_new_tokens):
                if greedy:
                    next_B = logits_BV.argmax(dim=-1)
                else:
                    logits_BV = top_k_top_p_filter(logits_BV / temperature, top_k, top_p)
                    next_B = torch.multinomial(logits_BV.softmax(dim=-1), 1, generator=generator)[:, 0]
                if eos_token_id is not None:
                    next_B = torch.where(finished_B, eos_token_id, next_B)
                    finished_B |= next_B == eos_token_id
                new.append(next_B)
                if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished_B.all())):
                    break
                if cuda_graphs:  # the graph's outputs of the last step (logits_BV) are used up: replay over them
                    torch.compiler.cudagraph_mark_step_begin()
                try:
                    logits_BV = decode(next_B[:, None], cache)
                except Exception as e:  # noqa: BLE001 - any failure to compile leaves the eager step
                    if decode == self._decode_step:
                        raise
                    first_line = (str(e).splitlines() or [""])[0]
                    warnings.warn(f"generate: the compiled decoding step failed ({type(e).__name__}: {first_line}); "
                                  "decoding eagerly instead", stacklevel=2)
                    decode = self._decode_step
                    logits_BV = decode(next_B[:, None], cache)
                cache.advance(1)
        return torch.stack(new, dim=1)

    def _decode_step(self, ids_B1: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, V), float32, after one more token per row: one step of generate, the graph it compiles.
        It reads and writes tensors only (the cache's buffers and position); generate advances the cache."""
        h_B1D = self._cached_pass(self.embed_tokens(ids_B1), cache)
        return self.logits(h_B1D[:, -1]).float()

    def _compiled_decode(self, compile: bool | str, device: torch.device) -> tuple[Callable, bool]:
        """(the compiled decoding step, whether it replays CUDA graphs); compiled once per backend and device."""
        backend = "inductor" if compile is True else str(compile)
        cuda_graphs = backend == "inductor" and device.type == "cuda"
        key = (backend, device.type)
        if key not in self._decoders:
            self._decoders[key] = torch.compile(self._decode_step, backend=backend, fullgraph=True,
                                                mode="reduce-overhead" if cuda_graphs else None)
        return self._decoders[key], cuda_graphs

    def _reused_cache(self, capacity: int, batch: int, x_BTD: Tensor) -> KVCache:
        """The cache of every compiled generate call of this capacity, batch, dtype and device, emptied: its
        buffers keep their addresses from call to call, which CUDA graphs replay (new buffers would have the
        graphs recorded anew)."""
        key = (capacity, batch, x_BTD.dtype, x_BTD.device)
        if key not in self._caches:
            self._caches[key] = KVCache(capacity)
            self._caches[key].static_addresses = True
        cache = self._caches[key]
        cache.reset()
        return cache

    def __getstate__(self) -> dict:
        # copies (deepcopy, pickle) compile their own decoding step and make their own caches: a compiled
        # function holds this instance
        state = dict(self.__dict__)
        state["_decoders"], state["_caches"] = {}, {}
        return state


DECODE_BUCKET = 256  # compiled decoding: cache capacities are rounded up to a multiple of this


def _eager_even_if_compiled() -> contextlib.AbstractContextManager:
    """Run blocks that the engine compiled (train.compile) eagerly: a prompt's length is new at every call, so
    compiled blocks would recompile until dynamo's limit and then fall back anyway."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()

"""models/attention.py: masks defined once, the same results through SDPA and flex_attention."""

from __future__ import annotations

import math

import pytest
import torch

from support.markers import requires_flex
from vistrain.models import attention as attn_mod
from vistrain.models.attention import AttentionMask, attention

GROUPS = torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2])  # VAR's scales for patch_nums [1, 2, 3]
DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5, 7, 7, 8, 8, 8, 8, 8, 9]])


def _reference(q, k, v, allowed, scale):
    """softmax(q k^T scale) v in float64 with a boolean allowed-mask (None = full)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, -math.inf)
    return (s.softmax(-1) @ v.double()).float()


def _block_causal_by_hand(groups):
    L = len(groups)
    return torch.tensor([[bool(groups[k] <= groups[q]) for k in range(L)] for q in range(L)])


def _document_causal_by_hand(docs):
    B, L = docs.shape
    return torch.tensor(
        [[[k <= q and bool(docs[b, k] == docs[b, q]) for k in range(L)] for q in range(L)] for b in range(B)]
    )


def test_dense_masks_equal_the_patterns_built_by_hand() -> None:
    dense = AttentionMask.block_causal(GROUPS).dense("cpu")
    assert dense.dtype == torch.bool and dense.shape == (1, 1, 14, 14)
    assert torch.equal(dense[0, 0], _block_causal_by_hand(GROUPS))
    # spot checks of the intended meaning: the start token sees only itself, a scale sees itself fully
    assert dense[0, 0, 0].sum() == 1 and dense[0, 0, 1, 4] and not dense[0, 0, 4, 5]

    dense = AttentionMask.document_causal(DOCS).dense("cpu")
    assert dense.dtype == torch.bool and dense.shape == (2, 1, 14, 14)
    assert torch.equal(dense[:, 0], _document_causal_by_hand(DOCS))
    assert not dense[0, 0, 3, 2] and dense[0, 0, 4, 3] and not dense[0, 0, 3, 4]  # other doc / same / future


def test_every_query_sees_itself_so_no_row_is_fully_masked() -> None:
    for mask in (AttentionMask.block_causal(GROUPS), AttentionMask.document_causal(DOCS)):
        dense = mask.dense("cpu")
        assert dense.diagonal(dim1=-2, dim2=-1).all()
        assert dense.any(dim=-1).all()


def test_truncated_mask_is_the_prefix_and_masks_are_cached() -> None:
    for mask in (AttentionMask.block_causal(GROUPS), AttentionMask.document_causal(DOCS)):
        full = mask.dense("cpu")
        assert torch.equal(mask.dense("cpu", length=5), full[..., :5, :5])
        assert mask.dense("cpu") is full  # computed once per device and length
        with pytest.raises(ValueError, match="length"):
            mask.dense("cpu", length=15)


@requires_flex
@pytest.mark.parametrize("scale", [None, 1.0, 0.3])
@pytest.mark.parametrize("kind", ["block_causal", "document_causal"])
def test_sdpa_and_flex_agree_with_the_reference(kind: str, scale: float | None) -> None:
    torch.manual_seed(0)
    mask = AttentionMask.block_causal(GROUPS) if kind == "block_causal" else AttentionMask.document_causal(DOCS)
    q, k, v = (torch.randn(2, 3, 14, 16) for _ in range(3))
    if scale == 1.0:  # VAR's setting: unit-norm q, k with a temperature folded into q
        q, k = torch.nn.functional.normalize(q, dim=-1) * 4.0, torch.nn.functional.normalize(k, dim=-1)
    ref = _reference(q, k, v, mask.dense("cpu"), 1 / math.sqrt(16) if scale is None else scale)
    o_sdpa = attention(q, k, v, mask, scale=scale, impl="sdpa")
    with torch.no_grad():
        o_flex = attention(q, k, v, mask, scale=scale, impl="flex")
    torch.testing.assert_close(o_sdpa, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_flex, o_sdpa, rtol=1e-5, atol=1e-5)
    # and the mask does matter: without it the output differs
    assert not torch.allclose(attention(q, k, v, None, scale=scale, impl="sdpa"), o_sdpa, atol=1e-3)


@requires_flex
def test_no_mask_is_full_attention_also_with_a_longer_kv_cache() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    ref = _reference(q, k, v, None, 1.0)
    torch.testing.assert_close(attention(q, k, v, None, scale=1.0, impl="sdpa"), ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, None, scale=1.0, impl="flex"), ref, rtol=1e-5, atol=1e-5)


def test_impl_choice_and_errors() -> None:
    q = torch.randn(2, 1, 14, 8)
    mask = AttentionMask.block_causal(GROUPS)
    assert attn_mod._choose_impl("auto", q, mask, 0.0) == "sdpa"  # CPU: sdpa
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, mask, impl="xformers")
    with pytest.raises(ValueError, match="one length"):
        attention(q[:, :, :4], q, q, mask)
    with pytest.raises(ValueError, match="rows"):
        attention(q[:1], q[:1], q[:1], AttentionMask.document_causal(DOCS))
    with pytest.raises(ValueError, match="integer"):
        AttentionMask.block_causal(torch.rand(5))
    with pytest.raises(ValueError, match="2-d"):
        AttentionMask.document_causal(GROUPS)
    if attn_mod.flex_available():
        with pytest.raises(ValueError, match="dropout"):
            attention(q, q, q, mask, impl="flex", dropout_p=0.1)
        with pytest.raises(RuntimeError, match="forward only on the CPU"):
            attention(q.requires_grad_(), q, q, mask, impl="flex")


def test_sdpa_path_trains_and_gradients_respect_the_mask() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 14, 16, requires_grad=True) for _ in range(3))
    o = attention(q, k, v, AttentionMask.document_causal(DOCS), impl="auto")
    o[0, :, 4].sum().backward()  # row 0, token 4: its document is tokens 3..4
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    seen = v.grad[0].abs().sum(dim=(0, 2)) > 0
    assert seen.tolist() == [i in (3, 4) for i in range(14)]
    assert v.grad[1].abs().sum() == 0


@requires_flex
def test_causal_mask_and_kv_cache_queries_with_q_offset() -> None:
    """causal(): k <= q; with q_offset the queries are the last rows (a KV cache), through both back ends."""
    torch.manual_seed(0)
    L = 14
    causal = AttentionMask.causal(L)
    dense = causal.dense("cpu")
    assert dense.shape == (1, 1, L, L) and torch.equal(dense[0, 0], torch.ones(L, L, dtype=torch.bool).tril())
    assert torch.equal(causal.dense("cpu", 9, q_offset=6), dense[..., 6:9, :9])
    docs = AttentionMask.document_causal(DOCS)
    assert torch.equal(docs.dense("cpu", q_offset=10), docs.dense("cpu")[..., 10:, :])

    q, k, v = (torch.randn(2, 3, L, 16) for _ in range(3))
    for mask in (causal, docs):
        full = _reference(q, k, v, mask.dense("cpu"), 1 / math.sqrt(16))
        torch.testing.assert_close(attention(q, k, v, mask, impl="sdpa"), full, rtol=1e-5, atol=1e-5)
        for n in (1, 4):  # one new token, a chunk of several over a cached prefix
            with torch.no_grad():
                for impl in ("sdpa", "flex"):
                    got = attention(q[:, :, -n:], k, v, mask, impl=impl, q_offset=L - n)
                    torch.testing.assert_close(got, full[:, :, -n:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q_offset"):
        attention(q[:, :, :4], k, v, causal, q_offset=3)
    with pytest.raises(ValueError, match="length"):
        attention(q, k, v, AttentionMask.causal(L - 1))
    with pytest.raises(ValueError, match="length"):
        AttentionMask.causal(0)

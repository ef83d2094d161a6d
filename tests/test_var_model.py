"""models/var.py: the VAR transformer (official names and sizes, exact math, sampling, KV cache)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.markers import requires_flex
from vistrain.models.var import VAR, VARConfig, sample_top_k_top_p, top_k_top_p_filter

PN = [1, 2, 3]  # L = 14 tokens; scale ranges (0,1) (1,5) (5,14)
NUM_CLASSES, V, CV = 10, 64, 8


def _tiny(**kw) -> VARConfig:
    base = {"depth": 2, "num_classes": NUM_CLASSES, "vocab_size": V, "z_channels": CV, "patch_nums": list(PN),
            "drop_path_rate": 0.0}
    return VARConfig(**{**base, **kw})


def _model(seed: int = 0, **kw) -> VAR:
    torch.manual_seed(seed)
    model = VAR(_tiny(**kw))
    # init_weights nearly zeroes the AdaLN gates (gamma), which would make every block an identity and the
    # tests below blind; give all weights random values of a sensible size instead.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


class _Quantize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(V, CV)


class StubTokenizer(nn.Module):
    """The multi-scale residual tokenizer's VAR interface (spec 1.6), without the phi convolutions."""

    def __init__(self, patch_nums: list[int]):
        super().__init__()
        self.patch_nums = patch_nums
        self.quantize = _Quantize()
        self.quantize.next_input = self.next_input  # generate() asks the quantizer, as models/vqvae.py has it
        self.handed_out: list[torch.Tensor] = []  # the next-scale inputs given to generate()

    def next_input(self, si, f_hat_BChw, h_BChw):
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            f_hat_BChw += F.interpolate(h_BChw, size=(side, side), mode="bicubic")
            pn = self.patch_nums[si + 1]
            nxt = F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")
            self.handed_out.append(nxt)
            return f_hat_BChw, nxt
        f_hat_BChw += h_BChw
        return f_hat_BChw, f_hat_BChw

    def var_input(self, idx_list):
        """Teacher-forcing input (B, L - 1, Cv) from the indices of every scale (idxBl_to_var_input)."""
        B, side, E = idx_list[0].shape[0], self.patch_nums[-1], self.quantize.embedding.weight
        f_hat = torch.zeros(B, CV, side, side)
        out = []
        for si in range(len(self.patch_nums) - 1):
            pn = self.patch_nums[si]
            h = E[idx_list[si]].transpose(1, 2).reshape(B, CV, pn, pn)
            f_hat = f_hat + F.interpolate(h, size=(side, side), mode="bicubic")
            nxt = F.interpolate(f_hat, size=(self.patch_nums[si + 1],) * 2, mode="area")
            out.append(nxt.reshape(B, CV, -1).transpose(1, 2))
        return torch.cat(out, dim=1)


# --------------------------------------------------------------------------- official sizes and names


def _official_keys_d16() -> list[tuple[str, tuple[int, ...]]]:
    """Appendix B of the spec (var_d16.pth, 220 entries) without the buffers lvl_1L, attn_bias_for_masking
    and blocks.{i}.attn.zero_k_bias."""
    C = 1024
    keys = [
        ("pos_start", (1, 1, C)), ("pos_1LC", (1, 680, C)), ("word_embed.weight", (C, 32)), ("word_embed.bias", (C,)),
        ("class_emb.weight", (1001, C)), ("lvl_embed.weight", (10, C)),
    ]
    for i in range(16):
        b = f"blocks.{i}."
        keys += [
            (b + "attn.scale_mul_1H11", (1, 16, 1, 1)), (b + "attn.q_bias", (C,)), (b + "attn.v_bias", (C,)),
            (b + "attn.mat_qkv.weight", (3 * C, C)), (b + "attn.proj.weight", (C, C)), (b + "attn.proj.bias", (C,)),
            (b + "ffn.fc1.weight", (4 * C, C)), (b + "ffn.fc1.bias", (4 * C,)), (b + "ffn.fc2.weight", (C, 4 * C)),
            (b + "ffn.fc2.bias", (C,)), (b + "ada_lin.1.weight", (6 * C, C)), (b + "ada_lin.1.bias", (6 * C,)),
        ]
    keys += [("head_nm.ada_lin.1.weight", (2 * C, C)), ("head_nm.ada_lin.1.bias", (2 * C,)),
             ("head.weight", (4096, C)), ("head.bias", (4096,))]
    return keys


def test_official_d16_state_dict_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = VAR(VARConfig(depth=16))
    got = [(k, tuple(t.shape)) for k, t in model.state_dict().items()]
    assert got == _official_keys_d16()
    assert len(got) == 220 - 2 - 16
    assert list(model.buffers()) == []
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 16


@pytest.mark.parametrize(
    "depth, params", [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360), (30, 2_010_020_356)]
)
def test_official_parameter_counts(depth: int, params: int) -> None:
    with torch.device("meta"):
        model = VAR(VARConfig(depth=depth))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.width == 64 * depth and model.blocks[0].attn.heads == depth
    assert model.blocks[-1].drop_path_rate == pytest.approx(0.1 * depth / 24)
    assert model.blocks[0].drop_path_rate == 0.0


def test_shared_adaln_layout_matches_the_official_512px_d36_count() -> None:
    with torch.device("meta"):
        model = VAR(VARConfig(depth=36, shared_aln=True, patch_nums=[1, 2, 3, 4, 6, 9, 13, 18, 24, 32]))
    assert sum(p.numel() for p in model.parameters()) == 2_353_893_904
    sd = model.state_dict()
    assert sd["shared_ada_lin.1.weight"].shape == (6 * 2304, 2304) and sd["shared_ada_lin.1.bias"].shape == (6 * 2304,)
    assert sd["blocks.0.ada_gss"].shape == (1, 1, 6, 2304) and "blocks.0.ada_lin.1.weight" not in sd


@pytest.mark.parametrize(
    "key, value",
    [("depth", 0), ("vocab_size", -1), ("patch_nums", []), ("patch_nums", [2, 1]), ("mlp_ratio", 0.0),
     ("drop_path_rate", 1.5), ("cond_drop_rate", 2.0), ("attn_impl", "xformers"), ("init_std", 0.0)],
)
def test_config_validation_names_the_key(key: str, value) -> None:
    with pytest.raises(ValueError, match=f"VARConfig.{key}"):
        _tiny(**{key: value})


# --------------------------------------------------------------------------- math


def test_block_head_and_stem_follow_the_spec() -> None:
    """The math of spec sections 3.4-3.9 written out op by op, against the modules."""
    model = _model()
    C, H, c = model.width, 2, 64
    with torch.no_grad():
        model.blocks[1].attn.scale_mul_1H11[0, 0] = 5.0  # above the cap: this head's temperature is 100
    torch.manual_seed(1)
    x, cond = torch.randn(2, 14, C), torch.randn(2, C)
    groups = torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    allowed = groups[None, :] <= groups[:, None]

    def ln(t):
        return F.layer_norm(t, (C,), eps=1e-6)

    def block_ref(blk, x, cond):
        p = dict(blk.named_parameters())
        mod = F.linear(F.silu(cond), p["ada_lin.1.weight"], p["ada_lin.1.bias"]).view(-1, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod.unbind(2)
        y = ln(x) * (1 + scale1) + shift1
        qkv_bias = torch.cat([p["attn.q_bias"], torch.zeros(C), p["attn.v_bias"]])
        q, k, v = F.linear(y, p["attn.mat_qkv.weight"], qkv_bias).view(2, 14, 3, H, c).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * p["attn.scale_mul_1H11"].clamp(max=math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        att = (q @ k.transpose(-1, -2)).masked_fill(~allowed, -math.inf).softmax(-1) @ v  # scale 1
        x = x + F.linear(att.transpose(1, 2).reshape(2, 14, C), p["attn.proj.weight"], p["attn.proj.bias"]) * gamma1
        y = ln(x) * (1 + scale2) + shift2
        h = F.gelu(F.linear(y, p["ffn.fc1.weight"], p["ffn.fc1.bias"]), approximate="tanh")
        return x + F.linear(h, p["ffn.fc2.weight"], p["ffn.fc2.bias"]) * gamma2

    def head_ref(x, cond):
        w, b = model.head_nm.ada_lin[1].weight, model.head_nm.ada_lin[1].bias
        scale, shift = F.linear(F.silu(cond), w, b).view(-1, 1, 2, C).unbind(2)
        return F.linear(ln(x) * (1 + scale) + shift, model.head.weight, model.head.bias)

    # Tolerances a little above float32 rounding: the temperature-100 head amplifies it. A wrong op (chunk order,
    # a missing 1 +, the cap) changes the outputs by O(1).
    tol = {"rtol": 1e-4, "atol": 1e-4}
    with torch.no_grad():
        for blk in model.blocks:
            torch.testing.assert_close(blk(x, cond, model.attn_mask), block_ref(blk, x, cond), **tol)
        torch.testing.assert_close(model._logits(x, cond), head_ref(x, cond), **tol)

        label, x_in = torch.tensor([4, 10]), torch.randn(2, 13, CV)  # 10 = the null class
        cond = model.class_emb(label)
        h = torch.cat([cond[:, None] + model.pos_start, model.word_embed(x_in)], dim=1)
        h = h + (model.lvl_embed(groups)[None] + model.pos_1LC)  # level + position, summed first
        for blk in model.blocks:
            h = block_ref(blk, h, cond)
        torch.testing.assert_close(model(label, x_in), head_ref(h, cond), **tol)


def test_teacher_forcing_equals_kv_cached_generation() -> None:
    model = _model()
    tok = StubTokenizer(PN)
    label = torch.tensor([3, 0, 9])
    f_hat, cached = model.generate(tok, label, cfg=0.0, top_k=1, return_logits=True)
    assert [t.shape for t in cached] == [(3, pn * pn, V) for pn in PN]
    assert f_hat.shape == (3, CV, 3, 3)

    idx_list = [logits.argmax(-1) for logits in cached]  # top_k=1, cfg=0: the greedy choice
    x_BLCv = tok.var_input(idx_list)
    handed = torch.cat([t.reshape(3, CV, -1).transpose(1, 2) for t in tok.handed_out], dim=1)
    torch.testing.assert_close(x_BLCv, handed)  # generation fed the model what teacher forcing would
    logits = model(label, x_BLCv)
    torch.testing.assert_close(logits, torch.cat(cached, dim=1), rtol=1e-5, atol=1e-5)
    assert logits.abs().max() > 1.0  # not a trivially small comparison
    again = model.generate(tok, label, cfg=0.0, top_k=1)
    assert torch.equal(again, f_hat)  # the KV caches live in the call: nothing carries over to the next


def test_label_dropout_only_in_train_mode() -> None:
    model = _model(cond_drop_rate=1.0)
    label, x = torch.tensor([1, 2, 3, 4]), torch.randn(4, 13, CV)
    null = torch.full_like(label, NUM_CLASSES)
    with torch.no_grad():
        eval_logits = model(label, x)
        null_logits = model(null, x)
        assert not torch.allclose(eval_logits, null_logits)
        model.train()  # drop_path_rate is 0, so train mode differs only by the label dropout
        torch.testing.assert_close(model(label, x), null_logits)  # rate 1: every label dropped
        model.cond_drop_rate = 0.5
        torch.manual_seed(0)
        label = torch.arange(32) % NUM_CLASSES
        x = torch.randn(32, 13, CV)
        train_logits = model(label, x)
        model.eval()
        kept = torch.isclose(train_logits, model(label, x)).flatten(1).all(1)
        dropped = torch.isclose(train_logits, model(torch.full_like(label, NUM_CLASSES), x)).flatten(1).all(1)
        assert (kept ^ dropped).all() and 0 < dropped.sum() < 32
        model.cond_drop_rate = 1.0
        torch.testing.assert_close(model(label, x), model(label, x))  # eval: never dropped, deterministic


def test_block_causal_mask_over_scales() -> None:
    model = _model()
    label, x = torch.tensor([1, 7]), torch.randn(2, 13, CV)
    with torch.no_grad():
        base = model(label, x)
        later = x.clone()
        later[:, 4:] += 1.0  # inputs of scale 2 (tokens 5..13)
        out = model(label, later)
        torch.testing.assert_close(out[:, :5], base[:, :5])  # earlier scales do not see it
        assert (out[:, 5:] - base[:, 5:]).abs().amax(-1).min() > 1e-4  # every token of scale 2 does
        earlier = x.clone()
        earlier[:, 0] += 1.0  # one input of scale 1 (token 1)
        out = model(label, earlier)
        torch.testing.assert_close(out[:, :1], base[:, :1])
        assert (out[:, 1:] - base[:, 1:]).abs().amax(-1).min() > 1e-4  # its whole scale and all later ones


def test_progressive_truncation_is_the_prefix() -> None:
    model = _model()
    label, x = torch.tensor([1, 7]), torch.randn(2, 13, CV)
    with torch.no_grad():
        full = model(label, x)
        torch.testing.assert_close(model(label, x, prog_si=1), full[:, :5])
        torch.testing.assert_close(model(label, x[:, :4], prog_si=1), full[:, :5])
        torch.testing.assert_close(model(label, None, prog_si=0), full[:, :1])
    model.train()
    model(label, None, prog_si=0).sum().backward()  # word_embed still gets a (zero) gradient, for DDP
    assert model.word_embed.weight.grad is not None and model.word_embed.weight.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="x_BLCv"):
        model(label, x[:, :3], prog_si=1)


@requires_flex
def test_sdpa_and_flex_give_the_same_logits() -> None:
    sdpa = _model(attn_impl="sdpa")
    flex = VAR(_tiny(attn_impl="flex")).eval()
    flex.load_state_dict(sdpa.state_dict())
    label, x = torch.tensor([1, 7]), torch.randn(2, 13, CV)
    with torch.no_grad():
        torch.testing.assert_close(flex(label, x), sdpa(label, x), rtol=1e-5, atol=1e-5)


def test_generation_with_guidance_and_sampling_is_reproducible() -> None:
    model = _model()
    tok = StubTokenizer(PN)
    label = torch.tensor([2, 5])

    def run(seed: int, **kw) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(tok, label, cfg=2.0, top_k=20, top_p=0.9, generator=gen, **kw)

    a, b, c = run(0), run(0), run(1)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    smooth = run(0, more_smooth=True)
    assert smooth.shape == a.shape and torch.isfinite(smooth).all() and not torch.equal(smooth, a)


# --------------------------------------------------------------------------- sampling semantics


def test_top_k_one_is_argmax_whatever_the_rng() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    for seed in range(3):
        idx = sample_top_k_top_p(logits, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert idx.shape == (2, 5, 1) and torch.equal(idx[..., 0], logits.argmax(-1))


def test_top_k_keeps_ties_with_the_kth_value() -> None:
    logits = torch.tensor([[[5.0, 3.0, 3.0, 1.0, 0.0]]])
    kept = torch.isfinite(top_k_top_p_filter(logits, top_k=2))
    assert kept[0, 0].tolist() == [True, True, True, False, False]
    assert torch.isfinite(top_k_top_p_filter(logits, top_k=100)).all()  # k > V keeps all
    assert torch.equal(top_k_top_p_filter(logits), logits)  # 0, 0: no filtering


def test_top_p_keeps_the_smallest_set_with_enough_mass_and_always_the_largest() -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().view(1, 1, 4)

    def kept(p: float) -> list[bool]:
        return torch.isfinite(top_k_top_p_filter(logits, top_p=p))[0, 0].tolist()

    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 = 0.8 >= 0.7
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone is enough
    assert kept(0.01) == [False, True, False, False]
    assert kept(1e-9) == [False, True, False, False]  # all mass is <= 1 - p (in float32): the largest still stays
    assert kept(0.9) == [True, True, False, True]  # 0.95 >= 0.9
    assert kept(0.99) == [True, True, True, True]
    idx = sample_top_k_top_p(logits, top_p=0.7, num_samples=2000, generator=torch.Generator().manual_seed(0))
    assert set(idx.unique().tolist()) == {1, 3}
    # top-k first, then top-p on what is left
    assert torch.isfinite(top_k_top_p_filter(logits, top_k=3, top_p=0.99))[0, 0].tolist() == [True, True, False, True]


# --------------------------------------------------------------------------- initialisation


def test_init_weights_scales() -> None:
    torch.manual_seed(0)
    model = VAR(_tiny(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02))
    C, depth = model.width, model.depth
    std = math.sqrt(1 / (3 * C))

    def close(t: torch.Tensor, want: float) -> None:
        assert t.std().item() == pytest.approx(want, rel=0.1)

    for block in model.blocks:
        w = block.ada_lin[1].weight
        close(w[: 2 * C], std * 1e-3)  # gamma1, gamma2
        close(w[2 * C:], std * 0.5)  # scale, shift
        assert block.ada_lin[1].bias.abs().sum() == 0
        close(block.attn.proj.weight, std / math.sqrt(2 * depth))
        close(block.ffn.fc2.weight, std / math.sqrt(2 * depth))
        close(block.ffn.fc1.weight, std)
        close(block.attn.mat_qkv.weight, std)
        assert block.ffn.fc1.bias.abs().sum() == 0 and block.attn.proj.bias.abs().sum() == 0
        assert torch.allclose(block.attn.scale_mul_1H11, torch.full((1, 2, 1, 1), math.log(4)))
        assert block.attn.q_bias.abs().sum() == 0 and block.attn.v_bias.abs().sum() == 0
    close(model.head.weight, std * 0.02)
    assert model.head.bias.abs().sum() == 0
    close(model.head_nm.ada_lin[1].weight, std * 0.5)
    close(model.class_emb.weight, std)
    close(model.pos_1LC, std)
    # a fresh model starts near identity blocks: no gate weight beyond 6 sigma of init_adaln_gamma * std
    assert model.blocks[0].ada_lin[1].weight[: 2 * C].abs().max() < 6 * std * 1e-3

    model = VAR(_tiny(init_std=0.01))
    close(model.blocks[0].ffn.fc1.weight, 0.01)


def test_stochastic_depth_drops_whole_branches_and_per_block_compile_builds_one_graph() -> None:
    """Every block has its own drop-path rate; the rates reach the blocks as tensors, so compiling each block
    (train.compile=blocks) traces one graph for all of them -- a Python float per block would make one each."""
    from torch._dynamo.testing import CompileCounter

    model = _model(depth=6, drop_path_rate=0.5).train()
    assert len({block.drop_path_rate for block in model.blocks}) == 6
    label_B, x_BLCv = torch.arange(4), torch.randn(4, 13, CV)
    torch.manual_seed(0)
    eager = model(label_B, x_BLCv)
    counter = CompileCounter()
    torch._dynamo.reset()
    for block in model.blocks:
        block.compile(backend=counter)
    torch.manual_seed(0)
    compiled = model(label_B, x_BLCv)
    torch.testing.assert_close(compiled, eager)  # the same random drops, the same math
    assert counter.frame_count <= 2  # block 0 (rate 0: no scales) and the rest
    torch.manual_seed(1)
    assert not torch.allclose(model(label_B, x_BLCv), eager)  # other drops: the branches are really dropped


def test_sampling_compiles_three_block_graphs_for_every_scale_and_batch() -> None:
    """`vistrain sample` on CUDA compiles each block with dynamic shapes: the token count changes from scale to
    scale and the KV cache grows, yet the blocks need three graphs (the first scale without a cache, the second
    with a one-token cache, then every other), whatever the batch; and they sample what the eager blocks do."""
    from torch._dynamo.testing import CompileCounter

    from vistrain.models.vqvae import VQVAE, VQVAEConfig
    from vistrain.tasks.var import compile_for_sampling, generate_images

    pn = [1, 2, 3, 4, 5, 6]
    torch.manual_seed(0)
    var = VAR(VARConfig(depth=2, num_classes=10, vocab_size=64, z_channels=8, patch_nums=pn)).eval()
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                            patch_nums=pn)).eval()
    kw = dict(cfg=1.5, top_k=5, top_p=0.9)
    eager = generate_images(var, vae, torch.arange(4), generator=torch.Generator().manual_seed(0), **kw)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        compile_for_sampling(var, vae, backend=counter)
        compiled = generate_images(var, vae, torch.arange(4), generator=torch.Generator().manual_seed(0), **kw)
        generate_images(var, vae, torch.arange(7), **kw)
        assert counter.frame_count == 3 + 2  # and the decoder: one graph per batch size, here two
    finally:
        torch._dynamo.reset()
    assert torch.equal(compiled, eager)

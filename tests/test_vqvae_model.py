"""VAR's multi-scale residual VQ-VAE: official layout and numbers, quantizer semantics, training."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from support import var_vae_golden as golden
from vistrain.models.vqvae import (
    VQVAE,
    Downsample2x,
    MultiScaleQuantizer,
    Upsample2x,
    VQVAEConfig,
    phi_indices,
)

DATA = Path(__file__).resolve().parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_cfg(**kw) -> VQVAEConfig:
    """16 px images, 4 x 4 latent, three scales: a model that trains in seconds on a CPU."""
    base = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, in_channels=3,
                patch_nums=[1, 2, 4])
    return VQVAEConfig(**{**base, **kw})


def _official_to_ours(key: str) -> str:
    return re.sub(r"^quantize\.quant_resi\.qresi_ls\.", "quantize.phi.", key)


# --------------------------------------------------------------------------- official layout


def test_state_dict_has_the_official_keys_shapes_and_parameter_count() -> None:
    with torch.device("meta"):
        vae = VQVAE(VQVAEConfig())
    expected = []
    for line in (DATA / "var_vae_state_dict.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, kind = line.split()
        if key == "quantize.ema_vocab_hit_SV":  # usage statistics of the original's DDP training: not kept
            assert kind == "buffer"
            continue
        expected.append((_official_to_ours(key), tuple(int(s) for s in shape.split("x"))))
    assert len(expected) == 323
    got = [(k, tuple(v.shape)) for k, v in vae.state_dict().items()]
    assert got == expected  # same names, shapes and even order
    assert not list(vae.buffers())

    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(vae) == 108_948_355
    assert (count(vae.encoder), count(vae.decoder), count(vae.quantize)) == (44_107_872, 64_653_923, 168_064)
    assert vae.resolution == 256 and vae.downsample_factor == 16


def test_phi_selection_follows_the_tick_rule() -> None:
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # the official map (K == 4: ticks at 1/(3K))
    assert phi_indices(6, 4) == [0, 0, 1, 2, 3, 3]
    assert phi_indices(10, 2) == [0] * 5 + [1] * 5  # other K: ticks at 1/(2K), 1 - 1/(2K)
    assert phi_indices(10, 1) == [0] * 10
    assert phi_indices(10, 0) == list(range(10))  # one per scale
    q = MultiScaleQuantizer(16, 4, [1, 2, 3, 4, 5, 6, 8, 10, 13, 16], share_quant_resi=4)
    assert len(q.phi) == 4
    assert [next(k for k, m in enumerate(q.phi) if m is q.phi_at(si)) for si in range(10)] == phi_indices(10, 4)
    assert len(MultiScaleQuantizer(16, 4, [1, 2, 4], share_quant_resi=0).phi) == 3
    ident = MultiScaleQuantizer(16, 4, [1, 2, 4], quant_resi=0.0)
    x = torch.randn(1, 4, 4, 4)
    assert torch.equal(ident.phi_at(1)(x), x) and not list(ident.phi.parameters())


def test_matches_the_official_model_on_the_same_weights() -> None:
    """Golden outputs of the original code (tests/support/var_vae_golden.py) on seeded weights."""
    ref = load_file(str(golden.GOLDEN))
    cfg = VQVAEConfig(**golden.SMALL)
    vae = VQVAE(cfg, resolution=golden.RESOLUTION)
    shapes = {re.sub(r"^quantize\.phi\.", "quantize.quant_resi.qresi_ls.", k): tuple(v.shape)
              for k, v in vae.state_dict().items()}
    vae.load_state_dict({_official_to_ours(k): v for k, v in golden.official_weights(shapes).items()})
    vae.eval()
    img = golden.images()
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        f = vae.encode(img)
        torch.testing.assert_close(f, ref["f"], **close)
        idx, fhats = vae.quantize.f_to_idx_and_fhats(f)
        for si in range(len(cfg.patch_nums)):
            assert torch.equal(idx[si], ref[f"idx.{si}"]), f"scale {si} codes differ from the official ones"
            torch.testing.assert_close(fhats[si], ref[f"fhat.{si}"], **close)
        torch.testing.assert_close(vae.quantize.idx_to_var_input(idx), ref["var_input"], **close)
        torch.testing.assert_close(golden.subsample(vae.idx_to_img(idx)), ref["idx_to_img"], **close)
    vae.train()
    recon, vq_loss, _ = vae(img)
    ((recon - img).square().mean() + vq_loss).backward()
    torch.testing.assert_close(golden.subsample(recon.detach()), ref["train.recon"], **close)
    torch.testing.assert_close(vq_loss.detach().reshape(1), ref["train.vq_loss"], **close)
    params = dict(vae.named_parameters())
    for key in golden.GRAD_KEYS:
        torch.testing.assert_close(params[_official_to_ours(key)].grad, ref[f"grad.{key}"], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- quantizer semantics

PNS = [1, 2, 3, 4, 6, 8]  # 8 -> 3 and 8 -> 6 area windows overlap; the 4 phi serve [0, 0, 1, 2, 3, 3]


def _quantizer(seed: int = 0, V: int = 32, C: int = 4) -> MultiScaleQuantizer:
    torch.manual_seed(seed)
    q = MultiScaleQuantizer(V, C, PNS, beta=0.25, quant_resi=0.5, share_quant_resi=4)
    with torch.no_grad():
        q.embedding.weight.normal_(0.0, 0.7)  # codes on the latent's scale, so every scale picks varied codes
    return q


def _reference_quantize(q: MultiScaleQuantizer, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The algorithm as the paper states it, written independently (broadcast distances, pooling)."""
    E = q.embedding.weight.detach()
    H = f.shape[-1]
    phis = [q.phi[k] for k in (0, 0, 1, 2, 3, 3)]
    f_hat = torch.zeros_like(f)
    idx_list, fhats = [], []
    for si, pn in enumerate(PNS):
        rest = f - f_hat
        z = F.adaptive_avg_pool2d(rest, pn) if pn != H else rest
        d = (z.permute(0, 2, 3, 1)[..., None, :] - E).square().sum(-1)  # (B, pn, pn, V)
        idx = d.flatten(1, 2).argmin(-1)  # (B, pn*pn), row-major
        codes = E[idx].reshape(f.shape[0], pn, pn, -1).permute(0, 3, 1, 2)
        up = F.interpolate(codes, size=(H, H), mode="bicubic", align_corners=False) if pn != H else codes
        f_hat = f_hat + phis[si](up)  # phi after the upsampling
        idx_list.append(idx)
        fhats.append(f_hat)
    return idx_list, fhats


def test_f_to_idx_is_nearest_code_on_the_residual_of_each_scale() -> None:
    q = _quantizer()
    f = torch.randn(3, 4, 8, 8)
    f_before = f.clone()
    with torch.no_grad():
        idx, fhats = q.f_to_idx_and_fhats(f)
        ref_idx, ref_fhats = _reference_quantize(q, f)
    assert torch.equal(f, f_before)  # the input is not touched
    assert [tuple(i.shape) for i in idx] == [(3, pn * pn) for pn in PNS] and idx[0].dtype == torch.int64
    for si in range(len(PNS)):
        assert torch.equal(idx[si], ref_idx[si]), f"scale {si}"
        torch.testing.assert_close(fhats[si], ref_fhats[si])
    assert all(len(torch.unique(i)) > 1 for i in idx[2:])  # a meaningful test: varied codes
    assert [torch.equal(a, b) for a, b in zip(q.f_to_idx(f), idx)] == [True] * len(PNS)

    with torch.no_grad():
        # idx_to_fhat rebuilds exactly what f_to_idx accumulated, and each prefix of scales its partial sum.
        torch.testing.assert_close(q.idx_to_fhat(idx), fhats[-1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q.idx_to_fhat(idx[:3]), fhats[2], rtol=1e-6, atol=1e-6)
        # The last scale: nearest code per latent cell of f - f_hat(before), no resizing, then phi.
        E = q.embedding.weight
        rest = (f - fhats[-2]).permute(0, 2, 3, 1).reshape(3, 64, 1, 4)
        assert torch.equal(idx[-1], (rest - E).square().sum(-1).argmin(-1))
        codes = E[idx[-1]].reshape(3, 8, 8, 4).permute(0, 3, 1, 2)
        torch.testing.assert_close(fhats[-1] - fhats[-2], q.phi[3](codes), rtol=1e-5, atol=1e-5)


def test_the_scales_explain_f_and_the_last_one_never_adds_error() -> None:
    """A sign or order slip in the residual update shows here: the error would grow, not shrink."""
    torch.manual_seed(1)
    q = MultiScaleQuantizer(512, 4, PNS, quant_resi=0.0, share_quant_resi=4)  # phi = identity: a pure residual VQ
    with torch.no_grad():
        q.embedding.weight.normal_(0.0, 0.5)
        q.embedding.weight[0].zero_()  # the zero code: a scale can always leave the residual as it is
        f = torch.randn(2, 4, 8, 8) * 0.5
        _, fhats = q.f_to_idx_and_fhats(f)
    errors = [(f - fh).square().mean().item() for fh in fhats]
    assert errors[-1] < 0.5 * f.square().mean().item()
    # The last scale picks per cell the nearest code to the residual, the zero code included: never worse.
    assert errors[-1] <= errors[-2] + 1e-7


def test_var_input_is_the_area_downsampled_cumulative_fhat_of_the_next_scale() -> None:
    q = _quantizer(seed=2)
    f = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        idx, fhats = q.f_to_idx_and_fhats(f)
        var_in = q.idx_to_var_input(idx)
        pieces = [F.adaptive_avg_pool2d(fhats[si], PNS[si + 1]).flatten(2).transpose(1, 2)
                  for si in range(len(PNS) - 1)]
        expected = torch.cat(pieces, dim=1)
    L = sum(pn * pn for pn in PNS)
    assert var_in.shape == (2, L - 1, 4) and var_in.dtype == torch.float32
    torch.testing.assert_close(var_in, expected, rtol=1e-5, atol=1e-5)
    # Row-major within a scale: token (r, c) of scale 1 (2 x 2) is the mean of that 4 x 4 quadrant of f_hat.
    torch.testing.assert_close(var_in[:, 1, :], fhats[0][:, :, 0:4, 4:8].mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    # The codes of the last scale are not needed.
    assert torch.equal(q.idx_to_var_input(idx[:-1]), var_in)


def test_next_input_steps_rebuild_the_fhat_and_the_var_input() -> None:
    q = _quantizer(seed=3)
    with torch.no_grad():
        idx, fhats = q.f_to_idx_and_fhats(torch.randn(2, 4, 8, 8))
        var_in = q.idx_to_var_input(idx)
        f_hat, nexts = None, []
        for si in range(len(PNS)):
            before = None if f_hat is None else f_hat.clone()
            new_f_hat, nxt = q.next_input(si, f_hat, q.idx_to_codes(idx[si], si))
            if before is not None:
                assert torch.equal(f_hat, before)  # the caller's f_hat is left alone
            torch.testing.assert_close(new_f_hat, fhats[si], rtol=1e-5, atol=1e-5)
            f_hat = new_f_hat
            if si < len(PNS) - 1:
                assert nxt.shape == (2, 4, PNS[si + 1], PNS[si + 1])
                nexts.append(nxt.flatten(2).transpose(1, 2))
            else:
                assert nxt is new_f_hat  # after the last scale the "next input" is f_hat itself
    torch.testing.assert_close(torch.cat(nexts, dim=1), var_in)
    torch.testing.assert_close(f_hat, q.idx_to_fhat(idx))


# --------------------------------------------------------------------------- training forward


def test_training_quantizer_straight_through_and_loss_gradients() -> None:
    q = _quantizer(seed=4)
    f = torch.randn(2, 4, 8, 8, requires_grad=True)
    f_hat_st, vq_loss, idx = q(f)
    with torch.no_grad():
        ref_idx, fhats = q.f_to_idx_and_fhats(f)
    assert all(torch.equal(a, b) for a, b in zip(idx, ref_idx))
    torch.testing.assert_close(f_hat_st, fhats[-1])  # numerically the quantized latent
    # Both terms equal mse(f_hat_si, f) in value: vq_loss = (1 + beta) * mean over scales.
    expected = sum(F.mse_loss(fh, f.detach()) for fh in fhats) * (1.25 / len(PNS))
    torch.testing.assert_close(vq_loss, expected)

    # Straight-through: the decoder's gradient reaches f unchanged, and nothing reaches the codebook that way.
    w = torch.randn_like(f)
    (g_st,) = torch.autograd.grad((f_hat_st * w).sum(), f, retain_graph=True)
    torch.testing.assert_close(g_st, w)
    # vq_loss: f only gets the commitment term beta * d mse(f_hat_si.detach(), f) / df, averaged over scales ...
    g_f, g_E, g_phi0, g_phi3 = torch.autograd.grad(vq_loss, [f, q.embedding.weight, q.phi[0].weight, q.phi[3].bias])
    expected_g = sum(2 * (f.detach() - fh) / f.numel() for fh in fhats) * (0.25 / len(PNS))
    torch.testing.assert_close(g_f, expected_g)
    # ... and the codebook term trains the codes that were used (only those) and every phi.
    used = torch.unique(torch.cat([i.flatten() for i in idx]))
    row_has_grad = g_E.abs().sum(1) > 0
    assert row_has_grad[used].all() and not row_has_grad[~torch.isin(torch.arange(q.vocab_size), used)].any()
    assert g_phi0.abs().sum() > 0 and g_phi3.abs().sum() > 0


def test_quantizer_runs_in_fp32_under_autocast() -> None:
    q = _quantizer(seed=5)
    f = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        plain = q(f)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = q(f.bfloat16())
            idx_auto = q.f_to_idx(f)
    assert auto[0].dtype == torch.float32 and auto[1].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(idx_auto, plain[2]))
    # bf16 input rounding moves f slightly, but the codes of this well-spread codebook stay put on most cells.
    same = torch.cat([(a == b).flatten() for a, b in zip(auto[2], plain[2])]).float().mean()
    assert same > 0.9


def test_vqvae_forward_gradients_reach_every_part() -> None:
    torch.manual_seed(0)
    vae = VQVAE(_tiny_cfg(), resolution=16)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, vq_loss, idx = vae(img)
    assert recon.shape == img.shape and [tuple(i.shape) for i in idx] == [(2, 1), (2, 4), (2, 16)]
    ((recon - img).square().mean() + vq_loss).backward()
    for name in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight",
                 "quantize.embedding.weight", "quantize.phi.0.weight", "quantize.phi.2.weight",
                 "post_quant_conv.weight", "decoder.up.0.block.0.conv1.weight", "decoder.conv_out.weight"):
        grad = vae.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert vae.last_layer is vae.decoder.conv_out.weight


def test_a_few_adam_steps_reduce_the_training_loss() -> None:
    torch.manual_seed(0)
    vae = VQVAE(_tiny_cfg(ch_mult=[1, 1, 1]), resolution=16)
    # Fixed batch of simple images: a bright disc of varying size and position on a dark background.
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    discs = [((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).float() for cy, cx, r in
             [(5, 5, 3), (10, 8, 4), (8, 11, 3), (4, 12, 2), (11, 4, 5), (8, 8, 6), (12, 12, 3), (6, 9, 4)]]
    img = (torch.stack(discs)[:, None].expand(-1, 3, -1, -1) * 2 - 1).contiguous()
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def step() -> float:
        recon, vq_loss, _ = vae(img)
        loss = (recon - img).square().mean() + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    # Not monotone: vq_loss first grows while the latents outgrow the small initial codes. Seeds 0-3 end
    # near 0.4 of the first loss.
    losses = [step() for _ in range(40)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0], losses


# --------------------------------------------------------------------------- encoder / decoder structure


def test_resampling_shapes_and_asymmetric_padding() -> None:
    down, up = Downsample2x(2), Upsample2x(2)
    x = torch.randn(1, 2, 8, 8)
    assert down(x).shape == (1, 2, 4, 4) and down(torch.randn(1, 2, 257, 257)).shape == (1, 2, 128, 128)
    assert up(x).shape == (1, 2, 16, 16)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0  # centre tap: reads x at (2i+1, 2j+1) after padding only at the end
        assert torch.equal(down(x)[0, 0], x[0, 0, 1::2, 1::2])
        down.conv.weight[0, 0, 1, 1] = 0.0
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap: the last output reads the zero padding
        out = down(x)[0, 0]
        assert torch.equal(out[:3, :3], x[0, 0, 2::2, 2::2][:3, :3]) and out[3, 3] == 0 and out[3, 0] == 0
        up.conv.weight.zero_()
        up.conv.bias.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0
        assert torch.equal(up(x)[0, 0], x[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))  # nearest


@pytest.mark.parametrize("p", (3, 5))
def test_encoder_divides_the_size_by_2_pow_levels_minus_one(p: int) -> None:
    torch.manual_seed(0)
    vae = VQVAE(_tiny_cfg(patch_nums=[1, p]))
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(torch.randn(1, 3, 4 * p, 4 * p)))
        assert f.shape == (1, 8, p, p)
        assert vae.decode(f).shape == (1, 3, 4 * p, 4 * p)
        idx = vae.img_to_idx(torch.rand(2, 3, 4 * p, 4 * p) * 2 - 1)
        img = vae.idx_to_img(idx)
    assert img.shape == (2, 3, 4 * p, 4 * p) and img.abs().max() <= 1.0


def test_structure_follows_the_config() -> None:
    vae = VQVAE(_tiny_cfg(num_res_blocks=2))
    assert [len(level.block) for level in vae.encoder.down] == [2, 2, 2]
    assert [len(level.block) for level in vae.decoder.up] == [3, 3, 3]  # one more block in the decoder
    assert [len(level.attn) for level in vae.encoder.down] == [0, 0, 2]  # attention at the lowest resolution
    assert [len(level.attn) for level in vae.decoder.up] == [0, 0, 3]
    assert [hasattr(level, "downsample") for level in vae.encoder.down] == [True, True, False]
    assert [hasattr(level, "upsample") for level in vae.decoder.up] == [False, True, True]
    assert not hasattr(vae.decoder.up[1].block[0].nin_shortcut, "weight")  # 64 -> 64: identity shortcut
    assert vae.decoder.up[0].block[0].nin_shortcut.weight.shape == (32, 64, 1, 1)  # 64 -> 32 channels
    plain = VQVAE(_tiny_cfg(attn=False, mid_attn=False))
    assert not any(".attn" in k for k in plain.state_dict())
    assert plain(torch.rand(1, 3, 16, 16) * 2 - 1)[0].shape == (1, 3, 16, 16)


def test_blocks_are_the_levels_and_work_under_activation_checkpointing() -> None:
    torch.manual_seed(0)
    vae = VQVAE(_tiny_cfg())
    blocks = vae.blocks
    assert isinstance(blocks, list) and len(blocks) == 3 + 1 + 1 + 3
    assert blocks[:3] == list(vae.encoder.down) and blocks[-3:] == list(vae.decoder.up)[::-1]
    assert blocks[3] is vae.encoder.mid and blocks[4] is vae.decoder.mid
    # Every parameter of encoder and decoder lives in a block, but for the in/out convs and norms.
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = [n for n, p in vae.named_parameters() if id(p) not in in_blocks and n.startswith(("encoder", "decoder"))]
    assert sorted(outside) == sorted(f"{c}.{m}.{w}" for c in ("encoder", "decoder")
                                     for m in ("conv_in", "norm_out", "conv_out") for w in ("weight", "bias"))
    # A level is a called module: activation checkpointing wraps it and gives the same loss and gradients.
    from torch.distributed._composable import checkpoint

    ckpt = copy.deepcopy(vae)
    for block in ckpt.blocks:
        checkpoint(block)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    grads = []
    for model in (vae, ckpt):
        recon, vq_loss, _ = model(img)
        ((recon - img).square().mean() + vq_loss).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)
    assert list(ckpt.state_dict()) == list(vae.state_dict())


def test_bad_configs_and_inputs_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"vqvae\.ch must be a positive multiple of 32"):
        VQVAE(_tiny_cfg(ch=48))
    with pytest.raises(ValueError, match=r"vqvae\.patch_nums must be strictly increasing"):
        VQVAE(_tiny_cfg(patch_nums=[1, 3, 2]))
    with pytest.raises(ValueError, match=r"vqvae\.ch_mult"):
        VQVAE(_tiny_cfg(ch_mult=[]))
    with pytest.raises(ValueError, match=r"vqvae\.patch_nums ends at 4, but 32 px images give a 8 x 8 latent"):
        VQVAE(_tiny_cfg(), resolution=32)
    with pytest.raises(ValueError, match=r"vqvae\.quant_resi"):
        VQVAE(_tiny_cfg(quant_resi=1.5))
    vae = VQVAE(_tiny_cfg())
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 16, 16\]"):
        vae(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"scale 1 indices must have shape \[2, 4\]"):
        vae.idx_to_img([torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)])

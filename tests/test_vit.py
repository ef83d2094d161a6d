"""The SigLIP-style vision transformer (models/vit.py) and its import from Hugging Face checkpoints
(interop/hf.py), checked against transformers itself.

Checkpoints are made here: tiny, seeded SiglipVisionModel / SiglipModel instances written with
save_pretrained, so the files have exactly the names and layout transformers writes. Their weights are
perturbed away from the initialisation (LayerNorms at 1 / 0 and zero biases would hide a swapped key).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vistrain.interop.hf import (
    ViTImportError,
    load_vit_from_hf,
    vit_config_from_hf,
    vit_config_to_hf,
    vit_state_dict_from_hf,
    vit_state_dict_to_hf,
)
from vistrain.models.vit import VisionTransformer, ViTConfig

transformers = pytest.importorskip("transformers")

CLOSE = dict(rtol=0.0, atol=1e-5)  # float32 rounding of a different but equivalent op order
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _hf_vision(seed: int = 0, **overrides) -> transformers.SiglipVisionModel:
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**{**TINY, **overrides}))
    _perturb(model, seed + 1)
    return model.eval()


def _pixels(batch: int = 2, size: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory) -> tuple[Path, transformers.SiglipVisionModel]:
    folder = tmp_path_factory.mktemp("siglip_vision")
    hf = _hf_vision()
    hf.save_pretrained(folder)
    return folder, hf


# ---------------------------------------------------------------------------------------------------
# parity with transformers


def test_vision_model_checkpoint_matches_transformers(vision_folder):
    folder, hf = vision_folder
    cfg, vit = load_vit_from_hf(folder)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.image_size, cfg.patch_size) == (32, 2, 4, 32, 8)
    assert cfg.image_mean == cfg.image_std == [0.5, 0.5, 0.5]  # no preprocessor_config.json: SigLIP's
    assert vit.num_patches == 16 and all(p.dtype == torch.float32 for p in vit.parameters())
    assert all(p.requires_grad for p in vit.parameters())
    x = _pixels()
    with torch.no_grad():
        ours = vit(x)
        theirs = hf(pixel_values=x).last_hidden_state
    assert ours.shape == (2, 16, 32)
    torch.testing.assert_close(ours, theirs, **CLOSE)
    # transformers 5 defaults to SDPA; the explicit softmax path must agree as well.
    eager = transformers.SiglipVisionModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, eager(pixel_values=x).last_hidden_state, **CLOSE)


def test_full_siglip_model_checkpoint_imports_the_vision_tower(tmp_path):
    torch.manual_seed(5)
    config = transformers.SiglipConfig(
        vision_config=TINY,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, max_position_embeddings=16, bos_token_id=1, eos_token_id=2),
    )
    hf = transformers.SiglipModel(config)
    _perturb(hf, 6)
    hf.eval().save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "vision_model.embeddings.patch_embedding.weight" in keys and any(k.startswith("text_model.") for k in keys)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}
    ))
    cfg, vit = load_vit_from_hf(tmp_path)
    assert cfg.image_mean == [0.4, 0.5, 0.6] and cfg.image_std == [0.2, 0.3, 0.4]
    x = _pixels(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf.vision_model(pixel_values=x).last_hidden_state, **CLOSE)


def test_export_loads_into_transformers(tmp_path):
    """vistrain -> transformers: our random model, exported, gives the same features in SiglipVisionModel."""
    torch.manual_seed(8)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4)
    vit = VisionTransformer(cfg).eval()
    _perturb(vit, 9)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vit_config_to_hf(cfg))).eval()
    hf.load_state_dict(vit_state_dict_to_hf(vit.state_dict()), strict=True)
    assert vit_config_from_hf(hf.config.to_dict()) == cfg
    x = _pixels(seed=10)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(pixel_values=x).last_hidden_state, **CLOSE)


# ---------------------------------------------------------------------------------------------------
# key map and config


@pytest.mark.parametrize("prefix", ["", "vision_model.", "model.vision_tower.vision_model."])
def test_key_map_round_trips(vision_folder, prefix):
    hf_state = {k: v for k, v in load_file(vision_folder[0] / "model.safetensors").items()
                if not k.startswith("head.")}
    ours = vit_state_dict_from_hf(hf_state)
    assert set(ours) == set(VisionTransformer(vit_config_from_hf(vision_folder[1].config.to_dict())).state_dict())
    prefixed = vit_state_dict_to_hf(ours, prefix=prefix)
    assert set(prefixed) == {prefix + k for k in hf_state}
    # Text tower, logit scale and pooling head under any prefix are dropped; the tensors are the same objects.
    extra = {"text_model.embeddings.token_embedding.weight": torch.zeros(1), "logit_scale": torch.zeros(1),
             f"{prefix}head.probe": torch.zeros(1), f"{prefix}embeddings.position_ids": torch.zeros(1)}
    back = vit_state_dict_from_hf({**prefixed, **extra})
    assert set(back) == set(ours) and all(back[k] is ours[k] for k in ours)


def test_config_from_full_and_sparse_configs():
    # A full SiglipConfig dict: the vision section is read, the text section ignored.
    full = {"model_type": "siglip", "text_config": {"hidden_size": 8},
            "vision_config": {"model_type": "siglip_vision_model", **TINY}}
    cfg = vit_config_from_hf(full)
    assert (cfg.hidden_size, cfg.num_layers, cfg.image_size, cfg.layer_norm_eps) == (32, 2, 32, 1e-6)
    # transformers 4 wrote only non-default values: the rest are SiglipVisionConfig's defaults (224 px, base).
    cfg = vit_config_from_hf({"model_type": "siglip", "vision_config": {"image_size": 512}})
    assert (cfg.image_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size) == (
        512, 768, 12, 12, 3072)
    assert vit_config_from_hf({"model_type": "siglip_vision_model"}).image_size == 224
    cfg = vit_config_from_hf({**TINY}, {"do_normalize": False})
    assert cfg.image_mean == [0.0] * 3 and cfg.image_std == [1.0] * 3
    with pytest.raises(ViTImportError, match="siglip2"):
        vit_config_from_hf({"model_type": "siglip2", "vision_config": {}})
    with pytest.raises(ViTImportError, match="hidden_act"):
        vit_config_from_hf({**TINY, "hidden_act": "relu"})
    with pytest.raises(ViTImportError, match="vision_config.model_type"):
        vit_config_from_hf({"model_type": "siglip", "vision_config": {"model_type": "clip_vision_model"}})


@pytest.mark.parametrize(("changes", "key"), [
    (dict(image_size=30, patch_size=8), "image_size"),
    (dict(hidden_size=30, num_heads=4), "hidden_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(image_std=[0.5, 0.0, 0.5]), "image_std"),
    (dict(image_mean=[0.5, 0.5]), "image_mean"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    (dict(attn_impl="xformers"), "attn_impl"),
])
def test_config_errors_name_the_key(changes, key):
    with pytest.raises(ValueError, match=rf"ViTConfig\.{key} "):
        ViTConfig(**changes)


def test_forward_rejects_other_resolutions():
    vit = VisionTransformer(ViTConfig(image_size=16, patch_size=8, hidden_size=8, intermediate_size=16,
                                      num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        vit(torch.zeros(1, 3, 24, 24))


# ---------------------------------------------------------------------------------------------------
# errors


def test_folder_without_weights(tmp_path, vision_folder):
    (tmp_path / "config.json").write_text((vision_folder[0] / "config.json").read_text())
    with pytest.raises(ViTImportError, match=rf"{tmp_path}.*no weights.*model\.safetensors"):
        load_vit_from_hf(tmp_path)
    with pytest.raises(ViTImportError, match=rf"{tmp_path / 'absent'}: no such folder"):
        load_vit_from_hf(tmp_path / "absent")


def test_missing_or_misshapen_key_is_named(tmp_path, vision_folder):
    (tmp_path / "config.json").write_text((vision_folder[0] / "config.json").read_text())
    state = load_file(vision_folder[0] / "model.safetensors")
    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(ViTImportError, match=rf"{tmp_path}: key 'encoder\.layers\.1\.mlp\.fc2\.bias' is missing"):
        load_vit_from_hf(tmp_path)
    save_file({**state, "encoder.layers.1.mlp.fc2.bias": torch.zeros(7)}, tmp_path / "model.safetensors")
    with pytest.raises(ViTImportError, match=r"'encoder\.layers\.1\.mlp\.fc2\.bias' has shape \[7\]"):
        load_vit_from_hf(tmp_path)
    save_file({**state, "encoder.layers.2.mlp.fc2.bias": torch.zeros(32)}, tmp_path / "model.safetensors")
    with pytest.raises(ViTImportError, match=r"unexpected key 'encoder\.layers\.2\.mlp\.fc2\.bias'"):
        load_vit_from_hf(tmp_path)
    with pytest.raises(ViTImportError, match=r"'vision_model\.embeddings\.patch_embedding\.weight'\) is missing"):
        vit_state_dict_from_hf({"text_model.embeddings.token_embedding.weight": torch.zeros(1)})


def test_pytorch_model_bin_is_read(tmp_path, vision_folder):
    (tmp_path / "config.json").write_text((vision_folder[0] / "config.json").read_text())
    state = load_file(vision_folder[0] / "model.safetensors")
    torch.save({f"vision_model.{k}": v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "pytorch_model.bin")
    _, vit = load_vit_from_hf(tmp_path)  # transformers 4's SiglipVisionModel layout, in bf16
    assert vit.pos_embed_ND.dtype == torch.float32
    torch.testing.assert_close(vit.pos_embed_ND, state["embeddings.position_embedding.weight"].bfloat16().float())


# ---------------------------------------------------------------------------------------------------
# nanoVLM's default tower, on the meta device


def test_nanovlm_default_size():
    """SigLIP2-base-patch16-512 without its pooling head: same keys, shapes and parameter count as
    transformers' model, and as counted by hand from the architecture."""
    cfg = ViTConfig()
    assert cfg.num_patches == 1024
    with torch.device("meta"):
        vit = VisionTransformer(cfg)
        hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=512, vision_use_head=False))
    ours = {k: tuple(v.shape) for k, v in vit_state_dict_to_hf(vit.state_dict()).items()}
    assert ours == {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    D, F, N, P, layers = 768, 3072, 1024, 16, 12
    per_block = 4 * (D * D + D) + (D * F + F) + (F * D + D) + 2 * 2 * D  # q,k,v,out; fc1; fc2; two LayerNorms
    by_hand = (3 * P * P * D + D) + N * D + layers * per_block + 2 * D  # patch conv, positions, blocks, norm
    count = sum(p.numel() for p in vit.parameters())
    assert count == by_hand == sum(p.numel() for p in hf.parameters()) == 86_433_024
    assert isinstance(vit.blocks, torch.nn.ModuleList) and len(vit.blocks) == 12

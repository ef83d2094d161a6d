"""`vistrain import nanovlm`: a folder written by huggingface/nanoVLM's save_pretrained -> a vistrain model
folder that builds nanoVLM's prompt and generates nanoVLM's tokens.

The files in tests/data/nanovlm_tiny/ come from the original nanoVLM at commit 4e0c096 (2025-10-27), run
outside this repository on the CPU in float32 (torch 2.13, transformers 4.57.1; transformers 5.24 gave the
same numbers):

* config.json and model.safetensors are what nanoVLM's own `VisionLanguageModel.save_pretrained` wrote for a
  tiny config (ViT 32 wide, patch 8, 64 px tiles, 2 blocks; LM 64 wide, 4 heads, 2 kv heads, 2 blocks,
  vocabulary 512 + 66; pixel shuffle 2, so 16 tokens per tile; max_img_size 192), built with
  torch.manual_seed(0) and then every tensor re-drawn from a generator seeded 1 (a tiny model with nanoVLM's
  N(0, 0.02) initialisation repeats one token). Weights are random: only agreement matters.
* tokenizer/ is a stand-in for SmolLM2's tokenizer: a byte-level BPE of 512 tokens trained on a synthetic
  corpus, with <|endoftext|>, <|im_start|>, <|im_end|> at ids 0, 1, 2 (eos = <|im_end|>).
* tiny_image.png is 150 x 90 px of np.random.RandomState(0) noise.
* reference.json holds what the original computed. The folder was loaded with nanoVLM's
  `VisionLanguageModel.from_pretrained`; the prompt was built as its generate.py builds it: get_tokenizer
  (the tokenizer folder with config's vlm_extra_tokens and lm_chat_template), get_image_processor(192, 64,
  True) on the image, get_image_string for the grid + "What is this?" as the user message,
  apply_chat_template(add_generation_prompt=True) -> `input_ids`. Then `model(input_ids, pixels)` (hidden
  states) and `model.decoder.head` on the last position -> `last_logits_all`; `model.generate(input_ids,
  pixels, max_new_tokens=8, greedy=True)` -> `greedy_8` (a no-cache recompute gave the same tokens; the
  top-1/top-2 logit gaps per step are >= 0.19, so float rounding cannot flip them); `pixel_view_sums` are
  the per-view sums of the pixel tensor the processor returned. `attn_scaling`: the same with config's
  lm_attn_scaling set to 1.3 before VLMConfig(**config). `images`: get_image_processor(192, 64,
  resize_to_max_side_len) on RandomState(seed) noise images of other sizes (grid, shape, per-view sums).
  `two_images`: the input ids for two images of grids (2, 3) and (1, 1) (nanoVLM labels them <image: k>).
No nanoVLM code is in this repository; the scripts that ran it are not either.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vistrain.cli import main
from vistrain.data.vqa_images import ImageProcessor
from vistrain.data.vqa_text import VQAEncoder
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.models.vlm import VisionLanguageModel
from vistrain.tasks.vlm_inference import load_for_generation

DATA = Path(__file__).resolve().parent / "data" / "nanovlm_tiny"
REF = json.loads((DATA / "reference.json").read_text())
LOGITS_ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a 2-core machine the second thread costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _import(source: Path, out: Path, *extra: str) -> int:
    return main(["import", "nanovlm", str(source), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "tiny"
    assert _import(DATA, out, "--tokenizer", str(DATA / "tokenizer")) == 0
    return out


@pytest.fixture(scope="module")
def loaded(imported):
    return load_for_generation(imported)


@pytest.fixture(scope="module")
def prompt(loaded) -> dict:
    _, _, encoder, _ = loaded
    image = Image.open(DATA / "tiny_image.png").convert("RGB")
    return encoder.encode_prompt({"images": [image], "texts": [{"user": REF["prompt"], "assistant": ""}]})


def _copy_source(tmp_path: Path, drop: tuple[str, ...] = (), **config_changes) -> Path:
    source = tmp_path / "nanovlm"
    source.mkdir()
    shutil.copy(DATA / "model.safetensors", source / "model.safetensors")
    config = json.loads((DATA / "config.json").read_text())
    config.update(config_changes)
    for key in drop:
        del config[key]
    (source / "config.json").write_text(json.dumps(config, indent=4))
    return source


# ------------------------------------------------------------------------------------------ the folder


def test_import_writes_a_model_folder(imported):
    ckpt_lib.verify_checkpoint(imported)
    config = json.loads((imported / "config.json").read_text())
    assert config["task"] == "vlm"
    assert config["image_resize"] == "nanovlm" and config["image_labels"] is True
    assert config["max_image_size"] == 192 and config["chat_template"] == "tokenizer"
    assert config["eos_token"] == "<|im_end|>"
    assert config["model"]["vision"]["image_mean"] == [0.0, 0.0, 0.0]
    assert config["model"]["vision"]["image_std"] == [1.0, 1.0, 1.0]
    assert config["model"]["image_token_id"] == REF["image_token_id"]
    assert config["imported_from"]["format"] == "nanovlm"
    weights = load_file(str(imported / "model.safetensors"))
    assert all(k.startswith("vlm.") for k in weights)
    assert "vlm.lm.embed_tokens.weight" in weights and "vlm.lm.lm_head.weight" not in weights  # tied: one matrix
    # the tied head nanoVLM saved as decoder.head.weight is our embedding, the fused qkv is split in three
    theirs = load_file(str(DATA / "model.safetensors"))
    assert torch.equal(weights["vlm.lm.embed_tokens.weight"], theirs["decoder.head.weight"])
    qkv = theirs["vision_encoder.blocks.1.attn.qkv_proj.weight"]
    assert torch.equal(weights["vlm.vision.blocks.1.attn.k_proj.weight"], qkv[32:64])
    model = VisionLanguageModel.from_pretrained(imported)
    assert model.cfg.image_token_length == 16 and model.cfg.lm.vocab_size == 578


def test_tokenizer_ids_match_nanovlm(loaded):
    _, tokenizer, _, eos_id = loaded
    assert len(tokenizer) == 578
    assert tokenizer.convert_tokens_to_ids("<|image|>") == REF["image_token_id"] == 512
    assert tokenizer.convert_tokens_to_ids("<|global_image|>") == REF["global_image_token_id"] == 513
    assert tokenizer.convert_tokens_to_ids("<row_2_col_1>") == 522  # 514 + (2-1)*8 + (1-1), row-major
    assert tokenizer.convert_tokens_to_ids("<row_8_col_8>") == 577
    assert eos_id == REF["eos_token_id"] and tokenizer.pad_token_id == eos_id


# ------------------------------------------------------------------------------------------ parity


def test_prompt_ids_and_pixels_match_nanovlm(prompt):
    assert prompt["input_ids"].tolist() == REF["input_ids"]
    pixels = prompt["pixel_values"]
    assert list(pixels.shape) == REF["pixel_values_shape"]
    sums = pixels.double().sum(dim=(1, 2, 3))
    np.testing.assert_allclose(sums.numpy(), REF["pixel_view_sums"], rtol=0, atol=1e-6)


def test_last_logits_match_nanovlm(loaded, prompt):
    model = loaded[0]
    with torch.no_grad():
        logits = model(prompt["input_ids"][None], prompt["pixel_values"])[0, -1]
    ref = torch.tensor(REF["last_logits_all"])
    diff = (logits - ref).abs().max().item()
    assert diff < LOGITS_ATOL, f"max |logit difference| {diff:.2e}"
    assert int(logits.argmax()) == int(ref.argmax())


def test_greedy_generation_matches_nanovlm(loaded, prompt, imported, capsys):
    model, tokenizer, _, eos_id = loaded
    ids = model.generate(prompt["input_ids"][None], prompt["pixel_values"], max_new_tokens=8, eos_token_id=eos_id)
    assert ids[0].tolist() == REF["greedy_8"]
    # the user's path: `vistrain generate` on the folder prints the decoded answer of the same tokens
    capsys.readouterr()
    assert main(["generate", str(imported), "--image", str(DATA / "tiny_image.png"), "--prompt", REF["prompt"],
                 "--max-new-tokens", "8", "--device", "cpu"]) == 0
    expected = tokenizer.decode(REF["greedy_8"], skip_special_tokens=True)
    assert capsys.readouterr().out == expected + "\n"


def test_attention_scaling_is_folded_into_the_weights(tmp_path):
    """nanoVLM's lm_attn_scaling multiplies RoPE's cos and sin; vistrain folds it into the q/k projections."""
    ref = REF["attn_scaling"]
    source = _copy_source(tmp_path, lm_attn_scaling=ref["lm_attn_scaling"])
    assert _import(source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer")) == 0
    model, _, encoder, eos_id = load_for_generation(tmp_path / "out")
    image = Image.open(DATA / "tiny_image.png").convert("RGB")
    p = encoder.encode_prompt({"images": [image], "texts": [{"user": REF["prompt"], "assistant": ""}]})
    with torch.no_grad():
        logits = model(p["input_ids"][None], p["pixel_values"])[0, -1]
    diff = (logits - torch.tensor(ref["last_logits_all"])).abs().max().item()
    assert diff < LOGITS_ATOL, f"max |logit difference| {diff:.2e}"
    ids = model.generate(p["input_ids"][None], p["pixel_values"], max_new_tokens=8, eos_token_id=eos_id)
    assert ids[0].tolist() == ref["greedy_8"]


@pytest.mark.parametrize("case", REF["images"], ids=lambda c: f"{c['width']}x{c['height']}-"
                         f"{'max' if c['resize_to_max_side_len'] else 'tiles'}")
def test_image_processing_matches_nanovlm(case):
    resize = "nanovlm" if case["resize_to_max_side_len"] else "nanovlm_tiles"
    processor = ImageProcessor(64, 192, (0, 0, 0), (1, 1, 1), resize=resize)
    rng = np.random.RandomState(case["seed"])
    pixels = rng.randint(0, 256, size=(case["height"], case["width"], 3), dtype=np.uint8)
    views, grid = processor(Image.fromarray(pixels, "RGB"))
    assert list(grid) == case["grid"] == list(processor.grid(case["width"], case["height"]))
    assert list(views.shape) == case["shape"]
    np.testing.assert_allclose(views.double().sum(dim=(1, 2, 3)).numpy(), case["view_sums"], rtol=0, atol=1e-6)


def test_two_images_are_labelled_as_nanovlm_does(loaded):
    """Grids (2, 3) and (1, 1): resize_to_max_side_len false makes a 64 px image one tile."""
    _, tokenizer, _, _ = loaded
    encoder = VQAEncoder(tokenizer, ImageProcessor(64, 192, (0, 0, 0), (1, 1, 1), resize="nanovlm_tiles"), 16,
                         "tokenizer", image_labels=True)
    images = [Image.open(DATA / "tiny_image.png").convert("RGB"), Image.new("RGB", (64, 64))]
    p = encoder.encode_prompt({"images": images, "texts": [{"user": REF["prompt"], "assistant": ""}]})
    assert [list(encoder.image_processor.grid(*im.size)) for im in images] == REF["two_images"]["grids"]
    assert p["input_ids"].tolist() == REF["two_images"]["input_ids"]
    assert p["pixel_values"].shape[0] == 7 + 1  # global + 6 tiles, then the single tile


def test_lm_tokenizer_as_a_local_folder(tmp_path):
    """Without --tokenizer, config.json's lm_tokenizer is used when it is a local folder."""
    source = _copy_source(tmp_path, lm_tokenizer=str(DATA / "tokenizer"))
    assert _import(source, tmp_path / "out") == 0
    _, _, encoder, _ = load_for_generation(tmp_path / "out")
    image = Image.open(DATA / "tiny_image.png").convert("RGB")
    p = encoder.encode_prompt({"images": [image], "texts": [{"user": REF["prompt"], "assistant": ""}]})
    assert p["input_ids"].tolist() == REF["input_ids"]


# ------------------------------------------------------------------------------------------ errors


def _fails(capsys, source: Path, out: Path, *extra: str) -> str:
    capsys.readouterr()
    assert _import(source, out, *extra) == 2
    assert not out.exists()
    return capsys.readouterr().err


def test_missing_key_names_the_file_and_key(tmp_path, capsys):
    source = _copy_source(tmp_path)
    state = load_file(str(source / "model.safetensors"))
    del state["vision_encoder.blocks.1.attn.qkv_proj.bias"]
    save_file(state, str(source / "model.safetensors"))
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "model.safetensors" in err and "'vision_encoder.blocks.1.attn.qkv_proj.bias' is missing" in err


def test_unexpected_key_and_wrong_shape_name_the_key(tmp_path, capsys):
    source = _copy_source(tmp_path)
    state = load_file(str(source / "model.safetensors"))
    state["vision_encoder.cls_token"] = torch.zeros(1, 1, 32)
    save_file(state, str(source / "model.safetensors"))
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "model.safetensors" in err and "unexpected key 'vision_encoder.cls_token'" in err
    del state["vision_encoder.cls_token"]
    state["MP.proj.weight"] = torch.zeros(64, 64)
    save_file(state, str(source / "model.safetensors"))
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "'MP.proj.weight' has shape [64, 64]" in err and "[64, 128]" in err


@pytest.mark.parametrize("change, words", [
    ({"vit_cls_flag": True}, ["config.json", "'vit_cls_flag'"]),
    ({"lm_use_tokens": True}, ["config.json", "'lm_use_tokens'"]),
    ({"mp_image_token_length": 64}, ["config.json", "'mp_image_token_length'", "gives 16"]),
    ({"max_img_size": 200}, ["config.json", "'max_img_size'"]),
    ({"max_img_size": 64 * 9}, ["config.json", "'max_img_size'", "9 tiles"]),
    ({"resize_to_max_side_len": None}, ["config.json", "'resize_to_max_side_len'"]),
    ({"lm_vocab_size": 560}, ["config.json", "'lm_vocab_size'"]),
    ({"vlm_extra_tokens": {"image_token": "<|image|>"}}, ["config.json", "'vlm_extra_tokens'"]),
    ({"lm_tokenizer": "HuggingFaceTB/SmolLM2-360M-Instruct"}, ["config.json", "'lm_tokenizer'", "--tokenizer"]),
])
def test_config_that_cannot_be_imported_names_the_key(tmp_path, capsys, change, words):
    source = _copy_source(tmp_path, **change)
    extra = () if "lm_tokenizer" in change else ("--tokenizer", str(DATA / "tokenizer"))
    err = _fails(capsys, source, tmp_path / "out", *extra)
    for word in words:
        assert word in err, err


def test_missing_config_key_is_not_defaulted(tmp_path, capsys):
    """nanoVLM would take today's default (true) for an old config without resize_to_max_side_len."""
    source = _copy_source(tmp_path, drop=("resize_to_max_side_len",))
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "config.json" in err and "'resize_to_max_side_len' is missing" in err


def test_wrong_files_are_named(tmp_path, capsys):
    # a Hugging Face Llama config is not a nanoVLM one: the first key it lacks is named
    source = tmp_path / "llama"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    shutil.copy(DATA / "model.safetensors", source / "model.safetensors")
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "config.json" in err and "is missing" in err
    # weights that are not safetensors
    source = _copy_source(tmp_path)
    (source / "model.safetensors").write_bytes(b"not a safetensors file")
    err = _fails(capsys, source, tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "model.safetensors" in err and "cannot read" in err
    # no folder at all
    err = _fails(capsys, tmp_path / "nowhere", tmp_path / "out", "--tokenizer", str(DATA / "tokenizer"))
    assert "nowhere" in err

"""SmolVLM / Idefics3 through transformers: `vistrain import smolvlm` and `vistrain export --format transformers`.

A tiny random Idefics3 model and its processor are built with transformers itself (no download): SmolVLM is
the Idefics3 architecture with the same weights, prompt and image processing, and transformers' SmolVLM
processor needs torchvision (for video), so the Idefics3 classes stand in for it. The folder holds what a
SmolVLM folder holds: config.json, model.safetensors, the tokenizer, the processor settings (transformers 5's
processor_config.json) and SmolVLM's chat template. What vistrain computes from the imported folder is checked
against what transformers computes from the original: prompt ids and pixel values (equal), logits (1e-4 in
fp32) and greedy tokens (equal); then a fine-tuned model goes back to transformers and generates what
`vistrain generate` generates.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistrain import cli
from vistrain.config import load_config
from vistrain.data.vqa import digits_vqa, train_tokenizer, vqa_texts
from vistrain.data.vqa_images import ImageProcessor
from vistrain.data.vqa_text import VQAEncoder, smolvlm_special_tokens
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.interop.tokenizers import tokenizer_assets
from vistrain.interop.vlm_parts import build_vlm
from vistrain.models.vlm import PixelShuffleProjector, VisionLanguageModel
from vistrain.registry import make_trainer
from vistrain.tasks.vlm_inference import answer_ids, encode_question, load_for_generation

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "configs" / "vlm" / "digits.yaml"
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PROMPT = "What digit is this?"
LOGITS_ATOL = 1e-4
# SmolVLM-256M-Instruct's chat template, as its chat_template.json has it: structured content, "User:" and
# "Assistant:" turns ended by <end_of_utterance>
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: on a 2-core machine the second thread costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _idefics3(tokenizer, tied: bool, seed: int = 0):
    """A tiny random Idefics3ForConditionalGeneration: 32 px tiles of 4 px patches (8 x 8), shuffled by 2 into
    16 tokens; a 2-layer Llama 64 wide. Weights N(0, 0.2) so that greedy decoding does not repeat one token."""
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=4),
        # a few unused rows, as real checkpoints round their vocabulary up
        text_config=dict(model_type="llama", vocab_size=len(tokenizer) + 3, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=1024, tie_word_embeddings=tied),
        scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.Idefics3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    return model


def _processor(tokenizer):
    image_processor = transformers.Idefics3ImageProcessor(
        size={"longest_edge": 96}, max_image_size={"longest_edge": 32}, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5])
    return transformers.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16,
                                          chat_template=SMOLVLM_TEMPLATE)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(the vistrain model folder `import smolvlm` made, the transformers model, its processor) of a tiny
    SmolVLM-shaped model, untied, saved by transformers."""
    root = tmp_path_factory.mktemp("smolvlm")
    tokenizer = train_tokenizer(vqa_texts(digits_vqa("val", 16)), special_tokens=smolvlm_special_tokens(),
                                vocab_size=400)
    processor = _processor(tokenizer)
    model = _idefics3(processor.tokenizer, tied=False)
    model.save_pretrained(root / "hf")
    processor.save_pretrained(root / "hf")
    out = root / "imported"
    assert cli.main(["import", "smolvlm", str(root / "hf"), "--out", str(out)]) == 0
    return out, model, processor


def _hf_inputs(processor, images: list, prompt: str = PROMPT) -> dict:
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=text, images=images, return_tensors="pt")


# ------------------------------------------------------------------------------------------------- parity


def test_the_pixel_shuffle_orders_features_as_idefics3s_connector():
    """Tile token (r, c) holds patches (2r + i, 2c + j) at channels (2i + j) D..: no weight columns to permute."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    x_NSD = torch.randn(3, 64, 5)
    config = transformers.Idefics3Config(vision_config=dict(hidden_size=5), text_config=dict(model_type="llama"),
                                         scale_factor=2)
    ours = PixelShuffleProjector(5, 7, 2)
    folded = {}
    ours.proj.register_forward_hook(lambda module, args, out: folded.setdefault("x", args[0]))
    ours(x_NSD)
    assert torch.equal(folded["x"], Idefics3Connector(config).pixel_shuffle(x_NSD, 2))


@pytest.mark.parametrize("sizes", [[(70, 40)], [(40, 90)], [(20, 20)], [(70, 40), (30, 50)]],
                         ids=["wide-2x3-tiles", "tall-3x2", "small-square-upscaled-3x3", "two-images"])
def test_prompt_ids_and_pixel_values_equal_the_processors(smol, sizes):
    folder, _, processor = smol
    images = [_noise(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    _, _, encoder, _ = load_for_generation(folder)
    ours = encode_question(encoder, images, PROMPT)
    theirs = _hf_inputs(processor, images)
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"][0])
    if sizes == [(70, 40)]:  # 96 x 56 px: 2 rows x 3 columns of tiles, then the global view
        assert len(ours["pixel_values"]) == 7


def test_without_image_splitting_the_prompt_and_pixels_equal_the_processors(smol, tmp_path):
    """do_image_splitting false: each image squeezed into one tile (the global view alone)."""
    folder, _, processor = smol
    hf = tmp_path / "hf"
    shutil.copytree(_read(folder / "config.json")["imported_from"]["folder"], hf)
    settings = _read(hf / "processor_config.json")["image_processor"]
    _edit_json(hf / "processor_config.json", image_processor={**settings, "do_image_splitting": False})
    assert cli.main(["import", "smolvlm", str(hf), "--out", str(tmp_path / "unsplit")]) == 0
    images = [_noise(70, 40, 0), _noise(20, 30, 1)]
    _, _, encoder, _ = load_for_generation(tmp_path / "unsplit")
    ours = encode_question(encoder, images, PROMPT)
    theirs = transformers.AutoProcessor.from_pretrained(hf)
    theirs = _hf_inputs(theirs, images)
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"][0]) and len(ours["pixel_values"]) == 2


def test_an_image_of_one_tile_is_its_global_view_alone_as_in_the_processor(smol):
    """size.longest_edge = the tile (as digits' 16 px images get): no splitting, one view, no row tokens."""
    folder, _, processor = smol
    _, tokenizer, _, _ = load_for_generation(folder)
    encoder = VQAEncoder(tokenizer, ImageProcessor(32, 32, resize="smolvlm"), 16, "tokenizer", layout="smolvlm")
    images = [_noise(70, 40, 0)]
    ours = encode_question(encoder, images, PROMPT)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    theirs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True), images=images,
                       size={"longest_edge": 32}, return_tensors="pt")
    assert ours["input_ids"].tolist() == theirs["input_ids"][0].tolist()
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"][0]) and len(ours["pixel_values"]) == 1


def test_logits_and_greedy_tokens_equal_transformers(smol):
    folder, hf_model, processor = smol
    images = [_noise(70, 40, 0)]
    model, _, encoder, eos_id = load_for_generation(folder)
    encoded = encode_question(encoder, images, PROMPT)
    inputs = _hf_inputs(processor, images)
    with torch.no_grad():
        ours = model(encoded["input_ids"][None], encoded["pixel_values"])
        theirs = hf_model(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGITS_ATOL)
    new = answer_ids(model, encoded, 12, eos_id)
    generated = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos_id)
    assert new.tolist() == generated[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(new.tolist())) > 2  # a real sequence, not one token repeated


def test_the_imported_folder_keeps_smolvlms_processing(smol):
    folder, _, _ = smol
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ("image_layout", "image_resize", "max_image_size", "chat_template", "eos_token")} \
        == {"image_layout": "smolvlm", "image_resize": "smolvlm", "max_image_size": 96, "chat_template": "tokenizer",
            "eos_token": "<end_of_utterance>"}
    assert VisionLanguageModel.from_pretrained(folder).cfg.image_token_length == 16


# --------------------------------------------------------------------------------------------- round trip


def _tiny_vqa_run(out: Path, cache: Path, *overrides: str):
    """A few steps on the_cauldron-shaped digit questions (a save_to_disk folder), packed."""
    source = cache.parent / "vqa_train"
    if not source.exists():
        digits_vqa("train", 40).select(range(48)).save_to_disk(str(source))
    return load_config(DIGITS, [
        "data.name=vqa", f"data.sources=[{{name: digits, path: {source}}}]", "data.val_size=8", "data.seq_length=512",
        "data.num_workers=0", f"data.cache_dir={cache}", "train.batch_size=4", "train.max_steps=3",
        "train.ckpt_every=3", "train.eval_every=3", "vlm.val_questions=2", "run.loggers=[jsonl]",
        f"run.out_dir={out}", *overrides])


def _same_tokens_in_both(export: Path, run: Path, images: list, capsys) -> None:
    """transformers on the exported folder and vistrain on the run see the same prompt, compute the same logits
    and answer with the same tokens (`vistrain generate` prints them)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(export).eval()
    processor = transformers.AutoProcessor.from_pretrained(export)
    inputs = _hf_inputs(processor, images)
    ours, tokenizer, encoder, eos_id = load_for_generation(ckpt_lib.find_checkpoint(run))
    encoded = encode_question(encoder, images, PROMPT)
    assert encoded["input_ids"].tolist() == inputs["input_ids"][0].tolist()
    assert torch.equal(encoded["pixel_values"], inputs["pixel_values"][0])
    with torch.no_grad():
        torch.testing.assert_close(ours(encoded["input_ids"][None], encoded["pixel_values"]), model(**inputs).logits,
                                   rtol=0, atol=LOGITS_ATOL)
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer_ids(ours, encoded, 8, eos_id).tolist() == generated.tolist()
    paths = []
    for k, image in enumerate(images):
        paths += ["--image", str(export.parent / f"image{k}.png")]
        image.save(paths[-1])
    capsys.readouterr()
    assert cli.main(["generate", str(run), *paths, "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    tokens = generated.tolist()
    text = tokenizer.decode(tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens, skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == text.strip()


def test_import_fine_tune_export_loads_in_transformers_and_generates_the_same(smol, tmp_path, capsys):
    folder, _, _ = smol
    run = tmp_path / "run"
    make_trainer(_tiny_vqa_run(run, tmp_path / "cache", f"model.init={folder}", "data.image_layout=smolvlm",
                               "data.max_image_size=96"), CPU).fit()
    before = ckpt_lib.load_weights(folder)["vlm.projector.proj.weight"]
    assert not torch.equal(ckpt_lib.load_weights(run)["vlm.projector.proj.weight"], before)  # it trained
    export = tmp_path / "export"
    assert cli.main(["export", str(run), "--format", "transformers", "--out", str(export)]) == 0
    _same_tokens_in_both(export, run, [_noise(70, 40, 3)], capsys)
    # and the export comes back as it went: the same weights after `vistrain import smolvlm`
    again = tmp_path / "again"
    assert cli.main(["import", "smolvlm", str(export), "--out", str(again)]) == 0
    trained, back = ckpt_lib.load_weights(run), ckpt_lib.load_weights(again)
    assert trained.keys() == back.keys() and all(torch.equal(trained[k], back[k]) for k in trained)


def test_a_new_vlm_of_the_smolvlm_layout_exports_tied(tmp_path, capsys):
    """data.image_layout=smolvlm on a model trained from scratch: SmolVLM's tokens, template and tiling, and a
    tied head (vistrain's default), which transformers ties by tie_word_embeddings."""
    run = tmp_path / "run"
    make_trainer(_tiny_vqa_run(run, tmp_path / "cache", "data.image_layout=smolvlm", "model.lm.num_layers=2",
                               "model.vision.num_layers=1", "data.max_image_size=48"), CPU).fit()
    export = tmp_path / "export"
    assert cli.main(["export", str(run), "--format", "transformers", "--out", str(export)]) == 0
    assert json.loads((export / "config.json").read_text())["tie_word_embeddings"] is True
    assert "AutoModelForImageTextToText" in (export / "README.md").read_text()  # a card for transformers' users
    _same_tokens_in_both(export, run, [_noise(40, 20, 4), _noise(16, 16, 5)], capsys)


# ------------------------------------------------------------------------------------------------- faults


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_export_of_a_vlm_of_vistrains_layout_is_refused_naming_the_reason(tmp_path, capsys):
    tokenizer = train_tokenizer(vqa_texts(digits_vqa("val", 16)), vocab_size=400)
    cfg = load_config(DIGITS, []).model
    model = build_vlm(cfg.vision, cfg.lm, cfg.pixel_shuffle_factor, tokenizer)
    folder = tmp_path / "vistrain_vlm"
    ckpt_lib.write_model_folder(folder, {f"vlm.{k}": v for k, v in model.state_dict().items()},
                                {"task": "vlm", "model": dataclasses.asdict(model.cfg), "chat_template": "chatml",
                                 "max_image_size": 16}, tokenizer_assets(tokenizer))
    before = _snapshot(tmp_path)
    out = tmp_path / "export"
    assert cli.main(["export", str(folder), "--format", "transformers", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "image layout is 'vistrain'" in err and "data.image_layout=smolvlm" in err
    assert not out.exists() and _snapshot(tmp_path) == before


def test_fine_tuning_in_another_layout_than_the_models_is_refused(smol, tmp_path, capsys):
    folder = smol[0]
    before = _snapshot(folder)
    assert cli.main(["train", str(DIGITS), f"model.init={folder}", "data.image_layout=vistrain",
                     f"run.out_dir={tmp_path / 'run'}", "run.loggers=[jsonl]", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.image_layout=vistrain" in err and "'smolvlm' layout" in err
    assert _snapshot(folder) == before


@pytest.mark.parametrize("fault, message", [
    (lambda d: _edit_json(d / "config.json", model_type="llava"), "key 'model_type' is 'llava'"),
    (lambda d: _edit_json(d / "processor_config.json", image_seq_len=64), "key 'image_seq_len' is 64"),
    (lambda d: _edit_json(d / "processor_config.json", image_processor={**_read(d / "processor_config.json")[
        "image_processor"], "resample": 3}), "key 'resample' is 3"),
    (lambda d: (d / "model.safetensors").unlink(), "no weights"),
], ids=["not-idefics3", "image-seq-len", "resample", "no-weights"])
def test_an_unusable_folder_is_refused_naming_the_file_and_key(smol, tmp_path, capsys, fault, message):
    folder = tmp_path / "hf"
    shutil.copytree(_read(smol[0] / "config.json")["imported_from"]["folder"], folder)
    fault(folder)
    before = _snapshot(tmp_path)
    assert cli.main(["import", "smolvlm", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and str(folder) in err
    assert _snapshot(tmp_path) == before


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**_read(path), **changes}))

"""Every shipped recipe lives its whole life at rehearsal size.

Each YAML under configs/ (new ones are picked up without editing this file) is shrunk in its sizes only --
steps, batch, depth, width, resolution, sample counts: the task's `--smoke` shapes plus tiny stand-ins for its
data, tokenizer and Hugging Face folders -- and keeps every other key: train.parallel, train.compile,
train.activation_checkpointing, train.async_checkpoint, precision, eval.*, loggers. Then it trains, evaluates in
the loop, checkpoints, is SIGKILLed, resumes, and the task's outputs (sample, eval, generate, export) are made
from the result. A recipe that says `parallel: fsdp` trains on 2 gloo ranks and resumes on 1 (a reshard).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.cli_runs import vistrain
from support.standin_detector import TwoHeaded, save_scripted
from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.models.vqvae import VQVAE, VQVAEConfig
from vistrain.registry import get_spec
from vistrain.tasks.capabilities import ImageSampler, PromptAnswerer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
CONFIGS = REPO / "configs"
RECIPES = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))
# The digits defaults under FSDP as well: the sharded path of in-loop generation (VAR, VLM) must work for them.
FSDP_ALSO = ["var/digits", "vlm/digits"]
# Recipes this CPU cannot rehearse, with the reason (fp16 + fsdp is refused by the engine itself).
CANNOT_RUN_ON_CPU: dict[str, str] = {}
KILL_AT = 3  # the run is killed before step 4, after step 2's checkpoint and eval and step 3's update
STEPS = 4
BATCH = 4

# Rehearsal shapes of the stand-ins (a tokenizer for VAR, a SigLIP and a Llama for the VLM).
TOKENIZER = dict(vocab_size=64, z_channels=8, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, patch_nums=[1, 2, 4])
TOKENIZER_RESOLUTION = 16
VISION_TILE = 32


# ------------------------------------------------------------------------------------------ stand-ins


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Data, a tokenizer, Hugging Face folders and a detector that the recipes name but tests cannot download."""
    root = tmp_path_factory.mktemp("stand_ins")
    return {"root": root, "images": _image_folders(root), "detector": save_scripted(TwoHeaded(), root / "det.pt")}


def _image_folders(root: Path) -> dict[str, Path]:
    """ImageNet-layout train and val folders: 2 classes of small RGB images."""
    rng = np.random.default_rng(0)
    folders = {}
    for split, per_class in (("train", 12), ("val", 4)):
        for label in range(2):
            folder = root / "images" / split / f"class_{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels).save(folder / f"{i}.png")
        folders[split] = root / "images" / split
    return folders


def _tokenizer_folder(root: Path, channels: int) -> Path:
    """A random tokenizer (a VQ-VAE model folder) of the rehearsal shapes for `channels`-channel images."""
    folder = root / f"tokenizer_{channels}ch"
    if not folder.exists():
        torch.manual_seed(0)
        config = VQVAEConfig(in_channels=channels, **TOKENIZER)
        weights = {f"vae.{k}": v for k, v in VQVAE(config).state_dict().items()}
        ckpt_lib.write_model_folder(folder, weights, {"task": "vqvae", "model": dataclasses.asdict(config)})
    return folder


def _hf_folders(root: Path) -> tuple[Path, Path]:
    """A tiny SigLIP and a tiny Llama with a tokenizer trained on the digits questions."""
    import transformers

    from vistrain.data.vqa import digits_vqa, train_tokenizer, vqa_texts

    vision, lm = root / "siglip", root / "llama"
    if not lm.exists():
        torch.manual_seed(0)
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=VISION_TILE,
            patch_size=4)).save_pretrained(vision)
        tokenizer = train_tokenizer(vqa_texts(digits_vqa("val", 16)), special_tokens=[], vocab_size=300)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(lm)
        tokenizer.save_pretrained(lm)
    return vision, lm


def _vqa_sources(root: Path) -> tuple[str, str]:
    """the_cauldron-shaped train and val sources (datasets' save_to_disk folders) of digit questions."""
    from vistrain.data.vqa import digits_vqa

    train, val = root / "vqa_train", root / "vqa_val"
    if not train.exists():
        digits_vqa("train", 40).select(range(96)).save_to_disk(str(train))
        digits_vqa("val", 40).select(range(24)).save_to_disk(str(val))
    return f"[{{name: digits, path: {train}}}]", f"[{{name: digits_val, path: {val}}}]"


# ------------------------------------------------------------------------------------------ shrinking


def rehearsal_overrides(recipe: str, stand_ins: dict, world_size: int) -> list[str]:
    """The recipe's sizes shrunk; every other key as shipped."""
    cfg = load_config(CONFIGS / f"{recipe}.yaml", [])
    # a global batch of 4; accumulation (2 micro-batches per step) stays on where the recipe has it
    micro = BATCH // (2 * world_size) if cfg.train.micro_batch_size else 0
    overrides = [f"train.max_steps={STEPS}", "train.ckpt_every=2", "train.eval_every=2", "train.log_every=1",
                 f"train.batch_size={BATCH}", f"train.micro_batch_size={micro}",
                 f"data.num_workers={min(cfg.data.num_workers, 1)}", "eval.num_samples=20", "eval.batch_size=10"]
    overrides += get_spec(cfg.task).smoke_overrides
    if cfg.data.name == "image_folder":
        overrides += [f"data.root={stand_ins['images']['train']}", f"data.val_root={stand_ins['images']['val']}"]
    if cfg.task == "vqvae":
        overrides += [f"data.resolution={TOKENIZER_RESOLUTION}", *(f"model.{k}={v}" for k, v in TOKENIZER.items())]
        if cfg.vqvae.perceptual.weight > 0:
            overrides += _perceptual_files(stand_ins["root"])
        if cfg.vqvae.adversarial.weight > 0:  # switched on within the rehearsal
            overrides += ["vqvae.adversarial.start=1", "vqvae.adversarial.discriminator.base_channels=8"]
    if cfg.task == "var":
        tokenizer = _tokenizer_folder(stand_ins["root"], cfg.data.channels)
        overrides += [f"var.tokenizer={tokenizer}", f"data.resolution={TOKENIZER_RESOLUTION}",
                      *(f"model.{k}={TOKENIZER[k]}" for k in ("vocab_size", "z_channels", "patch_nums"))]
    if cfg.task == "vlm":
        overrides += ["vlm.max_new_tokens=4"]
        if cfg.model.vision_from is not None or cfg.data.name == "vqa":  # a recipe built on pretrained towers
            vision, lm = _hf_folders(stand_ins["root"])
            overrides += [f"model.vision_from={vision}", f"model.lm_from={lm}",
                          f"data.max_image_size={2 * VISION_TILE}", "data.val_size=8"]
        if cfg.data.name == "vqa":
            train, val = _vqa_sources(stand_ins["root"])
            overrides += [f"data.sources={train}", f"data.val_sources={val}"]
    return overrides


def _perceptual_files(root: Path) -> list[str]:
    from vistrain.models.lpips import LPIPS

    vgg, lin = root / "vgg16.pth", root / "lin.pth"
    if not vgg.exists():
        lpips = LPIPS()
        torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, vgg)
        torch.save({f"lin{i}.model.1.weight": layer.weight for i, layer in enumerate(lpips.lins)}, lin)
    return [f"vqvae.perceptual.vgg={vgg}", f"vqvae.perceptual.lin={lin}"]


# ------------------------------------------------------------------------------------------- the life


def train(args: list[str], env: dict, nproc: int = 1, kill_at: int | None = None) -> subprocess.CompletedProcess:
    entry = [str(TESTS / "support" / "kill_at_step.py"), str(kill_at)] if kill_at is not None else ["-m", "vistrain"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*launcher, *entry, "train", *args], env=env, capture_output=True, text=True, timeout=900)


def cases():
    for recipe in RECIPES:
        parallel = load_config(CONFIGS / f"{recipe}.yaml", []).train.parallel
        yield pytest.param(recipe, [], id=recipe)
        if parallel != "fsdp" and recipe in FSDP_ALSO:
            yield pytest.param(recipe, ["train.parallel=fsdp"], id=f"{recipe}+fsdp")


@pytest.mark.parametrize("recipe, extra", list(cases()))
def test_a_recipe_trains_evaluates_survives_a_kill_resumes_and_gives_its_outputs(recipe, extra, stand_ins, tmp_path,
                                                                                  subprocess_env, capsys):
    if recipe in CANNOT_RUN_ON_CPU:
        pytest.skip(CANNOT_RUN_ON_CPU[recipe])
    shipped = load_config(CONFIGS / f"{recipe}.yaml", extra)
    fsdp = shipped.train.parallel == "fsdp"
    nproc = 2 if fsdp else 1
    run = tmp_path / "run"
    args = [CONFIGS / f"{recipe}.yaml", f"run.out_dir={run}", *rehearsal_overrides(recipe, stand_ins, nproc), *extra]
    args = [str(a) for a in args]

    killed = train(args, subprocess_env, nproc, kill_at=KILL_AT)
    assert killed.returncode != 0, "the run was to be killed at step 3"
    checkpoints = run / "checkpoints"
    assert ckpt_lib.latest_checkpoint(checkpoints).name == ckpt_lib.step_dir_name(2), killed.stderr[-3000:]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["split"] == "val" and e["step"] == 2 for e in events), "no in-loop eval at step 2"

    # resumed on one rank, as shipped otherwise (a 2 -> 1 reshard for FSDP recipes)
    one_rank = rehearsal_overrides(recipe, stand_ins, 1) if fsdp else []
    resumed = train([*args, *one_rank, *extra], subprocess_env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"resumed from {checkpoints / ckpt_lib.step_dir_name(2)}" in resumed.stdout
    assert ckpt_lib.latest_checkpoint(checkpoints).name == ckpt_lib.step_dir_name(STEPS)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["split"] == "val" and e["step"] == STEPS for e in events)
    assert json.loads((checkpoints / ckpt_lib.step_dir_name(STEPS) / "metrics.json").read_text())
    saved = load_config(run / "config.yaml", [])
    for key in ("parallel", "compile", "activation_checkpointing", "async_checkpoint", "precision"):
        assert getattr(saved.train, key) == getattr(shipped.train, key), key
    assert list(saved.eval.metrics) == list(shipped.eval.metrics) and saved.eval.mode == shipped.eval.mode

    outputs(shipped, run, stand_ins, tmp_path / "out")
    capsys.readouterr()


def outputs(cfg, run: Path, stand_ins: dict, out: Path) -> None:
    """What a user makes of the run: images, scores, answers, a release folder that works alone."""
    spec = get_spec(cfg.task)
    export = out / "export"
    assert vistrain("export", run, "--out", export) == 0
    sources = (run, export)
    if spec.capability(ImageSampler) is not None:
        for source in sources:
            assert vistrain("sample", source, "--out", out / f"{source.name}.png", "--num", 4) == 0
        assert vistrain("sample", run, "--out", out / "many.npz", "--num", 6, "--batch-size", 4) == 0
        assert np.load(out / "many.npz")["arr_0"].shape[0] == 6
    if cfg.task in ("gan", "var"):
        metrics = (["--metrics", "judge"] if cfg.data.name == "digits" else
                   ["--metrics", "fid", "--ref", stand_ins["images"]["val"], "--detector", stand_ins["detector"]])
        assert vistrain("eval", run, *metrics, "--num-images", 20, "--out", out / "eval.json") == 0
    if cfg.task == "vqvae":
        assert vistrain("eval", run, "--metrics", "psnr,ssim", "--num-images", 8, "--out", out / "eval.json") == 0
    if spec.capability(PromptAnswerer) is not None:
        from vistrain.data.vqa import digits_vqa

        image = out / "digit.png"
        digits_vqa("val", 16)[0]["images"][0].save(image)
        for source in sources:
            assert vistrain("generate", source, "--image", image, "--prompt", "What digit is this?",
                            "--max-new-tokens", 3) == 0

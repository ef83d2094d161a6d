"""VAR on the engine: the tokenizer trains, the transformer trains on it from its run, both resume exactly,
sample, and the shipped recipes build with the reference's parameter counts."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.cli_runs import vistrain
from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.engine.dist import DistContext
from vistrain.models.var import VAR
from vistrain.models.vqvae import VQVAE, VQVAEConfig
from vistrain.registry import make_trainer

pytestmark = pytest.mark.slow  # end to end: the tokenizer and the transformer train, resume, sample

REPO = Path(__file__).resolve().parents[1]
CPU = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_DATA = ["data.resolution=16", "data.num_workers=0", "train.batch_size=16", "run.loggers=[jsonl]"]
TINY_VQVAE = [*TINY_DATA, "model.ch=32", "model.ch_mult=[1,2,2]", "model.num_res_blocks=1", "model.vocab_size=64",
              "model.z_channels=8", "model.patch_nums=[1,2,4]", "vqvae.num_samples=4", "vqvae.val_images=32",
              "vqvae.restart_every=5"]
TINY_VAR = [*TINY_DATA, "model.depth=2", "model.vocab_size=64", "model.z_channels=8", "model.patch_nums=[1,2,4]",
            "var.num_samples=4", "var.val_images=32", "var.sample_top_k=0", "var.sample_top_p=0.0",
            "eval.metrics=[judge]", "eval.num_samples=50"]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vqvae") / "run"
    cfg = load_config(REPO / "configs/vqvae/digits.yaml", [
        *TINY_VQVAE, f"run.out_dir={run}", "train.max_steps=20", "train.eval_every=20", "train.ckpt_every=20"])
    make_trainer(cfg, CPU).fit()
    return run


def var_config(out_dir, tokenizer, *overrides):
    return load_config(REPO / "configs/var/digits.yaml", [
        *TINY_VAR, f"run.out_dir={out_dir}", f"var.tokenizer={tokenizer}", "train.max_steps=8",
        "train.eval_every=8", "train.ckpt_every=4", "train.log_every=4", "train.keep_last=0", *overrides])


def test_the_tokenizer_trains_logs_its_health_and_shows_reconstructions(tokenizer_run):
    import json

    events = [json.loads(line) for line in (tokenizer_run / "metrics.jsonl").read_text().splitlines()]
    val = [e for e in events if e["split"] == "val"][-1]
    assert 0 < val["psnr"] < 100 and val["rec_loss"] > 0 and val["perplexity"] >= 1
    assert all(0 < val[f"usage/scale_{si}"] <= 100 for si in range(3))
    train = [e for e in events if e["split"] == "train"]
    assert {"rec_loss", "vq_loss", "samples_per_s"} <= set(train[-1])
    grid = np.asarray(Image.open(tokenizer_run / "samples" / "step_00000020.png"))
    assert grid.shape[1] > grid.shape[0]  # images beside their reconstructions: wider than tall
    model_config = ckpt_lib.load_model_config(tokenizer_run)  # enough to rebuild the tokenizer alone
    expected = VQVAE(VQVAEConfig(**model_config["model"])).state_dict()
    assert set(ckpt_lib.load_weights(tokenizer_run)) == {f"vae.{k}" for k in expected}


def test_var_trains_from_the_tokenizer_run_resumes_exactly_and_keeps_the_tokenizer_out(tokenizer_run, tmp_path):
    make_trainer(var_config(tmp_path / "a", tokenizer_run), CPU).fit()
    weights = ckpt_lib.load_weights(tmp_path / "a")
    assert weights and all(k.startswith("var.") for k in weights)  # the frozen tokenizer is not saved again
    middle = tmp_path / "a" / "checkpoints" / "step_00000004"
    make_trainer(var_config(tmp_path / "b", tokenizer_run, f"run.resume={middle}"), CPU).fit()
    resumed = ckpt_lib.load_weights(tmp_path / "b")
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)

    import json

    events = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["split"] == "train"][-1]
    assert {"Lm", "Lt", "Accm", "Acct", "loss/scale_0", "acc/scale_2", "tokens_per_s"} <= set(train)
    assert train["tokens_per_s"] == pytest.approx(21 * train["samples_per_s"])  # 1 + 4 + 16 tokens per image
    val = [e for e in events if e["split"] == "val"][-1]
    assert {"Lm", "Lt", "Accm", "Acct"} <= set(val)
    # digits: the judge scores var.judge_samples class-balanced samples, and picks `best`
    assert {"fd_judge", "class_acc", "is_judge"} <= set(val)
    assert val["fd_judge"] > 0 and 0 <= val["class_acc"] <= 100 and 1 <= val["is_judge"] <= 10
    best = (tmp_path / "a" / "checkpoints" / "best").read_text().strip()
    best_metrics = json.loads((tmp_path / "a" / "checkpoints" / best / "metrics.json").read_text())
    assert best_metrics["fd_judge"] == val["fd_judge"]  # the only eval (step 8) is the best by fd_judge

    out = tmp_path / "balanced.npz"
    assert vistrain("sample", tmp_path / "a", "--out", out, "--num-per-class", 2, "--top-k", 5, "--seed", 3) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (20, 16, 16, 3) and arr.dtype == np.uint8
    again = tmp_path / "again.npz"
    assert vistrain("sample", tmp_path / "a", "--out", again, "--num-per-class", 2, "--top-k", 5, "--seed", 3) == 0
    assert np.array_equal(np.load(again)["arr_0"], arr)  # a seed fixes the samples


def test_tokenizer_mismatches_are_named(tokenizer_run, tmp_path, capsys):
    assert vistrain("train", REPO / "configs/var/digits.yaml", *TINY_VAR, f"run.out_dir={tmp_path / 'x'}",
                    f"var.tokenizer={tokenizer_run}", "model.vocab_size=128") == 2
    assert "model.vocab_size=128 does not match the tokenizer's vocab_size=64" in capsys.readouterr().err
    assert vistrain("train", REPO / "configs/var/digits.yaml", *TINY_VAR, f"run.out_dir={tmp_path / 'y'}",
                    "var.tokenizer=") == 2
    assert "var.tokenizer is not set" in capsys.readouterr().err


def test_vqvae_sample_writes_images_beside_reconstructions(tokenizer_run, tmp_path):
    out = tmp_path / "pairs.npz"
    assert vistrain("sample", tokenizer_run, "--out", out, "--num", 6) == 0
    arr = np.load(out)["arr_0"]
    assert arr.shape == (6, 16, 16, 3)


# Parameter counts of the reference implementation (VAR's own count excludes the tokenizer).
REFERENCE_PARAMS = {"var/imagenet256_d16": 310_283_520, "var/imagenet256_d20": 600_917_136,
                    "var/imagenet256_d24": 1_033_399_360, "var/imagenet256_d30": 2_010_020_356,
                    "vqvae/imagenet256": 108_948_355}
# nanoVLM's two models: SigLIP (86M) + SmolLM2 with the 66 image tokens + the projector; about 222M and 460M.
APPROX_PARAMS = {"vlm/nanovlm_222m": 222e6, "vlm/nanovlm_460m": 460e6}
SHIPPED = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))


def build_models(cfg) -> list[torch.nn.Module]:
    """The networks a shipped config describes, on the meta device (no memory, no data needed)."""
    from vistrain.models.gan import build_discriminator, build_generator

    with torch.device("meta"):
        if cfg.task == "var":
            return [VAR(cfg.model)]
        if cfg.task == "vqvae":
            return [VQVAE(cfg.model)]
        if cfg.task == "vlm":
            from vistrain.models.vlm import VisionLanguageModel, VLMConfig

            return [VisionLanguageModel(VLMConfig(cfg.model.vision, cfg.model.lm, cfg.model.pixel_shuffle_factor))]
        shape = dict(resolution=cfg.data.resolution, channels=cfg.data.channels, num_classes=10)
        return [build_generator(cfg.model.generator, **shape), build_discriminator(cfg.model.discriminator, **shape)]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_builds_its_models(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    count = sum(p.numel() for model in build_models(cfg) for p in model.parameters())
    if name in REFERENCE_PARAMS:
        assert count == REFERENCE_PARAMS[name]
    if name in APPROX_PARAMS:
        assert abs(count - APPROX_PARAMS[name]) < 0.01 * APPROX_PARAMS[name], count
    if name.startswith("var/imagenet256"):
        big = name.endswith("d30")  # the 2B model shards its state and recomputes its activations
        assert (cfg.train.parallel, cfg.train.activation_checkpointing) == (("fsdp", True) if big else ("ddp", False))


def test_the_reference_recipes_are_all_shipped():
    assert set(REFERENCE_PARAMS) | set(APPROX_PARAMS) <= set(SHIPPED)
    assert {"gan/digits", "vqvae/digits", "var/digits", "vlm/digits"} <= set(SHIPPED)


def test_the_tokenizer_trains_with_perceptual_and_adversarial_losses(tmp_path, capsys):
    """LPIPS from local files (random here: the shapes are what matters) and a discriminator switched on later."""
    from vistrain.models.lpips import LPIPS

    lpips = LPIPS()
    torch.save({f"features.{k}": v for k, v in lpips.features.state_dict().items()}, tmp_path / "vgg16.pth")
    torch.save({f"lin{i}.model.1.weight": lin.weight for i, lin in enumerate(lpips.lins)}, tmp_path / "lin.pth")
    run = tmp_path / "run"
    args = ["train", REPO / "configs/vqvae/digits.yaml", *TINY_VQVAE, f"run.out_dir={run}", "train.max_steps=4",
            "train.eval_every=4", "train.ckpt_every=4", "train.log_every=1", "vqvae.perceptual.weight=1.0",
            f"vqvae.perceptual.vgg={tmp_path / 'vgg16.pth'}", f"vqvae.perceptual.lin={tmp_path / 'lin.pth'}",
            "vqvae.adversarial.weight=0.5", "vqvae.adversarial.start=2",
            "vqvae.adversarial.discriminator.base_channels=8"]
    assert vistrain(*args) == 0
    import json

    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {e["step"]: e for e in events if e["split"] == "train"}
    assert "lpips" in train[1] and "g_loss" not in train[2] and "d_loss" not in train[2]
    assert {"g_loss", "adv_weight", "d_loss"} <= set(train[3])  # from step 2 (the third) on
    weights = ckpt_lib.load_weights(run)
    assert any(k.startswith("D.") for k in weights) and not any(k.startswith("lpips.") for k in weights)

    missing = ["train", REPO / "configs/vqvae/digits.yaml", *TINY_VQVAE, f"run.out_dir={tmp_path / 'bad'}",
               "vqvae.perceptual.weight=1.0", f"vqvae.perceptual.vgg={tmp_path / 'nope.pth'}"]
    assert vistrain(*missing) == 2
    assert f"vqvae.perceptual.vgg={tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err


def test_progressive_training_grows_the_scales_and_ramps_the_newest_in(tokenizer_run, tmp_path):
    """pg 0.5 over 20 steps with no warmup: scale 1 first, the last scale (index 2, all tokens) from step 6, when
    pg0 + round(step / 10 x (2 - pg0)) reaches it."""
    cfg = var_config(tmp_path, tokenizer_run, "var.pg=0.5", "var.pg0=1", "var.pgwp=0.1", "train.max_steps=20",
                     "train.log_every=1", "optim.schedule.warmup_frac=0.0")
    trainer = make_trainer(cfg, CPU)
    task = trainer.task
    assert [task.progressive_scale(s) for s in (0, 4, 5, 6, 10, 19)] == [1, 1, 1, -1, -1, -1]
    assert task._newest_scale_weight(3, 1) == 1.0  # no ramp in the first stage
    trainer.fit()
    import json

    train = {e["step"]: e for e in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if e["split"] == "train"}
    assert "Lt" not in train[5] and "loss/scale_2" not in train[5]  # the last scale is not trained yet
    assert train[5]["tokens_per_s"] == pytest.approx(5 * train[5]["samples_per_s"])  # 1 + 4 tokens
    assert "Lt" in train[11] and train[11]["tokens_per_s"] == pytest.approx(21 * train[11]["samples_per_s"])


# --------------------------------------------------------------------------- teacher forcing: speed paths


def built_task(out_dir, tokenizer, *overrides):
    from vistrain.engine.task import TaskEnv
    from vistrain.registry import get_spec

    cfg = var_config(out_dir, tokenizer, *overrides)
    env = TaskEnv(dist=CPU, seed=0, max_steps=8, batch_size=16, micro_batch_size=16, out_dir=Path(out_dir))
    return get_spec("var").build(cfg, env)


def test_teacher_forcing_gives_the_tokens_of_the_plain_fp32_tokenizer(tokenizer_run, tmp_path):
    """The task encodes with its tokenizer's convolutions in channels-last memory: on the digits, exactly the
    indices (and nearly the inputs) of the tokenizer as the original runs it. var.encoder_precision=bf16 is
    faster on tensor cores but moves a few indices (docs/var.md: 3% of them with the digits tokenizer)."""
    from vistrain.tasks.var import load_tokenizer

    task = built_task(tmp_path, tokenizer_run)
    images = torch.stack([task.train_set[i]["image"] for i in range(len(task.train_set))])
    plain = load_tokenizer(str(tokenizer_run), torch.device("cpu"))[0]  # NCHW, fp32, as loaded
    with torch.no_grad():
        idx_list = plain.img_to_idx(images)
        gt_BL, x_BLCv = task.teacher_forcing(images)
        assert torch.equal(gt_BL, torch.cat(idx_list, dim=1))
        torch.testing.assert_close(x_BLCv, plain.quantize.idx_to_var_input(idx_list))
        bf16_BL, _ = built_task(tmp_path, tokenizer_run, "var.encoder_precision=bf16").teacher_forcing(images)
    moved = (bf16_BL != gt_BL).float().mean().item()
    assert 0 < moved < 0.1, moved


def test_an_unknown_encoder_precision_is_named(tokenizer_run, tmp_path, capsys):
    assert vistrain("train", REPO / "configs/var/digits.yaml", *TINY_VAR, f"run.out_dir={tmp_path / 'x'}",
                    f"var.tokenizer={tokenizer_run}", "var.encoder_precision=fp8") == 2
    assert "var.encoder_precision='fp8': must be fp32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_token_cache_trains_as_encoding_on_the_fly_is_built_once_and_resumes_exactly(tokenizer_run, tmp_path,
                                                                                         capsys):
    """Digits without flips: every image has one view, so training on its cached tokens is training on the fly."""
    no_eval = ("eval.metrics=[]", "var.num_samples=2")
    make_trainer(var_config(tmp_path / "fly", tokenizer_run, *no_eval), CPU).fit()
    make_trainer(var_config(tmp_path / "cached", tokenizer_run, *no_eval, "var.token_cache=true"), CPU).fit()
    assert "var.token_cache: encoded 1617 images" in capsys.readouterr().out
    [cache] = (Path(os.environ["VISTRAIN_CACHE_DIR"]) / "var_tokens").glob("*.npy")
    tokens = np.load(cache)
    assert tokens.shape == (1617, 1 + 21) and tokens.dtype == np.int16  # the label, then 1 + 4 + 16 tokens
    fly, cached = ckpt_lib.load_weights(tmp_path / "fly"), ckpt_lib.load_weights(tmp_path / "cached")
    assert all(torch.equal(fly[k], cached[k]) for k in fly)

    middle = tmp_path / "cached" / "checkpoints" / "step_00000004"
    make_trainer(var_config(tmp_path / "resumed", tokenizer_run, *no_eval, "var.token_cache=true",
                            f"run.resume={middle}"), CPU).fit()
    assert "var.token_cache: reading" in capsys.readouterr().out  # the file is there: nothing is encoded again
    resumed = ckpt_lib.load_weights(tmp_path / "resumed")
    assert all(torch.equal(cached[k], resumed[k]) for k in cached)


def test_the_token_cache_refuses_random_flips(tokenizer_run, tmp_path, capsys):
    from test_faults import snapshot

    folders = (tokenizer_run, tmp_path, Path(os.environ["VISTRAIN_CACHE_DIR"]))
    before = [snapshot(folder) for folder in folders]
    assert vistrain("train", REPO / "configs/var/digits.yaml", *TINY_VAR, f"run.out_dir={tmp_path / 'run'}",
                    f"var.tokenizer={tokenizer_run}", "var.token_cache=true", "data.hflip=true") == 2
    err = capsys.readouterr().err
    assert "var.token_cache=true keeps one encoding of each training image" in err and "data.hflip=false" in err
    assert before == [snapshot(folder) for folder in folders]  # no run folder, no cache file

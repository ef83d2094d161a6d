"""`vistrain import var`: official FoundationVision/VAR files -> a vistrain model folder, and parity with the
original code on the imported models.

The official files are built here, small, by official key name with seeded weights (tests/support/var_golden.py),
saved with torch.save as the originals are, and imported through the command line. Every check then uses
the folder the importer wrote (the path a user takes): its config, its weights, `vistrain sample` on it,
and the numbers of the original code on the same weights (tests/data/var_golden.safetensors).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vistrain.models.var as var_module
from support import var_golden as golden
from vistrain.cli import main
from vistrain.engine import checkpoint_files as ckpt_lib
from vistrain.tasks.var import load_transformer
from vistrain.tasks.vqvae import load_vqvae

REPO = Path(__file__).resolve().parents[1]

CLOSE = dict(rtol=0.0, atol=1e-5)  # float32 rounding of a different but equivalent op order


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def official() -> dict:
    return {"vae": golden.official_vae_state(), "var": golden.official_var_state()}


@pytest.fixture(scope="module")
def official_files(official, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("official")
    paths = {"vae": folder / "vae_ch32v64z8.pth", "var": folder / "var_d2.pth"}
    for name, path in paths.items():
        torch.save(official[name], path)
    return paths


def _import(vae: Path, var: Path, out: Path, *extra: str) -> int:
    return main(["import", "var", "--vae", str(vae), "--var", str(var), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def imported(official_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "var_d2"
    assert _import(official_files["vae"], official_files["var"], out) == 0
    return out


@pytest.fixture(scope="module")
def models(imported):
    """The transformer and tokenizer as `vistrain sample` loads them from the folder."""
    model_config = ckpt_lib.load_model_config(imported)
    weights = ckpt_lib.load_weights(imported)
    cpu = torch.device("cpu")
    return load_transformer(model_config, weights, cpu), load_vqvae(model_config["vae"], weights, cpu)


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return load_file(str(golden.GOLDEN))


def _ours(key: str) -> str:
    """Official tokenizer key -> vistrain's (the shared residual convs are renamed)."""
    return re.sub(r"^quantize\.quant_resi\.qresi_ls\.", "quantize.phi.", key)


# --------------------------------------------------------------------------- import


def test_import_reads_the_architecture_from_the_shapes(imported) -> None:
    assert sorted(p.name for p in imported.iterdir()) == ["checksums.json", "config.json", "model.safetensors",
                                                          "provenance.json"]
    assert json.loads((imported / "provenance.json").read_text())["action"] == "import"
    config = json.loads((imported / "config.json").read_text())
    assert config["task"] == "var" and config["tokenizer"] is None
    model = config["model"]
    assert {k: model[k] for k in ("depth", "num_classes", "vocab_size", "z_channels", "patch_nums", "shared_aln")} == {
        "depth": 2, "num_classes": 10, "vocab_size": 64, "z_channels": 8, "patch_nums": [1, 2, 3, 4],
        "shared_aln": False,
    }
    vae = config["vae"]
    assert {k: vae[k] for k in ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "in_channels",
                                "share_quant_resi", "patch_nums", "attn", "mid_attn")} == {
        "vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "in_channels": 3,
        "share_quant_resi": 4, "patch_nums": [1, 2, 3, 4], "attn": True, "mid_attn": True,
    }


def test_imported_weights_are_the_files_tensors(imported, official) -> None:
    weights = ckpt_lib.load_weights(imported)
    expected = {}
    for key, value in official["var"].items():
        if key in ("lvl_1L", "attn_bias_for_masking") or key.endswith(".attn.zero_k_bias"):
            continue  # recomputable buffers, not stored
        expected[f"var.{key}"] = value
    for key, value in official["vae"].items():
        if key != "quantize.ema_vocab_hit_SV":
            expected[f"vae.{_ours(key)}"] = value
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key


def test_sample_command_on_the_imported_folder(imported, ref, tmp_path) -> None:
    out = tmp_path / "x.npz"
    argv = ["sample", str(imported), "--out", str(out), "--top-k", "1", "--cfg", "1.5", "--labels", "3,7", "--num", "4"]
    assert main(argv) == 0
    images = np.load(out)["arr_0"]
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images[0], images[2]) and np.array_equal(images[1], images[3])  # greedy: label decides
    # The original's greedy images (labels 3, 7, cfg 1.5) in [0, 1], to uint8 rounding.
    got = torch.from_numpy(images[:2, ::4, ::4]).permute(0, 3, 1, 2).float() / 255
    assert (got - ref["greedy1.5.img"]).abs().max() <= 0.5 / 255 + 1e-5


# --------------------------------------------------------------------------- parity with the original


def test_teacher_forced_logits_match_the_original(models, ref) -> None:
    var, vae = models
    with torch.no_grad():
        x_BLCv = vae.quantize.idx_to_var_input(golden.teacher_forcing_idx())
        torch.testing.assert_close(x_BLCv, ref["tf.var_input"], **CLOSE)
        assert not var.training  # no label dropout: the original's forward with cond_drop_rate = 0
        logits = var(torch.tensor(golden.TF_LABELS), x_BLCv)
    torch.testing.assert_close(logits, ref["tf.logits"], **CLOSE)
    assert torch.equal(logits.argmax(-1), ref["tf.argmax"])


def _generate(models, monkeypatch, **kw) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Token indices per scale (recorded at the one sampling call per scale) and the image in [0, 1]."""
    var, vae = models
    picked: list[torch.Tensor] = []
    real = var_module.sample_top_k_top_p

    def record(*args, **kwargs):
        idx = real(*args, **kwargs)
        picked.append(idx[:, :, 0].clone())
        return idx

    monkeypatch.setattr(var_module, "sample_top_k_top_p", record)
    with torch.no_grad():
        f_hat = var.generate(vae, torch.tensor(golden.GEN_LABELS), **kw)
        img = vae.fhat_to_img(f_hat).add(1).mul(0.5)  # the original returns [0, 1]
    return picked, img


@pytest.mark.parametrize("cfg", golden.GREEDY_CFGS)
def test_greedy_generation_matches_the_original(models, ref, monkeypatch, cfg) -> None:
    assert ref[f"greedy{cfg}.margin"].item() > 1e-3  # the original's picks are far from ties
    picked, img = _generate(models, monkeypatch, cfg=cfg, top_k=1, top_p=0.0,
                            generator=torch.Generator().manual_seed(0))
    assert len(picked) == len(golden.PATCH_NUMS)
    for si, idx in enumerate(picked):
        assert torch.equal(idx, ref[f"greedy{cfg}.idx.{si}"]), f"scale {si}: {idx.tolist()}"
    torch.testing.assert_close(golden.subsample(img), ref[f"greedy{cfg}.img"], **CLOSE)


def test_sampled_generation_matches_the_original(models, ref, monkeypatch) -> None:
    """top-k, top-p and one multinomial draw per scale from a seeded CPU generator: same draws, same order."""
    s = golden.SAMPLED
    picked, img = _generate(models, monkeypatch, cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"],
                            generator=torch.Generator().manual_seed(s["seed"]))
    for si, idx in enumerate(picked):
        assert torch.equal(idx, ref[f"sampled.idx.{si}"]), f"scale {si}: {idx.tolist()}"
    torch.testing.assert_close(golden.subsample(img), ref["sampled.img"], **CLOSE)
    other, _ = _generate(models, monkeypatch, cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"],
                         generator=torch.Generator().manual_seed(s["seed"] + 1))
    assert any(not torch.equal(a, b) for a, b in zip(picked, other))  # the draws do depend on the seed


# --------------------------------------------------------------------------- round trip


def test_export_to_official_and_import_again_is_identical(official, imported, tmp_path, capsys) -> None:
    """official -> `vistrain import var` -> `vistrain export --format var-official`: the files the official code
    loads (build_vae_var + load_state_dict), named as the released ones, holding the same tensors to the bit --
    buffers included -- and importing them again gives the same model folder."""
    out = tmp_path / "official"
    assert main(["export", str(imported), "--format", "var-official", "--out", str(out)]) == 0
    config = json.loads((imported / "config.json").read_text())
    vae = config["vae"]
    files = {"vae": out / f"vae_ch{vae['ch']}v{vae['vocab_size']}z{vae['z_channels']}.pth",
             "var": out / f"var_d{config['model']['depth']}.pth"}
    for name, path in files.items():
        exported = torch.load(path, map_location="cpu", weights_only=True)
        assert sorted(exported) == sorted(official[name]), name
        for key, value in official[name].items():
            got = exported[key]
            assert got.dtype == value.dtype and torch.equal(got, value), key
    assert (out / "provenance.json").is_file() and (out / "checksums.json").is_file()
    again = tmp_path / "again"
    assert _import(files["vae"], files["var"], again) == 0
    first, second = ckpt_lib.load_weights(imported), ckpt_lib.load_weights(again)
    assert sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
    assert json.loads((again / "config.json").read_text()) == json.loads((imported / "config.json").read_text())
    capsys.readouterr()
    assert main(["export", str(imported), "--format", "transformers", "--out", str(tmp_path / "hf")]) == 2
    assert "a 'var' model exports as vistrain, var-official" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors


def _error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    return err


def test_a_truncated_file_is_named(official_files, tmp_path, capsys) -> None:
    data = official_files["var"].read_bytes()
    cut = tmp_path / "var_cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    err = _error(capsys, _import(official_files["vae"], cut, tmp_path / "out"))
    assert f"--var {cut}: not a readable checkpoint" in err
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_of_another_vocabulary_is_refused(official, official_files, tmp_path, capsys) -> None:
    vae = dict(official["vae"])
    vae["quantize.embedding.weight"] = torch.randn(32, golden.CVAE)
    vae["quantize.ema_vocab_hit_SV"] = torch.zeros(len(golden.PATCH_NUMS), 32)
    path = tmp_path / "vae_v32.pth"
    torch.save(vae, path)
    err = _error(capsys, _import(path, official_files["var"], tmp_path / "out"))
    assert f"--vae {path} and --var {official_files['var']} do not belong together" in err
    assert "32 codes of 8 channels" in err and "expects 64 of 8" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, key", [
    ("var", "pos_1LC"),  # read for the architecture
    ("var", "head.weight"),
    ("var", "blocks.1.ffn.fc1.bias"),  # found missing when the weights are checked against it
    ("vae", "quantize.embedding.weight"),
    ("vae", "encoder.conv_in.weight"),
    ("vae", "decoder.up.2.block.1.conv2.weight"),
    ("vae", "quantize.quant_resi.qresi_ls.3.bias"),
])
def test_a_missing_key_is_named_with_its_file(official, official_files, tmp_path, capsys, flag, key) -> None:
    state = {k: v for k, v in official[flag].items() if k != key}
    broken = tmp_path / f"{flag}_broken.pth"
    torch.save(state, broken)
    paths = {**official_files, flag: broken}
    err = _error(capsys, _import(paths["vae"], paths["var"], tmp_path / "out"))
    assert f"--{flag} {broken}" in err and repr(key) in err, err
    assert not (tmp_path / "out").exists()


def test_an_ambiguous_scale_schedule_asks_for_patch_nums(official, official_files, tmp_path, capsys) -> None:
    """78 tokens in 4 scales from 1 is [1, 2, 3, 8] or [1, 4, 5, 6]: the shapes cannot tell, --patch-nums can."""
    var = dict(official["var"])
    var["pos_1LC"] = torch.randn(1, 78, 64 * golden.DEPTH)
    path = tmp_path / "var_l78.pth"
    torch.save(var, path)
    err = _error(capsys, _import(official_files["vae"], path, tmp_path / "out"))
    assert f"--var {path}: cannot tell the scale schedule" in err and "pos_1LC [1, 78, 128]" in err
    assert "several fit: 1,2,3,8; 1,4,5,6" in err and "--patch-nums" in err
    err = _error(capsys, _import(official_files["vae"], path, tmp_path / "out", "--patch-nums", "1,2,3,4"))
    assert "--patch-nums 1,2,3,4 does not fit" in err and "pos_1LC has 78 positions" in err
    err = _error(capsys, _import(official_files["vae"], path, tmp_path / "out", "--patch-nums", "1,x"))
    assert "--patch-nums 1,x: expected comma-separated sizes" in err
    assert _import(official_files["vae"], path, tmp_path / "out", "--patch-nums", "1,4,5,6") == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"]["patch_nums"] == config["vae"]["patch_nums"] == [1, 4, 5, 6]


def test_given_patch_nums_that_fit_change_nothing(official_files, imported, tmp_path) -> None:
    out = tmp_path / "given"
    assert _import(official_files["vae"], official_files["var"], out, "--patch-nums", "1,2,3,4") == 0
    assert (out / "config.json").read_text() == (imported / "config.json").read_text()


@pytest.mark.slow
def test_var_training_can_start_from_the_imported_model(imported, tmp_path) -> None:
    """Fine-tuning: the transformer starts from the imported weights, the tokenizer is the imported one."""
    from vistrain.config import load_config
    from vistrain.engine import checkpoint_files as ckpt_lib
    from vistrain.engine.dist import DistContext
    from vistrain.registry import make_trainer

    cfg = load_config(REPO / "configs" / "var" / "digits.yaml", [
        f"run.out_dir={tmp_path}", f"var.init={imported}", f"var.tokenizer={imported}", "data.resolution=64",
        "data.channels=3", "data.num_workers=0", f"model.depth={golden.DEPTH}", f"model.vocab_size={golden.VOCAB}",
        f"model.z_channels={golden.CVAE}", "model.patch_nums=[1,2,3,4]", "train.batch_size=8", "train.max_steps=2",
        "train.eval_every=100", "train.ckpt_every=2", "run.loggers=[]", "var.num_samples=2", "var.val_images=8"])
    trainer = make_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")))
    start = ckpt_lib.load_weights(imported)
    for key, value in trainer.task.nets["var"].state_dict().items():
        assert torch.equal(value, start[f"var.{key}"]), key
    trainer.fit()
    assert (tmp_path / "checkpoints" / "step_00000002" / "model.safetensors").exists()

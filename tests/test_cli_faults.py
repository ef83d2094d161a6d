"""The command-line and evaluation faults a new user hit (issue 12, faults 3 and 5-15): each is refused with a
non-zero exit and one line that names the file, key or flag, before any work, and every existing run or model
folder is left byte for byte as it was (no stray temporary file either)."""

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import cli_runs
from support import var_golden as golden
from support.cli_runs import snapshot, vistrain
from support.standin_detector import TwoHeaded, save_scripted
from vistrain import cli
from vistrain.config import load_config
from vistrain.engine import checkpoint_files as ckpt_lib

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "support" / "toy.yaml"
TOY_RUN = ["train.batch_size=16", "train.max_steps=2", "train.ckpt_every=2", "data.num_workers=0",
           "run.loggers=[jsonl]"]
TINY_GAN = [*cli_runs.TINY_GAN, "train.max_steps=2", "train.ckpt_every=2", "train.eval_every=2", "eval.metrics=[]"]
VLM = REPO / "configs" / "vlm" / "digits.yaml"
TINY_VLM = ["data.seq_length=128", "train.batch_size=4", "data.val_size=8", "vlm.val_questions=2",
            "model.lm.num_layers=1", "model.lm.hidden_size=64", "model.lm.intermediate_size=128",
            "model.vision.num_layers=1", "run.loggers=[jsonl]", "data.num_workers=0", "train.max_steps=2",
            "train.ckpt_every=2", "train.eval_every=2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The folders a user already has: a digits GAN run, a GAN run on an image folder, a VLM run, an imported
    VAR model (the official layout, small: tests/support/var_golden.py), and a folder of three images."""
    root = tmp_path_factory.mktemp("runs")
    images = root / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(16):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / cls / f"{i}.png")
    three = root / "three"
    three.mkdir()
    for i in range(3):
        shutil.copy(images / "a" / f"{i}.png", three)
    found = {"gan": root / "gan", "gan_folder": root / "gan_folder", "vlm": root / "vlm", "var": root / "var_import"}
    assert vistrain("train", REPO / "configs/gan/digits.yaml", *TINY_GAN, f"run.out_dir={found['gan']}") == 0
    assert vistrain("train", REPO / "configs/gan/digits.yaml", *TINY_GAN, f"run.out_dir={found['gan_folder']}",
                    "data.name=image_folder", f"data.root={images}", "data.channels=3") == 0
    assert vistrain("train", VLM, *TINY_VLM, f"run.out_dir={found['vlm']}", f"data.cache_dir={root / 'cache'}") == 0
    official = official_files(root, {})
    assert vistrain("import", "var", "--vae", official["vae"], "--var", official["var"], "--out", found["var"]) == 0
    return {**found, "three_images": three, "detector": Path(save_scripted(TwoHeaded(), root / "standin.pt"))}


def official_files(folder: Path, nan_keys: dict[str, str]) -> dict[str, Path]:
    """The small official VAR files; `nan_keys` (file -> key) puts a nan into that tensor."""
    paths = {}
    for name, state in (("vae", golden.official_vae_state()), ("var", golden.official_var_state())):
        if name in nan_keys:
            state[nan_keys[name]] = state[nan_keys[name]].clone()
            state[nan_keys[name]].view(-1)[0] = float("nan")
        paths[name] = folder / f"{name}{'_nan' if nan_keys else ''}.pth"
        torch.save(state, paths[name])
    return paths


def refused(runs, capsys, argv: list, status: int, *needles: str) -> str:
    """Run `vistrain *argv`: it must exit `status`, say every needle on stderr in one line and no traceback,
    and leave every existing folder exactly as it was."""
    folders = [p for key, p in runs.items() if key != "detector"]
    before = {p: snapshot(p) for p in folders}
    assert vistrain(*argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    for p in folders:
        assert snapshot(p) == before[p], p
    return err


def latest(run: Path) -> Path:
    return ckpt_lib.find_checkpoint(run)


def damaged_copy(run: Path, to: Path, damage) -> Path:
    shutil.copytree(run, to)
    damage(latest(to))
    return to


# ------------------------------------------------------------------------------------- 3: judge and data


def test_eval_refuses_the_digits_judge_for_a_model_of_other_data(runs, capsys):
    refused(runs, capsys, ["eval", runs["gan_folder"], "--metrics", "judge", "--num-images", 20], 2,
            "`judge`, the digits judge", "data.name=image_folder", "only knows digits")


# ------------------------------------------------------------------------------ 5: configs beyond reason


@pytest.mark.timeout(60)  # a regression would expand the bomb until memory runs out: stop it long before that
def test_a_yaml_alias_bomb_or_a_section_holding_itself_is_refused(runs, tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    lines, previous = ["task: support.toy_task", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"], "a0"
    for i in range(1, 10):  # 10^10 values once expanded
        lines.append(f"a{i}: &a{i} [{', '.join([f'*{previous}'] * 10)}]")
        previous = f"a{i}"
    bomb.write_text("\n".join(lines) + "\n")
    refused(runs, capsys, ["train", bomb, f"run.out_dir={tmp_path / 'out'}"], 2, str(bomb), "alias bomb")
    itself = tmp_path / "itself.yaml"
    itself.write_text("task: support.toy_task\nrun: &r\n  x: *r\n")
    refused(runs, capsys, ["train", itself, f"run.out_dir={tmp_path / 'out'}"], 2, str(itself), "holds itself")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ 6, 12, 15: where output goes


@pytest.fixture
def no_scoring(monkeypatch):
    """`vistrain eval` that would score (generate, load a detector) fails the test: refusals come first."""
    def scoring(*args, **kwargs):
        raise AssertionError("scored before the output path was checked")

    monkeypatch.setattr(cli.evaluate, "evaluate", scoring)


def test_eval_checks_out_before_any_work_and_never_writes_into_a_checkpoint(runs, tmp_path, capsys, no_scoring):
    ckpt = latest(runs["gan"])
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    cases = [(runs["gan"] / "checkpoints", "is a folder"),
             (a_file / "result.json", f"{a_file} is a file, so nothing can be written under it"),
             (ckpt / "metrics.json", f"is inside {ckpt}"),
             (runs["gan"] / "checkpoints" / "result.json", "is inside"),
             (tmp_path / ("x" * 300) / "result.json", "is 300 bytes long")]
    for out, needle in cases:
        refused(runs, capsys, ["eval", runs["gan"], "--metrics", "judge", "--out", out], 2, "--out", needle)
    assert a_file.read_text() == "mine\n"


def test_sample_export_and_import_check_out_before_any_work(runs, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    full = tmp_path / "full"
    (full / "x").mkdir(parents=True)
    under_file = f"{a_file} is a file, so nothing can be written under it"
    refused(runs, capsys, ["sample", runs["gan"], "--out", latest(runs["gan"]) / "x.png"], 2, "--out", "is inside")
    refused(runs, capsys, ["export", runs["gan"], "--out", a_file / "sub"], 2, "--out", under_file)
    refused(runs, capsys, ["export", runs["gan"], "--out", full], 2, "--out", "already exists and is not empty")
    refused(runs, capsys, ["export", runs["gan"], "--out", runs["gan"] / "checkpoints" / "release"], 2, "is inside")
    refused(runs, capsys, ["import", "vlm", "--vision", tmp_path, "--lm", tmp_path, "--out", a_file / "sub"], 2,
            "--out", under_file)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "full"] and a_file.read_text() == "mine\n"


def test_a_run_folder_name_too_long_for_the_file_system_is_a_config_error(runs, tmp_path, capsys):
    out = tmp_path / ("r" * 300)
    refused(runs, capsys, ["train", TOY, f"run.out_dir={out}", *TOY_RUN], 2, "run.out_dir=", "is 300 bytes long",
            "choose a shorter path")


def test_export_of_a_checkpoint_whose_metrics_json_was_overwritten_still_writes_its_card(runs, tmp_path, capsys):
    run = damaged_copy(runs["gan"], tmp_path / "run", lambda c: (c / "metrics.json").write_text('{"metrics": {}}'))
    assert vistrain("export", run, "--out", tmp_path / "release") == 0
    assert "A vistrain gan model" in (tmp_path / "release" / "README.md").read_text()


# ------------------------------------------------------------------------------------- 7: generate


def test_generate_bounds_max_new_tokens_by_the_context(runs, capsys):
    err = refused(runs, capsys, ["generate", runs["vlm"], "--prompt", "What digit is this?", "--max-new-tokens",
                                 100_000_000], 2, "--max-new-tokens 100000000", "context is 2048 tokens")
    room = int(err.rsplit("at most ", 1)[1].split()[0])
    assert vistrain("generate", runs["vlm"], "--prompt", "What digit is this?", "--max-new-tokens", room) == 0


@pytest.mark.parametrize("args, needle", [
    (["--temperature", "nan"], "--temperature"),
    (["--top-k", "-1"], "--top-k -1"),
    (["--top-p", "1.5"], "--top-p 1.5"),
])
def test_generate_refuses_sampling_flags_out_of_range(runs, capsys, args, needle):
    refused(runs, capsys, ["generate", runs["vlm"], "--prompt", "?", *args], 2, needle)


# --------------------------------------------------------------------------- 8: a checkpoint's assets


def test_model_init_of_another_task_names_the_key(runs, tmp_path, capsys):
    refused(runs, capsys, ["train", VLM, *TINY_VLM, f"run.out_dir={tmp_path / 'new'}", f"model.init={runs['gan']}"],
            2, f"model.init={runs['gan']} holds a 'gan' model, not a vision-language model")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda ckpt: shutil.rmtree(ckpt / "tokenizer"), "has no tokenizer/ folder"),
    (lambda ckpt: (ckpt / "tokenizer" / "tokenizer.json").write_text("{bad"), "tokenizer/tokenizer.json is corrupt"),
])
def test_a_missing_or_damaged_tokenizer_is_named_wherever_it_is_read(runs, tmp_path, capsys, damage, needle):
    from vistrain.lmms import VLMRunner

    copy = damaged_copy(runs["vlm"], tmp_path / "vlm", damage)
    runs = {**runs, "copy": copy}
    refused(runs, capsys, ["generate", copy, "--prompt", "?"], 1, needle)
    refused(runs, capsys, ["train", VLM, *TINY_VLM, f"run.out_dir={tmp_path / 'new'}", f"model.init={copy}"], 2,
            f"model.init={copy}", needle)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ckpt_lib.CheckpointError, match=needle.replace("/", ".")):
        VLMRunner(copy, device="cpu")  # the lmms-eval adapter


# ------------------------------------------------------------------------------------- 9: eval.mode=slurm


def test_slurm_eval_jobs_without_submitit_or_without_slurm_are_refused_at_start(runs, tmp_path, capsys,
                                                                                monkeypatch):
    slurm = ["train", TOY, f"run.out_dir={tmp_path / 'out'}", *TOY_RUN, "eval.mode=slurm", "eval.metrics=[fid]"]
    monkeypatch.setitem(sys.modules, "submitit", None)  # not importable, whatever is installed
    refused(runs, capsys, slurm, 2, "eval.mode=slurm", "submitit, which is not installed")
    monkeypatch.delitem(sys.modules, "submitit")
    fake = tmp_path / "site" / "submitit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.setenv("PATH", str(tmp_path / "no_slurm_here"))
    refused(runs, capsys, slurm, 2, "eval.mode=slurm", "no SLURM", "eval.mode=local")
    assert not (tmp_path / "out").exists()
    # asked for explicitly, submitit's local cluster needs no SLURM
    assert load_config(TOY, [*slurm[2:], "eval.slurm.cluster=local"]).eval.slurm.cluster == "local"


# ------------------------------------------------------------------------------------ 10: VAR sampling


@pytest.mark.parametrize("args, needle", [
    (["--num-per-class", "-2"], "--num-per-class -2: must be at least 1"),
    (["--num-per-class", "0"], "--num-per-class 0: must be at least 1"),
    (["--cfg", "nan"], "--cfg nan: must be a finite number"),
    (["--cfg", "inf"], "--cfg inf: must be a finite number"),
    (["--top-k", "-5"], "--top-k -5: must be >= 0"),
    (["--top-p", "2"], "--top-p 2.0: must be in [0, 1]"),
    (["--top-p", "-0.5"], "--top-p -0.5: must be in [0, 1]"),
    (["--num-per-class", "2", "--labels", "3"], "--num-per-class and --labels both choose the classes"),
    (["--labels", "12"], "--labels [12] out of range"),
])
def test_var_sample_flags_are_checked_by_the_task_that_declares_them(runs, tmp_path, capsys, args, needle):
    refused(runs, capsys, ["sample", runs["var"], "--out", tmp_path / "x.png", "--num", 4, *args], 2, needle)
    assert not list(tmp_path.iterdir())


def test_eval_refuses_var_sample_flags_it_cannot_honour(runs, capsys, no_scoring):
    refused(runs, capsys, ["eval", runs["var"], "--metrics", "judge", "--top-p", "7"], 2, "--top-p 7.0")


@pytest.mark.parametrize("flag, key", [("var", "head.weight"), ("vae", "quantize.embedding.weight")])
def test_import_refuses_weights_that_hold_nan_naming_the_file(runs, tmp_path, capsys, flag, key):
    files = official_files(tmp_path, {flag: key})
    refused(runs, capsys, ["import", "var", "--vae", files["vae"], "--var", files["var"], "--out", tmp_path / "out"],
            2, f"--{flag} {files[flag]}: tensor {flag}.{key} holds non-finite values")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 11, 13: references and scores


def test_a_reference_too_small_for_the_metric_is_refused_before_generating(runs, capsys, monkeypatch):
    def load_weights(*args, **kwargs):  # loading the weights comes right before generating
        raise AssertionError("generation started")

    monkeypatch.setattr(ckpt_lib, "load_weights", load_weights)
    refused(runs, capsys, ["eval", runs["gan"], "--metrics", "pr", "--ref", runs["three_images"], "--detector",
                           runs["detector"], "--num-images", 20000, "--out", runs["three_images"].parent / "pr.json"],
            2, f"reference {runs['three_images']} holds 3 images; pr needs at least 4")
    refused(runs, capsys, ["eval", runs["gan"], "--metrics", "is", "--detector", runs["detector"], "--num-images", 3,
                           "--out", runs["three_images"].parent / "is.json"], 2, "--num-images 3: is needs at least 10")


def test_non_finite_reference_statistics_or_detector_outputs_are_named(runs, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.full(16, np.nan), sigma=np.eye(16), count=np.int64(50))
    refused(runs, capsys, ["eval", runs["gan"], "--metrics", "fid", "--ref", stats, "--detector", runs["detector"],
                           "--num-images", 20, "--out", tmp_path / "r.json"], 2, f"{stats}: mu holds non-finite")
    nan_detector = save_scripted(NanFeatures(), tmp_path / "nan.pt")
    refused(runs, capsys, ["eval", runs["gan"], "--metrics", "fid", "--ref", stats, "--detector", nan_detector,
                           "--num-images", 20, "--out", tmp_path / "r.json"], 2, "detector nan.pt",
            "outputs non-finite values")
    assert not (tmp_path / "r.json").exists()


class NanFeatures(torch.nn.Module):
    """A detector gone bad: features like the stand-in's, with a nan in them."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        out = x.float().flatten(1)[:, :16]
        out[:, 0] = float("nan")
        return out


def test_generated_images_that_are_not_finite_are_not_scored(runs):
    from vistrain.eval.score import ImageScorer

    scorer = ImageScorer(["is"], detector=str(runs["detector"]))
    with pytest.raises(ValueError, match="non-finite pixel values"):
        scorer.score_samples([(torch.full((12, 3, 16, 16), float("nan")), None)])


# -------------------------------------------------------------------------------------- 14: import vlm


def test_import_vlm_refuses_a_path_that_is_not_a_folder_at_once_naming_the_flag(runs, tmp_path, capsys, monkeypatch):
    import vistrain.interop.vlm_parts as vlm_parts

    monkeypatch.setattr(vlm_parts, "import_hf", lambda *a: pytest.fail("import_hf was called"))
    refused(runs, capsys, ["import", "vlm", "--vision", tmp_path, "--lm", "hf/nope", "--out", tmp_path / "out"], 2,
            "--lm hf/nope is not a folder")
    refused(runs, capsys, ["train", VLM, *TINY_VLM, f"run.out_dir={tmp_path / 'new'}", "model.lm_from=hf/nope"], 2,
            "model.lm_from=hf/nope", "is not a folder")
    assert not (tmp_path / "out").exists() and not (tmp_path / "new").exists()


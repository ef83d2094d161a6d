"""Provenance: every checkpoint and model folder says which code, command, machines and config made it, and
`vistrain info` shows it with the step, the metrics and whether every file still matches its checksum."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from support import cli_runs
from support.cli_runs import snapshot, vistrain
from vistrain import cli, provenance

REPO = Path(__file__).resolve().parents[1]
GAN = REPO / "configs" / "gan" / "digits.yaml"
TINY_GAN = [*cli_runs.TINY_GAN, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2", "eval.metrics=[]"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    """A tiny GAN run, started the way a user starts one: `vistrain train ...` is the process's command line."""
    run = tmp_path_factory.mktemp("gan") / "run"
    argv = ["train", str(GAN), *TINY_GAN, f"run.out_dir={run}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(REPO / ".venv" / "bin" / "vistrain"), *argv])
        assert cli.main(argv) == 0
    return run


def head_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_every_checkpoint_records_the_commit_command_machines_and_config(gan_run):
    checkpoints = sorted((gan_run / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]
    config = yaml.safe_load((gan_run / "config.yaml").read_text())
    for ckpt in checkpoints:
        record = json.loads((ckpt / provenance.FILE).read_text())
        assert provenance.FILE in json.loads((ckpt / "checksums.json").read_text())  # checksummed like the rest
        assert record["action"] == "train"
        assert record["vistrain"]["commit"] == head_commit()  # the tests run from a checkout
        assert isinstance(record["vistrain"]["dirty"], bool)
        assert record["command"] == "vistrain " + shlex.join(["train", str(GAN), *TINY_GAN, f"run.out_dir={gan_run}"])
        assert record["torch"] == torch.__version__ and "cuda" in record
        assert record["world_size"] == 1 and sum(record["devices"].values()) == 1
        assert record["config"] == config  # the resolved config, as config.yaml holds it
        assert record["best_metric"] == {"name": "fd_pixels", "mode": "min"}


def test_info_shows_step_metrics_checksums_commit_and_command(gan_run, capsys):
    assert vistrain("info", gan_run) == 0
    out = capsys.readouterr().out
    assert "checkpoint at step 4, task gan" in out
    assert f"commit {head_commit()}" in out
    assert f"command: vistrain train {GAN}" in out
    assert "checksums: every file matches" in out
    assert "fd_pixels=" in out and "training config:" in out and "max_steps: 4" in out


def test_info_names_a_damaged_file_and_fails(gan_run, tmp_path, capsys):
    ckpt = shutil.copytree(gan_run / "checkpoints" / "step_00000004", tmp_path / "step_00000004")
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert vistrain("info", ckpt) == 1
    out = capsys.readouterr().out
    assert "checksums: model.safetensors is corrupt" in out and "commit" in out  # still shows what it knows


@pytest.mark.parametrize("make", ["empty folder", "missing", "a file"])
def test_info_on_what_is_no_checkpoint_says_so(tmp_path, capsys, make):
    path = tmp_path / "thing"
    if make == "empty folder":
        path.mkdir()
    elif make == "a file":
        path.write_text("hello")
    before = snapshot(tmp_path)
    assert vistrain("info", path) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_an_export_keeps_the_training_provenance_and_its_card_shows_it(gan_run, tmp_path, capsys):
    out = tmp_path / "release"
    assert vistrain("export", gan_run, "--out", out) == 0
    trained = json.loads((gan_run / "checkpoints" / "step_00000004" / provenance.FILE).read_text())
    record = json.loads((out / provenance.FILE).read_text())
    assert record["action"] == "export" and record["from"] == trained
    assert provenance.FILE in json.loads((out / "checksums.json").read_text())
    card = (out / "README.md").read_text()
    assert "## Provenance" in card and f"commit {head_commit()}" in card
    assert f"command: vistrain train {GAN}" in card and "## Training config" in card and "max_steps: 4" in card
    capsys.readouterr()
    assert vistrain("info", out) == 0
    shown = capsys.readouterr().out
    assert "model folder, task gan" in shown and "made by: vistrain export" in shown
    assert "  from:\n    made by: vistrain train" in shown


def test_outside_a_checkout_or_without_git_there_is_no_commit_and_no_error(tmp_path, monkeypatch):
    assert provenance._code(tmp_path) == {"version": provenance.vistrain.__version__, "source": str(tmp_path)}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git to be found
    assert "commit" not in provenance._code(REPO / "src" / "vistrain")


@pytest.mark.parametrize("argv, shown", [
    (["/venv/lib/python3.11/site-packages/vistrain/__main__.py", "train", "a b.yaml"],
     "python -m vistrain train 'a b.yaml'"),
    (["/venv/bin/vistrain", "export", "run"], "vistrain export run"),
    (["/usr/bin/my script.py", "x=1"], "'/usr/bin/my script.py' x=1"),
])
def test_the_command_is_shown_as_a_user_types_it(argv, shown):
    assert provenance.command_line(argv) == shown

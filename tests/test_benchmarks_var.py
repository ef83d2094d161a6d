"""benchmarks/vs_var.py runs vistrain's half at a tiny shape (the original's half needs its checkout), so the
benchmark cannot rot between the runs that compare."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_var.py"
TINY = ["--depth", "1", "--resolution", "64", "--batch", "2", "--vae-ch", "32", "--sample-batch", "1",
        "--steps", "1", "--rounds", "1", "--calls", "1", "--warmup", "0"]


@pytest.fixture(scope="module")
def vs_var():
    spec = importlib.util.spec_from_file_location("vs_var", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vs_var"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["vs_var"]


def test_vistrains_half_trains_encodes_and_samples(vs_var, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert vs_var.main([*TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| train step | vistrain | sdpa |" in printed
    assert "| encode batch 2 (teacher forcing) | vistrain |" in printed and "| sample batch 1 | vistrain |" in printed
    assert "vistrain/original" not in printed  # no --ref: no ratio
    rows = json.loads(out.read_text())["rows"]
    assert [(r["what"], r["side"]) for r in rows] == [
        ("train step", "vistrain"), ("encode batch 2 (teacher forcing)", "vistrain"), ("sample batch 1", "vistrain")]
    assert all(r["images_per_s"] > 0 and r["ms"] > 0 for r in rows)


def test_the_token_cache_note_weighs_its_build_against_each_steps_saving(vs_var):
    """(--token-cache itself encodes the whole digits set: too long for a test; tests/test_var_task.py trains on it)"""
    rows = [{"what": "train step", "side": "vistrain", "ms": 30.0},
            {"what": "train step", "side": "vistrain, var.token_cache", "ms": 20.0}]
    note = vs_var._cache_note({"cache_s": 8.0, "images": 1000}, rows, batch=10)
    assert note == ("var.token_cache: built once in 8.0 s for 1000 images (8.00 ms per image); each step saves "
                    "10.0 ms (1.00 ms per image): it pays for itself after 8.0 epochs")


def test_a_ref_that_is_not_the_original_is_named(vs_var, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        vs_var.main(["--ref", str(tmp_path)])
    assert stop.value.code == 2
    assert f"--ref {tmp_path}: not a checkout of FoundationVision/VAR" in capsys.readouterr().err

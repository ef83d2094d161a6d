"""benchmarks/gpu_suite.sh: its CPU smoke runs the pipeline the GPU run takes (every benchmark, one table, the JSON)
at tiny shapes without the originals, so that the one GPU call it is made for works the first time; and the
table says what became of a step that timed out, failed, or found no time left."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own

REPO = Path(__file__).resolve().parents[1]


def run_suite(tmp_path, *args, **env):
    out = tmp_path / "suite.json"
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--out", str(out), *args],
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


def test_the_cpu_smoke_runs_every_benchmark_into_one_table(tmp_path):
    printed, doc = run_suite(tmp_path)
    assert doc["cpu_smoke"] is True and doc["device"].startswith("CPU") and doc["torch"] and doc["date"]
    assert [(s["name"], s["status"]) for s in doc["steps"]] == [("var_d1", "ok"), ("vlm_tiny", "ok"), ("gan", "ok")]
    cases = {(r["benchmark"], r["case"]) for r in doc["rows"]}
    assert ("vs_var", "VAR-d1, 64 px, batch 2, fp32: train step") in cases
    assert ("vs_var", "VAR-d1, 64 px, batch 2, fp32: sample batch 1") in cases
    assert ("vs_nanovlm", "tiny shape: train step (2 x 128 rows, batch 4, fp32)") in cases
    assert ("vs_nanovlm", "tiny shape: greedy generation (batch 1, 4 tokens)") in cases
    assert ("gan_step", "ResNet GAN iteration, 16 px, batch 4, channels_last") in cases
    for r in doc["rows"]:
        assert r["vistrain"] > 0
        if r["benchmark"] == "gan_step":  # the bare loop is always there; the originals are not in a smoke run
            assert r["reference_is"] == "bare loop" and r["ratio"] == pytest.approx(r["vistrain"] / r["reference"])
        else:
            assert r["reference"] is None and r["ratio"] is None
    assert "| gan_step | ResNet GAN iteration, 16 px, batch 4, eager | images/s |" in printed
    assert "engine/bare: " in doc["steps"][2]["headline"]


def test_a_suite_without_time_left_runs_nothing_and_says_so(tmp_path):
    printed, doc = run_suite(tmp_path, SUITE_DEADLINE_S="10")
    assert doc["rows"] == []
    assert [s["status"] for s in doc["steps"]] == ["not run: the suite's time was up"] * 3
    assert "| gan | not run: the suite's time was up |" in printed


@pytest.fixture
def suite_table(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("suite_table")


def test_a_step_that_timed_out_or_failed_gets_a_row_and_its_log(suite_table, tmp_path):
    (tmp_path / "steps.tsv").write_text("var_d16\tvs_var.py\t124\t150\t150\nvlm_222m\tvs_nanovlm.py\t1\t12\t120\n")
    (tmp_path / "var_d16.log").write_text("[VAR-d16] building\n")
    (tmp_path / "vlm_222m.log").write_text("Traceback (most recent call last):\nValueError: no checkpoint\n")
    rows, steps = suite_table.collect(tmp_path)
    assert rows == []
    assert [s["status"] for s in steps] == ["timed out after its 150 s", "failed (exit status 1)"]
    assert steps[1]["log_tail"][-1] == "ValueError: no checkpoint" and steps[1]["headline"] == steps[1]["log_tail"][-1]


def test_the_cases_a_stopped_gan_step_had_measured_stay_in_the_table(suite_table, tmp_path):
    (tmp_path / "steps.tsv").write_text("gan\tgan_step.py\t124\t120\t120\n")
    measured = [{"resolution": 128, "batch": 64, "variant": "eager", "side": side, "images_per_s": rate,
                 "ms_per_iteration": 64e3 / rate, "peak_mib": 900.0}
                for side, rate in (("bare", 800.0), ("engine", 760.0))]
    (tmp_path / "gan.json").write_text(json.dumps({"rows": measured, "skipped": None, "complete": False}))
    rows, steps = suite_table.collect(tmp_path)
    assert [(r["case"], r["ratio"]) for r in rows] == [("ResNet GAN iteration, 128 px, batch 64, eager", 0.95)]
    assert steps[0]["status"] == "timed out after its 120 s; what it had measured is in the table (1 row)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this would start the whole suite")
def test_without_a_gpu_the_suite_asks_for_the_smoke(tmp_path):
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--out", str(tmp_path / "x.json")],
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "x.json").exists()
    assert "sees no CUDA device; on a machine without one, run the smoke: --cpu-smoke" in done.stderr


def test_gpu_wheels_fetches_what_the_image_lacks_and_nothing_else(tmp_path):
    """Downloads from PyPI (as CI can); skipped where it cannot be reached, except on CI."""
    from importlib.metadata import version

    from packaging.utils import parse_wheel_filename

    def wheels(folder, **env):
        return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_wheels.sh"), str(folder)],
                              env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                              timeout=300)

    done = wheels(tmp_path / "whl")
    if done.returncode != 0 and "neither carried nor on the GPU image" not in done.stderr and not os.environ.get("CI"):
        pytest.skip(f"PyPI out of reach? {done.stderr[-500:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    found = {parse_wheel_filename(w.name)[:2] for w in (tmp_path / "whl").iterdir()}
    # exactly these, at the versions the tests here ran with: no torch, nothing CUDA, no other dependency
    assert {(str(name), str(v)) for name, v in found} == {
        (name, version(name)) for name in ("omegaconf", "datasets", "dill", "multiprocess")}
    for w in (tmp_path / "whl").iterdir():  # each installs on CPython 3.12, Linux x86-64
        tags = parse_wheel_filename(w.name)[3]
        assert any(t.interpreter in ("py3", "py312", "cp312") and (t.platform == "any" or "x86_64" in t.platform)
                   for t in tags), w.name

    # a requirement that is neither carried nor on the image is named
    done = wheels(tmp_path / "again", GPU_IMAGE_HAS="")
    assert done.returncode == 1
    assert f"datasets-{version('datasets')}-py3-none-any.whl needs pyarrow" in done.stderr

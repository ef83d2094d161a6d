"""benchmarks/gan_step.py at a tiny shape on the CPU: the engine's GAN iteration and the bare loop's, each side in a
process of its own, in alternating rounds, so the benchmark cannot rot between the GPU runs that use it."""

import importlib
import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end to end: whole runs, or processes of their own

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gan_step(monkeypatch):
    # on sys.path, not loaded from its file: the sides' processes (spawned) import it by name
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gan_step")


def test_both_sides_of_two_variants_at_the_tiny_shape(gan_step, tmp_path, capsys):
    out = tmp_path / "gan.json"
    assert gan_step.main(["--shape", "tiny", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for variant in ("eager", "channels_last"):
        for side in ("bare", "engine"):
            assert f"| 16 px, batch 4 | {variant} | {side} |" in printed
    last = printed.rstrip().splitlines()[-1]
    assert re.fullmatch(r"engine/bare: \d+\.\d\d \(lowest of 2 cases\); fastest at 16 px: (eager|channels_last), "
                        r"[\d,]+ images/s through the engine, \d+\.\d\dx eager", last), last

    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["variant"], r["side"]) for r in rows] == [
        ("eager", "bare"), ("eager", "engine"), ("channels_last", "bare"), ("channels_last", "engine")]
    for r in rows:  # one round of two timed iterations, at batch 4
        assert len(r["ms_per_iteration_each_round"]) == 1 and r["ms_per_iteration"] > 0
        assert r["images_per_s"] == pytest.approx(4 / (r["ms_per_iteration"] / 1e3))
        assert r["peak_mib"] is None  # CUDA memory only
    ratios = [e["images_per_s"] / b["images_per_s"] for b, e in zip(rows[::2], rows[1::2])]
    assert result["summary"]["engine_over_bare"] == pytest.approx(min(ratios))
    assert result["skipped"] == []


def test_a_time_budget_leaves_out_the_cases_that_would_overrun_it(gan_step, capsys):
    assert gan_step.main(["--shape", "tiny", "--variants", "eager,compile", "--time-budget", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| 16 px, batch 4, eager | | skipped: over --time-budget |" in printed
    assert "| 16 px, batch 4, compile | | skipped: over --time-budget |" in printed
    assert printed.rstrip().splitlines()[-1] == "engine/bare: n/a (no case measured)"


def test_an_unknown_variant_is_named(gan_step, capsys):
    with pytest.raises(SystemExit) as stop:
        gan_step.main(["--shape", "tiny", "--variants", "eager,fast"])
    assert stop.value.code == 2
    assert "--variants: unknown fast; choose from eager, channels_last, compile, channels_last+compile" in (
        capsys.readouterr().err)

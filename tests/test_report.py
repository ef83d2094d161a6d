"""`vistrain report` (one self-contained HTML page of a run, checked in a real browser) and `vistrain runs` (the
runs under a folder, one line each)."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import cli_runs
from support.cli_runs import snapshot, vistrain

REPO = Path(__file__).resolve().parents[1]
GAN = REPO / "configs" / "gan" / "digits.yaml"
# two evals (steps 2 and 4), so every eval curve has two points and there are two sample grids
TINY_GAN = [*cli_runs.TINY_GAN, "train.max_steps=4", "train.ckpt_every=2", "train.eval_every=2",
            "train.log_every=1", "eval.metrics=[]"]
CHROMIUM = shutil.which("chromium")
TRAIN_BLUE, VAL_RED = (0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)  # html_report.SPLIT_COLORS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gan") / "run"
    assert vistrain("train", GAN, *TINY_GAN, f"run.out_dir={run}") == 0
    return run


def logged_metrics(run: Path) -> set[str]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {f"{r['split']}/{k}" for r in lines for k in r if k not in ("step", "split", "time")}


def test_the_report_holds_every_curve_grid_eval_the_config_and_the_provenance(gan_run, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert vistrain("report", gan_run, "--out", out) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    charts = re.findall(r'<svg class="chart"[^>]*data-metric="([^"]+)"', page)
    assert sorted(charts) == sorted(logged_metrics(gan_run)) and "val/fd_pixels" in charts
    grids = sorted((gan_run / "samples").glob("*.png"))
    assert len(grids) == 2 and page.count("<img ") == len(grids)
    assert re.findall(r'(?:src|href)\s*=\s*"(?!data:image/png;base64,)', page) == []  # nothing from elsewhere
    best = int((gan_run / "checkpoints" / "best").read_text().strip().split("_")[1])
    rows = re.findall(r'<tr( class="best")?><td>(\d+)</td>', page)
    assert rows == [(' class="best"' if step == best else "", str(step)) for step in (2, 4)]
    assert html.escape((gan_run / "config.yaml").read_text()) in page
    commit = json.loads((gan_run / "checkpoints" / "step_00000004" / "provenance.json").read_text())["vistrain"]
    assert f"commit {commit['commit']}" in page


def test_report_refuses_what_is_not_a_run_and_bad_outputs_before_any_work(gan_run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine\n")
    before, mine = snapshot(gan_run), snapshot(tmp_path)
    for args, needle in [
        ([tmp_path], f"{tmp_path} is not a run folder"),
        ([gan_run, "--out", tmp_path], "is a folder"),
        ([gan_run, "--out", a_file / "report.html"], "is a file, so nothing can be written under it"),
        ([gan_run, "--out", gan_run / "checkpoints" / "step_00000004" / "report.html"], "is inside"),
    ]:
        assert vistrain("report", *args) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(gan_run) == before and snapshot(tmp_path) == mine


def chromium(page: Path, profile: Path, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `page`, as isolated as it goes: a fresh profile, nothing fetched in the background."""
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *action, page.as_uri()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def console_messages(stderr: str) -> list[str]:
    """What the page said on its console (errors, blocked loads): Chromium logs each as a CONSOLE line."""
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


# What the browser made of the page, read back from its DOM: a copy of the report with this script allowed in.
# A chart is drawn when its line has a width, or, for a single point, its marker is there.
PROBE = """<script>addEventListener("load", () => {
  const images = [...document.images], charts = [...document.querySelectorAll("svg.chart")];
  const drawn = charts.filter(c => c.querySelector("polyline")
                                   && (c.querySelector("polyline").getBBox().width > 0 || c.querySelector("circle")));
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    charts: charts.length, drawn: drawn.length}));
});</script>"""


def test_the_report_renders_in_headless_chromium_with_its_curves_and_grids(gan_run, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed, and CI must run this test (scripts/test.sh installs it)")
        pytest.skip("chromium is not installed here (Debian: apt-get install chromium); CI installs it and runs this")
    page = tmp_path / "report.html"
    assert vistrain("report", gan_run, "--out", page) == 0
    shot = tmp_path / "shot.png"
    done = chromium(page, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1300,2600")
    assert console_messages(done.stderr) == []  # no error, nothing blocked by the page's no-network policy
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(np.int32)
    assert len(np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2])) > 50  # not blank: text, curves, grids
    for colour in (TRAIN_BLUE, VAL_RED):  # the train and the val curves are drawn
        assert (np.abs(pixels - np.array(colour, dtype=np.int32)).max(axis=1) < 12).sum() > 100, colour

    probed = tmp_path / "probed.html"
    text = page.read_text().replace("style-src 'unsafe-inline'",
                                    "style-src 'unsafe-inline'; script-src 'unsafe-inline'")
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = chromium(probed, tmp_path / "profile2", "--dump-dom").stdout
    probe = json.loads(html.unescape(re.search(r'data-probe="([^"]*)"', dom).group(1)))
    charts = len(logged_metrics(gan_run))
    assert probe == {"images": 2, "decoded": 2, "charts": charts, "drawn": charts}


# ---------------------------------------------------------------------------------------------- runs


def test_runs_lists_every_run_with_its_task_step_state_best_last_eval_and_size(gan_run, tmp_path, subprocess_env,
                                                                             capsys):
    root = tmp_path / "runs"
    shutil.copytree(gan_run, root / "finished")
    stopped = shutil.copytree(gan_run, root / "group" / "stopped")
    config = stopped / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 4", "max_steps: 8"))  # its last checkpoint: step 4 of 8
    live = shutil.copytree(gan_run, root / "live")
    (root / "not_a_run" / "notes").mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from vistrain.engine.rundir import RunDir; "
         f"RunDir({str(live)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"],
        env=subprocess_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert vistrain("runs", root) == 0
    finally:
        holder.stdin.close()
        holder.wait()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "task", "step", "state", "best", "last", "eval", "size"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == ["finished", "group/stopped", "live"]  # nothing inside a run, no folder without one
    best_step = int((gan_run / "checkpoints" / "best").read_text().strip().split("_")[1])
    best = json.loads((gan_run / "checkpoints" / f"step_{best_step:08d}" / "metrics.json").read_text())["fd_pixels"]
    assert re.search(rf"finished\s+gan\s+4/4\s+finished\s+fd_pixels={best:.4g} @ {best_step}\s+@ 4: fd_pixels=",
                     rows["finished"])
    assert re.search(r"\s4/8\s+stopped\s", rows["group/stopped"])
    assert f"running (pid {holder.pid} on " in rows["live"]
    assert re.search(r"\d+\.\d KB$", rows["finished"])


def test_runs_on_a_missing_folder_or_one_without_runs(tmp_path, capsys):
    assert vistrain("runs", tmp_path / "nowhere") == 2
    assert f"{tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err
    assert vistrain("runs", tmp_path) == 0
    assert capsys.readouterr().out.strip() == f"no runs under {tmp_path}"

"""The GPU suite's one table: every benchmark's result file, read and put side by side (benchmarks/gpu_suite.sh).

    python benchmarks/suite_table.py RESULTS_DIR --out FILE.json

RESULTS_DIR holds steps.tsv (one line per step the suite ran: name, script, exit status, seconds, time budget)
and, per step, NAME.json (the script's --json) and NAME.log (what it printed). A row compares vistrain with its
reference on one measurement: the original (FoundationVision/VAR, huggingface/nanoVLM) or, for the GAN, a bare
PyTorch loop. Below the rows, every step with its outcome (ok, timed out, failed, not run) and its verdict line;
the JSON keeps the end of the log of each step that did not end well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

TIMED_OUT = (124, 137)  # timeout(1)'s status, and a SIGKILL after its grace period
LOG_TAIL = 30  # lines of a failed step's log kept in the JSON


def row(benchmark: str, case: str, unit: str, ours: dict, theirs: Optional[dict], reference: str, rate: str,
        peak: Optional[str] = None, mfu: Optional[str] = None) -> dict:
    """One measurement: `rate`, `peak` and `mfu` name fields of the sides' dicts (the reference's may be missing)."""
    mine, other = ours[rate], theirs[rate] if theirs else None
    return {"benchmark": benchmark, "case": case, "unit": unit, "vistrain": mine, "reference": other,
            "reference_is": reference if theirs else None, "ratio": mine / other if mine and other else None,
            "vistrain_peak_mib": ours.get(peak) if peak else None,
            "reference_peak_mib": theirs.get(peak) if theirs and peak else None,
            "vistrain_mfu": ours.get(mfu) if mfu else None}


def vs_var_rows(doc: dict) -> list[dict]:
    """benchmarks/vs_var.py --json: rows of (shape, what, side); each vistrain side against the original."""
    rows = []
    for r in doc["rows"]:
        if r["side"] == "original":
            continue
        original = next((o for o in doc["rows"] if o["side"] == "original"
                         and (o["shape"], o["what"]) == (r["shape"], r["what"])), None)
        variant = "" if r["side"] == "vistrain" else f" ({r['side'].removeprefix('vistrain, ')})"  # var.token_cache
        case = f"{r['shape']}: {r['what']}{variant}"
        rows.append(row("vs_var", case, "images/s", r, original, "original", "images_per_s", "peak_mib", "mfu"))
    return rows


def vs_nanovlm_rows(doc: dict) -> list[dict]:
    """benchmarks/vs_nanovlm.py --json: per shape, the training step and greedy generation."""
    rows = []
    for res in doc["results"]:
        shape = res["shape"]
        name = f"nanoVLM-{shape['name']}" if shape["name"] in ("222m", "460m") else f"{shape['name']} shape"
        train = res["train"]
        rows.append(row("vs_nanovlm", f"{name}: train step ({shape['micro']} x {shape['seq_length']} rows, batch "
                        f"{shape['batch']}, {res['precision']})", "useful tokens/s", train["vistrain"],
                        train.get("nanoVLM"), "original", "tokens_per_s", "peak_memory_mb", "mfu"))
        if "generate" in res:
            gen = res["generate"]
            rows.append(row("vs_nanovlm", f"{name}: greedy generation (batch 1, {shape['gen_tokens']} tokens)",
                            "tokens/s", gen["vistrain"], gen.get("nanoVLM"), "original", "tokens_per_s"))
    return rows


def gan_step_rows(doc: dict) -> list[dict]:
    """benchmarks/gan_step.py --json: per resolution and variant, the engine against the bare loop."""
    rows = []
    for r in doc["rows"]:
        if r["side"] != "engine":
            continue
        bare = next(b for b in doc["rows"] if b["side"] == "bare"
                    and (b["resolution"], b["variant"]) == (r["resolution"], r["variant"]))
        case = f"ResNet GAN iteration, {r['resolution']} px, batch {r['batch']}, {r['variant']}"
        rows.append(row("gan_step", case, "images/s", r, bare, "bare loop", "images_per_s", "peak_mib"))
    return rows


READERS = {"vs_var.py": vs_var_rows, "vs_nanovlm.py": vs_nanovlm_rows, "gan_step.py": gan_step_rows}


def read_rows(path: Path, script: str) -> list[dict]:
    """The table's rows from a script's JSON; none when it wrote none."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return READERS[script](doc)


def read_steps(results: Path) -> list[dict]:
    steps = []
    for line in (results / "steps.tsv").read_text().splitlines():
        name, script, rc, seconds, budget = line.split("\t")
        steps.append({"name": name, "script": script, "rc": int(rc), "seconds": int(seconds), "budget_s": int(budget)})
    return steps


def headline(lines: list[str]) -> str:
    """A script's closing verdict (`vistrain/original: X.XX`, `engine/bare: X.XX ...`), else its last line."""
    for line in reversed(lines):
        if line.startswith(("vistrain/original:", "engine/bare:")):
            return line
    return next((line for line in reversed(lines) if line.strip()), "")


def collect(results: Path) -> tuple[list[dict], list[dict]]:
    """The rows of every step that wrote its result, and every step's status (with its log's last line)."""
    rows, steps = [], read_steps(results)
    for step in steps:
        log = results / f"{step['name']}.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        step["headline"] = headline(lines)
        found = read_rows(results / f"{step['name']}.json", step["script"])
        rows += [{"step": step["name"], **r} for r in found]
        if step["rc"] == 0:
            step["status"] = "ok" if found else "ok, but it wrote no result"
            continue
        if step["rc"] in TIMED_OUT:
            step["status"] = f"timed out after its {step['budget_s']} s"
        elif step["rc"] == -1:
            step["status"] = "not run: the suite's time was up"
        else:
            step["status"] = f"failed (exit status {step['rc']})"
        if found:  # gan_step.py rewrites its JSON after every case
            step["status"] += f"; what it had measured is in the table ({len(found)} row{'s' * (len(found) > 1)})"
        step["log_tail"] = lines[-LOG_TAIL:]
    return rows, steps


def card_name() -> str:
    """The GPU's name from nvidia-smi, else from torch; on a machine without one, the CPU."""
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                   text=True, timeout=30).stdout.split("\n")
            if names[0].strip():
                return names[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f})"


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(doc: dict) -> None:
    print(f"\nGPU suite on {doc['device']}, torch {doc['torch']}, {doc['date']}, {doc['seconds']} s"
          f"{' (cpu smoke: tiny shapes, vistrain only)' if doc['cpu_smoke'] else ''}\n")
    print("| benchmark | case | unit | vistrain | reference | vistrain / reference | peak MiB (vistrain / reference) "
          "| MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        reference = f"{fmt(r['reference'], ',.1f')} ({r['reference_is']})" if r["reference_is"] else "-"
        peaks = f"{fmt(r['vistrain_peak_mib'], ',.0f')} / {fmt(r['reference_peak_mib'], ',.0f')}"
        mfu = fmt(100 * r["vistrain_mfu"], ".1f") + "%" if r["vistrain_mfu"] is not None else "-"
        print(f"| {r['benchmark']} | {r['case']} | {r['unit']} | {fmt(r['vistrain'], ',.1f')} | {reference} "
              f"| {fmt(r['ratio'], '.2f')} | {peaks} | {mfu} |")
    print("\n| step | status | seconds (budget) | its verdict, or last line |")
    print("|---|---|---|---|")
    for s in doc["steps"]:
        said = s["headline"].replace("|", "\\|")  # a table row of its own would split this one
        print(f"| {s['name']} | {s['status']} | {s['seconds']} ({s['budget_s']}) | {said} |")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the folder gpu_suite.sh wrote steps.tsv and the results into")
    parser.add_argument("--out", type=Path, required=True, help="the suite's JSON")
    parser.add_argument("--seconds", type=int, default=0, help="the suite's wall time so far")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args(argv)
    import torch

    rows, steps = collect(args.results)
    doc = {"device": card_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "seconds": args.seconds, "cpu_smoke": args.cpu_smoke, "rows": rows, "steps": steps}
    print_table(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

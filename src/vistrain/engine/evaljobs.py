"""Eval jobs beside training (`eval.mode: local | slurm`): one job per checkpoint, so no step waits for them.

The trainer hands each new checkpoint to `EvalJobs.submit`; a job is a command (built by the layer that knows
the CLI, e.g. `vistrain eval CKPT --out eval/step_N.json ...`) run by a launcher: a detached local process,
or a SLURM job through submitit. `poll` (every step, cheap) starts queued jobs up to `eval.max_jobs`, picks
up finished results, logs them on their own axis (split "eval" at the checkpoint's step), and updates
`best`. A job that fails or is killed is reported with its log path and training goes on.

The files under `<run>/eval/` are the whole state, so a run that is killed, or ends while jobs still run,
loses nothing: the next run in the folder reads them back.

    step_00001000.job    the trainer's record: checkpoint, status (queued|running|logged|failed), pid/job id
    step_00001000.log    the job's output (local jobs; SLURM jobs log under eval/slurm/)
    step_00001000.json   the job's results, written atomically as its last act
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from vistrain.engine.config_sections import SlurmEvalConfig
from vistrain.engine.rundir import write_text_atomic

# (checkpoint folder, result file) -> the command that evaluates the checkpoint and writes the result file
EvalCommand = Callable[[Path, Path], list[str]]


class Launcher(Protocol):
    def start(self, argv: list[str], log: Path) -> tuple[dict, Path]:
        """Start the command; returns a JSON-able handle (pid / job id) and the path of its log."""

    def state(self, handle: dict) -> Optional[str]:
        """None while the job runs; once it ended: "" for success, else what went wrong."""


# Python 3.10 has no process_group argument: a session of its own detaches the job there (see LocalLauncher).
_OWN_PROCESS_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}


class LocalLauncher:
    """Each job is a process of its own process group: it survives the trainer (and its Ctrl-C / SIGTERM).

    Jobs run at a lower CPU priority (nice 10), so that training keeps the cores it needs. Not a session of its
    own: Linux's autogroup scheduling shares the CPU evenly between sessions, whatever their nice values, and a
    CPU-bound job would take half the machine. `threads` caps a job's intra-op threads, for training on the CPU.
    (Measured on 2 cores: a GAN step went from 90 ms to 1.5 s while a job of its own session ran beside it.)
    """

    NICENESS = 10

    def __init__(self, threads: Optional[int] = None):
        self.env = None
        if threads is not None:
            count = str(threads)
            self.env = {**os.environ, "OMP_NUM_THREADS": count, "MKL_NUM_THREADS": count}
        self._procs: dict[int, subprocess.Popen] = {}

    def start(self, argv: list[str], log: Path) -> tuple[dict, Path]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, **_OWN_PROCESS_GROUP)
        try:
            os.setpriority(os.PRIO_PROCESS, proc.pid, self.NICENESS)
        except (OSError, AttributeError):  # not permitted, or not a POSIX system: the job runs at our priority
            pass
        self._procs[proc.pid] = proc
        return {"pid": proc.pid}, log

    def state(self, handle: dict) -> Optional[str]:
        pid = int(handle["pid"])
        proc = self._procs.get(pid)
        if proc is not None:  # started by this trainer: its exit status is known
            code = proc.poll()
            if code is None:
                return None
            del self._procs[pid]
            return "" if code == 0 else _exit_reason(code)
        try:  # started before a resume: only whether it is alive can be known
            os.kill(pid, 0)
            return None
        except ProcessLookupError:
            return ""  # ended: its result file (or its absence) tells the rest
        except PermissionError:
            return None


class SlurmLauncher:
    """Each job is a SLURM job submitted with submitit (`cluster="local"` runs them as local processes)."""

    def __init__(self, folder: Path, cfg: SlurmEvalConfig, cluster: Optional[str] = None):
        try:
            import submitit
        except ImportError as err:
            raise ImportError("eval.mode=slurm submits through submitit: pip install 'vistrain[eval]'") from err
        self._submitit = submitit
        self.folder = Path(folder)
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        params: dict[str, Any] = {"timeout_min": cfg.time_min, "gpus_per_node": cfg.gpus,
                                  "cpus_per_task": cfg.cpus, "mem_gb": cfg.mem_gb, "name": "vistrain-eval"}
        if self.executor.cluster == "slurm":
            params.update({k: v for k, v in (("slurm_partition", cfg.partition), ("slurm_account", cfg.account))
                           if v})
        self.executor.update_parameters(**params)
        self._jobs: dict[str, Any] = {}

    def start(self, argv: list[str], log: Path) -> tuple[dict, Path]:
        job = self.executor.submit(self._submitit.helpers.CommandFunction(argv, verbose=False))
        self._jobs[str(job.job_id)] = job
        return {"job_id": str(job.job_id)}, Path(job.paths.stdout)

    def state(self, handle: dict) -> Optional[str]:
        job = self._jobs.get(handle["job_id"])
        if job is None:
            if self.executor.cluster != "slurm":
                return None  # a local job from before a resume: wait for its result file
            job = self._jobs[handle["job_id"]] = self._submitit.SlurmJob(self.folder, handle["job_id"])
        if not job.done():
            return None
        exc = job.exception()
        return "" if exc is None else f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"


def _exit_reason(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


@dataclass
class EvalJob:
    step: int
    checkpoint: str
    status: str = "queued"  # queued | running | logged | failed
    handle: Optional[dict] = None
    log: Optional[str] = None


class EvalJobs:
    """The eval jobs of one run folder (the main rank's). See the module docstring."""

    def __init__(self, out_dir: Path, command: EvalCommand, launcher: Launcher, max_jobs: int,
                 on_result: Callable[[int, Path, dict], None], poll_every_s: float = 1.0):
        """`on_result(step, checkpoint, metrics)` logs a job's results and updates `best`."""
        self.folder = Path(out_dir) / "eval"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.command, self.launcher, self.max_jobs = command, launcher, max_jobs
        self.on_result = on_result
        self.poll_every_s = poll_every_s
        self._last_poll = 0.0
        self.jobs: dict[int, EvalJob] = {}
        self._read_back()

    # ------------------------------------------------------------------------------------------- files

    def _path(self, step: int, suffix: str) -> Path:
        return self.folder / f"step_{step:08d}{suffix}"

    def _save(self, job: EvalJob) -> None:
        record = {"step": job.step, "checkpoint": job.checkpoint, "status": job.status, "handle": job.handle,
                  "log": job.log}
        write_text_atomic(self._path(job.step, ".job"), json.dumps(record, indent=1) + "\n")

    def _read_back(self) -> None:
        """Jobs of an earlier run in this folder that were not logged yet: results that arrived while the
        trainer was down are logged at the first poll, queued jobs start, running ones are watched."""
        for path in sorted(self.folder.glob("step_*.job")):
            try:
                job = EvalJob(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as err:
                print(f"warning: ignoring the unreadable eval job record {path}: {err}", flush=True)
                continue
            if job.status == "queued" and not Path(job.checkpoint).is_dir():
                job.status = "failed"
                self._save(job)
                print(f"warning: the eval of step {job.step} was queued, and its checkpoint {job.checkpoint} is "
                      "gone; skipping it", flush=True)
            elif job.status in ("queued", "running"):
                self.jobs[job.step] = job

    # ------------------------------------------------------------------------------------------ the API

    @property
    def pending(self) -> list[EvalJob]:
        return [job for job in self.jobs.values() if job.status in ("queued", "running")]

    def protected(self) -> set[str]:
        """Checkpoint folders that pending jobs still have to read: pruning keeps them."""
        return {Path(job.checkpoint).name for job in self.pending}

    def submit(self, step: int, checkpoint: Path) -> None:
        """Queue an eval of `checkpoint` (which may still be being written: it starts once the folder exists)."""
        job = self.jobs.get(step)
        if job is not None and job.status != "queued":
            return  # already evaluated or running (a resumed run re-saving a step)
        job = self.jobs[step] = EvalJob(step=step, checkpoint=str(checkpoint))
        self._save(job)
        self.poll(force=True)

    def poll(self, force: bool = False) -> None:
        """Pick up finished jobs, then start queued ones; at most every `poll_every_s` unless forced."""
        now = time.monotonic()
        if not force and now - self._last_poll < self.poll_every_s:
            return
        self._last_poll = now
        for job in sorted(self.pending, key=lambda j: j.step):
            if job.status == "running" or self._path(job.step, ".json").exists():
                self._check(job)
        running = sum(job.status == "running" for job in self.jobs.values())
        for job in sorted(self.pending, key=lambda j: j.step):
            if running >= self.max_jobs:
                break
            if job.status == "queued" and Path(job.checkpoint).is_dir():
                self._start(job)
                running += 1

    def wait(self) -> None:
        """Run every pending job to its end (a finished run, once its last checkpoint is written)."""
        for job in self.pending:
            if job.status == "queued" and not Path(job.checkpoint).is_dir():
                job.status = "failed"  # its checkpoint was never written (the save failed) or was removed
                self._save(job)
        if self.pending:
            steps = ", ".join(str(job.step) for job in self.pending)
            print(f"waiting for the eval jobs of steps {steps} (logs in {self.folder}; Ctrl-C leaves them running "
                  "and a later run in this folder logs their results)", flush=True)
        while self.pending:
            self.poll(force=True)
            if self.pending:
                time.sleep(0.2)

    def report_pending(self) -> None:
        for job in sorted(self.pending, key=lambda j: j.step):
            where = f"its log: {job.log}" if job.log else "not started yet"
            print(f"eval of step {job.step} is still {job.status} ({where}); its results will be in "
                  f"{self._path(job.step, '.json')}, and logged when a run continues in this folder", flush=True)

    # -------------------------------------------------------------------------------------- internals

    def _start(self, job: EvalJob) -> None:
        result = self._path(job.step, ".json")
        try:
            handle, log = self.launcher.start(self.command(Path(job.checkpoint), result), self._path(job.step, ".log"))
        except Exception as err:  # e.g. sbatch refused the job: report it, keep training
            job.status = "failed"
            self._save(job)
            print(f"warning: the eval job of step {job.step} could not start: {err}", flush=True)
            return
        job.status, job.handle, job.log = "running", handle, str(log)
        self._save(job)

    def _check(self, job: EvalJob) -> None:
        result = self._path(job.step, ".json")
        ended = self.launcher.state(job.handle) if job.handle is not None else ""
        if ended is None and not result.exists():
            return  # still running
        try:
            metrics = json.loads(result.read_text(encoding="utf-8"))["metrics"]
        except (OSError, ValueError, KeyError, TypeError):
            metrics = None
        if metrics is None:
            if ended is None:
                return  # the file is being written; the job is still running
            job.status = "failed"
            self._save(job)
            why = ended or "it ended without writing its results"
            print(f"warning: the eval job of step {job.step} failed ({why}); training goes on. Its log: {job.log}",
                  flush=True)
            return
        self.on_result(job.step, Path(job.checkpoint), metrics)
        job.status = "logged"
        self._save(job)

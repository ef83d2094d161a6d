"""Ctrl-C or SIGTERM while `vistrain sample` writes an .npz: one line on stderr, the shell's status for that signal,
no traceback, no temporary file or partial output left, the run folder untouched. The signal arrives while the
first chunk sits in the temporary file: the child announces that moment and waits for the test, so it is hit by
construction, not by timing."""

import signal
import subprocess
import sys

import pytest

from test_faults import GAN, TINY_GAN, snapshot, vistrain

# `vistrain sample`, paused after the .npz writer's first chunk until the test has looked and signalled.
PAUSED_SAMPLE = """
import signal, sys
from vistrain import cli
from vistrain.engine import images

write = images.NpzImageWriter.write

def write_then_wait(self, chunk):
    write(self, chunk)
    if self.written == len(chunk):
        print("first chunk written", flush=True)
        sys.stdin.readline()  # the signal arrives while this waits

images.NpzImageWriter.write = write_then_wait
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if pytest runs in the background
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("gan") / "run"
    assert vistrain("train", GAN, f"run.out_dir={run}", *TINY_GAN, "train.max_steps=1", "train.ckpt_every=1",
                    "train.eval_every=100", "eval.metrics=[]") == 0
    return run


def test_a_signal_during_sampling_ends_it_with_one_line_and_leaves_nothing(gan_run, tmp_path, subprocess_env):
    before = snapshot(gan_run)
    samplers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):  # both at once: each child takes seconds to start
        folder = tmp_path / sig.name
        folder.mkdir()
        samplers[sig] = subprocess.Popen(
            [sys.executable, "-c", PAUSED_SAMPLE, "sample", str(gan_run), "--out", str(folder / "x.npz"),
             "--num", "3000", "--batch-size", "256"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env)
    for sig, child in samplers.items():
        folder = tmp_path / sig.name
        try:
            assert child.stdout.readline() == "first chunk written\n", child.communicate()[1]
            [temporary] = list(folder.iterdir())  # the writer's, holding the first chunk
            assert temporary.name.startswith(".tmp-x.npz-") and temporary.stat().st_size > 0
            child.send_signal(sig)
            _, err = child.communicate(timeout=120)
        finally:
            child.kill()
            child.wait()
        assert child.returncode == 128 + sig, err
        assert err == f"vistrain: sampling stopped by {sig.name}; {folder / 'x.npz'} was not written\n"
        assert list(folder.iterdir()) == []
    assert snapshot(gan_run) == before

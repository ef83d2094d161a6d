"""vistrain.durable: a file replaced through it is, at every instant, the old file or the new one, whole -- whatever
kills the writer. The kill comes from inside the writing process (tests/support/killed_writer.py), just before its n-th
step, so every point of the write is hit by construction, with no timing involved."""

import gc
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TESTS, subprocess_env_for
from support.killed_writer import NEW, OLD
from vistrain import durable
from vistrain.engine.images import NpzImageWriter
from vistrain.engine.rundir import RunDir


def write_killed_at(path, kill_at) -> int:
    """Replace `path` with NEW in a child process killed before its kill_at-th step; its exit status, negative for a
    signal."""
    child = subprocess.run([sys.executable, str(TESTS / "support" / "killed_writer.py"), str(path), str(kill_at)],
                           env=subprocess_env_for(), capture_output=True, text=True, timeout=60)
    assert child.stderr == "", child.stderr
    return child.returncode


@pytest.mark.parametrize("had_old", [True, False])
def test_a_writer_killed_at_any_step_leaves_the_old_file_or_the_new_one_whole(tmp_path, had_old):
    path = tmp_path / "state.bin"
    seen = []
    for kill_at in range(1, 20):
        path.unlink(missing_ok=True)
        if had_old:
            path.write_bytes(OLD)
        status = write_killed_at(path, kill_at)
        assert status in (-signal.SIGKILL, 0), status
        now = path.read_bytes() if path.exists() else None
        assert now in (OLD if had_old else None, NEW), f"killed before step {kill_at}: a part under the file's name"
        leftovers = sorted(p for p in tmp_path.iterdir() if p != path)
        assert all(p.name.startswith(f".tmp-{path.name}-") for p in leftovers), leftovers
        seen.append((now == NEW, [p.stat().st_size for p in leftovers]))
        if status == 0:  # the writer got past its last step: every point has been tried
            break
    else:
        pytest.fail("the write took more than 20 steps")
    replaced = [done for done, _ in seen]
    assert replaced == sorted(replaced) and not replaced[0] and replaced[-1], seen  # old until the rename, new after
    assert (False, [len(NEW) // 2]) in seen, seen  # one kill left half of the new bytes, under the temporary name
    assert durable.remove_stale_temps(tmp_path)  # their writers are dead: the leftovers go, the file stays
    assert sorted(tmp_path.iterdir()) == [path] and path.read_bytes() == NEW


@pytest.mark.parametrize("interruption", [ValueError, KeyboardInterrupt])
def test_a_writer_that_raises_leaves_the_old_file_and_no_temporary_one(tmp_path, interruption):
    path = tmp_path / "state.bin"
    path.write_bytes(OLD)
    with pytest.raises(interruption):
        with durable.AtomicFile(path) as out:
            out.file.write(NEW)
            raise interruption()
    assert list(tmp_path.iterdir()) == [path] and path.read_bytes() == OLD


def test_text_is_written_as_utf8_with_the_permissions_of_a_new_file(tmp_path):
    path = tmp_path / "latest"
    durable.write_atomic(path, "step_00000002 ✓\n")
    assert path.read_text(encoding="utf-8") == "step_00000002 ✓\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the private 0o600 of mkstemp


def test_the_temporary_file_of_a_live_writer_is_never_removed(tmp_path):
    (tmp_path / ".tmp-notes").write_text("a file of the user's, not a temporary one\n")
    writer = durable.AtomicFile(tmp_path / "result.json")  # this process writes it: alive
    writer.file.write(b"{}\n")
    assert durable.remove_stale_temps(tmp_path) == []
    writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-notes", "result.json"]


def test_a_run_starting_in_its_folder_removes_what_killed_writers_left_there(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "eval").mkdir()
    for path in (run / "config.yaml", run / "samples" / "step_00000002.png", run / "eval" / "step_00000002.json"):
        assert write_killed_at(path, 2) == -signal.SIGKILL  # dies mid-write
    run_dir = RunDir(run)
    run_dir.acquire()
    run_dir.release()
    assert not list(run.glob(".tmp-*")) and not list((run / "samples").glob(".tmp-*"))
    # eval/ is left alone: eval jobs write their results there, maybe from another machine, while a run starts
    assert len(list((run / "eval").glob(".tmp-*"))) == 1


def test_an_npz_writer_stopped_mid_way_leaves_nothing_and_says_nothing(tmp_path, monkeypatch):
    """Its zip is closed on the way out: left open, it would print 'Exception ignored' when collected."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(KeyboardInterrupt):
        with NpzImageWriter(tmp_path / "x.npz", 8) as writer:
            writer.write(torch.zeros(4, 3, 2, 2))
            raise KeyboardInterrupt
    del writer
    gc.collect()
    assert unraisable == [] and list(tmp_path.iterdir()) == []


def test_an_npz_of_all_its_images_reads_back(tmp_path):
    images = torch.rand(6, 3, 4, 4) * 2 - 1
    with NpzImageWriter(tmp_path / "x.npz", 6) as writer:
        writer.write(images[:4])
        writer.write(images[4:])
    with np.load(tmp_path / "x.npz") as data:
        assert data["arr_0"].shape == (6, 4, 4, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]

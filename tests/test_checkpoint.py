"""Checkpoints: exact roundtrip, atomic appearance, pruning, best tracking, clear errors on damage,
and resolution of run.resume."""

import datetime
import json
import os
from pathlib import Path

import pytest
import torch

import vistrain.engine.checkpoint_files as ckpt_mod
from vistrain.engine.checkpoint_files import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_config,
    load_weights,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
    step_dir_name,
    update_best,
)
from vistrain.engine.rng import capture_rng_state, restore_rng_state, seed_everything

CONFIG = {"model": "tiny", "width": 8, "layers": [1, 2]}


def _weights(scale: float = 1.0) -> dict:
    return {"G.w": torch.full((2, 3), scale), "D.b": torch.arange(4.0) * scale}


def _save(root: Path, step: int, **kw) -> Path:
    kw.setdefault("weights", _weights(step))
    kw.setdefault("model_config", CONFIG)
    kw.setdefault("train_state", {"step": step})
    return save_checkpoint(root, step, **kw)


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_step_dir_name():
    assert step_dir_name(1000) == "step_00001000"
    assert step_dir_name(0) == "step_00000000"
    with pytest.raises(ValueError):
        step_dir_name(-1)


def test_roundtrip_weights_config_optimizer_rng(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().mean().backward()
    opt.step()
    seed_everything(11)
    train_state = {
        "step": 7,
        "optimizers": {"g": opt.state_dict()},
        "rng": capture_rng_state(torch.device("cpu")),
        "sampler": {"epoch": 2, "index": 13, "order": [3, 1, 2], "note": None, "name": "digits"},
    }
    weights = {f"G.{k}": v for k, v in model.state_dict().items()}
    expected_draws = torch.rand(3)  # what the stream yields right after capture

    path = save_checkpoint(tmp_path, 7, weights, CONFIG, train_state, metrics={"loss": 0.5})
    assert path == tmp_path / "step_00000007"
    assert sorted(os.listdir(path)) == ["checksums.json", "config.json", "metrics.json", "model.safetensors",
                                        "train_state.pt"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000007"

    w, cfg, state = load_checkpoint(path)
    assert cfg == CONFIG
    assert w.keys() == weights.keys()
    for k in weights:
        assert torch.equal(w[k], weights[k])
    assert state["step"] == 7 and state["sampler"] == train_state["sampler"]

    # the optimizer continues exactly as the original one
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict({k[2:]: v for k, v in w.items()})
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizers"]["g"])
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)

    restore_rng_state(state["rng"], torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draws)
    assert json.loads((path / "metrics.json").read_text()) == {"loss": 0.5}


def test_shared_and_non_contiguous_tensors_are_saved(tmp_path):
    emb = torch.randn(5, 4)
    weights = {"G.embed": emb, "G.head": emb, "G.t": emb.t(), "G.row": emb[1]}
    w, _, _ = load_checkpoint(_save(tmp_path, 1, weights=weights))
    assert torch.equal(w["G.embed"], emb) and torch.equal(w["G.head"], emb)
    assert torch.equal(w["G.t"], emb.t()) and torch.equal(w["G.row"], emb[1])


def test_train_state_with_numpy_is_refused_before_writing(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"train_state\['sampler'\]\['perm'\]"):
        _save(tmp_path, 1, train_state={"sampler": {"perm": np.arange(3)}})
    with pytest.raises(TypeError, match=r"train_state\['loss'\]"):
        _save(tmp_path, 1, train_state={"loss": np.float64(1.0)})
    assert not any(p.name.startswith("step_") for p in tmp_path.iterdir())


def test_crash_while_writing_leaves_no_step_folder(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    latest_before = (tmp_path / "latest").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, 2)
    assert _names(tmp_path) == ["latest", "step_00000001"]
    assert (tmp_path / "latest").read_text() == latest_before
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_crash_in_torch_save_leaves_no_step_folder(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3)
    assert _names(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None


def test_stale_tmp_folders_are_removed_at_next_save(tmp_path):
    stale = tmp_path / ".tmp-step_00000005-99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-latest-99999").write_text("step_0000")
    _save(tmp_path, 6)
    assert _names(tmp_path) == ["latest", "step_00000006"]


def test_saving_same_step_again_replaces_folder(tmp_path):
    _save(tmp_path, 4, weights=_weights(1.0))
    path = _save(tmp_path, 4, weights=_weights(2.0), metrics=None)
    assert torch.equal(load_weights(path)["G.w"], torch.full((2, 3), 2.0))
    assert _names(tmp_path) == ["latest", "step_00000004"]


def test_prune_keeps_newest_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        path = _save(tmp_path, step, metrics={"fid": 10.0 - step if step != 2 else 0.5})
        update_best(tmp_path, path, "fid", json.loads((path / "metrics.json").read_text())["fid"])
    assert (tmp_path / "best").read_text().strip() == "step_00000002"

    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in deleted) == ["step_00000001", "step_00000003"]
    assert _names(tmp_path) == ["best", "latest", "step_00000002", "step_00000004", "step_00000005"]
    assert prune_checkpoints(tmp_path, keep_last=0) == []
    assert len(_names(tmp_path)) == 5


def test_prune_never_deletes_latest(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    # resumed from step 10 and saved step 15: latest is older than the newest folders
    _save(tmp_path, 15)
    prune_checkpoints(tmp_path, keep_last=1)
    assert _names(tmp_path) == ["latest", "step_00000015", "step_00000030"]


def test_update_best_min_max_and_metrics_written(tmp_path):
    a = _save(tmp_path, 1)
    b = _save(tmp_path, 2)
    c = _save(tmp_path, 3)
    assert update_best(tmp_path, a, "loss", 2.0) is True  # no best yet
    assert update_best(tmp_path, b, "loss", 3.0) is False
    assert update_best(tmp_path, c, "loss", 1.0) is True
    assert (tmp_path / "best").read_text().strip() == "step_00000003"
    # the value is recorded with the checkpoint, so later comparisons can read it
    assert json.loads((c / "metrics.json").read_text())["loss"] == 1.0
    assert update_best(tmp_path, b, "loss", float("nan")) is False

    root = tmp_path / "max"
    x, y = _save(root, 1), _save(root, 2)
    assert update_best(root, x, "acc", 0.5, mode="max")
    assert update_best(root, y, "acc", 0.7, mode="max")
    assert not update_best(root, x, "acc", 0.6, mode="max")
    assert (root / "best").read_text().strip() == "step_00000002"
    with pytest.raises(ValueError, match="mode"):
        update_best(root, x, "acc", 0.1, mode="lowest")


@pytest.mark.parametrize("victim", ["model.safetensors", "train_state.pt", "config.json"])
def test_truncated_file_raises_naming_it_and_keeps_files(tmp_path, victim):
    path = _save(tmp_path, 1, train_state={"step": 1, "big": torch.randn(1000)})
    target = path / victim
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(target) in msg and "corrupt" in msg
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before  # nothing deleted or rewritten


def test_missing_file_and_folder_raise(tmp_path):
    path = _save(tmp_path, 1)
    (path / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state.pt is missing"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step_00000099")


def test_pickled_objects_are_not_loaded(tmp_path):
    path = _save(tmp_path, 1)

    # any non-allowlisted class would run its unpickling code under a plain torch.load
    torch.save({"x": datetime.timedelta(days=1)}, path / "train_state.pt")
    with pytest.raises(CheckpointError, match="train_state.pt"):
        load_checkpoint(path)


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    assert resolve_resume(run, "never") is None
    assert resolve_resume(run, "auto") is None  # nothing yet
    first = _save(ckdir, 100)
    second = _save(ckdir, 200)
    assert resolve_resume(run, "never") is None
    assert resolve_resume(run, "auto") == second
    assert resolve_resume(tmp_path / "elsewhere", str(run)) == second  # a run folder
    assert resolve_resume(tmp_path / "elsewhere", str(ckdir)) == second  # a checkpoints folder
    assert resolve_resume(run, str(first)) == first  # a step folder
    assert resolve_resume(run, str(first / "model.safetensors")) == first

    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(run, str(tmp_path / "nope"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve_resume(run, str(empty))

    (ckdir / "latest").write_text("step_00000300\n")
    with pytest.raises(CheckpointError, match="step_00000300.*does not exist"):
        resolve_resume(run, "auto")


def test_latest_falls_back_to_newest_folder_without_latest_file(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path / "missing") is None


def test_load_weights_and_config_from_run_folder(tmp_path):
    path = _save(tmp_path / "run" / "checkpoints", 3)
    w = load_weights(tmp_path / "run")
    assert torch.equal(w["D.b"], torch.arange(4.0) * 3)
    assert torch.equal(load_weights(path / "model.safetensors")["G.w"], torch.full((2, 3), 3.0))
    assert load_model_config(path) == CONFIG


def test_a_flipped_bit_is_caught_naming_the_file_and_the_newest_intact_checkpoint(tmp_path):
    _save(tmp_path, 1)
    path = _save(tmp_path, 2)
    model = path / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-3] ^= 0x10  # inside the tensor data: safetensors itself would load it without complaint
    model.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(model) in str(e.value) and str(tmp_path / "step_00000001") in str(e.value)
    with pytest.raises(CheckpointError, match="checksum"):
        load_weights(path)
    load_model_config(path)  # the files a reader needs are checked, not the others
    load_checkpoint(tmp_path / "step_00000001")


def test_a_full_disk_is_reported_as_such_and_the_last_checkpoint_is_kept(tmp_path, monkeypatch):
    import errno

    _save(tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", no_space)
    with pytest.raises(CheckpointError) as e:
        _save(tmp_path, 2)
    assert "no space left" in str(e.value) and str(tmp_path) in str(e.value)
    assert "step_00000001" in str(e.value)
    assert _names(tmp_path) == ["latest", "step_00000001"]
    load_checkpoint(latest_checkpoint(tmp_path))


def test_find_checkpoint_picks_latest_or_best(tmp_path):
    from vistrain.engine.checkpoint_files import find_checkpoint

    root = tmp_path / "checkpoints"
    for step, value in ((1, 0.5), (2, 0.9)):
        ckpt = save_checkpoint(root, step, {"w": torch.zeros(1)}, {}, {"step": step}, metrics={"loss": value})
        update_best(root, ckpt, "loss", value)
    assert find_checkpoint(tmp_path).name == "step_00000002"
    assert find_checkpoint(tmp_path, "best").name == "step_00000001"
    assert find_checkpoint(root / "step_00000002", "best").name == "step_00000002"  # a step folder is itself
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")

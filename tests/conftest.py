import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def subprocess_env_for() -> dict:
    """Environment for `vistrain` subprocesses: tests/ importable (the support package), quiet, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    env["WANDB_SILENT"] = "true"
    return env


@pytest.fixture(scope="session", autouse=True)
def vistrain_cache_dir(tmp_path_factory):
    """One $VISTRAIN_CACHE_DIR for the whole session (subprocesses inherit it): the digits judge that GAN and
    VAR evals on digits use is trained once per session, in seconds, and the user's ~/.cache is not touched."""
    path = tmp_path_factory.mktemp("vistrain_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISTRAIN_CACHE_DIR", str(path))
        yield path


@pytest.fixture
def subprocess_env():
    return subprocess_env_for()


@pytest.fixture
def vistrain_cmd():
    return [sys.executable, "-m", "vistrain"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: on a 2-core machine a second intra-op thread costs more than it saves."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kill_rng():
    """The random choices of a kill-and-resume test (which checkpoint to wait for, how long after it to kill), from
    a seed that is printed -- pytest shows it with a failure -- and can be given back to replay the same choices:
    VISTRAIN_KILL_SEED=<seed> pytest -k <test>."""
    import random

    seed = int(os.environ.get("VISTRAIN_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"kill seed {seed} (replay the same choices with VISTRAIN_KILL_SEED={seed})")
    return random.Random(seed)


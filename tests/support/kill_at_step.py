"""`python tests/support/kill_at_step.py K ARGS...` runs `vistrain ARGS...` and SIGKILLs itself when training is
about to start step K + 1: after step K's checkpoint is on disk (an async save is waited for) and after its eval.
The kill lands at a moment fixed by construction, not by a timer. Works under torchrun too (every rank kills
itself at the same step, and torchrun then ends the job).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the support package

from vistrain.cli import main  # noqa: E402
from vistrain.engine.trainer import Trainer  # noqa: E402


def kill_at(step: int) -> None:
    train_step = Trainer._train_step

    def _train_step(self):
        if self.step == step:
            self.checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)

    Trainer._train_step = _train_step


if __name__ == "__main__":
    kill_at(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))

"""A writer for tests/test_durable.py: `killed_writer.py PATH KILL_AT` replaces PATH through vistrain.durable and
kills itself (SIGKILL) just before its KILL_AT-th step, so a test hits every point of the write by construction.
Its steps are what durable asks of the OS (open, fsync, replace, close) and, between the two halves of the new
bytes, the write itself. Exits 0 when the write had fewer steps. No torch: it starts in milliseconds."""

import os
import signal
import sys

from vistrain import durable

OLD, NEW = b"old\n" * 50_000, b"new\n" * 80_000  # sizes differ: a part of either would show
STEPS = ("open", "fsync", "replace", "close")


class KillingOs:
    """`os` as durable.py sees it, except that the process dies just before its kill_at-th step."""

    def __init__(self, kill_at: int):
        self.kill_at, self.steps = kill_at, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        call = getattr(os, name)
        if name not in STEPS:
            return call

        def step_then_call(*args, **kwargs):
            self.step()
            return call(*args, **kwargs)

        return step_then_call


if __name__ == "__main__":
    killer = KillingOs(int(sys.argv[2]))
    durable.os = killer
    with durable.AtomicFile(sys.argv[1]) as out:
        out.file.write(NEW[: len(NEW) // 2])
        out.file.flush()
        killer.step()  # killed here, the temporary file holds half of NEW
        out.file.write(NEW[len(NEW) // 2 :])

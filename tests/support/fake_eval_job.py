"""A stand-in eval job for the engine tests: `fake_eval_job.py CHECKPOINT RESULT GATE_DIR`.

It waits until the test opens the gate (GATE_DIR/open exists), so a test decides when results arrive; it
kills itself when GATE_DIR/die_<step> exists; else it writes {"metrics": {"score": ...}} atomically, as
`vistrain eval` does. Plain Python, no torch: it starts in milliseconds.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

checkpoint, result, gate = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
step = int(checkpoint.name.split("_")[1])
print(f"evaluating {checkpoint}", flush=True)
while not (gate / "open").exists():
    time.sleep(0.02)
if (gate / f"die_{step}").exists():
    os.kill(os.getpid(), signal.SIGKILL)
score = 100 - abs(step - 10)  # peaks at step 10: `best` must end there
tmp = result.with_name(f".{result.name}.tmp")
tmp.write_text(json.dumps({"checkpoint": str(checkpoint), "metrics": {"score": score}}))
tmp.replace(result)

"""Worker for the torchrun semantics test: records each attempt, and rank 1 crashes in attempt 0."""

import json
import os
import signal
import sys
import time

out_dir = sys.argv[1]
rank, attempt = int(os.environ["RANK"]), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
with open(os.path.join(out_dir, f"attempt{attempt}_rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "attempt": attempt, "pid": os.getpid()}, f)
if rank == 1 and attempt == 0:
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(2.0)

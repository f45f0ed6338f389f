"""A stand-in for one VM's `train-ddp` launcher, for tests of hvctl's side of a distributed job
(tests/unit/test_distributed_run.py): the real launcher's protocol (a ready line, the go file, per-rank progress
lines, a JSON result) without torch, so that the orchestration is tested in seconds. The real launcher is tested in
tests/unit/test_workload_distributed.py, and both together in a VM test.

argv: BEHAVIOUR CONTROL_DIR then the agent's workload arguments. BEHAVIOUR:
  ok           train every step and finish
  fail-early   exit 3 before printing the ready line
  hold         after step 2, wait until killed (a VM the test then "destroys")
CONTROL_DIR/release, when the test creates it, lets an `ok` rank that has trained every step exit.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from guest.workloads.__main__ import _parser  # noqa: E402
from guest.workloads.protocol import Ready, progress_line, ready_line  # noqa: E402
from guest.workloads.schema import TrainProgress  # noqa: E402

behaviour, control = sys.argv[1], Path(sys.argv[2])
args = _parser().parse_args(["run", "train-ddp", *sys.argv[3:]])
train = _parser().parse_args(["run", "train", *[a for a in args.train_args if a not in ("--", "--json")]])
if behaviour == "fail-early":
    print("cannot import torch: pretend", file=sys.stderr)
    sys.exit(3)
print(ready_line(Ready(interface="lo", address=args.address)), flush=True)
while args.go_file is not None and not Path(args.go_file).exists():  # a launcher without one joins at once
    time.sleep(0.02)
rank = 0 if args.hosts_store else 1
for step in range(1, train.steps + 1):
    print(progress_line(TrainProgress(step=step, loss=1.0 / step, lr=1e-3, rank=rank, world_size=args.max_nodes)),
          flush=True)
    if behaviour == "hold" and step == 2:
        while True:
            time.sleep(1)
while not (control / "release").exists():
    time.sleep(0.02)
print(json.dumps({"objective": "ssl", "final_step": train.steps, "losses": [1.0 / s for s in range(1, train.steps + 1)],
                  "address": args.address}), flush=True)

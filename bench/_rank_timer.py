"""``dflash_ds.train`` with each rank's time split by phase: a launcher runs this file in place of
``-m dflash_ds.train`` (same flags). Every rank writes ``$RANK_TIMES_DIR/rank{R}.json`` at exit: seconds in
DeepSpeed's forward, backward and step, in ``train_step`` as a whole, and in collective waits (the idle time of a rank
that is ahead), each summed over the run's optimizer steps. Used by ``bench/rank_balance.py``; not a benchmark.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed.runtime.engine as ds_engine  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dflash_ds.train as train  # noqa: E402

SECONDS: dict[str, float] = collections.defaultdict(float)
CALLS: dict[str, int] = collections.defaultdict(int)


def timed(owner, name: str, key: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SECONDS[key] += time.perf_counter() - t0
            CALLS[key] += 1

    setattr(owner, name, wrapper)


for method in ("forward", "backward", "step"):
    timed(ds_engine.DeepSpeedEngine, method, method)
timed(train, "train_step", "train_step")
# a rank that finished its share first waits in these: the loss's finiteness check and the gradient reduction
timed(dist.distributed_c10d, "all_reduce", "all_reduce")
dist.all_reduce = dist.distributed_c10d.all_reduce


def _write() -> None:
    out = Path(os.environ["RANK_TIMES_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"seconds": dict(SECONDS), "calls": dict(CALLS)}))


atexit.register(_write)
sys.exit(train.main(sys.argv[1:]))

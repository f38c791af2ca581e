"""The one test seam of the trainer: faults injected by the crash, hang, resume and non-finite tests.

Read once from the environment when this module is imported; with none of the variables set (every real run) each
call returns at once.

* ``DFLASH_DS_TEST_KILL_<POINT>=<step>``, POINT one of ``IN_STEP`` (before the step's first forward: the other ranks
  wait in its collectives), ``IN_SAVE`` (a checkpoint gathered but not yet renamed into place) and ``AFTER_STEP``
  (the step and its checkpoint done): the process kills itself there, for real (no clean-up).
  ``DFLASH_DS_TEST_KILL_RANK=<global rank>`` limits it to one rank (default: every rank);
  ``DFLASH_DS_TEST_KILL_SIGNAL=STOP`` freezes the process instead (a hung rank).
* ``DFLASH_DS_TEST_NAN_AT_STEP=<step>``: the loss of every micro-batch of that optimizer step becomes NaN.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

POINTS = ("IN_STEP", "IN_SAVE", "AFTER_STEP")


class TestFaults:
    __test__ = False  # not a pytest test class

    def __init__(self, env: dict[str, str]) -> None:
        self.kill_at = {p: int(env[f"DFLASH_DS_TEST_KILL_{p}"]) for p in POINTS if f"DFLASH_DS_TEST_KILL_{p}" in env}
        self.kill_rank = int(env["DFLASH_DS_TEST_KILL_RANK"]) if "DFLASH_DS_TEST_KILL_RANK" in env else None
        self.signal = env.get("DFLASH_DS_TEST_KILL_SIGNAL", "KILL")
        self.nan_at = int(env["DFLASH_DS_TEST_NAN_AT_STEP"]) if "DFLASH_DS_TEST_NAN_AT_STEP" in env else None

    def at(self, point: str, step: int) -> None:
        """Kill (or stop) this process if a test asked for it at ``point`` of optimizer step ``step``."""
        if self.kill_at.get(point) != step:
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.kill_rank is not None and self.kill_rank != rank:
            return
        print(f"test fault: SIG{self.signal} to rank {rank} at {point.lower()} {step}, t={time.time():.3f}", flush=True)
        os.kill(os.getpid(), getattr(signal, f"SIG{self.signal}"))

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``loss``, or NaN at the step a non-finite-guard test poisons."""
        return loss * float("nan") if self.nan_at == step else loss


faults = TestFaults(dict(os.environ))

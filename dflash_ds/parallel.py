"""Process groups for data x tensor parallelism, and the Megatron-style ``mpu`` object DeepSpeed accepts.

Ranks ``[k*tp, (k+1)*tp)`` form one tensor-parallel group (they hold different shards of the same weights and
see the same batch); ranks with the same TP rank form a data-parallel group (ZeRO partitions and averages
gradients there).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist



@dataclass
class TPGroup:
    """The tensor-parallel group this rank belongs to (``group=None`` with size 1 means no TP)."""

    rank: int = 0
    size: int = 1
    group: object | None = field(default=None, repr=False)


@dataclass
class ParallelLayout:
    world_size: int
    rank: int
    tp: TPGroup
    dp_rank: int
    dp_size: int
    dp_group: object | None = None


def check_parallel_sizes(world_size: int, tp_size: int) -> None:
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(
            f"tensor_parallel.autotp_size={tp_size} must be >= 1 and divide the number of ranks ({world_size})"
        )


def build_parallel_layout(tp_size: int) -> ParallelLayout:
    """Create the TP and DP groups (every rank must call this, in the same order). They are made without a backend,
    so they inherit the world group's backend string (``"cpu:gloo,cuda:nccl"`` on a GPU,
    dflash_ds/collectives.py): a CPU tensor has a backend on them too."""
    if not dist.is_initialized():
        return ParallelLayout(1, 0, TPGroup(), 0, 1, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_parallel_sizes(world, tp_size)
    tp_group = dp_group = None
    for start in range(0, world, tp_size):  # new_group is collective: create all groups on all ranks
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for tp_rank in range(tp_size):
        ranks = list(range(tp_rank, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    return ParallelLayout(
        world_size=world,
        rank=rank,
        tp=TPGroup(rank=rank % tp_size, size=tp_size, group=tp_group if tp_size > 1 else None),
        dp_rank=rank // tp_size,
        dp_size=world // tp_size,
        dp_group=dp_group,
    )


# ----------------------------------------------------------------------------------------------------------------
# a rank that dies or hangs

# Set-up (rank 0 tokenising the data into the cache while the others wait, loading the model, resuming) waits at
# least this long whatever --dist-timeout says: those waits are legitimately long and one-sided on a first run.
SETUP_TIMEOUT_S = 1800.0
_timeout_now_s: float | None = None


def setup_timeout(dist_timeout_s: float) -> timedelta:
    global _timeout_now_s
    _timeout_now_s = max(float(dist_timeout_s), SETUP_TIMEOUT_S)
    return timedelta(seconds=_timeout_now_s)


def set_dist_timeout(seconds: float) -> int:
    """Give every process group this rank belongs to (the world, the TP/DP groups, DeepSpeed's own) this collective
    timeout; returns how many. Needed because ``new_group()`` does not inherit the world group's timeout: a group
    made without one (DeepSpeed makes its own) waits torch's default, 30 minutes for gloo, whatever
    ``init_process_group(timeout=...)`` said. gloo honours the timeout on CPU: a collective whose peer is stopped
    raises "Timed out waiting ...ms" after it; a peer that died closes its sockets and fails the collective at once.
    """
    global _timeout_now_s
    from torch.distributed.distributed_c10d import _set_pg_timeout, _world

    if not dist.is_initialized():
        return 0
    count = 0
    for group in list(_world.pg_map):
        _set_pg_timeout(timedelta(seconds=seconds), group)
        count += 1
    _timeout_now_s = float(seconds)
    return count


_DEAD = re.compile(r"connection closed by peer|connection reset by peer|broken pipe|socket closed|"
                   r"recv\(\) failed|send\(\) failed", re.IGNORECASE)
_HUNG = re.compile(r"timed out|collective operation timeout", re.IGNORECASE)
_BACKEND = re.compile(r"gloo|nccl|processgroup|c10d", re.IGNORECASE)


def dist_failure_message(exc: BaseException, hint: str = "resume with --resume auto") -> str | None:
    """One line naming the cause when ``exc`` is another rank dying or hanging under a collective, else None."""
    text = str(exc)
    from_backend = isinstance(exc, dist.DistError) or bool(_BACKEND.search(text))
    if not isinstance(exc, RuntimeError) or not from_backend or not (_DEAD.search(text) or _HUNG.search(text)):
        return None
    rank = os.environ.get("RANK", "?")
    detail = text.strip().splitlines()[0][-200:] if text.strip() else type(exc).__name__
    if _DEAD.search(text):
        cause = ("another rank died (its connection closed) while this one waited in a collective: that rank's "
                 "log or the node's kernel log (OOM killer) says why")
    else:
        limit = f"{_timeout_now_s:g} s" if _timeout_now_s is not None else "the timeout"
        cause = (f"a collective waited {limit} (--dist-timeout) for another rank: a rank is hung (stopped process, "
                 "frozen node, network partition), or one rank's work between collectives (a checkpoint save on "
                 "slow storage, a bigger share of the work) took longer than the timeout")
    return f"rank {rank}: {cause}; {hint} ({detail})"


@contextlib.contextmanager
def exit_on_dist_failure(prog: str, hint: str = "resume with --resume auto"):
    """Turn another rank's death or hang into one clear line and exit code 3, leaving at once: interpreter shutdown
    would tear down process groups whose peers may never answer."""
    try:
        yield
    except RuntimeError as exc:
        message = dist_failure_message(exc, hint)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)


class ModelParallelUnit:
    """The ``mpu`` interface DeepSpeed reads to reduce gradients over data-parallel ranks only and to count
    tensor-parallel shards once each in the gradient norm."""

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout

    def get_model_parallel_rank(self) -> int:
        return self.layout.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tp.size

    def get_model_parallel_group(self):
        return self.layout.tp.group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.layout.rank - self.layout.tp.rank

    def get_data_parallel_rank(self) -> int:
        return self.layout.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.dp_size

    def get_data_parallel_group(self):
        return self.layout.dp_group

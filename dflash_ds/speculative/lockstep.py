"""Rank 0 decides, the other ranks follow: decoding in lockstep on every rank of a process group.

Under ZeRO-3 (every forward gathers the weights) or tensor parallelism (every forward all-reduces), the in-training
eval runs the same decode on every rank, and each rank must run the same forwards in the same order. Greedy
decoding alone does not promise that: an argmax tie (or a last-bit difference between ranks' kernels) can pick
another token on one rank, and from there the ranks run different forwards and wait on each other until the
process group's timeout. With a :class:`Lockstep`, every decision the loops take from logits (the drafted tokens
that go into the next forward, the accepted count and the bonus, which draft groups to run) is rank 0's, broadcast
to the others, so the control flow cannot diverge. Each decision is one small broadcast, on the model's device
(gloo on a CPU, NCCL on a GPU; a group made as ``"cpu:gloo,cuda:nccl"`` has both).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


class Lockstep:
    """Broadcasts rank 0's decisions (short lists of token ids or counts) to every rank of ``group``."""

    def __init__(self, group=None) -> None:
        self.group = group
        # the global rank of the group's first member: broadcast names its source by global rank
        self.src = dist.get_global_rank(group, 0) if group is not None else 0
        self.leader = dist.get_rank() == self.src

    @classmethod
    def if_distributed(cls, group=None) -> "Lockstep | None":
        """A :class:`Lockstep` when torch.distributed is initialised with more than one rank; None (free) else."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return cls(group) if dist.get_world_size(group) > 1 else None

    def agree(self, values: Sequence[int], capacity: int, device: torch.device) -> list[int]:
        """Rank 0's ``values`` (at most ``capacity`` ints) on every rank. Every rank must call it at the same point
        with the same ``capacity``; what the other ranks pass is ignored.

        One broadcast of ``[capacity + 1]`` longs: the count, then the values (a fixed size, so the ranks need not
        agree on the count beforehand). More than ``capacity`` values raise ValueError on every rank: rank 0
        broadcasts the overflow (a negative count) instead of leaving the others waiting out the timeout."""
        buf = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        if self.leader:
            if len(values) > capacity:
                buf[0] = -len(values)
            else:
                buf[0] = len(values)
                buf[1 : 1 + len(values)] = torch.tensor(list(values), dtype=torch.long)
        dist.broadcast(buf, self.src, group=self.group)
        count = int(buf[0])
        if count < 0:
            raise ValueError(f"Lockstep.agree: rank {self.src} had {-count} values for a capacity of {capacity}")
        return buf[1 : 1 + count].tolist()

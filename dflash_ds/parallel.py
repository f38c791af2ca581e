"""Process groups for data x tensor parallelism, and the Megatron-style ``mpu`` object DeepSpeed accepts.

Ranks ``[k*tp, (k+1)*tp)`` form one tensor-parallel group (they hold different shards of the same weights and
see the same batch); ranks with the same TP rank form a data-parallel group (ZeRO partitions and averages
gradients there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from .lora import TPGroup


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
    """Create the TP and DP groups (every rank must call this, in the same order)."""
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

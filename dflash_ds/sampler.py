"""Which examples each rank trains on at each step, and the learning-rate schedule: pure arithmetic, no DeepSpeed.

* :func:`sample_seed`: the per-example seed for anchors and noise (the same on any rank layout);
* :class:`StepBatches`: the deterministic global batches (seeded shuffle, optional grouping by length) and each
  data-parallel rank's micro-batches of a step;
* :func:`resume_step`: the step a resumed run starts at, or a clear error when this layout's global batch would
  restart it at another sample;
* :func:`lr_lambda`: warm-up then constant, linear or cosine decay.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Per-example seed for anchors/noise: the same example gets the same blocks on any rank layout."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 12_345) % (2**62)


class StepBatches:
    """Deterministic global batches: step ``g`` of epoch ``e`` takes ``order_e[g*GB:(g+1)*GB]``; data-parallel rank
    ``r`` gets micro-batch ``i`` as the slice ``[(i*dp + r)*micro, +micro)`` of it. TP ranks share ``r``.

    ``order_e`` is a random permutation of the examples (seeded by ``seed + e``). With ``group_by_length = G > 0``
    and the examples' ``lengths``, each run of ``G`` global batches of it is then sorted by length, longest first:
    the ranks of one step (and the rows of one micro-batch) get neighbouring lengths, so no rank idles at the
    step's gradient all-reduce while another finishes a longer sequence, and micro-batches carry little padding.
    Which examples an epoch uses, and in which group, stays random."""

    def __init__(self, num_examples: int, micro: int, accum: int, dp_size: int, dp_rank: int, seed: int,
                 lengths: Sequence[int] | None = None, group_by_length: int = 0) -> None:
        self.n, self.micro, self.accum, self.dp, self.rank, self.seed = num_examples, micro, accum, dp_size, dp_rank, seed
        self.global_batch = micro * accum * dp_size
        self.steps_per_epoch = num_examples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the data has {num_examples} usable conversations, fewer than one global batch "
                f"({self.global_batch} = micro x accum x data-parallel ranks); add data or shrink the batch"
            )
        if group_by_length and (lengths is None or len(lengths) != num_examples):
            raise ValueError("group_by_length needs one length per example")
        self.lengths, self.group = (list(lengths) if group_by_length else None), group_by_length
        self._perm_epoch, self._perm = -1, None

    def epoch_order(self, epoch: int) -> list[int]:
        """Every example index once, in the order epoch ``epoch`` takes them (its last ``n % GB`` go unused)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        if not self.group:
            return order
        used = self.steps_per_epoch * self.global_batch  # the tail is unused: keep it out of the groups
        span = self.group * self.global_batch
        grouped = []
        for start in range(0, used, span):
            grouped += sorted(order[start : min(start + span, used)], key=lambda i: -self.lengths[i])
        return grouped + order[used:]

    def micro_batches(self, step: int) -> list[tuple[int, list[int]]]:
        """``[(epoch, example indices)]`` for each micro-step of optimizer step ``step`` on this rank."""
        epoch, local = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self.epoch_order(epoch), epoch
        base = local * self.global_batch
        out = []
        for i in range(self.accum):
            start = base + (i * self.dp + self.rank) * self.micro
            out.append((epoch, self._perm[start : start + self.micro]))
        return out


def exact_batch_flags(global_batch: int, micro: int, dp: int) -> str | None:
    """Flags that give ``global_batch`` sequences per step on ``dp`` data-parallel ranks, keeping the micro-batch
    where possible (else the largest one that divides); None when ``dp`` does not divide ``global_batch``."""
    if global_batch % dp:
        return None
    per_rank = global_batch // dp
    if per_rank % micro == 0:
        return f"--grad-accum {per_rank // micro} (ds_config gradient_accumulation_steps)"
    m = max(d for d in range(1, min(micro, per_rank) + 1) if per_rank % d == 0)
    return (f"--micro-batch-size {m} --grad-accum {per_rank // m} (ds_config train_micro_batch_size_per_gpu, "
            "gradient_accumulation_steps)")


def resume_step(saved: dict, micro: int, accum: int, dp: int, where: str) -> int:
    """The step a run resumed from a checkpoint with client state ``saved`` starts at: the saved step, where this
    run's global batch (``micro x accum x dp``) is the one the checkpoint was trained with.

    A step is a global batch of the data order, and ``--max-steps``/``--epochs``, the schedule and the saved
    scheduler count steps: with another global batch the same step would start at another sample (some data
    skipped or seen twice) and the schedule would stretch or shrink. That is refused with the flags that resume
    exactly (``saved["samples"]`` is the position in sequences)."""
    step, samples = int(saved["step"]), saved.get("samples")
    global_batch = micro * accum * dp
    if samples is None or step == 0 or samples == step * global_batch:
        return step
    saved_batch = samples // step
    fix = exact_batch_flags(saved_batch, micro, dp)
    how = (f"resume with {fix} to continue exactly at sample {samples}" if fix else
           f"resume on a number of data-parallel ranks that divides {saved_batch}")
    raise ValueError(
        f"--resume {where}: the checkpoint is at step {step} of global batch {saved_batch} (sequence {samples} of "
        f"the data order); this run's global batch is {global_batch} (micro-batch {micro} x grad-accum {accum} x "
        f"{dp} data-parallel ranks), so it would restart at sequence {step * global_batch} and count "
        f"--max-steps/--epochs and the learning-rate schedule in other steps; {how}"
    )


def lr_lambda(total_steps: int, warmup_ratio: float, schedule: str):
    warmup = math.ceil(warmup_ratio * total_steps)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn

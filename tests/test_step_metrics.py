"""A skipped (non-finite) micro-batch adds nothing to a step's logged means (dflash_ds.metrics.StepMetrics)."""

from __future__ import annotations

import math

import pytest
import torch

from dflash_ds.blocks import BlockLayout
from dflash_ds.objective import ObjectiveOutput
from dflash_ds.parallel import ParallelLayout, TPGroup
from dflash_ds.metrics import StepMetrics

SINGLE = ParallelLayout(world_size=1, rank=0, tp=TPGroup(), dp_rank=0, dp_size=1)


def _out(loss: float, correct: list[float]) -> ObjectiveOutput:
    t = torch.tensor
    return ObjectiveOutput(loss=t(loss), ce=t(loss / 2), kl=t(loss / 4), correct_by_pos=t(correct),
                           count_by_pos=t([0.0, 4.0]), accept_sum=t(3.0), accept_count=t(2.0), supervised_rows=8)


def _blocks() -> BlockLayout:
    z = torch.zeros(1, 2, dtype=torch.long)
    return BlockLayout(anchors=z, block_valid=torch.ones(1, 2, dtype=torch.bool), block_input_ids=z, labels=z,
                       weights=z.float(), position_ids=z, teacher_positions=z, block_size=2, num_skipped=0)


def test_skipped_micro_batch_is_left_out_of_the_means():
    batch = {"attention_mask": torch.ones(1, 5)}
    m = StepMetrics(step=3, block_size=2)
    m.add(_out(float("nan"), [0.0, float("nan")]), torch.tensor(0.0), batch, _blocks(), skipped=True)
    m.add(_out(2.0, [0.0, 3.0]), torch.tensor(2.0), batch, _blocks())
    record = m.reduce(SINGLE, accum=2)
    assert (record["loss"], record["ce"], record["kl"]) == pytest.approx((2.0, 1.0, 0.5))
    assert record["acc"] == pytest.approx(3 / 4) and record["sim_tau"] == pytest.approx(1.5)
    assert record["nonfinite_micro_batches"] == 1


def test_a_step_with_every_micro_batch_skipped_logs_nan_means():
    m = StepMetrics(step=3, block_size=2)
    m.add(_out(float("nan"), [0.0, 1.0]), torch.tensor(0.0), {"attention_mask": torch.ones(1, 5)}, _blocks(),
          skipped=True)
    record = m.reduce(SINGLE, accum=1)
    assert all(math.isnan(record[k]) for k in ("loss", "ce", "kl", "acc"))
    assert record["tokens_per_s"] > 0  # its forward ran

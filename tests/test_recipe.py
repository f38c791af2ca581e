"""The recipe's step metrics (dflash_ds.train.StepMetrics) against hand-computed means."""

from __future__ import annotations

import pytest
import torch

from dflash_ds.blocks import BlockLayout
from dflash_ds.model import ObjectiveOutput
from dflash_ds.parallel import ParallelLayout, TPGroup
from dflash_ds.train import StepMetrics


def _out(loss, correct, count, accept_sum, accept_count):
    t = torch.tensor
    return ObjectiveOutput(loss=t(loss), ce=t(loss / 2), kl=t(loss / 4), correct_by_pos=t(correct),
                           count_by_pos=t(count), accept_sum=t(accept_sum), accept_count=t(accept_count),
                           supervised_rows=int(sum(count)))


def _blocks(valid: list[list[bool]], skipped: int) -> BlockLayout:
    v = torch.tensor(valid)
    z = torch.zeros(v.shape, dtype=torch.long)
    return BlockLayout(anchors=z, block_valid=v, block_input_ids=z, labels=z, weights=z.float(), position_ids=z,
                       teacher_positions=z, block_size=3, num_skipped=skipped)


def test_step_metrics_are_means_over_micro_batches():
    m = StepMetrics(step=7, block_size=3)
    batch = {"attention_mask": torch.ones(2, 5)}  # 10 clean tokens per micro-batch
    m.add(_out(2.0, [0.0, 3.0, 1.0], [0.0, 4.0, 4.0], 5.0, 2.0), torch.tensor(2.0), batch, _blocks([[True, True]], 0))
    m.add(_out(4.0, [0.0, 1.0, 0.0], [0.0, 4.0, 4.0], 1.0, 1.0), torch.tensor(4.0), batch, _blocks([[True, False]], 1))
    single = ParallelLayout(world_size=1, rank=0, tp=TPGroup(), dp_rank=0, dp_size=1)
    record = m.reduce(single, accum=2, lr=0.5)
    assert record["step"] == 7 and record["lr"] == 0.5
    assert record["loss"] == pytest.approx(3.0) and record["ce"] == pytest.approx(1.5) and record["kl"] == 0.75
    assert record["acc"] == pytest.approx(5 / 16)  # correct over supervised positions, pooled
    assert record["sim_tau"] == pytest.approx(6 / 3)  # accepted lengths over fully supervised blocks, pooled
    assert record["skipped_samples"] == 1
    assert m.per_position == pytest.approx([0.0, 4 / 8, 1 / 8])
    assert record["tokens_per_s"] > 0  # 20 clean + 3 valid blocks x 3 tokens over the elapsed time

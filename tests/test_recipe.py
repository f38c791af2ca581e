"""The recipe's step metrics (dflash_ds.metrics.StepMetrics) against hand-computed means."""

from __future__ import annotations

import pytest
import torch

from dflash_ds.blocks import BlockLayout
from dflash_ds.objective import ObjectiveOutput
from dflash_ds.parallel import ParallelLayout, TPGroup
from dflash_ds.metrics import StepMetrics
from dflash_ds.sampler import StepBatches


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


# ----------------------------------------------------------------------------------------------------------------
# data order: StepBatches, plain and grouped by length


def _step_batches(n, micro, accum, dp, lengths=None, group=0, seed=3):
    return [StepBatches(n, micro, accum, dp, r, seed, lengths, group) for r in range(dp)]


def _global_batches(ranks, step):
    """The examples of optimizer step ``step``, in the order the ranks' micro-batches take them."""
    per_rank = [r.micro_batches(step) for r in ranks]
    return [i for micro in range(len(per_rank[0])) for batches in per_rank for i in batches[micro][1]]


def test_plain_order_is_the_seeded_permutation():
    ranks = _step_batches(10, micro=2, accum=1, dp=2)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert [_global_batches(ranks, s) for s in range(2)] == [perm[0:4], perm[4:8]]
    assert ranks[0].micro_batches(1) == [(0, perm[4:6])] and ranks[1].micro_batches(1) == [(0, perm[6:8])]


@pytest.mark.parametrize("micro,accum,dp", [(1, 1, 2), (2, 2, 2), (1, 3, 1)])
def test_grouped_order_takes_each_example_once_per_epoch(micro, accum, dp):
    n, gb = 101, micro * accum * dp
    lengths = torch.randint(10, 500, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    ranks = _step_batches(n, micro, accum, dp, lengths, group=4)
    steps = n // gb
    for epoch in range(2):
        seen = [i for s in range(steps) for i in _global_batches(ranks, epoch * steps + s)]
        assert len(seen) == len(set(seen)) == steps * gb
        # the same examples as the plain order's epoch uses, only regrouped
        plain = torch.randperm(n, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert set(seen) == set(plain[: steps * gb])
        # within each run of 4 global batches, longest first
        for g in range(0, steps, 4):
            run = [lengths[i] for s in range(g, min(g + 4, steps)) for i in _global_batches(ranks, epoch * steps + s)]
            assert run == sorted(run, reverse=True)
    assert ranks[0].micro_batches(0) != ranks[0].micro_batches(steps)  # a new epoch, a new order


def test_grouping_balances_the_ranks_of_a_step():
    """The cost of a synchronous step is its longest sequence: grouped, the sum of those maxima comes within a few
    per cent of the mean length; plain shuffled pairs pay about a quarter more."""
    n = 512
    u = torch.rand(n, generator=torch.Generator().manual_seed(1))
    lengths = (80 - 90 * torch.log1p(-u)).long().clamp(max=512).tolist()  # 80 + Exp(mean 90), like real answers

    def overhead(group):
        ranks = _step_batches(n, 1, 1, 2, lengths if group else None, group)
        steps = n // 2
        worst = sum(max(lengths[i] for i in _global_batches(ranks, s)) for s in range(steps))
        return worst / (sum(lengths[i] for s in range(steps) for i in _global_batches(ranks, s)) / 2)

    plain, grouped = overhead(0), overhead(32)
    assert plain > 1.15
    assert grouped < 1.03


def test_group_by_length_flag():
    from dflash_ds.config import OptimConfig

    with pytest.raises(ValueError, match="--group-by-length"):
        OptimConfig(group_by_length=-1)
    with pytest.raises(ValueError, match="one length per example"):
        StepBatches(10, 1, 1, 2, 0, 0, lengths=[5] * 9, group_by_length=2)

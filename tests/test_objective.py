"""The metrics every kind's objective reports (dflash_ds.objective.block_metrics) against a plain loop over blocks,
on hand-made patterns of supervised and correct rows (a random model predicts almost nothing right, so the
objectives' own tests cannot tell a leading run from a count)."""

import torch

from dflash_ds.blocks import BlockLayout
from dflash_ds.loss import LossOutput
from dflash_ds.objective import block_metrics

B = 4


def _layout(b: int, N: int) -> BlockLayout:
    z = torch.zeros(b, N * B, dtype=torch.long)
    return BlockLayout(anchors=torch.zeros(b, N, dtype=torch.long), block_valid=torch.ones(b, N, dtype=torch.bool),
                       block_input_ids=z, labels=z, weights=z.float(), position_ids=z, teacher_positions=z,
                       block_size=B, num_skipped=0)


def test_block_metrics_equal_a_plain_loop_over_blocks():
    # 2 samples x 3 blocks x B rows; row 0 of a block (the anchor) is never supervised
    supervised = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0],
                               [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    correct_rows = torch.tensor([[0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0],
                                 [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    out = LossOutput(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(0.25), correct_rows[supervised])
    m = block_metrics(out, supervised, _layout(2, 3))

    accept, full = 0.0, 0
    for i in range(2):
        for j in range(3):
            rows = slice(j * B, (j + 1) * B)
            sup, cor = supervised[i, rows], correct_rows[i, rows]
            if sup[1:].all():  # only fully supervised blocks count towards the simulated acceptance
                full += 1
                run = 0
                while run < B - 1 and cor[1 + run]:
                    run += 1
                accept += run + 1
    # blocks (0,0): run 2 -> 3; (0,1): run 0 -> 1; (1,0): run 3 -> 4; (1,2): run 1 -> 2; (0,2), (1,1) not full
    assert (full, accept) == (4, 10.0)
    assert m.accept_count.item() == full and m.accept_sum.item() == accept
    per_pos = (correct_rows & supervised).view(2, 3, B).sum((0, 1)).float()
    assert torch.equal(m.correct_by_pos, per_pos)
    assert torch.equal(m.count_by_pos, supervised.view(2, 3, B).sum((0, 1)).float())
    assert m.supervised_rows == int(supervised.sum()) and m.loss.item() == 1.0 and m.kl.item() == 0.25

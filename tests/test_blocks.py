import pytest
import torch

from dflash_ds.blocks import (
    IGNORE_INDEX,
    BlockConfig,
    block_visibility,
    build_attention_mask,
    build_block_layout,
    decay_weights,
)

MASK = 95


def _batch(seed=0, b=3, S=40):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (b, S), generator=gen)
    loss_mask = torch.zeros(b, S, dtype=torch.long)
    attn = torch.ones(b, S, dtype=torch.long)
    loss_mask[0, 10:] = 1
    loss_mask[1, 5:15] = 1
    loss_mask[1, 25:30] = 1
    attn[2, 30:] = 0  # padded sample
    loss_mask[2, 12:30] = 1
    return ids, loss_mask, attn


@pytest.mark.parametrize("on_prompt", [False, True])
@pytest.mark.parametrize("strategy", ["random", "tile"])
@pytest.mark.parametrize("ctx", [(0.0, 0.0), (0.2, 0.6)])
def test_anchors_always_valid(strategy, ctx, on_prompt):
    ids, lm, attn = _batch()
    cfg = BlockConfig(block_size=4, anchors=strategy, context_ratio=ctx, mask_token_id=MASK, anchor_on_prompt=on_prompt)
    prompt_ends = set()
    for seed in range(20):
        lay = build_block_layout(ids, lm, attn, cfg, [seed, seed + 100, seed + 200])
        for i in range(ids.shape[0]):
            length = int(attn[i].sum())
            ctx_start = int(ctx[0] * length)  # the drawn ratio is >= lo
            anchors = lay.anchors[i][lay.block_valid[i]].tolist()
            assert anchors == sorted(anchors)
            assert len(set(anchors)) == len(anchors)
            for a in anchors:
                assert a <= length - 2
                assert lm[i, a + 1] == 1
                assert a >= ctx_start
                assert on_prompt or lm[i, a] == 1  # --no-anchor-on-prompt: an answer token, as at inference
                if lm[i, a] == 0:
                    prompt_ends.add((i, a))
            if strategy == "tile":
                assert all(b - a >= 4 for a, b in zip(anchors, anchors[1:]))
    if on_prompt and strategy == "tile" and ctx == (0.0, 0.0):  # tiling from the start takes the first valid anchor
        assert prompt_ends == {(0, 9), (1, 4), (1, 24), (2, 11)}  # (1, 24): the second turn


def test_labels_line_up_with_tokens_and_weights_decay():
    ids, lm, attn = _batch()
    cfg = BlockConfig(block_size=5, gamma=2.0, mask_token_id=MASK)
    lay = build_block_layout(ids, lm, attn, cfg, [1, 2, 3])
    b, N, B = ids.shape[0], lay.num_blocks, 5
    w = decay_weights(B, 2.0)
    labels, weights, block_ids = lay.labels.view(b, N, B), lay.weights.view(b, N, B), lay.block_input_ids.view(b, N, B)
    checked = 0
    for i in range(b):
        length = int(attn[i].sum())
        for j in range(N):
            if not lay.block_valid[i, j]:
                assert (labels[i, j] == IGNORE_INDEX).all() and (weights[i, j] == 0).all()
                continue
            a = int(lay.anchors[i, j])
            assert block_ids[i, j, 0] == ids[i, a]
            assert (block_ids[i, j, 1:] == MASK).all()
            assert lay.position_ids[i, ids.shape[1] + j * B : ids.shape[1] + (j + 1) * B].tolist() == list(range(a, a + B))
            assert labels[i, j, 0] == IGNORE_INDEX
            for k in range(1, B):
                sup = a + k < length and lm[i, a + k] == 1
                if sup:
                    assert labels[i, j, k] == ids[i, a + k]
                    assert weights[i, j, k] == pytest.approx(float(w[k]))
                    assert lay.teacher_positions[i, j * B + k] == a + k - 1
                    checked += 1
                else:
                    assert labels[i, j, k] == IGNORE_INDEX and weights[i, j, k] == 0
    assert checked > 20
    assert w[1] == 1.0 and w[2] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())


def test_noise_keeps_one_follower_masked_and_reveals_true_tokens():
    ids, lm, attn = _batch()
    lm[:] = 1
    attn[:] = 1
    cfg = BlockConfig(block_size=4, noise_min=0.05, mask_token_id=MASK)
    revealed_any = False
    for seed in range(30):
        lay = build_block_layout(ids, lm, attn, cfg, [seed, seed + 7, seed + 9])
        bi, lab = lay.block_input_ids.view(3, -1, 4), lay.labels.view(3, -1, 4)
        for i in range(3):
            for j in range(lay.num_blocks):
                if not lay.block_valid[i, j]:
                    continue
                a = int(lay.anchors[i, j])
                masked = bi[i, j, 1:] == MASK
                assert masked.any()
                for k in range(1, 4):
                    if a + k >= ids.shape[1]:
                        assert bi[i, j, k] == MASK and lab[i, j, k] == IGNORE_INDEX
                    elif bi[i, j, k] != MASK:
                        revealed_any = True
                        assert bi[i, j, k] == ids[i, a + k] and lab[i, j, k] == IGNORE_INDEX
                    else:
                        assert lab[i, j, k] == ids[i, a + k]
    assert revealed_any


def test_sample_without_valid_anchor_is_skipped_and_counted():
    ids, lm, attn = _batch()
    lm[1] = 0
    lay = build_block_layout(ids, lm, attn, BlockConfig(block_size=4, mask_token_id=MASK), [0, 1, 2])
    assert lay.num_skipped == 1
    assert not lay.block_valid[1].any()
    assert (lay.labels[1] == IGNORE_INDEX).all()


def test_same_seed_same_layout_regardless_of_batch_position():
    ids, lm, attn = _batch()
    cfg = BlockConfig(block_size=4, noise_min=0.3, context_ratio=(0.1, 0.3), mask_token_id=MASK)
    full = build_block_layout(ids, lm, attn, cfg, [11, 22, 33])
    single = build_block_layout(ids[1:2], lm[1:2], attn[1:2], cfg, [22])
    assert torch.equal(full.block_input_ids[1], single.block_input_ids[0])
    assert torch.equal(full.labels[1], single.labels[0])


def test_sample_gets_its_own_blocks_when_batched_with_a_longer_one():
    """A 100-token sample padded to 1,000 next to a long one draws 100 // B blocks, the same blocks it draws alone
    (the old code took the count from the padded length: 62 blocks instead of 6 at B = 16)."""
    B, short, long_ = 16, 100, 1000
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (2, long_), generator=gen)
    lm = torch.zeros(2, long_, dtype=torch.long)
    attn = torch.zeros(2, long_, dtype=torch.long)
    attn[0, :short], lm[0, 10:short] = 1, 1
    attn[1], lm[1, 10:] = 1, 1
    cfg = BlockConfig(block_size=B, mask_token_id=MASK)
    batched = build_block_layout(ids, lm, attn, cfg, [5, 6])
    alone = build_block_layout(ids[:1, :short], lm[:1, :short], attn[:1, :short], cfg, [5])
    assert int(batched.block_valid[0].sum()) == short // B == int(alone.block_valid[0].sum())
    assert int(batched.block_valid[1].sum()) == long_ // B
    n = alone.num_blocks
    assert torch.equal(batched.anchors[0, :n], alone.anchors[0])
    assert torch.equal(batched.labels[0, : n * B], alone.labels[0])
    assert torch.equal(batched.weights[0, : n * B], alone.weights[0])
    assert not batched.block_valid[0, n:].any() and (batched.labels[0, n * B :] == IGNORE_INDEX).all()


def _reference_visibility(lay, attn):
    b, S = attn.shape
    N, B = lay.num_blocks, lay.block_size
    T = S + N * B
    vis = torch.zeros(b, T, T, dtype=torch.bool)
    for i in range(b):
        for q in range(T):
            for k in range(T):
                if q < S:
                    ok = k < S and k <= q and attn[i, k] == 1
                else:
                    j = (q - S) // B
                    if not lay.block_valid[i, j]:
                        ok = False
                    elif k < S:
                        ok = k < lay.anchors[i, j] and attn[i, k] == 1
                    else:
                        ok = (k - S) // B == j
                vis[i, q, k] = ok
    return vis


def test_visibility_matches_plain_loop_reference():
    ids, lm, attn = _batch(S=20)
    lay = build_block_layout(ids, lm, attn, BlockConfig(block_size=3, num_anchors=4, mask_token_id=MASK), [4, 5, 6])
    assert torch.equal(block_visibility(lay, attn), _reference_visibility(lay, attn))
    mask = build_attention_mask(lay, attn, torch.float32)
    assert mask.shape == (3, 1, 20 + 12, 20 + 12)
    assert mask.max() == 0 and mask.min() == torch.finfo(torch.float32).min


def test_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--block-size"):
        BlockConfig(block_size=1)
    with pytest.raises(ValueError, match="--anchors"):
        BlockConfig(anchors="grid")
    with pytest.raises(ValueError, match="--context-ratio"):
        BlockConfig(context_ratio=(0.5, 0.2))

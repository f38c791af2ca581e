"""The standalone drafter's objective (dflash_ds/dflash_objective.py) against a plain materialised reference."""

import inspect

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from dflash_ds.blocks import IGNORE_INDEX, BlockConfig, build_block_layout
from dflash_ds.kinds.dflash import DFlashDraftModel, DFlashDraftObjective, make_draft_config
from dflash_ds.loss import LossConfig
from dflash_ds.kinds.lora import LoRADraftObjective
from dflash_ds.objective import ObjectiveOutput

MASK = 95
S, B = 20, 4


def _setup(family="qwen3", kl=0.5, ckpt=False, noise_min=None, num_anchors=3, seed=0):
    target = tiny_model(family, seed=seed, num_hidden_layers=6)
    torch.manual_seed(seed + 1)
    drafter = DFlashDraftModel(make_draft_config(target.config, 2, block_size=B, mask_token_id=MASK)).float()
    objective = DFlashDraftObjective(target, drafter, LossConfig(ce_weight=1.0, kl_weight=kl, chunk_size=7),
                                     gradient_checkpointing=ckpt).train()
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(0, 90, (2, S), generator=g)
    loss_mask = torch.ones(2, S, dtype=torch.long)
    loss_mask[:, :4] = 0
    attn = torch.ones(2, S, dtype=torch.long)
    attn[1, S - 5:] = 0  # a right-padded sample
    loss_mask[1] = 0
    loss_mask[1, 6:8] = 1  # two valid anchors (5, 6): with three blocks a sample, a padding block
    ids[1, S - 5:] = 0
    cfg = BlockConfig(block_size=B, num_anchors=num_anchors, mask_token_id=MASK, noise_min=noise_min)
    layout = build_block_layout(ids, loss_mask, attn, cfg, [11, 12])
    return objective, ids, attn, layout


def _reference_visibility(layout, attn):
    """[b, N*B, S+N*B] bool, written out block by block."""
    b, N = layout.anchors.shape
    vis = torch.zeros(b, N * B, S + N * B, dtype=torch.bool)
    for i in range(b):
        for j in range(N):
            if not layout.block_valid[i, j]:
                continue
            rows = slice(j * B, (j + 1) * B)
            for p in range(int(layout.anchors[i, j])):
                vis[i, rows, p] = bool(attn[i, p])
            vis[i, rows, S + j * B: S + (j + 1) * B] = True
    return vis


def _reference(objective, ids, attn, layout):
    """Full logits [b, N*B, V] and the plain weighted CE + forward KL."""
    target, drafter, cfg = objective.target, objective.drafter, objective.loss_config
    with torch.no_grad():
        out = target(ids, attention_mask=attn, output_hidden_states=True)
    ctx = drafter.project_context(out.hidden_states)  # the HF tuple: layer id -> hidden_states[id + 1]
    embeds = target.get_input_embeddings()(layout.block_input_ids).detach()
    h = drafter(embeds, layout.position_ids[:, S:], ctx, torch.arange(S).expand(2, S),
                attention_mask=_reference_visibility(layout, attn)[:, None])
    logits = target.lm_head(h).float()
    sup = layout.labels != IGNORE_INDEX
    w = layout.weights[sup]
    ce = F.cross_entropy(logits[sup], layout.labels[sup], reduction="none")
    t_idx = layout.teacher_positions[:, :, None].expand(-1, -1, logits.shape[-1])
    teacher = out.logits.float().gather(1, t_idx)[sup]
    log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(logits[sup], -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce_m, kl_m = (w * ce).sum() / w.sum(), (w * kl).sum() / w.sum()
    return logits, cfg.ce_weight * ce_m + cfg.kl_weight * kl_m, ce_m, kl_m


def _grads(module):
    return [p.grad.clone() for p in module.drafter.parameters()]


@pytest.mark.parametrize("family,noise_min", [("qwen3", None), ("qwen3", 0.5), ("llama", None)])
def test_loss_and_gradients_equal_materialised_reference(family, noise_min):
    objective, ids, attn, layout = _setup(family, noise_min=noise_min)
    assert not layout.block_valid[1].all()  # a padding block takes part (sees nothing, no loss)
    out = objective(ids, attn, layout)
    out.loss.backward()
    got = _grads(objective)
    objective.drafter.zero_grad()
    _, loss, ce, kl = _reference(objective, ids, attn, layout)
    loss.backward()
    want = _grads(objective)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl, kl.detach(), rtol=1e-5, atol=1e-6)
    assert out.kl > 0 and out.supervised_rows == int((layout.labels != IGNORE_INDEX).sum()) > 0
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


def test_only_drafter_parameters_train():
    objective, ids, attn, layout = _setup()
    assert not any(p.requires_grad for p in objective.target.parameters())
    assert {id(p) for p in objective.trainable_parameters()} == {id(p) for p in objective.drafter.parameters()}
    assert not objective.target.training and objective.drafter.training  # train() leaves the target in eval
    objective(ids, attn, layout).loss.backward()
    assert all(p.grad is None for p in objective.target.parameters())
    for name, p in objective.drafter.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_block_never_sees_clean_tokens_at_or_after_its_anchor():
    objective, ids, attn, layout = _setup(kl=0.0)
    objective.eval()

    def rows(x):
        with torch.no_grad():
            feats, _ = objective.target_pass(x, attn)
            return objective.block_hidden_states(attn, layout, feats)

    base = rows(ids)
    gen = torch.Generator().manual_seed(9)
    for i in range(2):
        for j in range(layout.num_blocks):
            if not layout.block_valid[i, j]:
                continue
            a, r = int(layout.anchors[i, j]), slice(j * B, (j + 1) * B)
            changed = ids.clone()
            changed[i, a:] = torch.randint(0, 90, (S - a,), generator=gen)  # the block keeps its own anchor token
            assert torch.equal(rows(changed)[i, r], base[i, r]), f"sample {i} block {j} sees tokens >= its anchor"
            if a > 0:  # positive control: a token before the anchor is visible
                before = ids.clone()
                before[i, a - 1] = (ids[i, a - 1] + 5) % 90
                assert not torch.allclose(rows(before)[i, r], base[i, r])


def test_a_blocks_loss_is_unchanged_when_later_clean_tokens_change():
    """One block per sample, CE only (labels come from the layout): the loss is bit-for-bit the same."""
    objective, ids, attn, layout = _setup(kl=0.0, num_anchors=1)
    with torch.no_grad():
        base = objective(ids, attn, layout).loss
        changed = ids.clone()
        for i in range(2):
            a = int(layout.anchors[i, 0])
            changed[i, a:] = (changed[i, a:] + 17) % 90
        assert torch.equal(objective(changed, attn, layout).loss, base)


def test_metrics_match_the_reference_and_the_lora_objectives_shape():
    objective, ids, attn, layout = _setup()
    out = objective(ids, attn, layout)
    logits, *_ = _reference(objective, ids, attn, layout)
    sup = layout.labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == layout.labels) & sup  # [b, N*B]
    N = layout.num_blocks
    c3, s3 = correct.view(2, N, B), sup.view(2, N, B)
    assert isinstance(out, ObjectiveOutput)
    assert out.correct_by_pos.shape == out.count_by_pos.shape == (B,)
    assert torch.equal(out.correct_by_pos, c3.sum((0, 1)).float())
    assert torch.equal(out.count_by_pos, s3.sum((0, 1)).float())
    assert out.count_by_pos[0] == 0 and out.correct_by_pos[0] == 0
    accept, full = 0.0, 0
    for i in range(2):
        for j in range(N):
            if s3[i, j, 1:].all():
                full += 1
                run = 0
                while run < B - 1 and c3[i, j, 1 + run]:
                    run += 1
                accept += run + 1
    assert full > 0 and out.accept_count.item() == full and out.accept_sum.item() == accept
    # drop-in for the LoRA kind's objective: same forward signature
    ours = list(inspect.signature(DFlashDraftObjective.forward).parameters)
    assert ours == list(inspect.signature(LoRADraftObjective.forward).parameters)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        objective, ids, attn, layout = _setup(ckpt=ckpt)
        assert objective.drafter.gradient_checkpointing is ckpt
        objective(ids, attn, layout).loss.backward()
        grads.append(_grads(objective))
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_bf16_target_with_fp32_drafter():
    """The trainer may keep the drafter in fp32 beside a bf16 target: the student rows meet the lm_head's dtype."""
    objective, ids, attn, layout = _setup()
    objective.target.to(torch.bfloat16)
    out = objective(ids, attn, layout)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in objective.drafter.parameters())


def test_zero3_registers_the_lm_head_on_the_loss_module(monkeypatch):
    import deepspeed

    from dflash_ds.objective import register_lm_head

    objective, *_ = _setup()
    assert register_lm_head(objective.loss_head, objective.target) is False  # not partitioned: nothing to do
    calls = []
    monkeypatch.setattr(deepspeed.zero, "register_external_parameter", lambda m, p: calls.append((m, p)))
    weight = objective.target.get_output_embeddings().weight
    weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    try:
        assert register_lm_head(objective.loss_head, objective.target) is True
    finally:
        del weight.ds_id
    assert calls == [(objective.loss_head, weight)]

import pytest
import torch

from conftest import randomize_lora_b, tiny_qwen3
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.lora import LoRAConfig, adapter_control, apply_lora
from dflash_ds.loss import LossConfig
from dflash_ds.kinds.lora import LoRADraftObjective as LoRADraftObjective, resolve_clean_pass

MASK = 95
S, B = 24, 4


def _setup(scope="block", attn="sdpa", kl=0.0, clean_pass="auto"):
    model = tiny_qwen3(attn_implementation=attn)
    base = tiny_qwen3(attn_implementation=attn)
    apply_lora(model, LoRAConfig(r=4, alpha=8, scope=scope))
    randomize_lora_b(model)
    objective = LoRADraftObjective(model, LossConfig(ce_weight=1.0, kl_weight=kl, chunk_size=7), scope, clean_pass)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 90, (2, S), generator=g)
    lm = torch.ones(2, S, dtype=torch.long)
    lm[:, :6] = 0
    attn_mask = torch.ones(2, S, dtype=torch.long)
    cfg = BlockConfig(block_size=B, num_anchors=3, mask_token_id=MASK)
    layout = build_block_layout(ids, lm, attn_mask, cfg, [5, 6])
    return model, base, objective, ids, attn_mask, layout


def _block_logits(objective, ids, attn_mask, layout):
    with torch.no_grad():
        h = objective.hidden_states(ids, attn_mask, layout)
        return objective.model.lm_head(h[:, ids.shape[1]:])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("scope,clean_pass", [("block", "cached"), ("block", "joint"), ("all", "joint")])
def test_blocks_cannot_see_what_they_must_not(attn, scope, clean_pass):
    model, _, objective, ids, attn_mask, layout = _setup(scope, attn, clean_pass=clean_pass)
    ref = _block_logits(objective, ids, attn_mask, layout)
    N = layout.num_blocks
    for i in range(2):
        for j in range(N):
            a = int(layout.anchors[i, j])
            rows = slice(j * B, (j + 1) * B)
            # a clean token at or after the anchor: invisible to block j
            ids2 = ids.clone()
            ids2[i, a + 1 if a + 1 < S else a] = (ids2[i, a] + 1) % 90
            ids2[i, a] = (ids[i, a] + 7) % 90  # changes the clean copy, not the block's own anchor token
            out = _block_logits(objective, ids2, attn_mask, layout)
            assert torch.equal(out[i, rows], ref[i, rows]), f"block {j} saw clean tokens at/after its anchor"
            # another block's tokens: invisible
            other = (j + 1) % N
            lay2 = build_block_layout(ids, ids.new_ones(2, S), attn_mask, BlockConfig(block_size=B, num_anchors=3, mask_token_id=MASK), [5, 6])
            lay2.__dict__.update({k: v.clone() for k, v in layout.__dict__.items() if isinstance(v, torch.Tensor)})
            lay2.block_input_ids[i, other * B : (other + 1) * B] = 3
            out = _block_logits(objective, ids, attn_mask, lay2)
            assert torch.equal(out[i, rows], ref[i, rows]), f"block {j} saw block {other}"
            # a clean token before the anchor: visible, so the logits must move
            if a > 0:
                ids3 = ids.clone()
                ids3[i, a - 1] = (ids[i, a - 1] + 11) % 90
                assert not torch.allclose(_block_logits(objective, ids3, attn_mask, layout)[i, rows], ref[i, rows])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_scope_clean_stream_is_the_base_model(attn):
    model, base, objective, ids, attn_mask, layout = _setup("block", attn)
    with torch.no_grad():
        h = objective.hidden_states(ids, attn_mask, layout)
        clean_logits = model.lm_head(h[:, :S])
        base_logits = base(input_ids=ids).logits
        control = adapter_control(model)
        control.rows_from = 0
        adapted = model(input_ids=ids).logits
    torch.testing.assert_close(clean_logits, base_logits, rtol=0, atol=2e-5)
    assert not torch.allclose(adapted, base_logits, atol=1e-3), "adapter has no effect: the test would prove nothing"
    with control.disabled():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["block", "all"])
def test_kl_teacher_is_the_adapter_off_model(scope):
    model, base, objective, ids, attn_mask, layout = _setup(scope, kl=1.0)
    with torch.no_grad():
        h = objective.hidden_states(ids, attn_mask, layout)
        teacher = objective.teacher_hidden(ids, attn_mask, h)
        expected = base.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(teacher, expected, rtol=0, atol=2e-5)


def test_forward_backward_trains_only_lora_and_reports_metrics():
    model, _, objective, ids, attn_mask, layout = _setup("block", kl=0.5)
    out = objective(ids, attn_mask, layout)
    out.loss.backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert out.count_by_pos[0] == 0 and out.count_by_pos[1:].sum() == out.supervised_rows > 0
    assert out.accept_count > 0 and 1.0 <= (out.accept_sum / out.accept_count).item() <= B
    assert torch.isfinite(out.loss)


def _loss_and_grads(objective, ids, attn_mask, layout):
    out = objective(ids, attn_mask, layout)
    out.loss.backward()
    params = [p for p in objective.model.parameters() if p.requires_grad]
    return out, torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_cached_clean_pass_equals_the_joint_forward(attn, ckpt):
    """The cached clean pass (a no-grad clean forward, then the blocks against its KV cache) gives the joint
    forward's hidden states, loss, metrics and gradients, with padding, the KL teacher and checkpointing."""
    runs = {}
    for clean_pass in ("joint", "cached"):
        model, _, objective, ids, attn_mask, layout = _setup("block", attn, kl=0.5, clean_pass=clean_pass)
        attn_mask[1, 19:] = 0
        layout = build_block_layout(ids, torch.ones_like(ids), attn_mask,
                                    BlockConfig(block_size=B, num_anchors=3, mask_token_id=MASK), [5, 6])
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        with torch.no_grad():
            hidden = objective.hidden_states(ids, attn_mask, layout)
        runs[clean_pass] = (hidden, *_loss_and_grads(objective, ids, attn_mask, layout))
    (h_joint, out_joint, g_joint), (h_cached, out_cached, g_cached) = runs["joint"], runs["cached"]
    rows = torch.cat([attn_mask.bool(), layout.block_valid.repeat_interleave(B, dim=1)], dim=1)
    torch.testing.assert_close(h_cached[rows], h_joint[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_cached.loss, out_joint.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(out_cached.correct_by_pos, out_joint.correct_by_pos)
    assert out_joint.kl > 0 and g_joint.abs().max() > 0
    torch.testing.assert_close(g_cached, g_joint, rtol=1e-4, atol=1e-7)


def test_cached_clean_pass_needs_scope_block():
    model = tiny_qwen3()
    apply_lora(model, LoRAConfig(r=4, alpha=8, scope="all"))
    with pytest.raises(ValueError, match="--clean-pass cached needs --lora-scope block"):
        LoRADraftObjective(model, LossConfig(), "all", "cached")
    assert LoRADraftObjective(model, LossConfig(), "all").clean_pass == "joint"
    with pytest.raises(ValueError, match="--clean-pass cached is not supported with --attn-implementation flex"):
        resolve_clean_pass("cached", "block", "flex_attention")
    assert resolve_clean_pass("auto", "block", "sdpa") == "cached"


@pytest.mark.parametrize("clean_pass", ["joint", "cached"])
def test_gradient_checkpointing_gives_same_gradients(clean_pass):
    grads = []
    for ckpt in (False, True):
        model, _, objective, ids, attn_mask, layout = _setup("block", kl=0.5, clean_pass=clean_pass)
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        objective(ids, attn_mask, layout).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_flex_attention_block_mask_matches_sdpa():
    """FlexAttention (compiled; on CPU too) must give the SDPA mask's numbers."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    _, _, objective, ids, attn_mask, layout = _setup("block", "sdpa")
    attn_mask[1, 20:] = 0  # padding too
    flex_model = tiny_qwen3(attn_implementation="flex_attention")
    apply_lora(flex_model, LoRAConfig(r=4, alpha=8, scope="block"))
    flex_model.load_state_dict(objective.model.state_dict())
    flex = LoRADraftObjective(flex_model, objective.loss_config, "block")
    assert flex.clean_pass == "joint" and objective.clean_pass == "cached"
    with torch.no_grad():
        a = objective.hidden_states(ids, attn_mask, layout)
        b = flex.hidden_states(ids, attn_mask, layout)
    rows = torch.cat([attn_mask.bool(), layout.block_valid.repeat_interleave(B, dim=1)], dim=1)
    torch.testing.assert_close(b[rows], a[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_cached_clean_pass_fails_loudly_when_transformers_drops_the_cache(attn, ckpt):
    """The cached pass relies on a private transformers attribute to keep the KV cache under gradient
    checkpointing. If a transformers release ignored it, the blocks would train without their context: the
    objective must raise instead of training on. Emulated by clearing the attribute after set-up."""
    model, _, objective, ids, attn_mask, layout = _setup("block", attn, clean_pass="cached")
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    objective(ids, attn_mask, layout).loss.backward()  # the installed transformers keeps the cache: no error
    for layer in model.model.layers:
        layer._can_checkpoint_with_cache = False
    if not ckpt:  # without checkpointing the attribute is never read: still fine
        objective(ids, attn_mask, layout)
        return
    with pytest.raises(RuntimeError, match="did not read the clean tokens' KV cache"):
        objective(ids, attn_mask, layout)

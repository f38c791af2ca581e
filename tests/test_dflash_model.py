"""The standalone DFlash draft model (dflash_ds/dflash_model.py) against an independent reading of its export.

The reference forward below is written from the published design (z-lab ``dflash/model.py``, SGLang
``srt/models/dflash.py``, vLLM ``qwen3_dflash.py``) with plain torch ops, and reads only what a serving engine
reads: ``config.json``, ``model.safetensors`` and the target's embedding / lm_head.
"""

import json
import math

import pytest
import torch

from conftest import tiny_model
from dflash_ds.kinds.dflash import (
    DFlashContextCache,
    DFlashDraftModel,
    FeatureTap,
    default_target_layer_ids,
    init_from_target,
    load_dflash_draft,
    make_draft_config,
    save_dflash_draft,
)
from dflash_ds.blocks import block_rows_visibility, visibility

B = 4  # block size
MASK = 95  # a row of the tiny targets' 96-row embedding
CASES = {
    # qwen3: q/k norms in the target, separate lm_head; llama: SmolLM2-like (tied head), here with attention biases
    "qwen3": dict(num_hidden_layers=6),
    "llama": dict(num_hidden_layers=6, attention_bias=True),
}


def _setup(family, num_draft_layers=2, seed=0):
    target = tiny_model(family, seed=seed, **CASES[family])
    config = make_draft_config(target.config, num_hidden_layers=num_draft_layers, block_size=B, mask_token_id=MASK)
    torch.manual_seed(seed + 1)
    draft = DFlashDraftModel(config).float().eval()
    with torch.no_grad():  # norms away from 1 and nonzero biases, so a swapped or skipped one shows
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return target, draft


def _features(target, ids):
    with torch.no_grad():
        return target(ids, output_hidden_states=True).hidden_states


def _blocks(ids, anchors, block_valid=None):
    """[x[a], MASK, ...] per block and positions a..a+B-1."""
    b, N = anchors.shape
    block_ids = torch.full((b, N * B), MASK, dtype=torch.long)
    block_ids[:, ::B] = torch.gather(ids, 1, anchors)
    if block_valid is not None:
        block_ids[:, ::B][~block_valid] = MASK
    pos = (anchors[:, :, None] + torch.arange(B)).reshape(b, N * B)
    return block_ids, pos


def _draft_logits(target, draft, hidden_states, block_ids, block_pos, mask=None, context_pos=None):
    with torch.no_grad():
        ctx = draft.project_context(hidden_states)
        h = draft(target.model.embed_tokens(block_ids), block_pos, ctx, context_pos, attention_mask=mask)
        return target.lm_head(h)


# ---------------------------------------------------------------------------------------------------------------
# the independent reference: config.json + model.safetensors + the target's embedding and lm_head


def _rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def _rotate(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[..., None] * inv  # [b, L, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    half = d // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def reference_logits(export_dir, embed_w, head_w, hidden_states, block_ids, block_pos, context_pos, visible):
    """Logits of the block rows. ``visible`` [b, M, T+M] bool over keys [context rows | block rows]."""
    from safetensors.torch import load_file

    cfg = json.loads((export_dir / "config.json").read_text())
    W = load_file(str(export_dir / "model.safetensors"))
    eps, nh, nkv, d = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    assert cfg["rope_parameters"]["rope_type"] == "default"
    theta = cfg["rope_parameters"]["rope_theta"]
    bias = cfg["attention_bias"]

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if bias and name + ".bias" in W else y

    feats = torch.cat([hidden_states[i + 1] for i in cfg["dflash_config"]["target_layer_ids"]], -1)
    ctx = _rms(feats @ W["fc.weight"].T, W["hidden_norm.weight"], eps)
    h = embed_w[block_ids]
    b, M, _ = h.shape
    T = ctx.shape[1]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        x = _rms(h, W[p + "input_layernorm.weight"], eps)
        q = _rms(lin(x, p + "self_attn.q_proj").view(b, M, nh, d), W[p + "self_attn.q_norm.weight"], eps)
        kv_in = torch.cat([ctx, x], 1)  # the context is not passed through input_layernorm
        k = _rms(lin(kv_in, p + "self_attn.k_proj").view(b, T + M, nkv, d), W[p + "self_attn.k_norm.weight"], eps)
        v = lin(kv_in, p + "self_attn.v_proj").view(b, T + M, nkv, d)
        q = _rotate(q.transpose(1, 2), block_pos, theta)
        k = _rotate(k.transpose(1, 2), torch.cat([context_pos, block_pos], 1), theta)
        k = k.repeat_interleave(nh // nkv, 1)
        v = v.transpose(1, 2).repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        att = torch.softmax(scores, -1).nan_to_num(0.0) @ v
        h = h + lin(att.transpose(1, 2).reshape(b, M, nh * d), p + "self_attn.o_proj")
        y = _rms(h, W[p + "post_attention_layernorm.weight"], eps)
        gate, up = y @ W[p + "mlp.gate_proj.weight"].T, y @ W[p + "mlp.up_proj.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ W[p + "mlp.down_proj.weight"].T
    return _rms(h, W["norm.weight"], eps) @ head_w.T


def training_attention_mask(anchors, block_size, S, block_valid=None):
    """The training visibility the objective hands the drafter, all context rows real."""
    valid = torch.ones(anchors.shape, dtype=torch.bool) if block_valid is None else block_valid
    return block_rows_visibility(anchors, valid, block_size, torch.ones(anchors.shape[0], S, dtype=torch.bool))


def _reference_visibility(anchors, block_valid, T):
    b, N = anchors.shape
    vis = torch.zeros(b, N * B, T + N * B, dtype=torch.bool)
    for bi in range(b):
        for j in range(N):
            if block_valid[bi, j]:
                rows = slice(j * B, (j + 1) * B)
                vis[bi, rows, : int(anchors[bi, j])] = True
                vis[bi, rows, T + j * B: T + (j + 1) * B] = True
    return vis


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(CASES))
def test_export_reproduced_by_independent_reference_training_layout(family, tmp_path):
    target, draft = _setup(family)
    S = 14
    ids = torch.randint(0, 90, (2, S), generator=torch.Generator().manual_seed(3))
    anchors = torch.tensor([[2, 6, 9], [0, 4, 11]])
    valid = torch.tensor([[True, True, True], [True, True, False]])  # a padding block
    block_ids, block_pos = _blocks(ids, anchors, valid)
    hs = _features(target, ids)
    mask = training_attention_mask(anchors, B, S, block_valid=valid)
    ours = _draft_logits(target, draft, hs, block_ids, block_pos, mask)

    save_dflash_draft(draft, tmp_path, target.config)
    ctx_pos = torch.arange(S).expand(2, S)
    vis = _reference_visibility(anchors, valid, S)
    ref = reference_logits(tmp_path, target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach(), hs,
                           block_ids, block_pos, ctx_pos, vis)
    rows = valid.repeat_interleave(B, dim=1)
    torch.testing.assert_close(ours[rows], ref[rows], rtol=1e-5, atol=2e-5)
    assert torch.isfinite(ours).all()  # the padding block's fully masked rows stay finite
    # the draft read back from the export gives the same numbers
    again = load_dflash_draft(tmp_path)
    torch.testing.assert_close(_draft_logits(target, again, hs, block_ids, block_pos, mask), ours, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(CASES))
def test_export_reproduced_by_independent_reference_inference_block(family, tmp_path):
    target, draft = _setup(family)
    P = 9  # committed tokens; the block's anchor is the last sampled token at position P
    ids = torch.randint(0, 90, (1, P + 1), generator=torch.Generator().manual_seed(4))
    hs = [h[:, :P] for h in _features(target, ids)]
    block_ids, block_pos = _blocks(ids, torch.tensor([[P]]))
    ours = _draft_logits(target, draft, hs, block_ids, block_pos, mask=None)
    save_dflash_draft(draft, tmp_path, target.config)
    vis = torch.ones(1, B, P + B, dtype=torch.bool)
    ref = reference_logits(tmp_path, target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach(), hs,
                           block_ids, block_pos, torch.arange(P)[None], vis)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("family", list(CASES))
def test_block_sees_nothing_at_or_after_its_anchor_nor_other_blocks(family):
    target, draft = _setup(family)
    S = 16
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 90, (1, S), generator=gen)
    anchors = torch.tensor([[3, 7, 12]])
    block_ids, block_pos = _blocks(ids, anchors)
    mask = training_attention_mask(anchors, B, S)
    base = _draft_logits(target, draft, _features(target, ids), block_ids, block_pos, mask)
    for j in range(3):
        rows = slice(j * B, (j + 1) * B)
        a = int(anchors[0, j])
        # a context token at >= the anchor (the block input keeps its anchor token): the features change from a on
        changed = ids.clone()
        changed[0, a:] = torch.randint(0, 90, (S - a,), generator=gen)
        hs = _features(target, changed)
        assert not torch.equal(hs[2][:, a:], _features(target, ids)[2][:, a:])
        out = _draft_logits(target, draft, hs, block_ids, block_pos, mask)
        assert torch.equal(out[:, rows], base[:, rows]), f"block {j} sees context at >= its anchor"
        # every other block's tokens
        others = block_ids.clone()
        for k in range(3):
            if k != j:
                others[0, k * B:(k + 1) * B] = torch.randint(0, 90, (B,), generator=gen)
        out = _draft_logits(target, draft, _features(target, ids), others, block_pos, mask)
        assert torch.equal(out[:, rows], base[:, rows]), f"block {j} sees another block"
        assert not torch.equal(out, base)


def test_training_mask_is_the_reference_visibility_and_the_lora_kinds_block_rows():
    """The drafter's keys [context | blocks] under the reference rule (padding context never visible), and the same
    rows as the block rows of the LoRA kind's joint mask (dflash_ds.blocks.visibility)."""
    anchors = torch.tensor([[1, 5, 9], [0, 2, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    key_real = torch.ones(2, 12, dtype=torch.bool)
    key_real[1, 10:] = False
    ours = block_rows_visibility(anchors, valid, B, key_real)
    ref = _reference_visibility(anchors, valid, 12)
    ref[:, :, :12] &= key_real[:, None, :]
    assert torch.equal(ours, ref)
    assert torch.equal(ours, visibility(anchors, valid, B, key_real)[:, 12:])


@pytest.mark.parametrize("family", list(CASES))
def test_context_cache_equals_uncached_forward(family):
    target, draft = _setup(family)
    P, L = 7, 16
    ids = torch.randint(0, 90, (1, L), generator=torch.Generator().manual_seed(6))
    hs = _features(target, ids)
    with torch.no_grad():
        ctx_all = draft.project_context(hs)
    embed = target.model.embed_tokens

    def uncached(n):  # all committed context [0, n) and a block anchored at n
        block_ids, pos = _blocks(ids, torch.tensor([[n]]))
        with torch.no_grad():
            return draft(embed(block_ids), pos, ctx_all[:, :n])

    cache = DFlashContextCache(len(draft.layers))
    committed = 0
    for step, accepted in enumerate([P, 3, 1, 4]):  # prefill, then the rows each verify step commits
        n = committed + accepted
        block_ids, pos = _blocks(ids, torch.tensor([[n]]))
        with torch.no_grad():
            if step == 2:  # one draft forward appends the context, a second one reads the cache alone
                draft(embed(block_ids), pos, ctx_all[:, committed:n], cache=cache)
                out = draft(embed(block_ids), pos, None, cache=cache)
            else:
                out = draft(embed(block_ids), pos, ctx_all[:, committed:n], cache=cache)
        committed = n
        assert cache.length == committed  # block rows are never cached
        torch.testing.assert_close(out, uncached(n), rtol=1e-6, atol=1e-6)


def test_draft_config_keys_and_types_the_loaders_read(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    target, draft = _setup("qwen3", num_draft_layers=3)
    save_dflash_draft(draft, tmp_path, target.config, dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"]  # vLLM registry / SGLang EntryClass
    assert cfg["model_type"] == "qwen3"
    for key in ("block_size", "num_target_layers", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert type(cfg[key]) is int, key
    assert cfg["block_size"] == B and cfg["num_target_layers"] == 6 and cfg["num_hidden_layers"] == 3
    assert cfg["vocab_size"] == target.config.vocab_size and cfg["hidden_size"] == target.config.hidden_size
    dc = cfg["dflash_config"]
    assert type(dc["mask_token_id"]) is int and dc["mask_token_id"] == MASK  # SGLang: Integral, not bool, >= 0
    ids = dc["target_layer_ids"]
    assert ids == default_target_layer_ids(6, 3) == [1, 2, 3]
    assert all(type(i) is int and 0 <= i < cfg["num_target_layers"] for i in ids)
    assert cfg["layer_types"] == ["full_attention"] * 3  # SGLang: one entry per layer; vLLM: non-causal full layers
    assert cfg["hidden_act"] == "silu" and type(cfg["attention_bias"]) is bool
    assert type(cfg["rms_norm_eps"]) is float
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"] == target.config.rope_parameters["rope_theta"]
    assert cfg["rope_scaling"] is None and cfg["sliding_window"] is None and cfg["use_sliding_window"] is False
    assert cfg["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        fc = f.get_tensor("fc.weight")
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    expected = {f"layers.{i}.{n}" for i in range(3) for n in per_layer} | {"fc.weight", "hidden_norm.weight",
                                                                           "norm.weight"}
    assert keys == expected  # no embed_tokens / lm_head: the engines share the target's
    assert fc.dtype == torch.bfloat16 and tuple(fc.shape) == (64, len(ids) * 64)
    loaded = AutoConfig.from_pretrained(tmp_path)  # what both engines do first
    assert type(loaded).__name__ == "Qwen3Config"
    assert loaded.dflash_config == dc and loaded.block_size == B and loaded.num_target_layers == 6
    assert loaded.head_dim == 16 and loaded.rope_parameters["rope_theta"] == cfg["rope_theta"]


def test_default_target_layer_ids_follow_the_reference_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B, as SPEC 12 / z-lab
    assert default_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]  # z-lab Qwen3.5-9B-DFlash's published ids
    assert default_target_layer_ids(36, 1) == [18]  # one layer: N // 2
    assert default_target_layer_ids(3, 1) == [1] and default_target_layer_ids(2, 1) == [0]  # never the last layer
    assert default_target_layer_ids(6, 2) == [1, 3]
    with pytest.raises(ValueError):
        default_target_layer_ids(3, 2)
    target = tiny_model("qwen3", num_hidden_layers=6)
    with pytest.raises(ValueError, match="out of range"):  # the last layer's HF feature is post-norm
        make_draft_config(target.config, 1, target_layer_ids=[5], mask_token_id=MASK)
    cfg = make_draft_config(target.config, 1, target_layer_ids=[0, 2, 4], mask_token_id=MASK)
    assert DFlashDraftModel(cfg).fc.weight.shape == (64, 3 * 64)  # K features need not equal the draft's depth


@pytest.mark.parametrize("family", list(CASES))
def test_init_from_target_copies_weights(family):
    target, draft = _setup(family, num_draft_layers=2)
    src = init_from_target(draft, target)
    assert src == [4, 5]  # the last two of six
    for d_layer, i in zip(draft.layers, src):
        theirs = target.model.layers[i].state_dict()
        for name, value in d_layer.state_dict().items():
            if name in theirs:
                assert torch.equal(value, theirs[name]), name
            else:  # Llama has no q/k norms: they start at 1
                assert family == "llama" and name.endswith(("q_norm.weight", "k_norm.weight"))
                assert torch.equal(value, torch.ones_like(value))
    assert torch.equal(draft.norm.weight, target.model.norm.weight)
    K = len(draft.target_layer_ids)
    feats = torch.randn(1, 3, K * 64)
    torch.testing.assert_close(draft.fc(feats), feats.view(1, 3, K, 64).mean(2))
    assert init_from_target(draft, target, [1, 3]) == [1, 3]  # explicit source layers
    assert torch.equal(draft.layers[0].mlp.up_proj.weight, target.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(draft.layers[1].mlp.up_proj.weight, target.model.layers[3].mlp.up_proj.weight)


def test_feature_tap_equals_hidden_states_and_projection_inputs():
    target, draft = _setup("qwen3")
    ids = torch.randint(0, 90, (2, 10))
    tap = FeatureTap.of(target, draft.target_layer_ids)
    with torch.no_grad():
        with tap.recording():
            hs = target(ids, output_hidden_states=True).hidden_states
            feats = tap.take(draft.target_layer_ids)
        target(ids)  # off outside the recording: nothing kept
    assert not tap.active and not tap.out
    assert torch.equal(feats, torch.cat([hs[i + 1] for i in draft.target_layer_ids], dim=-1))
    with torch.no_grad():
        a, b = draft.project_context(hs), draft.project_context(feats)
        c = draft.project_context(list(feats.split(64, dim=-1)))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_gradient_checkpointing_gives_the_same_gradients():
    target, draft = _setup("qwen3")
    ids = torch.randint(0, 90, (1, 12))
    anchors = torch.tensor([[2, 7]])
    block_ids, pos = _blocks(ids, anchors)
    hs = _features(target, ids)
    mask = training_attention_mask(anchors, B, 12)
    draft.train()
    grads = []
    for ckpt in (False, True):
        draft.zero_grad()
        draft.gradient_checkpointing_enable(ckpt)
        h = draft(target.model.embed_tokens(block_ids).detach(), pos, draft.project_context(hs), attention_mask=mask)
        h.square().mean().backward()
        grads.append([p.grad.clone() for p in draft.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_rotary_frequencies_stay_fp32_in_a_bf16_drafter(tmp_path):
    """.to(bfloat16) and a bf16 load keep inv_freq in fp32: the bf16 drafter's RoPE angles at far positions are the
    fp32 rotary's (cast to bf16 only at the end), not phases off by a bf16-rounded frequency."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    target, draft = _setup("qwen3")
    config = draft.config
    config.rope_parameters = {**config.rope_parameters, "rope_theta": 1e6}
    fp32 = Qwen3RotaryEmbedding(config)
    draft = DFlashDraftModel(config).to(torch.bfloat16)
    assert draft.rotary_emb.inv_freq.dtype == torch.float32 and draft.fc.weight.dtype == torch.bfloat16
    assert torch.equal(draft.rotary_emb.inv_freq, fp32.inv_freq)
    x = torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    pos = torch.tensor([[100, 1000, 4000]])
    ours, ref = draft.rotary_emb(x, pos), fp32(x.float(), pos)
    for a, r in zip(ours, ref):
        assert torch.equal(a, r.to(torch.bfloat16))
    save_dflash_draft(draft, tmp_path, target.config)
    assert load_dflash_draft(tmp_path, dtype=torch.bfloat16).rotary_emb.inv_freq.dtype == torch.float32


def test_the_gpus_repeated_kv_attention_equals_gqa():
    """With the training mask on a GPU the K/V heads are repeated (SDPA's memory-efficient kernel takes no GQA):
    the same numbers as GQA, forward and backward, the GPU's path run here on the CPU."""
    from dflash_ds.kinds.dflash.dflash_model import draft_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 2, 20, 16, generator=gen, requires_grad=True) for _ in range(2))
    mask = training_attention_mask(torch.tensor([[3, 9], [0, 5]]), B, 12)[:, None]
    outs = []
    for repeat in (False, True):
        out = draft_attention(q, k, v, mask, 0.25, repeat_kv=repeat)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        outs.append((out, *grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

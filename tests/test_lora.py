"""The gated LoRA: adapter products on the gated rows only equal the full-width product times a 0/1 gate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dflash_ds.lora import AdapterControl, LoRALinear


def _reference(x, base: nn.Linear, A, B, scaling, rows_from):
    """``W x + b + scaling * gate * B A x`` with an explicit ``[.., seq, 1]`` gate (1 from ``rows_from`` on)."""
    gate = torch.zeros(*x.shape[:-1], 1)
    gate[..., rows_from:, :] = 1.0
    return base(x) + scaling * gate * (x @ A.t() @ B.t())


@pytest.mark.parametrize("rows_from", [0, 1, 5, 9, 12])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_rows_equal_the_gate_product(rows_from, bias):
    torch.manual_seed(0)
    control = AdapterControl()
    layer = LoRALinear(nn.Linear(16, 24, bias=bias), r=4, alpha=8.0, dropout=0.0, control=control)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = torch.randn(3, 9, 16, requires_grad=True)
    control.set(True, rows_from=rows_from)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in (layer.lora_A.weight, layer.lora_B.weight)]
    got = (y.detach(), x.grad.clone(), *grads)

    x2 = x.detach().clone().requires_grad_(True)
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    want_y = _reference(x2, layer.base_layer, A, B, layer.scaling, rows_from)
    (want_y * g).sum().backward()
    for a, b in zip(got, (want_y.detach(), x2.grad, A.grad, B.grad)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    if rows_from >= 9:  # no gated row: exactly the base layer, and the adapter got no gradient
        assert torch.equal(got[0], layer.base_layer(x).detach())
        assert got[2].abs().sum() == 0


def test_disabled_adapter_is_the_base_layer():
    control = AdapterControl()
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4.0, dropout=0.0, control=control)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 8)
    with control.disabled():
        assert torch.equal(layer(x), layer.base_layer(x))
    assert control.enabled
    assert not torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("rows_from", [0, 3, 7])
def test_decode_fast_path_equals_the_reference(rows_from):
    """Batch 1 without autograd takes the functional multiply-add path: same values as the gate product."""
    torch.manual_seed(1)
    control = AdapterControl()
    layer = LoRALinear(nn.Linear(16, 24), r=4, alpha=8.0, dropout=0.0, control=control)
    nn.init.normal_(layer.lora_B.weight, std=0.3)
    x = torch.randn(1, 7, 16)
    control.set(True, rows_from=rows_from)
    with torch.no_grad():
        got = layer(x)
        want = _reference(x, layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scaling, rows_from)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3", "qwen2-bias"])
def test_stacked_projections_give_the_same_logits(family):
    """q/k/v and gate/up stacked into one product each (decoding): same logits for the adapter off, on for every
    row and on for a suffix of rows, and the members' weights are views of the stack (no copy)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from dflash_ds.lora import LoRAConfig, apply_lora, lora_modules, stack_projections

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=8)).eval()
    else:  # q/k/v carry biases
        model = Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    # qwen3: every projection adapted (stacks q/k/v and gate/up); qwen2: some (stacks q/v; up alone is not stacked)
    targets = LoRAConfig.target_modules if family == "qwen3" else ("q_proj", "v_proj", "up_proj", "down_proj")
    control = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    for _, m in lora_modules(model):
        nn.init.normal_(m.lora_B.weight, std=0.2)
    ids = torch.randint(0, 64, (1, 9))
    settings = [(False, 0), (True, 0), (True, 5)]

    def logits():
        out = []
        with torch.no_grad():
            for enabled, rows_from in settings:
                control.set(enabled, rows_from)
                out.append(model(input_ids=ids).logits)
        return out

    before = logits()
    assert stack_projections(model) == (4 if family == "qwen3" else 2)  # per layer: q/k/v and gate/up, or q/v
    attn = model.model.layers[0].self_attn
    stacked = attn.q_proj.stacked
    second = attn.k_proj if family == "qwen3" else attn.v_proj
    assert second.base_layer.weight.data_ptr() == stacked.weight[attn.q_proj.base_layer.out_features:].data_ptr()
    for want, got in zip(before, logits()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before[0], before[1])  # the adapter changes the logits: the comparison means something


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_shard_target_splits_the_frozen_projections_and_apply_lora_adds_the_same_adapter(tp_rank):
    """shard_target (both drafter kinds) wraps every column/row-parallel projection in an adapter-less LoRALinear
    holding this rank's slice; apply_lora on top adapts the targeted ones with the factors it would have made on the
    unsharded model, sliced (row-parallel A by input columns), and leaves the others bare. Built only: a forward of
    a sharded layer is collective (tests/test_distributed.py runs them)."""
    from conftest import tiny_model
    from dflash_ds.lora import LoRAConfig, apply_lora, lora_modules, shard_target
    from dflash_ds.parallel import TPGroup

    full = tiny_model("qwen3")
    tp = TPGroup(rank=tp_rank, size=2)
    sharded = tiny_model("qwen3")
    shard_target(sharded, tp)
    assert not any(p.requires_grad for p in sharded.parameters())
    assert not hasattr(sharded, "dflash_adapter")  # only apply_lora marks a model as adapted
    layer, ref = sharded.model.layers[0], full.model.layers[0]
    for name, kind in (("self_attn.q_proj", "column"), ("self_attn.o_proj", "row"), ("mlp.down_proj", "row")):
        wrapped, linear = layer.get_submodule(name), ref.get_submodule(name)
        assert isinstance(wrapped, LoRALinear) and wrapped.parallel == kind and not wrapped.has_adapter
        w = linear.weight
        want = w.chunk(2, dim=0 if kind == "column" else 1)[tp_rank]
        assert torch.equal(wrapped.base_layer.weight, want)
    assert isinstance(sharded.lm_head, nn.Linear)  # not a decoder projection: whole

    config = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "o_proj"))
    apply_lora(full, config, seed=5)
    apply_lora(sharded, config, tp=tp, seed=5)
    ours, theirs = dict(lora_modules(sharded)), dict(lora_modules(full))
    assert ours.keys() == theirs.keys() and len(ours) == 4  # q and o of 2 layers
    for name, m in ours.items():
        a_full = theirs[name].lora_A.weight
        want = a_full.chunk(2, dim=1)[tp_rank] if m.parallel == "row" else a_full
        assert torch.equal(m.lora_A.weight, want), name
        assert m.lora_B.weight.shape[0] == theirs[name].lora_B.weight.shape[0] // (2 if m.parallel == "column" else 1)
    assert not sharded.model.layers[0].mlp.up_proj.has_adapter  # sharded, not a target
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        sharded.model.layers[0].self_attn.q_proj.add_adapter(4, 8.0, 0.0)

"""What decoding derives from the model's weights follows the model when it moves (issue 23).

``dflash-ds eval --device cuda`` stacked the projections (:func:`dflash_ds.lora.stack_projections`) and then moved
the model: the stacked weights stayed behind and the first forward crashed. A CPU cannot move to a GPU, so a dtype
cast stands in for the move: ``Module.to(device)`` and ``Module.double()`` take the same path (``Module._apply``).
"""

from __future__ import annotations

import copy

import pytest
import torch

from dflash_ds.lora import gather_full_lora_state, stack_projections
from dflash_ds.kinds.lora import LoRABlockDrafter, fused_generate
from dflash_ds.speculative import StaticDecoding, autoregressive_generate, speculative_generate

from test_speculative import MASK, hf_greedy, prompts, tiny_model

NEW = 16


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_stack_then_move_decodes_exactly(static):
    """Stack, then cast to float64 (the stand-in for ``model.to("cuda")``), then decode with both loops and the AR
    baseline: the output is the float64 model's greedy output, and the drafts (adapter on, through the stacked
    ``B`` factors) are those of the same model never stacked."""
    model = tiny_model("sdpa", seed=3)
    plain = copy.deepcopy(model).double()  # the reference: the same weights, never stacked
    assert stack_projections(model) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up per layer
    model.double()
    cache = StaticDecoding(model, 120) if static else None  # built after the move, as run_eval does
    for prompt in prompts():
        want = hf_greedy(plain, prompt, NEW)
        two = speculative_generate(model, prompt, LoRABlockDrafter(MASK), block_size=4, max_new_tokens=NEW,
                                   static=cache)
        fused = fused_generate(model, prompt, MASK, block_size=4, max_new_tokens=NEW, static=cache)
        ar = autoregressive_generate(model, prompt, max_new_tokens=NEW, static=cache)
        assert two.output_ids == fused.output_ids == ar.output_ids == want
        ref = speculative_generate(plain, prompt, LoRABlockDrafter(MASK), block_size=4, max_new_tokens=NEW)
        assert two.accepted_per_step == ref.accepted_per_step  # the stacked adapter drafts what the plain one does


def test_stacking_leaves_state_dict_and_export_alone_and_moves_as_one_copy():
    """The stack's tensors are non-persistent buffers of the layer: ``state_dict``, parameter names and the PEFT
    export are those of the unstacked model; after a move the members' weights are still views of the (moved)
    stack, so the move costs no second copy."""
    model = tiny_model("sdpa", seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    export = gather_full_lora_state(model)
    stack_projections(model)
    model.double()
    assert [n for n, _ in model.named_parameters()] == names
    after = model.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value.double()), key
    assert gather_full_lora_state(model).keys() == export.keys()
    for key, value in gather_full_lora_state(model).items():
        assert torch.equal(value, export[key].double()), key
    attn = model.model.layers[0].self_attn
    stack = attn.q_proj.stacked
    assert stack.weight.dtype == stack.b_t.dtype == torch.float64
    q_rows = attn.q_proj.base_layer.out_features
    assert attn.k_proj.base_layer.weight.data_ptr() == stack.weight[q_rows:].data_ptr()  # a view, not a copy
    assert attn.q_proj.lora_A.weight.data_ptr() == stack.weight[stack.out:].data_ptr()


def test_a_stack_left_behind_is_a_clear_error():
    """A path that swaps the stack's tensors outside ``Module.to`` gets an error naming the cause, not a matmul
    crash deep in the forward."""
    model = tiny_model("sdpa", seed=3)
    stack_projections(model)
    model.double()
    stack = model.model.layers[0].self_attn.q_proj.stacked
    stack._buffers["weight"] = stack.weight.float()  # what the old plain-attribute stack looked like after a move
    with pytest.raises(RuntimeError, match="stacked projections hold torch.float32.*the input is torch.float64"):
        autoregressive_generate(model, [5, 6, 7], max_new_tokens=2)


def test_a_static_cache_used_before_a_move_is_refused():
    """The static cache allocates at its first forward (and a compiled decoder specialises there): after a move,
    a clear error instead of a dtype or device mismatch deep in the cache update."""
    model = tiny_model("sdpa", seed=3)
    cache = StaticDecoding(model, 64)
    autoregressive_generate(model, [5, 6, 7], max_new_tokens=2, static=cache)
    model.double()
    with pytest.raises(RuntimeError, match="build the static cache .* after moving the model"):
        autoregressive_generate(model, [5, 6, 7], max_new_tokens=2, static=cache)


def test_eval_cli_stacks_after_moving_the_model(tmp_path, monkeypatch):
    """``dflash-ds eval`` moves the model to ``--device`` first and stacks after, so the stacked weights are built
    on the device they compute on (the old order stacked on the CPU, then moved)."""
    import json

    from torch import nn

    import dflash_ds.lora as lora
    from dflash_ds.evaluate import main
    from dflash_ds.lora import DraftMeta, LoRAConfig, save_adapter_dir

    from test_evaluate import BLOCK, CONVERSATIONS, fit_random_adapter, tiny_base, tiny_tokenizer

    tok = tiny_tokenizer()
    base = fit_random_adapter(tiny_base(len(tok) + 8, seed=3))
    model_dir, adapter_dir = tmp_path / "model", tmp_path / "adapter"
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    save_adapter_dir(adapter_dir, gather_full_lora_state(base), LoRAConfig(r=4, alpha=8),
                     DraftMeta(BLOCK, tok.convert_tokens_to_ids("<|mask|>"), "block", base_model=str(model_dir)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"conversations": CONVERSATIONS[0]}) + "\n")

    events: list[str] = []
    real_to, real_stack = nn.Module.to, lora.stack_projections

    def to(self, *args, **kwargs):
        if hasattr(self, "generation_config"):  # the causal LM itself, not a submodule
            events.append("to")
        return real_to(self, *args, **kwargs)

    def stack(model, *args, **kwargs):
        events.append("stack")
        return real_stack(model, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    monkeypatch.setattr(lora, "stack_projections", stack)
    rc = main(["--model-path", str(model_dir), "--adapter", str(adapter_dir), "--prompts", str(prompts),
               "--report", str(tmp_path / "r.json"), "--max-new-tokens", "4", "--repeats", "1", "--baselines", "none",
               "--no-progress"])
    assert rc == 0
    assert "stack" in events and "to" in events[: events.index("stack")], events

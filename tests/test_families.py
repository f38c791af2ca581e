"""Per-family facts (dflash_ds/families.py): which models are supported, what TP and the training mask need."""

import pytest
import torch

from conftest import randomize_lora_b, tiny_config, tiny_model
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.families import check_max_length, check_tp_compatible, decoder, family_of, sliding_window
from dflash_ds.lora import LoRAConfig, apply_lora
from dflash_ds.loss import LossConfig
from dflash_ds.kinds.lora import LoRADraftObjective


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral"])
def test_every_family_trains_and_its_clean_stream_is_the_base_model(family):
    """Gated LoRA on every projection, one forward over [clean | blocks]: the clean stream is the frozen target
    (the KL teacher), the loss trains the adapter only."""
    model, base = tiny_model(family, seed=1), tiny_model(family, seed=1)
    assert family_of(model).name == family and decoder(model) is model.model
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_b(model)
    objective = LoRADraftObjective(model, LossConfig(kl_weight=0.5, chunk_size=7), "block")
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    mask, lm = torch.ones(2, 20, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)
    layout = build_block_layout(ids, lm, mask, BlockConfig(block_size=4, mask_token_id=95), [1, 2])
    with torch.no_grad():
        clean = model.lm_head(objective.hidden_states(ids, mask, layout)[:, :20])
        torch.testing.assert_close(clean, base(input_ids=ids).logits, rtol=0, atol=2e-5)
    out = objective(ids, mask, layout)
    out.loss.backward()
    trained = [n for n, p in model.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in n for n in trained)
    assert len(trained) == 2 * 7 * model.config.num_hidden_layers  # A and B of all seven projections


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral"])
def test_every_family_gets_the_joint_forwards_loss_and_gradients_from_the_cached_clean_pass(family):
    ids = torch.randint(0, 90, (2, 20), generator=torch.Generator().manual_seed(0))
    mask, lm = torch.ones(2, 20, dtype=torch.long), torch.ones(2, 20, dtype=torch.long)
    mask[1, 16:] = 0
    layout = build_block_layout(ids, lm, mask, BlockConfig(block_size=4, mask_token_id=95), [1, 2])
    results = []
    for clean_pass in ("joint", "cached"):
        model = tiny_model(family, seed=1)
        apply_lora(model, LoRAConfig(r=4, alpha=8))
        randomize_lora_b(model)
        out = LoRADraftObjective(model, LossConfig(kl_weight=0.5, chunk_size=7), "block", clean_pass)(ids, mask, layout)
        out.loss.backward()
        results.append((out.loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)


def test_unsupported_model_type_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"unsupported target model_type 'gpt2'.*'qwen3', 'llama', 'qwen2', 'mistral'"):
        family_of(GPT2Config())


def test_tp_checks_name_the_setting():
    # SmolLM2's head layout in miniature: 3 key-value heads
    cfg = tiny_config("llama", hidden_size=72, num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                      intermediate_size=192)
    with pytest.raises(ValueError, match=r"autotp_size=4 exceeds the model's key-value head count \(3\)"):
        check_tp_compatible(cfg, 4)
    with pytest.raises(ValueError, match="autotp_size=2 must divide the model's num_key_value_heads=3"):
        check_tp_compatible(cfg, 2)
    check_tp_compatible(cfg, 3)
    check_tp_compatible(cfg, 1)


def test_sliding_window_longer_than_max_length_is_refused():
    mistral = tiny_config("mistral", sliding_window=64)
    assert sliding_window(mistral) == 64
    check_max_length(mistral, 64)
    with pytest.raises(ValueError, match="--max-length 65 exceeds the model's sliding_window=64"):
        check_max_length(mistral, 65)
    qwen2 = tiny_config("qwen2", sliding_window=64)  # Qwen2 applies it only where layer_types say so
    assert sliding_window(qwen2) is None
    assert sliding_window(tiny_config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=0)) == 64
    assert sliding_window(tiny_config("llama")) is None


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_decoding_a_sliding_window_model_is_exact_inside_the_window_and_refused_past_it(family):
    """The decoder keeps a full cache with its own masks (no window): while a decode cannot reach the window that
    is the model exactly (every loop, dynamic and static cache, equals transformers' generate, which applies the
    window); a decode that could reach it is refused up front naming sliding_window (it crashed mid-decode in
    transformers' sliding cache layer, or with a static cache in the attention, while the AR baseline ran)."""
    from types import SimpleNamespace

    from dflash_ds.evaluate import EvalConfig, run_eval
    from dflash_ds.lora import DraftMeta
    from dflash_ds.kinds.lora import LoRABlockDrafter, fused_generate
    from dflash_ds.speculative import StaticDecoding, autoregressive_generate, speculative_generate

    window, B, mask_id = 80, 4, 3
    extra = dict(use_sliding_window=True, max_window_layers=0) if family == "qwen2" else {}
    model = tiny_model(family, seed=2, initializer_range=0.2, sliding_window=window, eos_token_id=None, **extra)
    assert sliding_window(model.config) == window
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_b(model)
    model.dflash_adapter.set(False)
    prompt = torch.randint(4, 90, (10,), generator=torch.Generator().manual_seed(0)).tolist()

    def decoders(new: int, static: StaticDecoding | None = None):
        yield lambda: speculative_generate(model, prompt, LoRABlockDrafter(mask_id), block_size=B, max_new_tokens=new,
                                           static=static)
        yield lambda: fused_generate(model, prompt, mask_id, block_size=B, max_new_tokens=new, static=static)
        yield lambda: autoregressive_generate(model, prompt, max_new_tokens=new, static=static)

    new = 8  # prompt + new + 2*B*(B+2) = 66 slots: inside the window, static cache included
    ids = torch.tensor([prompt])
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    static = StaticDecoding(model, len(prompt) + new + 2 * B * (B + 2))
    for decode in [*decoders(new), *decoders(new, static)]:
        assert decode().output_ids == want
    for decode in decoders(70):  # 80 slots and more (the AR baseline: 83, the loops: 104 and 108): the window
        with pytest.raises(ValueError, match=f"sliding_window={window}"):
            decode()
    with pytest.raises(ValueError, match=f"static cache needs up to 90 KV-cache slots.*sliding_window={window}"):
        StaticDecoding(model, 90)
    tokenizer = SimpleNamespace(eos_token_id=None, pad_token_id=0)  # token-id prompts need no vocabulary
    with pytest.raises(ValueError, match=f"--max-new-tokens 70 after the longest prompt.*sliding_window={window}"):
        run_eval(model, tokenizer, DraftMeta(B, mask_id, "block"), [prompt], EvalConfig(max_new_tokens=70),
                 progress=False)

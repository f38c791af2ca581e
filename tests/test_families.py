"""Per-family facts (dflash_ds/families.py): which models are supported, what TP and the training mask need."""

import pytest
import torch

from conftest import randomize_lora_b, tiny_config, tiny_model
from dflash_ds.blocks import BlockConfig, build_block_layout
from dflash_ds.families import check_max_length, check_tp_compatible, decoder, family_of, sliding_window
from dflash_ds.lora import LoRAConfig, apply_lora
from dflash_ds.loss import LossConfig
from dflash_ds.model import DFlashObjective


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2", "mistral"])
def test_every_family_trains_and_its_clean_stream_is_the_base_model(family):
    """Gated LoRA on every projection, one forward over [clean | blocks]: the clean stream is the frozen target
    (the KL teacher), the loss trains the adapter only."""
    model, base = tiny_model(family, seed=1), tiny_model(family, seed=1)
    assert family_of(model).name == family and decoder(model) is model.model
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    randomize_lora_b(model)
    objective = DFlashObjective(model, LossConfig(kl_weight=0.5, chunk_size=7), "block")
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
        out = DFlashObjective(model, LossConfig(kl_weight=0.5, chunk_size=7), "block", clean_pass)(ids, mask, layout)
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

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


def tiny_qwen3_config(**overrides):
    from transformers import Qwen3Config

    kwargs = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


def tiny_qwen3(seed: int = 0, **overrides):
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(tiny_qwen3_config(**overrides)).float().eval()
    return model


def randomize_lora_b(model, seed: int = 1, std: float = 0.05) -> None:
    """Fresh adapters have lora_B = 0 (no effect); tests need one that changes the output."""
    from dflash_ds.lora import lora_modules

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * std)


@pytest.fixture
def model():
    return tiny_qwen3()

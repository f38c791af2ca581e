"""A model's adapter weights under PEFT's key names: enumerating the factors, and the full (TP-gathered) fp32 state
that checkpoints and the exported adapter hold, loaded back into (possibly TP-sharded) layers."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .layers import LoRALinear
from .tp import tp_gather_factor, tp_slice_factor


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear) and module.has_adapter:
            yield name, module


FACTORS = ("lora_A", "lora_B")


def peft_key(module_name: str, factor: str) -> str:
    """PEFT's saved key for one factor: ``base_model.model.<module>.lora_A.weight``."""
    return f"base_model.model.{module_name}.{factor}.weight"


def lora_factors(model: nn.Module) -> Iterator[tuple[str, "LoRALinear", str, nn.Parameter]]:
    """Every adapter factor of ``model``: ``(PEFT key, its LoRALinear, "lora_A" or "lora_B", the weight)``."""
    for name, module in lora_modules(model):
        for factor in FACTORS:
            yield peft_key(name, factor), module, factor, getattr(module, factor).weight


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [weight for *_, weight in lora_factors(model)]


def gather_full_lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-keyed fp32 adapter weights, concatenated across TP shards (every TP rank must call this).

    Under ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters(lora_parameters(model))``.
    """
    return {key: tp_gather_factor(module, factor, weight.detach().float()).cpu().contiguous()
            for key, module, factor, weight in lora_factors(model)}


def load_full_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load PEFT-keyed full adapter weights into (possibly TP-sharded) LoRA modules."""
    expected = {key for key, *_ in lora_factors(model)}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"adapter weights do not match the model: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} (check --lora-targets and the base model)"
        )
    parts = {}
    for key, module, factor, weight in lora_factors(model):  # check every shape before changing any weight
        try:
            parts[key] = tp_slice_factor(module, factor, state[key])
        except RuntimeError:  # narrower than the TP split
            parts[key] = state[key]
        if parts[key].shape != weight.shape:
            raise ValueError(f"adapter weights do not match the model: {key} is {tuple(state[key].shape)}, this "
                             f"model takes {tuple(weight.shape)} (an adapter trained on another base model?)")
    with torch.no_grad():
        for key, _, _, weight in lora_factors(model):
            weight.copy_(parts[key].to(weight.dtype))

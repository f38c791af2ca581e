"""Fitting a model with the adapter: :class:`LoRAConfig`, :func:`apply_lora` (freeze, shard for tensor parallelism,
wrap the projections, seeded PEFT initialisation) and the accessors of the switch it attaches to the model."""

from __future__ import annotations

import hashlib
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..families import PROJECTIONS as DEFAULT_TARGETS
from ..parallel import TPGroup
from ..settings import check_choices, setting
from .layers import AdapterControl, LoRALinear
from .tp import projection_names, shard_target

SCOPES = ("block", "all")


@dataclass
class LoRAConfig:
    """Adapter (LoRA on the target's projections)."""

    r: int = setting(16, "LoRA rank", flag="lora-r")
    alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / r)", flag="lora-alpha")
    dropout: float = setting(0.0, "dropout on the adapter's input", flag="lora-dropout")
    target_modules: tuple[str, ...] = setting(DEFAULT_TARGETS, "projections that get an adapter", flag="lora-targets",
                                              metavar="NAME")
    scope: str = setting("block", "block: the adapter runs on block tokens only, so the clean stream is the frozen "
                         "target (one KV cache, no teacher forward); all: on every token", flag="lora-scope",
                         choices=SCOPES)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        check_choices(self)
        if self.r < 1:
            raise ValueError(f"--lora-r must be >= 1, got {self.r}")
        unknown = set(self.target_modules) - set(DEFAULT_TARGETS)
        if unknown:
            raise ValueError(
                f"--lora-targets: unknown module(s) {sorted(unknown)}; choose from {list(DEFAULT_TARGETS)}"
            )


def _module_seed(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _kaiming_uniform_full(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    # PEFT's default: nn.init.kaiming_uniform_(A, a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator, dtype=torch.float32) * 2 - 1) * bound


def apply_lora(model: nn.Module, config: LoRAConfig, tp: TPGroup | None = None, seed: int = 0) -> AdapterControl:
    """Freeze ``model`` and wrap its projections in :class:`LoRALinear` (in place).

    With ``tp.size > 1`` the frozen target is first split across the TP group (:func:`shard_target`: every
    column/row-parallel projection of every decoder layer, whether it is a LoRA target or not), then the targeted
    projections get their adapters. ``lora_A`` is drawn for the full (unsharded) shape from a generator seeded by
    ``(seed, module name)`` and then sliced, so every parallel layout starts from the same adapter. Returns the
    model's :class:`AdapterControl` (also at ``model.dflash_adapter``).
    """
    tp = tp or TPGroup()
    control = shard_target(model, tp)
    names = projection_names(model)
    if not names:
        raise ValueError("apply_lora: the model has no q/k/v/o/gate/up/down projections to adapt")
    for name in names:
        parent_name, _, short = name.rpartition(".")
        if short not in config.target_modules:
            continue
        parent = model.get_submodule(parent_name)
        module = getattr(parent, short)
        if isinstance(module, LoRALinear):  # this rank's shard of a tensor-parallel projection
            kind = module.parallel
            full_in = module.base_layer.in_features * (tp.size if kind == "row" else 1)
            module.add_adapter(config.r, config.alpha, config.dropout)
            wrapped, weight = module, module.base_layer.weight
        else:
            kind, full_in, weight = None, module.in_features, module.weight
            wrapped = LoRALinear(module, config.r, config.alpha, config.dropout, control, parallel=None, tp=tp)
        generator = torch.Generator().manual_seed(_module_seed(name, seed))
        a_full = _kaiming_uniform_full(config.r, full_in, generator)
        if kind == "row":
            cols = full_in // tp.size
            a_full = a_full[:, tp.rank * cols : (tp.rank + 1) * cols]
        wrapped.lora_A.weight.data.copy_(a_full.to(wrapped.lora_A.weight.dtype))
        wrapped.to(device=weight.device)
        wrapped.lora_A.to(dtype=weight.dtype)
        wrapped.lora_B.to(dtype=weight.dtype)
        setattr(parent, short, wrapped)
    model.dflash_adapter = control  # type: ignore[assignment]
    return control


def adapter_control(model: nn.Module) -> AdapterControl:
    """The :class:`AdapterControl` that :func:`apply_lora` attached (unwraps DeepSpeed/DDP ``.module``)."""
    control = _control_of(model)
    if control is None:
        raise ValueError("this model has no dflash-ds LoRA adapter (call apply_lora first)")
    return control


def _control_of(model: nn.Module) -> AdapterControl | None:
    while not hasattr(model, "dflash_adapter") and hasattr(model, "module"):
        model = model.module
    return getattr(model, "dflash_adapter", None)


def adapter_preserved(model: nn.Module):
    """A context that restores ``model``'s adapter switch on exit (decoders switch it per forward); a no-op for a
    model without an adapter."""
    control = _control_of(model)
    return control.preserved() if control is not None else nullcontext()


def adapter_disabled(model: nn.Module):
    """A context with ``model``'s adapter off (the exact base model); a no-op for a model without an adapter."""
    control = _control_of(model)
    return control.disabled() if control is not None else nullcontext()

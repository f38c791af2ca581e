"""Several LoRA adapters on one target model, for an eval that compares them: :class:`LoRABank`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from torch import nn

from ...families import PROJECTIONS
from ...lora import LoRAConfig, StackedProjections, apply_lora, load_full_lora_state, lora_factors
from ..base import DrafterArtifact, DrafterDirError


class LoRABank:
    """Several LoRA adapters on ONE target model: the model is fitted once (:func:`apply_lora`) and
    :meth:`activate` copies one adapter's factors into it (:func:`load_full_lora_state`, in place, so a static
    cache, compiled graphs and stacked projections keep their tensors), between generations and outside their
    timings. Memory: the target once plus every adapter's factors; every adapter decodes on the same model, cache
    and compiled graphs as the autoregressive baseline.

    Adapters of one shape (rank, adapted projections) load as they are (an alpha that differs is folded into
    ``lora_B``). Adapters of different shapes share the union of the projections at the largest rank, each
    zero-padded (``padded`` names them): exact outputs, but the smaller adapter's draft forwards then compute the
    padded rank (the report says so).
    """

    def __init__(self, model: nn.Module, artifacts: Sequence[DrafterArtifact]) -> None:
        if not artifacts:
            raise ValueError("LoRABank needs at least one adapter")
        self.model, self.artifacts = model, list(artifacts)
        configs = [a.extra for a in self.artifacts]
        first = configs[0]
        same = all(c.r == first.r and tuple(c.target_modules) == tuple(first.target_modules) for c in configs)
        if same:
            shared = first
        else:  # the union at the largest rank; the first adapter's scaling kept
            r = max(c.r for c in configs)
            targets = tuple(sorted({t for c in configs for t in c.target_modules}, key=PROJECTIONS.index))
            shared = LoRAConfig(r=r, alpha=first.alpha / first.r * r, dropout=0.0, target_modules=targets,
                                scope=first.scope)
        self.config = shared
        self.padded = [not same and (c.r != shared.r or tuple(c.target_modules) != shared.target_modules)
                       for c in configs]
        apply_lora(model, shared)
        device = next(model.parameters()).device
        self.states = [self._fit(load_file(str(a.weights)), c, a.path, device) for a, c in zip(self.artifacts, configs)]
        self.active: int | None = None
        self.activate(0)

    def _fit(self, state: dict[str, torch.Tensor], config: LoRAConfig, path: Path, device) -> dict[str, torch.Tensor]:
        """``state`` in the model's shapes: zero-padded to the shared rank, zeros for projections it does not adapt,
        its scaling folded into ``lora_B`` where the model's differs."""
        out = {}
        scale = config.alpha / config.r
        for key, module, factor, weight in lora_factors(self.model):
            full = state.get(key)
            shape = list(weight.shape)
            want = (self.config.r, shape[1]) if factor == "lora_A" else (shape[0], self.config.r)
            rank, dim = (0, 1) if factor == "lora_A" else (1, 0)  # only the rank may be smaller (zero-padded)
            if full is not None and (full.dim() != 2 or full.shape[dim] != want[dim] or full.shape[rank] > want[rank]):
                raise DrafterDirError(f"{path}: adapter weights do not match the model: {key} is "
                                      f"{tuple(full.shape)}, this model takes {want} (an adapter trained on another "
                                      "base model?)")
            if factor == "lora_A":
                t = torch.zeros(self.config.r, shape[1])  # [r, in] (not TP-sharded: eval is one process per model)
                if full is not None:
                    t[: full.shape[0], : full.shape[1]] = full
            else:
                t = torch.zeros(shape[0], self.config.r)
                if full is not None:
                    ratio = scale / module.scaling
                    t[: full.shape[0], : full.shape[1]] = full if ratio == 1.0 else full.float() * ratio
            out[key] = t.to(device=device, dtype=weight.dtype)
        unknown = set(state) - set(out)
        if unknown:
            raise DrafterDirError(f"{path}: adapter weights for modules this target does not have: "
                                  f"{sorted(unknown)[:3]} (an adapter trained on another base model?)")
        return out

    def activate(self, index: int) -> None:
        """Load adapter ``index``'s factors into the model (nothing to do when it is loaded already)."""
        if self.active == index:
            return
        load_full_lora_state(self.model, self.states[index])
        refresh_stacked_factors(self.model)
        self.active = index


def refresh_stacked_factors(model: nn.Module) -> int:
    """After new LoRA factors were copied into a model whose projections are stacked
    (:func:`dflash_ds.lora.stack_projections`): the stacks' ``A`` rows are views of the members' ``lora_A`` (already
    current), their ``B`` is a scaled copy, rebuilt here in place. Returns the number of stacks refreshed."""
    made = 0
    with torch.no_grad():
        for stack in model.modules():
            if not isinstance(stack, StackedProjections):
                continue
            blocks = torch.zeros_like(stack.b_t.t())  # [out, rank]
            r = 0
            for m in stack.__dict__["members"]:
                if m.r:
                    blocks[stack.slices[id(m)], r : r + m.r] = m.lora_B.weight * m.scaling
                    r += m.r
            stack.b_t.copy_(blocks.t())
            made += 1
    return made


__all__ = ["LoRABank", "refresh_stacked_factors"]

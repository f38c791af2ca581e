"""How tensor parallelism splits the weights: this rank's shard of a frozen base linear, and which dim of each LoRA
factor is split across the TP group (gathered to the full tensor, sliced back to this rank's shard)."""

from __future__ import annotations

import torch
from torch import nn

from .. import collectives
from ..parallel import TPGroup
from .layers import LoRALinear


def _shard_linear(linear: nn.Linear, kind: str | None, tp: TPGroup) -> nn.Linear:
    """Return a new frozen nn.Linear holding this rank's slice of ``linear``."""
    if kind is None:
        return linear
    weight = linear.weight.data
    if kind == "column":
        rows = weight.shape[0] // tp.size
        w = weight[tp.rank * rows : (tp.rank + 1) * rows]
        b = linear.bias.data[tp.rank * rows : (tp.rank + 1) * rows] if linear.bias is not None else None
    else:
        cols = weight.shape[1] // tp.size
        w = weight[:, tp.rank * cols : (tp.rank + 1) * cols]
        b = linear.bias.data if linear.bias is not None else None
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.requires_grad_(False)
    return new


def _sharded_dim(module: LoRALinear, factor: str) -> int | None:
    """Which dim of ``factor`` ("lora_A"/"lora_B") is split across TP ranks (None: replicated)."""
    if not module._tp_active():
        return None
    if module.parallel == "column" and factor == "lora_B":
        return 0
    if module.parallel == "row" and factor == "lora_A":
        return 1
    return None


def tp_gather_factor(module: LoRALinear, factor: str, t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a (possibly TP-sharded) factor or its optimizer state (collective over the TP group)."""
    dim = _sharded_dim(module, factor)
    if dim is None:
        return t
    return torch.cat(collectives.all_gather(t, group=module.tp.group), dim=dim)


def tp_slice_factor(module: LoRALinear, factor: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full factor tensor."""
    dim = _sharded_dim(module, factor)
    if dim is None:
        return t
    n = t.shape[dim] // module.tp.size
    return t.narrow(dim, module.tp.rank * n, n)

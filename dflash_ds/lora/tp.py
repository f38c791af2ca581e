"""How tensor parallelism splits the weights: this rank's shard of a frozen base linear, and which dim of each LoRA
factor is split across the TP group (gathered to the full tensor, sliced back to this rank's shard)."""

from __future__ import annotations

import torch
from torch import nn

from .. import collectives
from ..families import PROJECTIONS, check_tp_compatible, family_of
from ..parallel import TPGroup
from .layers import AdapterControl, LoRALinear


def projection_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s q/k/v/o/gate/up/down projections (plain, or already wrapped in a
    :class:`LoRALinear`), in module order."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, LoRALinear)) and n.split(".")[-1] in PROJECTIONS]


def shard_target(model: nn.Module, tp: TPGroup | None = None, control: AdapterControl | None = None) -> AdapterControl:
    """Freeze ``model`` and, with ``tp.size > 1``, split its frozen projections across the tensor-parallel group
    (in place): every column/row-parallel projection of every decoder layer (:mod:`dflash_ds.families` says which:
    Megatron-style, the first projection of attention and of the MLP by output rows, the second by input columns,
    so one all-reduce per block) becomes a :class:`LoRALinear` without adapter (``r = 0``) holding this rank's
    shard. Embedding, norms and lm_head stay whole. Without TP it only freezes.

    Both drafter kinds shard the target with this: the LoRA kind then adds adapters to the wrappers
    (:func:`dflash_ds.lora.apply_lora`), the standalone kind leaves them bare. The wrappers share ``control``
    (a new :class:`AdapterControl` when None), which is returned; it is not attached to the model (only
    :func:`apply_lora` marks a model as having an adapter)."""
    tp = tp or TPGroup()
    family = family_of(model)  # which projections exist and how tensor parallelism splits them
    check_tp_compatible(model.config, tp.size)
    for p in model.parameters():
        p.requires_grad_(False)
    control = control or AdapterControl()
    if tp.size == 1:
        return control
    for name in projection_names(model):
        parent_name, _, short = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, short)
        kind = family.parallel_kind(short)
        if kind is None or isinstance(linear, LoRALinear):
            continue
        setattr(parent, short, LoRALinear(_shard_linear(linear, kind, tp), 0, 0.0, 0.0, control, parallel=kind, tp=tp))
    return control


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
    if not module.tp_active():
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

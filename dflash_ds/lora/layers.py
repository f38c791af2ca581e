"""The adapted layer: :class:`LoRALinear` (a frozen, possibly tensor-parallel linear plus a gated LoRA adapter),
the :class:`AdapterControl` switch every adapted layer of a model shares, and the autograd functions that place the
tensor-parallel all-reduces."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .. import collectives
from ..parallel import TPGroup


class AdapterControl:
    """One switch shared by every :class:`LoRALinear` of a model.

    ``enabled`` turns the adapter off for the verifier (a Python flag: free to toggle). ``rows_from`` gates it by
    sequence position: the adapter runs on rows ``rows_from ..`` of every sequence and not at all on the rows
    before (0: every row). Scope ``block`` puts the clean tokens first and the gated rows (training blocks, decoding
    draft groups) after them, so the gate is always a suffix and the adapter's products run on those rows only
    (sliced, not multiplied by a 0/1 gate). It must stay set through backward when gradient checkpointing
    recomputes the forward.
    """

    def __init__(self) -> None:
        self.enabled = True
        self.rows_from = 0

    def set(self, enabled: bool, rows_from: int = 0) -> None:
        self.enabled, self.rows_from = enabled, rows_from

    @contextmanager
    def preserved(self) -> Iterator["AdapterControl"]:
        """Restore ``enabled`` and ``rows_from`` on exit (decoders switch the adapter per forward)."""
        saved = self.enabled, self.rows_from
        try:
            yield self
        finally:
            self.enabled, self.rows_from = saved

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self.preserved():
            self.enabled = False
            yield

    @contextmanager
    def all_rows(self) -> Iterator[None]:
        with self.preserved():
            self.rows_from = 0
            yield


class _CopyToTP(torch.autograd.Function):
    """Identity forward, all-reduce backward: a replicated input feeding rank-local shards."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        collectives.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: summing rank-local partial products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        collectives.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


class LoRALinear(nn.Module):
    """A frozen (possibly tensor-parallel shard of a) linear layer plus an optional gated LoRA adapter.

    ``parallel`` is ``None``, ``"column"`` (weight holds output rows ``[out/tp, in]``; input replicated, output
    sharded) or ``"row"`` (weight holds input columns ``[out, in/tp]``; input sharded, output all-reduced).
    LoRA factors: column -> ``A`` replicated, ``B`` split by output rows; row -> ``A`` split by input
    columns, ``B`` replicated. The conjugate copy/reduce placement below makes every replicated factor receive the
    full (identical) gradient on each TP rank, so no extra gradient all-reduce is needed.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: float,
        dropout: float,
        control: AdapterControl,
        parallel: str | None = None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.control = control
        self.parallel = parallel
        self.tp = tp or TPGroup()
        self.r = r
        self.scaling = alpha / r if r > 0 else 0.0
        # no module at all for p = 0: a module call per projection is measurable at decode batch sizes
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        # the StackedProjections (.stacking) this layer joined: set by stack_projections (decoding only), outside the
        # module tree (the stack is the parent layer's submodule)
        self.stacked: nn.Module | None = None
        if r > 0:
            self._make_factors()

    def _make_factors(self) -> None:
        self.lora_A = nn.Linear(self.base_layer.in_features, self.r, bias=False)
        self.lora_B = nn.Linear(self.r, self.base_layer.out_features, bias=False)
        nn.init.zeros_(self.lora_B.weight)
        # Mark shards so gradient-norm code counts them on every TP rank (replicated ones only once).
        if self.parallel == "column":
            self.lora_B.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
        elif self.parallel == "row":
            self.lora_A.weight.tensor_model_parallel = True  # type: ignore[attr-defined]

    def add_adapter(self, r: int, alpha: float, dropout: float) -> None:
        """Give a layer made without one (``r = 0``: a tensor-parallel shard of the frozen target,
        :func:`dflash_ds.lora.shard_target`) a LoRA adapter of rank ``r``, as if it had been made with it."""
        if self.r > 0:
            raise ValueError("this layer already has a LoRA adapter")
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r, self.scaling = r, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._make_factors()

    @property
    def has_adapter(self) -> bool:
        return self.r > 0

    def tp_active(self) -> bool:
        return self.parallel is not None and self.tp.size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., seq, in] -> [..., seq, out]``: the base projection, plus ``scaling * B(A(x))`` on the gated rows."""
        stacked = self.stacked
        if stacked is not None and not torch.is_grad_enabled() and x.dim() == 3 and x.shape[0] == 1:
            return stacked.output(self, x)
        group = self.tp.group if self.tp_active() else None
        if group is None:
            y = self.base_layer(x)
        elif self.parallel == "column":
            y = self.base_layer(_CopyToTP.apply(x, group))
        else:  # row parallel: the bias (if any) must be added once, after the reduction
            base = self.base_layer
            y = _ReduceFromTP.apply(nn.functional.linear(x, base.weight), group)
            if base.bias is not None:
                y = y + base.bias
        control = self.control
        start = control.rows_from
        if not (self.has_adapter and control.enabled) or start >= x.shape[-2]:
            return y
        if start:
            x = x[..., start:, :]
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)
        # Decoding (no autograd, batch 1, weights not partitioned by ZeRO-3, whose module hooks gather them): plain
        # functional calls and one fused multiply-add into this layer's own output rows; two ops instead of three
        # module calls and an add, which is most of the adapter's cost in a small decode forward.
        fast = not torch.is_grad_enabled() and x.dim() == 3 and x.shape[0] == 1 and not hasattr(self.lora_A.weight,
                                                                                             "ds_id")
        u = nn.functional.linear(x, self.lora_A.weight) if fast else self.lora_A(x)
        if group is not None:  # column: A replicated, B holds output rows; row: A holds input columns, B replicated
            u = (_CopyToTP if self.parallel == "column" else _ReduceFromTP).apply(u, group)
        if fast:
            (y[0, start:] if start else y[0]).addmm_(u[0], self.lora_B.weight.t(), alpha=self.scaling)
            return y
        delta = self.lora_B(u)
        if not start:
            return torch.add(y, delta, alpha=self.scaling)  # the scaling rides on the add: one kernel fewer
        y[..., start:, :].add_(delta, alpha=self.scaling)  # y is this layer's own output: safe to write in place
        return y

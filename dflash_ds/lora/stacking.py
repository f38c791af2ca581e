"""Decoding only: the adapted projections of a layer that read the same input, stacked into one matmul
(:class:`StackedProjections`, :func:`stack_projections`)."""

from __future__ import annotations

import torch
from torch import nn

from ..families import family_of
from .layers import LoRALinear


class StackedProjections(nn.Module):
    """Decoding only: the projections of one layer that read the same input (q/k/v; gate/up) as ONE matmul whose
    weight stacks their base weights and their LoRA ``A`` factors, then ONE multiply-add of all their ``B`` factors
    (block-diagonal, scaling folded in) on the gated rows. A decode forward at batch 1 is mostly per-op cost, so
    this turns 3 (2) base products plus 9 (6) adapter ops into 1 product plus 1 multiply-add.

    The stacked tensors are non-persistent buffers of this module, which :func:`stack_projections` registers on the
    layer that holds the members: ``model.to(device)`` / ``.double()`` / ``.half()`` move them with the model (a plain
    tensor attribute stayed behind: the first forward after the move crashed), and ``state_dict`` / the PEFT export
    do not see them. The members' base and ``A`` weights are views of the stacked weight (no extra memory), and
    :meth:`_apply` points them at the moved stack again after every move. The members are held outside the module
    tree (``__dict__``), so they keep their one name in ``named_modules``. ``B`` is copied, so stack after the
    adapter's weights are final (evaluation), never while training. The first member called computes every member's
    output; the others return their slice of it for the same input tensor.
    """

    def __init__(self, members: list["LoRALinear"]) -> None:
        super().__init__()
        outs = [m.base_layer.out_features for m in members]
        ranks = [m.r for m in members]
        self.out, rank = sum(outs), sum(ranks)
        base = [m.base_layer for m in members]
        weight = torch.cat([b.weight.detach() for b in base] + [m.lora_A.weight.detach() for m in members if m.r])
        bias = None
        if any(b.bias is not None for b in base):
            bias = torch.cat([b.bias.detach() if b.bias is not None else weight.new_zeros(n)
                              for b, n in zip(base, outs)] + [weight.new_zeros(rank)])
        blocks = weight.new_zeros(self.out, rank)
        self.slices: dict[int, slice] = {}
        o = r = 0
        for m, n, k in zip(members, outs, ranks):
            if k:
                blocks[o : o + n, r : r + k] = m.lora_B.weight.detach() * m.scaling
            self.slices[id(m)] = slice(o, o + n)
            o, r = o + n, r + k
        self.register_buffer("weight", weight, persistent=False)  # [out + rank, in]
        self.register_buffer("bias", bias, persistent=False)  # [out + rank] or None
        self.register_buffer("b_t", blocks.t().contiguous(), persistent=False)  # [rank, out]
        self.__dict__["members"] = list(members)  # not submodules: see the class docstring
        self.control = members[0].control
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._last = id(members[-1])
        self._point_members()

    def _point_members(self) -> None:
        """Make every member's base and ``A`` weight a view of the stacked weight (the stack is the only copy)."""
        o, a = 0, self.out
        for m in self.__dict__["members"]:
            n = m.base_layer.out_features
            m.base_layer.weight.data = self.weight[o : o + n]
            if m.r:
                m.lora_A.weight.data = self.weight[a : a + m.r]
            o, a = o + n, a + m.r

    def _apply(self, fn, recurse: bool = True):
        # Module.to() / .double() / .cuda() replace each parameter and buffer separately: the moved members would
        # hold their own copies, the views broken. Point them at the moved stack again (whichever moved first).
        out = super()._apply(fn, recurse)
        self._point_members()
        return out

    def output(self, member: "LoRALinear", x: torch.Tensor) -> torch.Tensor:
        if self._input is not x:
            self._input, self._output = x, self._compute(x)
        y = self._output[..., self.slices[id(member)]]
        if id(member) == self._last:  # the layer has read every member: drop the references
            self._input = self._output = None
        return y

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if x.device != weight.device or x.dtype != weight.dtype:  # two attribute reads: a clear error, not a crash
            raise RuntimeError(
                f"stacked projections hold {weight.dtype} on {weight.device} but the input is {x.dtype} on "
                f"{x.device}: the model was moved or cast after stack_projections by a path that bypassed "
                "Module.to(); stack after moving the model")
        control, out = self.control, self.out
        start = control.rows_from
        if not control.enabled or start >= x.shape[-2] or not self.b_t.shape[0]:
            bias = self.bias[:out] if self.bias is not None else None
            return nn.functional.linear(x, weight[:out], bias)
        y = nn.functional.linear(x, weight, self.bias)  # [1, q, out + rank]: base outputs, then A products
        rows = y[0, start:] if start else y[0]
        rows[:, :out].addmm_(rows[:, out:], self.b_t)
        return y  # members read their columns of the base outputs


def stack_projections(model: nn.Module, groups: tuple[tuple[str, ...], ...] | None = None) -> int:
    """Stack the adapted projections that read the same input in every layer (:class:`StackedProjections`), for
    decoding with the adapter's final weights (``groups``: the model family's, :mod:`dflash_ds.families`). Skips
    tensor-parallel shards. Returns the number of stacks made.

    Each stack is registered on the layer holding its members (``<layer>.dflash_stacked_<names>``: non-persistent
    buffers only), so it moves with the model; call it after ``model.to(device)`` all the same, so the move copies
    each weight once."""
    if groups is None:
        groups = family_of(model).stack_groups
    made = 0
    for parent in list(model.modules()):
        for names in groups:
            # projections without an adapter stay plain nn.Linear layers: stack the adapted ones (2 or more)
            members = [m for m in (getattr(parent, n, None) for n in names)
                       if isinstance(m, LoRALinear) and not m.tp_active() and m.stacked is None]
            if len(members) < 2 or len({m.base_layer.in_features for m in members}) != 1:
                continue
            stack = StackedProjections(members)
            parent.add_module("dflash_stacked_" + "_".join(names), stack)
            for m in members:
                m.__dict__["stacked"] = stack  # a reference, not a submodule: member names and state_dict unchanged
            made += 1
    return made

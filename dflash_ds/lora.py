"""Gated, tensor-parallel-aware LoRA for the drafter.

Why not PEFT's wrappers at training time:
  * DeepSpeed 0.19.8 AutoTP either crashes on PEFT LoRA or silently replaces its wrappers with plain TP layers
    (and trains no adapter), so the adapter has to know about tensor parallelism itself.
  * PEFT's ``disable_adapter()`` walks every module on each enter/exit (as long as a small forward on a CPU,
    docs/benchmarks.md); decoding toggles the adapter twice per step, so the toggle must be a flag.
  * Scope ``block`` needs a per-token gate on the adapter output.

The math, parameter names and initialisation are PEFT's (``lora_A`` kaiming-uniform, ``lora_B`` zero,
``scaling = alpha / r``), and :func:`peft_state_dict` writes PEFT's key names, so an exported adapter loads with
``PeftModel.from_pretrained`` and gives the same logits (tested).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from .families import PROJECTIONS as DEFAULT_TARGETS
from .families import check_tp_compatible, family_of
from .parallel import TPGroup
from .settings import check_choices, setting

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
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce forward, identity backward: summing rank-local partial products."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
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
        # set by stack_projections (decoding only), outside the module tree: the stack is the parent layer's submodule
        self.stacked: StackedProjections | None = None
        if r > 0:
            self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)
            self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)
            nn.init.zeros_(self.lora_B.weight)
            # Mark shards so gradient-norm code counts them on every TP rank (replicated ones only once).
            if parallel == "column":
                self.lora_B.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
            elif parallel == "row":
                self.lora_A.weight.tensor_model_parallel = True  # type: ignore[attr-defined]

    @property
    def has_adapter(self) -> bool:
        return self.r > 0

    def _tp_active(self) -> bool:
        return self.parallel is not None and self.tp.size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., seq, in] -> [..., seq, out]``: the base projection, plus ``scaling * B(A(x))`` on the gated rows."""
        stacked = self.stacked
        if stacked is not None and not torch.is_grad_enabled() and x.dim() == 3 and x.shape[0] == 1:
            return stacked.output(self, x)
        group = self.tp.group if self._tp_active() else None
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
                       if isinstance(m, LoRALinear) and not m._tp_active() and m.stacked is None]
            if len(members) < 2 or len({m.base_layer.in_features for m in members}) != 1:
                continue
            stack = StackedProjections(members)
            parent.add_module("dflash_stacked_" + "_".join(names), stack)
            for m in members:
                m.__dict__["stacked"] = stack  # a reference, not a submodule: member names and state_dict unchanged
            made += 1
    return made


def _module_seed(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _kaiming_uniform_full(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    # PEFT's default: nn.init.kaiming_uniform_(A, a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator, dtype=torch.float32) * 2 - 1) * bound


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


def apply_lora(model: nn.Module, config: LoRAConfig, tp: TPGroup | None = None, seed: int = 0) -> AdapterControl:
    """Freeze ``model`` and wrap its projections in :class:`LoRALinear` (in place).

    With ``tp.size > 1`` every column/row-parallel projection of every decoder layer is sharded (whether it is a
    LoRA target or not) so the frozen base weights are split across the TP group. ``lora_A`` is drawn for the full
    (unsharded) shape from a generator seeded by ``(seed, module name)`` and then sliced, so every parallel layout
    starts from the same adapter. Returns the model's :class:`AdapterControl` (also at ``model.dflash_adapter``).
    """
    tp = tp or TPGroup()
    family = family_of(model)  # which projections exist and how tensor parallelism splits them
    check_tp_compatible(model.config, tp.size)
    for p in model.parameters():
        p.requires_grad_(False)
    control = AdapterControl()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in DEFAULT_TARGETS]
    if not names:
        raise ValueError("apply_lora: the model has no q/k/v/o/gate/up/down projections to adapt")
    for name in names:
        parent_name, _, short = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear: nn.Linear = getattr(parent, short)
        # Megatron-style split: the first projection of attention and MLP by output rows, the second by input
        # columns, so one all-reduce per block suffices (families.py)
        kind = family.parallel_kind(short) if tp.size > 1 else None
        targeted = short in config.target_modules
        if not targeted and kind is None:
            continue
        full_in = linear.in_features
        local = _shard_linear(linear, kind, tp)
        wrapped = LoRALinear(
            local, config.r if targeted else 0, config.alpha, config.dropout, control, parallel=kind, tp=tp
        )
        if targeted:
            generator = torch.Generator().manual_seed(_module_seed(name, seed))
            a_full = _kaiming_uniform_full(config.r, full_in, generator)
            if kind == "row":
                cols = full_in // tp.size
                a_full = a_full[:, tp.rank * cols : (tp.rank + 1) * cols]
            wrapped.lora_A.weight.data.copy_(a_full.to(wrapped.lora_A.weight.dtype))
            wrapped.to(device=linear.weight.device)
            wrapped.lora_A.to(dtype=linear.weight.dtype)
            wrapped.lora_B.to(dtype=linear.weight.dtype)
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
    parts = [torch.empty_like(t) for _ in range(module.tp.size)]
    dist.all_gather(parts, t.contiguous(), group=module.tp.group)
    return torch.cat(parts, dim=dim)


def tp_slice_factor(module: LoRALinear, factor: str, t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a full factor tensor."""
    dim = _sharded_dim(module, factor)
    if dim is None:
        return t
    n = t.shape[dim] // module.tp.size
    return t.narrow(dim, module.tp.rank * n, n)


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


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DRAFT_META = "dflash.json"


@dataclass
class DraftMeta:
    """What a decoder needs beyond the LoRA weights (``dflash.json`` next to the PEFT files)."""

    block_size: int
    mask_token_id: int
    scope: str
    base_model: str = ""
    mask_token: str | None = None  # the MASK's token text (None: an embedding row no token uses)
    mask_token_rule: str = ""  # which rule chose it (dflash_ds.mask_token.RULES); "" in adapters from before


def save_adapter_dir(out_dir, state: dict[str, torch.Tensor], config: LoRAConfig, meta: DraftMeta) -> None:
    """Write a PEFT adapter directory plus ``dflash.json``; files appear atomically (tmp dir, then rename)."""
    import json
    import shutil
    from pathlib import Path

    from peft import LoraConfig as PeftLoraConfig

    from .files import replace_dir
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    PeftLoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        base_model_name_or_path=meta.base_model or None,
        task_type="CAUSAL_LM",
    ).save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / ADAPTER_WEIGHTS))
    (tmp / DRAFT_META).write_text(json.dumps(meta.__dict__, indent=2) + "\n")
    replace_dir(tmp, out)


def read_adapter_dir(path) -> tuple[LoRAConfig, DraftMeta, dict[str, torch.Tensor]]:
    """Read an adapter directory written by :func:`save_adapter_dir` (clear errors naming the file)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DRAFT_META):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: missing (is {path} an adapter exported by dflash-ds?)")
    try:
        peft_cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        meta = DraftMeta(**json.loads((path / DRAFT_META).read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: unreadable adapter metadata: {exc}") from exc
    config = LoRAConfig(
        r=int(peft_cfg["r"]),
        alpha=float(peft_cfg["lora_alpha"]),
        dropout=float(peft_cfg.get("lora_dropout", 0.0)),
        target_modules=tuple(sorted(peft_cfg["target_modules"], key=DEFAULT_TARGETS.index)),
        scope=meta.scope,
    )
    return config, meta, load_file(str(path / ADAPTER_WEIGHTS))


def load_adapter_dir(model: nn.Module, path, tp: TPGroup | None = None, stack: bool = False) -> DraftMeta:
    """Fit ``model`` with the adapter saved at ``path`` (in place); returns its drafting metadata. ``stack``: for
    eager decoding only, stack the projections that share an input (:func:`stack_projections`; better called after
    moving the model to its device, as ``dflash-ds eval`` does)."""
    config, meta, state = read_adapter_dir(path)
    apply_lora(model, config, tp=tp)
    load_full_lora_state(model, state)
    if stack:
        stack_projections(model)
    return meta

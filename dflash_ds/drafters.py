"""The drafter kinds behind one seam: what differs between the LoRA self-drafter and the standalone DFlash drafter,
for the trainer (:mod:`dflash_ds.train`) and the checkpoints (:mod:`dflash_ds.checkpoint`). Data, blocks, the fused
CE/KL loss, the sampler, metrics, TensorBoard and the checkpoint files themselves are shared.

* ``lora`` (:class:`LoRAKind`): the target itself with a gated LoRA adapter (:func:`dflash_ds.lora.apply_lora`),
  trained by :class:`dflash_ds.model.DFlashObjective`; exported as a PEFT adapter directory + ``dflash.json``
  (``OUTPUT/adapter``).
* ``dflash`` (:class:`DFlashKind`): a standalone DFlash draft model (:mod:`dflash_ds.dflash_model`) reading the
  frozen target's hidden states, trained by :class:`dflash_ds.dflash_objective.DFlashDraftObjective`; exported in
  the published format (``config.json`` + ``model.safetensors``, ``OUTPUT/drafter``) that SGLang and vLLM load.

What a kind answers (:class:`DraftKind`)::

    objective, meta = Kind.build(cfg, target, parallel, mask, dtype)   # what DeepSpeed wraps; the run's metadata
    Kind.client_state(cfg, meta)         # what a checkpoint records of the drafter (export needs no model)
    Kind.check_resume(saved, cfg, ...)   # a checkpoint of another drafter is refused, naming the flags
    kind = draft_kind(objective)         # around the live objective:
    kind.entries()                       #   trainable tensors by stable key, each with its TP gather / slice
    kind.full_weights()                  #   the full fp32 weights (collective over TP; ZeRO-3: inside a gather)
    Kind.export(state, out_dir)          # a checkpoint's artifact (no model, no DeepSpeed)

Tensor parallelism: both kinds shard the frozen target with :func:`dflash_ds.lora.shard_target`. The LoRA kind
splits its factors with the projections they adapt; the standalone drafter is *replicated* on every TP rank (it
is a few layers; sharding it would need TP-aware draft layers and buys little memory): every rank of a TP group
sees the same batch and the same full features (the row-parallel all-reduce makes them identical), and its
gradients are averaged over the TP group as autograd produces them (:func:`average_gradients_over_tp`), so the
replicas stay equal even where a kernel's backward is not bit-deterministic (GPU attention, index_put).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from . import collectives
from .config import DFLASH, DRAFT_INITS, KINDS, LORA, DrafterConfig  # noqa: F401  (re-exported)
from .speculative.artifact import StandaloneMeta

if TYPE_CHECKING:
    from .config import TrainConfig
    from .parallel import ParallelLayout, TPGroup


@dataclass
class DFlashMeta(StandaloneMeta):
    """What a ``dflash`` checkpoint records beside its weights: a decoder's view of the drafter
    (:class:`~dflash_ds.speculative.artifact.StandaloneMeta`, what the eval takes) plus enough to export it without
    a model."""

    mask_token: str | None = None
    mask_token_rule: str = ""
    draft_init: str = "target"
    dtype: str = "float32"  # the trained weights' dtype: the export keeps it (bf16 on a GPU, fp32 on a CPU)
    config: dict = field(default_factory=dict)  # the draft model's config (to_dict), with the DFlash keys


@dataclass
class Entry:
    """One trainable tensor: its key in checkpoints and exports, the parameter, and how this rank's tensor (the
    weight or an optimizer state of its shape) becomes the full one (collective over TP) and back."""

    key: str
    param: nn.Parameter
    gather: Callable[[torch.Tensor], torch.Tensor]
    slice: Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class DraftKind:
    """One kind's behaviour. Class methods: a run's set-up, its checkpoint record, resume check and export (no
    model needed). Instances wrap the live objective (``engine.module``): its trainable tensors."""

    name = ""
    artifact_dir = ""  # OUTPUT/<artifact_dir>: where the trainer exports the final drafter
    weights_key = ""  # the checkpoint state's key of the gathered weights

    def __init__(self, objective: nn.Module) -> None:
        self.objective = objective

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps, in a fixed order (every rank and layout the same)."""
        return [e.param for e in self.entries()]

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, full (gathered over TP: every TP rank must call this) in fp32 on the CPU. Under
        ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters(self.trainable_parameters())``."""
        return {e.key: e.gather(e.param.detach().float()).cpu().contiguous() for e in self.entries()}

    @classmethod
    def build(cls, cfg: "TrainConfig", model: nn.Module, parallel: "ParallelLayout", mask, dtype: torch.dtype):
        """``(objective, meta)`` for the loaded, frozen ``model`` (partitioned under ZeRO-3 without TP, whole
        otherwise): the module DeepSpeed wraps, with the target sharded over ``parallel.tp``."""
        raise NotImplementedError

    @classmethod
    def client_state(cls, cfg: "TrainConfig", meta) -> dict:
        raise NotImplementedError

    @classmethod
    def check_resume(cls, saved: dict, cfg: "TrainConfig", target_config, where: str) -> None:
        """Raise ValueError when the checkpoint (client state ``saved``, same kind) cannot continue as this run."""

    @classmethod
    def export(cls, state: dict, out_dir) -> Path:
        raise NotImplementedError


class LoRAKind(DraftKind):
    """The target + gated LoRA adapter. Keys: PEFT's; factors split with their projections under TP."""

    name, artifact_dir, weights_key = LORA, "adapter", "adapter"

    def entries(self) -> list[Entry]:
        from .lora import lora_factors, tp_gather_factor, tp_slice_factor

        return [Entry(key, weight, partial(tp_gather_factor, module, factor), partial(tp_slice_factor, module, factor))
                for key, module, factor, weight in lora_factors(self.objective.model)]

    def full_weights(self) -> dict[str, torch.Tensor]:
        from .lora import gather_full_lora_state

        return gather_full_lora_state(self.objective.model)

    @classmethod
    def build(cls, cfg, model, parallel, mask, dtype):
        from .lora import DraftMeta, apply_lora
        from .model import DFlashObjective

        apply_lora(model, cfg.lora, tp=parallel.tp, seed=cfg.optim.seed)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
        objective = DFlashObjective(model, cfg.loss, cfg.lora.scope, cfg.clean_pass)
        lm_head_weight = model.get_output_embeddings().weight
        if hasattr(lm_head_weight, "ds_id"):  # ZeRO-3: gather lm_head for the loss module's forward only
            import deepspeed

            deepspeed.zero.register_external_parameter(objective.loss_head, lm_head_weight)
        meta = DraftMeta(block_size=cfg.blocks.block_size, mask_token_id=mask.token_id, scope=cfg.lora.scope,
                         base_model=cfg.model_path, mask_token=mask.token, mask_token_rule=mask.rule)
        return objective, meta

    @classmethod
    def client_state(cls, cfg, meta) -> dict:
        return {"drafter_kind": LORA, "lora_config": cfg.lora.__dict__, "draft_meta": meta.__dict__}

    @classmethod
    def export(cls, state, out_dir) -> Path:
        from .lora import DraftMeta, LoRAConfig, save_adapter_dir

        save_adapter_dir(out_dir, state[cls.weights_key], LoRAConfig(**state["lora_config"]),
                         DraftMeta(**state["draft_meta"]))
        return Path(out_dir)


class DFlashKind(DraftKind):
    """The standalone DFlash drafter, replicated over TP. Keys: the published state-dict names (``layers.*``,
    ``fc.weight``, ``hidden_norm.weight``, ``norm.weight``)."""

    name, artifact_dir, weights_key = DFLASH, "drafter", "drafter"

    def entries(self) -> list[Entry]:
        return [Entry(name, p, _same, _same) for name, p in self.objective.drafter.named_parameters()
                if p.requires_grad]

    @classmethod
    def build(cls, cfg, model, parallel, mask, dtype):
        from .dflash_model import DFlashDraftModel
        from .dflash_objective import DFlashDraftObjective, register_zero3_external_parameters
        from .lora import shard_target

        model.config.use_cache = False  # the target runs once per step under no_grad: no activation checkpointing
        dcfg = cfg.drafter.draft_config(model.config, cfg.blocks.block_size, mask.token_id)
        # extra keys in config.json, ignored by the serving engines: where the drafter came from
        dcfg.base_model = cfg.model_path
        dcfg.dflash_ds = {"mask_token": mask.token, "mask_token_rule": mask.rule, "draft_init": cfg.drafter.init}
        torch.manual_seed(cfg.optim.seed)  # the same drafter on every rank and in every parallel layout
        drafter = DFlashDraftModel(dcfg).to(dtype=dtype)
        if cfg.drafter.init == "target":
            init_drafter_from_target(drafter, model)  # before sharding: it reads whole target layers
        shard_target(model, parallel.tp)
        objective = DFlashDraftObjective(model, drafter, cfg.loss, gradient_checkpointing=cfg.gradient_checkpointing)
        register_zero3_external_parameters(objective)
        if parallel.tp.size > 1:
            average_gradients_over_tp(objective.trainable_parameters(), parallel.tp)
        ids = list(dcfg.dflash_config["target_layer_ids"])
        meta = DFlashMeta(block_size=cfg.blocks.block_size, mask_token_id=mask.token_id, target_layer_ids=ids,
                          num_hidden_layers=cfg.drafter.layers, num_target_layers=int(model.config.num_hidden_layers),
                          hidden_size=int(model.config.hidden_size), base_model=cfg.model_path, mask_token=mask.token,
                          mask_token_rule=mask.rule, draft_init=cfg.drafter.init,
                          dtype=str(dtype).removeprefix("torch."), config=dcfg.to_dict())
        return objective, meta

    @classmethod
    def client_state(cls, cfg, meta) -> dict:
        return {"drafter_kind": DFLASH, "draft_meta": dataclasses.asdict(meta)}

    @classmethod
    def check_resume(cls, saved, cfg, target_config, where) -> None:
        meta = saved.get("draft_meta") or {}
        ids = list(cfg.drafter.draft_config(target_config, cfg.blocks.block_size, None).dflash_config["target_layer_ids"])
        theirs = (meta.get("num_hidden_layers"), list(meta.get("target_layer_ids") or []))
        if theirs != (cfg.drafter.layers, ids):
            raise ValueError(
                f"--resume {where}: the checkpoint's dflash drafter has {theirs[0]} layer(s) reading target layers "
                f"{theirs[1]}; this run builds {cfg.drafter.layers} reading {ids}: resume with --draft-layers "
                f"{theirs[0]} --target-layer-ids {' '.join(map(str, theirs[1]))}")

    @classmethod
    def export(cls, state, out_dir) -> Path:
        return export_dflash_drafter(state[cls.weights_key], DFlashMeta(**state["draft_meta"]), out_dir)


KIND_CLASSES: dict[str, type[DraftKind]] = {LORA: LoRAKind, DFLASH: DFlashKind}


def kind_class(name: str) -> type[DraftKind]:
    try:
        return KIND_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown drafter kind {name!r}; known: {', '.join(KINDS)}") from None


def draft_kind(objective: nn.Module) -> DraftKind:
    """The kind of a live objective (``engine.module``), wrapping it (its class attribute ``drafter_kind``)."""
    return kind_class(getattr(objective, "drafter_kind", LORA))(objective)


def state_kind(state: dict) -> str:
    """The drafter kind a checkpoint's state or client state records (checkpoints from before the field: lora)."""
    return state.get("drafter_kind") or LORA


def build_objective(cfg: "TrainConfig", model: nn.Module, parallel: "ParallelLayout", mask, dtype: torch.dtype):
    """``(objective, meta)`` of ``cfg.drafter.kind`` for the loaded target (:meth:`DraftKind.build`)."""
    return kind_class(cfg.drafter.kind).build(cfg, model, parallel, mask, dtype)


def check_resume(saved: dict, cfg: "TrainConfig", target_config, where: str) -> None:
    """Refuse (ValueError naming the flags) a checkpoint of another drafter kind or shape, before any model loads."""
    theirs = state_kind(saved)
    if theirs != cfg.drafter.kind:
        raise ValueError(f"--resume {where}: the checkpoint trained a {theirs!r} drafter, this run trains "
                         f"--drafter {cfg.drafter.kind}: resume with --drafter {theirs}, or start a new --output-dir")
    kind_class(theirs).check_resume(saved, cfg, target_config, where)


def export_state(state: dict, out_dir) -> Path:
    """Write the artifact of a checkpoint's state (``dflash_state.pt``) of either kind; returns ``out_dir``."""
    return kind_class(state_kind(state)).export(state, out_dir)


# ----------------------------------------------------------------------------------------------------------------
# the standalone kind's helpers


def init_drafter_from_target(drafter: nn.Module, model: nn.Module) -> list[int]:
    """:func:`dflash_ds.dflash_model.init_from_target` from the target's last ``L`` layers; under ZeRO-3 (the target
    partitioned) inside a gather of exactly the layers it reads and the final norm."""
    from .dflash_model import init_from_target
    from .families import decoder

    dec = decoder(model)
    N, L = len(dec.layers), len(drafter.layers)
    src = list(range(N - L, N))
    params = [p for i in src for p in dec.layers[i].parameters()] + list(dec.norm.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return init_from_target(drafter, model, src)


def average_gradients_over_tp(params: list[nn.Parameter], tp: "TPGroup") -> None:
    """Replace each parameter's gradient by its mean over the tensor-parallel group as autograd produces it (a
    tensor hook: before DeepSpeed's accumulation and data-parallel reduction). Every TP rank computes the same
    gradient from the same batch and features; the mean makes the replicas equal whatever a kernel's rounding."""
    group, size = tp.group, tp.size

    def mean(grad: torch.Tensor) -> torch.Tensor:
        return collectives.all_reduce(grad.contiguous().clone(), group=group).div_(size)

    for p in params:
        p.register_hook(mean)


def export_dflash_drafter(weights: dict[str, torch.Tensor], meta: DFlashMeta, out_dir) -> Path:
    """Write a standalone drafter's ``weights`` (full, by state-dict key) in the published format with
    :func:`dflash_ds.dflash_model.save_dflash_draft`, in the training dtype, atomically (a ``.tmp`` folder, then
    renamed). No model is built: the config rides on a shell on the meta device."""
    from transformers import Qwen3Config

    from .dflash_model import DFlashDraftModel, save_dflash_draft
    from .files import replace_dir

    config = Qwen3Config.from_dict(meta.config)
    with torch.device("meta"):
        shell = DFlashDraftModel(config)
    expected = set(shell.state_dict())
    if set(weights) != expected:
        raise ValueError(f"drafter weights do not match its config: missing {sorted(expected - set(weights))[:3]}, "
                         f"unexpected {sorted(set(weights) - expected)[:3]}")
    dtype = getattr(torch, meta.dtype)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_dflash_draft(shell, tmp, block_size=meta.block_size, mask_token_id=meta.mask_token_id,
                      state_dict={k: v.to(dtype) for k, v in weights.items()})
    replace_dir(tmp, out)
    return out


__all__ = ["DFLASH", "DFlashKind", "DFlashMeta", "DRAFT_INITS", "DraftKind", "DrafterConfig", "Entry", "KINDS",
           "LORA", "LoRAKind", "average_gradients_over_tp", "build_objective", "check_resume", "draft_kind",
           "export_dflash_drafter", "export_state", "init_drafter_from_target", "kind_class", "state_kind"]

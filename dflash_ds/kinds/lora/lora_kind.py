"""The LoRA kind behind the seam (:class:`LoRAKind`): the target itself with a gated LoRA adapter
(:func:`dflash_ds.lora.apply_lora`), trained by :class:`~.lora_objective.LoRADraftObjective`, exported as a PEFT
adapter directory + ``dflash.json`` (``OUTPUT/adapter``), decoded by the engine's two-forward loop with a
:class:`~.lora_decode.LoRABlockDrafter` or by the fused loop (:mod:`.fused`). Keys: PEFT's; the factors split with
their projections under tensor parallelism."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ...lora import (
    ADAPTER_WEIGHTS, DRAFT_META, DraftMeta, LoRAConfig, apply_lora, gather_full_lora_state, lora_factors, lora_modules,
    read_adapter_meta, save_adapter_dir, tp_gather_factor, tp_slice_factor,
)
from ...objective import register_lm_head
from ...speculative.decoders import Generation, Method, TwoForwardLoop
from ..base import LAYER_INDEX, DraftKind, DrafterArtifact, DrafterDirError, Entry, EvalDrafter, checked_block_size
from .fused import fused_generate
from .lora_bank import LoRABank
from .lora_decode import LoRABlockDrafter
from .lora_objective import LoRADraftObjective

LORA = "lora"
LOOP_LABELS = {"fused": "fused loop", "two_forward": "two-forward loop"}


def default_loop(device: torch.device) -> str:
    """The adapter's loop when both run: the one that measured faster where it was measured. On a CPU the
    two-forward loop (a fused forward's extra rows cost compute there: docs/benchmarks.md); on a GPU the fused loop,
    whose extra rows are nearly free at batch 1 (one forward per step instead of a draft and a verify)."""
    return "fused" if device.type == "cuda" else "two_forward"


class FusedLoop(Method):
    """The adapter through the fused loop (one forward per step)."""

    def generate(self, prompt, generator, max_new_tokens):
        s = self.setup
        r = fused_generate(s.model, prompt, s.meta.mask_token_id, block_size=s.config.block_size,
                           max_new_tokens=max_new_tokens, eos_token_ids=s.eos, temperature=s.config.temperature,
                           generator=generator, config=s.config.fused, static=s.static, lockstep=s.lockstep)
        return Generation(r.output_ids, r.wall_time, r, r.verify_forwards + r.draft_forwards)


def in_memory_lora(model: nn.Module, meta: DraftMeta) -> EvalDrafter:
    """The adapter already on ``model`` (``apply_lora``/``load_adapter_dir``), e.g. the trainer's: unnamed, rows
    read ``drafter (...)``; layers and parameters counted from the model."""
    modules = list(lora_modules(model))
    info: dict[str, Any] = {}
    if modules:
        layers = {m.group(1) for name, _ in modules if (m := LAYER_INDEX.search(f".{name}."))}
        info = {"layers": f"r{modules[0][1].r} over {len(layers)} target layer{'s' * (len(layers) != 1)}",
                "rank": modules[0][1].r, "target_layers": len(layers),
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for _, m in modules
                                  for p in (m.lora_A.weight, m.lora_B.weight))}
    return EvalDrafter(meta, None, info)


class LoRAKind(DraftKind):
    name, artifact_dir, weights_key = LORA, "adapter", "adapter"
    marker = DRAFT_META
    summary = f"a dflash-ds LoRA adapter ({DRAFT_META} + adapter_config.json + {ADAPTER_WEIGHTS})"

    # -- training ---------------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        return [Entry(key, weight, partial(tp_gather_factor, module, factor), partial(tp_slice_factor, module, factor))
                for key, module, factor, weight in lora_factors(self.objective.model)]

    def full_weights(self) -> dict[str, torch.Tensor]:
        return gather_full_lora_state(self.objective.model)

    def eval_drafter(self, meta) -> EvalDrafter:
        return in_memory_lora(self.objective.model, meta)

    @classmethod
    def build(cls, cfg, model, parallel, mask, dtype):
        apply_lora(model, cfg.lora, tp=parallel.tp, seed=cfg.optim.seed)
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
        objective = LoRADraftObjective(model, cfg.loss, cfg.lora.scope, cfg.clean_pass)
        register_lm_head(objective.loss_head, model)
        meta = DraftMeta(block_size=cfg.blocks.block_size, mask_token_id=mask.token_id, scope=cfg.lora.scope,
                         base_model=cfg.model_path, mask_token=mask.token, mask_token_rule=mask.rule)
        return objective, meta

    @classmethod
    def client_state(cls, cfg, meta) -> dict:
        return {"drafter_kind": LORA, "lora_config": cfg.lora.__dict__, "draft_meta": meta.__dict__}

    @classmethod
    def export(cls, state, out_dir) -> Path:
        save_adapter_dir(out_dir, state[cls.weights_key], LoRAConfig(**state["lora_config"]),
                         DraftMeta(**state["draft_meta"]))
        return Path(out_dir)

    # -- artifacts --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> DrafterArtifact:
        try:
            config, meta = read_adapter_meta(path)
        except (FileNotFoundError, ValueError) as exc:  # a missing PEFT file, unreadable metadata, another kind
            raise DrafterDirError(str(exc)) from exc
        return DrafterArtifact(path, LORA, meta, path / ADAPTER_WEIGHTS, extra=config)

    @classmethod
    def describe(cls, artifact, shapes) -> dict:
        cfg = artifact.extra
        layers = len({m.group(1) for k in shapes if (m := LAYER_INDEX.search(k))})
        return {"layers": f"r{cfg.r} over {layers} target layer{'s' * (layers != 1)}", "rank": cfg.r,
                "target_layers": layers, "target_modules": list(cfg.target_modules), "scope": artifact.meta.scope}

    @classmethod
    def load(cls, model, artifacts: Sequence[DrafterArtifact], names: Sequence[str]) -> list[EvalDrafter]:
        """Every adapter on ONE :class:`LoRABank` on ``model`` (applied here: stack the projections afterwards);
        each drafter's :meth:`~EvalDrafter.activate` swaps its factors in."""
        bank = LoRABank(model, artifacts)
        out = []
        for i, (a, name) in enumerate(zip(artifacts, names)):
            info = {}
            if bank.padded[i]:
                info["padded_to"] = {"r": bank.config.r, "target_modules": list(bank.config.target_modules),
                                     "note": "LoRA adapters of different shapes share one model: this one is "
                                             "zero-padded (exact outputs; its draft forwards compute the padded rank)"}
            out.append(EvalDrafter(a.meta, name, info, make_current=partial(bank.activate, i), holder=bank))
        return out

    # -- decoding ---------------------------------------------------------------------------------------------------

    @classmethod
    def resolve_eval(cls, config, meta, who):
        loop = config.loop if config.loop != "auto" else ("both" if meta.scope == "block" else "two_forward")
        lowest = 2 if loop == "two_forward" else 3
        B = checked_block_size(config, meta, who, lowest, "adapter",
                               "; the fused loop drafts positions 2 .. B-1" if lowest == 3 else "")
        if loop != "two_forward" and meta.scope != "block":
            raise ValueError(f"{who}--loop {loop}: the fused loop needs a scope 'block' adapter (this one is "
                             f"{meta.scope!r}); use --loop two_forward")
        if config.compile != "none" and meta.scope != "block":
            raise ValueError(f"{who}--compile static/compile needs a scope 'block' adapter (scope 'all' keeps a second "
                             "cache)")
        return dataclasses.replace(config, loop=loop, block_size=B,
                                   prompt_lookup_tokens=int(config.prompt_lookup_tokens or B - 1))

    @classmethod
    def methods(cls, setup, drafter) -> list[Method]:
        """``--loop``, and with ``both`` the other loop beside it (the first: :func:`default_loop`)."""
        cfg, meta = setup.config, setup.meta

        def loop_method(loop: str, name: str) -> Method:
            label = drafter.label(LOOP_LABELS[loop])
            if loop == "fused":
                m: Method = FusedLoop(name, label, setup)
            else:
                m = TwoForwardLoop(name, label, setup, lambda: LoRABlockDrafter(meta.mask_token_id, meta.scope))
            m.drafter = drafter
            return m

        first = cfg.loop if cfg.loop != "both" else default_loop(next(setup.model.parameters()).device)
        methods = [loop_method(first, drafter.key)]
        if cfg.loop == "both":
            methods.append(loop_method("two_forward" if first == "fused" else "fused", drafter.other_key))
        return methods


__all__ = ["FusedLoop", "LOOP_LABELS", "LORA", "LoRAKind", "default_loop", "in_memory_lora"]

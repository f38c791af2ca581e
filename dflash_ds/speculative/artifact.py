"""Drafter artifacts: the one seam through which decoding and eval open a drafter directory of either kind.

* ``lora``: a dflash-ds LoRA adapter (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` +
  ``dflash.json``, :class:`dflash_ds.lora.DraftMeta`, ``kind: "lora"``; a ``dflash.json`` written before the field
  existed has no ``kind`` and reads as ``lora``). It drafts with the target itself, the adapter on.
* ``dflash``: a standalone DFlash draft model in the published format (``config.json`` with ``architectures:
  ["DFlashDraftModel"]`` + ``model.safetensors``, :mod:`dflash_ds.dflash_model`). It drafts with its own layers
  from the target's features; the target stays plain.

:func:`open_drafter` reads a directory's metadata (no weights) and says its kind, or raises
:class:`DrafterDirError` naming the path; :func:`describe` gives what a report says about it (kind, layers,
parameters: read from the safetensors header, nothing loaded). :class:`LoRABank` fits one target with several LoRA
adapters and swaps their factors in between generations; :func:`load_standalone` loads a standalone drafter next to
its target.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from ..config import DFLASH, KINDS, LORA
from ..dflash_model import ARCHITECTURE as STANDALONE_ARCHITECTURE
from ..dflash_model import WEIGHTS_NAME as STANDALONE_WEIGHTS
from ..lora import DRAFT_META, DraftMeta, LoRAConfig, apply_lora, load_full_lora_state, lora_factors
from ..lora.adapter_dir import ADAPTER_WEIGHTS, read_adapter_meta



class DrafterDirError(ValueError):
    """A directory that is not a drafter of a known kind; the message names the path and what was found."""


@dataclass
class StandaloneMeta:
    """What a decoder needs to know of a standalone DFlash drafter, from its ``config.json``."""

    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_hidden_layers: int  # draft layers
    num_target_layers: int
    hidden_size: int = 0
    base_model: str = ""
    kind: str = DFLASH
    scope: None = None  # no LoRA scope: the target is never adapted


Meta = Union[DraftMeta, StandaloneMeta]


@dataclass
class DrafterArtifact:
    """An opened drafter directory: its kind, its metadata and (LoRA) its adapter config. Weights are not read."""

    path: Path
    kind: str
    meta: Meta
    lora_config: LoRAConfig | None = None
    weights: Path = field(init=False)

    def __post_init__(self) -> None:
        self.weights = self.path / (ADAPTER_WEIGHTS if self.kind == LORA else STANDALONE_WEIGHTS)


def kind_of(meta) -> str:
    """``lora`` or ``dflash`` for a drafter's metadata (a :class:`DraftMeta` without the field: ``lora``)."""
    return getattr(meta, "kind", LORA) or LORA


def _neither(path: Path, found: str) -> DrafterDirError:
    return DrafterDirError(f"{path}: {found}; a drafter directory is either a dflash-ds LoRA adapter ({DRAFT_META} + "
                           "adapter_config.json + adapter_model.safetensors) or a standalone DFlash drafter "
                           f"(config.json with architectures [\"{STANDALONE_ARCHITECTURE}\"] + {STANDALONE_WEIGHTS})")


def open_drafter(path, expect: str | None = None) -> DrafterArtifact:
    """Open a drafter directory and say its kind (:data:`KINDS`); ``expect`` a kind refuses the other one (``--adapter``
    takes LoRA adapters only). Errors name the path: missing directory (FileNotFoundError), neither kind, a kind
    other than expected or unreadable metadata (:class:`DrafterDirError`, a ValueError)."""
    path = Path(path)
    if not path.is_dir():
        if expect == LORA:  # --adapter: its message as before (the adapter's first file, missing)
            read_adapter_meta(path)
        raise FileNotFoundError(f"{path}: drafter directory not found")
    if (path / DRAFT_META).is_file():
        try:
            config, meta = read_adapter_meta(path)
        except (FileNotFoundError, ValueError) as exc:  # a missing PEFT file, unreadable metadata, another kind
            raise DrafterDirError(str(exc)) from exc
        artifact = DrafterArtifact(path, LORA, meta, config)
    elif (path / "config.json").is_file():
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise DrafterDirError(f"{path / 'config.json'}: not JSON: {exc}") from exc
        archs = raw.get("architectures") or []
        if STANDALONE_ARCHITECTURE not in archs:
            raise _neither(path, f"its config.json is a {', '.join(archs) or 'model without architectures'} "
                                 "(a target model? pass it as --model-path)")
        artifact = DrafterArtifact(path, DFLASH, _standalone_meta(path, raw))
    else:
        raise _neither(path, f"no {DRAFT_META} and no config.json")
    if expect is not None and artifact.kind != expect:
        raise DrafterDirError(f"{path}: a {artifact.kind} drafter where a {expect} one is expected"
                              + (" (--adapter takes LoRA adapters; pass a standalone drafter as --drafter)"
                                 if expect == LORA else ""))
    if not artifact.weights.is_file():
        raise DrafterDirError(f"{artifact.weights}: missing ({path} is a {artifact.kind} drafter without weights)")
    return artifact


def _standalone_meta(path: Path, raw: dict) -> StandaloneMeta:
    dc = raw.get("dflash_config") or {}
    try:
        L, N = int(raw["num_hidden_layers"]), int(raw["num_target_layers"])
        ids = dc.get("target_layer_ids")
        if ids is None:
            from ..dflash_model import default_target_layer_ids

            ids = default_target_layer_ids(N, L)
        meta = StandaloneMeta(block_size=int(raw["block_size"]), mask_token_id=dc.get("mask_token_id"),
                              target_layer_ids=[int(i) for i in ids], num_hidden_layers=L, num_target_layers=N,
                              hidden_size=int(raw.get("hidden_size", 0)),
                              base_model=str(raw.get("base_model") or raw.get("_name_or_path") or ""))
    except (KeyError, TypeError, ValueError) as exc:
        raise DrafterDirError(f"{path / 'config.json'}: unreadable DFlash draft config ({type(exc).__name__}: "
                              f"{exc}); it needs block_size, num_hidden_layers, num_target_layers") from exc
    if meta.mask_token_id is None:
        raise DrafterDirError(f"{path / 'config.json'}: no dflash_config.mask_token_id (the drafter's block rows "
                              "1..B-1 embed it)")
    meta.mask_token_id = int(meta.mask_token_id)
    return meta


# --------------------------------------------------------------------------------------------------------------
# What a report says about a drafter


def _shapes(weights: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def describe(artifact: DrafterArtifact) -> dict:
    """``kind``, ``layers`` (a phrase: LoRA ``"r16 over 32 target layers"``, standalone ``"2 draft layers"``),
    ``parameters`` (the drafter's own: LoRA factors; draft layers + fc + norms, the target's embedding and lm_head
    excluded) and the kind's details, from the metadata and the weights' header."""
    shapes = _shapes(artifact.weights)
    params = sum(_numel(s) for s in shapes.values())
    out = {"kind": artifact.kind, "path": str(artifact.path), "parameters": params,
           "block_size": int(artifact.meta.block_size), "mask_token_id": int(artifact.meta.mask_token_id)}
    if artifact.kind == LORA:
        cfg = artifact.lora_config
        layers = len({m.group(1) for k in shapes if (m := LAYER_INDEX.search(k))})
        out.update(layers=f"r{cfg.r} over {layers} target layer{'s' * (layers != 1)}", rank=cfg.r,
                   target_layers=layers, target_modules=list(cfg.target_modules), scope=artifact.meta.scope)
    else:
        m = artifact.meta
        out.update(layers=f"{m.num_hidden_layers} draft layer{'s' * (m.num_hidden_layers != 1)}",
                   draft_layers=m.num_hidden_layers, target_layer_ids=list(m.target_layer_ids))
    return out


def human_count(n: int) -> str:
    """12345 -> '12.3k', 1.5e6 -> '1.50M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_standalone(artifact: DrafterArtifact, target: nn.Module):
    """The standalone drafter of ``artifact`` on the target's device and dtype, checked against the target (depth,
    width, vocabulary, MASK id), in eval mode."""
    from ..dflash_model import load_dflash_draft

    param = next(target.parameters())
    cfg, meta = target.config, artifact.meta
    for what, theirs, ours in (("layers", cfg.num_hidden_layers, meta.num_target_layers),
                               ("hidden size", cfg.hidden_size, meta.hidden_size or cfg.hidden_size)):
        if int(theirs) != int(ours):
            raise DrafterDirError(f"{artifact.path}: drafted for a target of {what} {ours}, this target has {theirs}")
    if not 0 <= meta.mask_token_id < cfg.vocab_size:
        raise DrafterDirError(f"{artifact.path}: MASK id {meta.mask_token_id} is outside this target's vocabulary "
                              f"({cfg.vocab_size})")
    return load_dflash_draft(artifact.path, dtype=param.dtype, device=param.device)


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
        from safetensors.torch import load_file

        from ..families import PROJECTIONS

        if not artifacts:
            raise ValueError("LoRABank needs at least one adapter")
        self.model, self.artifacts = model, list(artifacts)
        configs = [a.lora_config for a in self.artifacts]
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
    from ..lora import StackedProjections

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


__all__ = ["DFLASH", "DrafterArtifact", "DrafterDirError", "KINDS", "LORA", "LoRABank", "Meta", "StandaloneMeta",
           "describe", "human_count", "kind_of", "load_standalone", "open_drafter", "refresh_stacked_factors"]

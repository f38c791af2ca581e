"""The registry of drafter kinds and the seam's entry points, for the trainer, the checkpoints and the eval.

A kind is a :class:`~.base.DraftKind` subclass in a folder of its own, registered in :data:`KIND_CLASSES`; nothing
else in the package names a kind's modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .base import DraftKind, DrafterArtifact, DrafterDirError, EvalDrafter, numel, weight_shapes
from .dflash import DFLASH, DFlashKind
from .lora import LORA, LoRAKind

KIND_CLASSES: dict[str, type[DraftKind]] = {LORA: LoRAKind, DFLASH: DFlashKind}
KINDS = tuple(KIND_CLASSES)


def kind_class(name: str) -> type[DraftKind]:
    try:
        return KIND_CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown drafter kind {name!r}; known: {', '.join(KINDS)}") from None


def kind_of(meta) -> str:
    """The kind a drafter's metadata names (a LoRA ``DraftMeta`` from before the field: ``lora``)."""
    return getattr(meta, "kind", None) or LORA


# -- training -------------------------------------------------------------------------------------------------------


def draft_kind(objective: nn.Module) -> DraftKind:
    """The kind of a live objective (``engine.module``), wrapping it (its class attribute ``drafter_kind``)."""
    return kind_class(getattr(objective, "drafter_kind", LORA))(objective)


def state_kind(state: dict) -> str:
    """The drafter kind a checkpoint's state or client state records (checkpoints from before the field: lora)."""
    return state.get("drafter_kind") or LORA


def build_objective(cfg, model: nn.Module, parallel, mask, dtype: torch.dtype):
    """``(objective, meta)`` of ``cfg.drafter.kind`` for the loaded target (:meth:`DraftKind.build`)."""
    return kind_class(cfg.drafter.kind).build(cfg, model, parallel, mask, dtype)


def check_resume(saved: dict, cfg, target_config, where: str) -> None:
    """Refuse (ValueError naming the flags) a checkpoint of another drafter kind or shape, before any model loads."""
    theirs = state_kind(saved)
    if theirs != cfg.drafter.kind:
        raise ValueError(f"--resume {where}: the checkpoint trained a {theirs!r} drafter, this run trains "
                         f"--drafter {cfg.drafter.kind}: resume with --drafter {theirs}, or start a new --output-dir")
    kind_class(theirs).check_resume(saved, cfg, target_config, where)


def export_state(state: dict, out_dir) -> Path:
    """Write the artifact of a checkpoint's state (``dflash_state.pt``) of either kind; returns ``out_dir``."""
    return kind_class(state_kind(state)).export(state, out_dir)


# -- artifacts ------------------------------------------------------------------------------------------------------


def open_drafter(path, expect: str | None = None) -> DrafterArtifact:
    """Open a drafter directory and say its kind (:data:`KINDS`); ``expect`` a kind refuses the others (``--adapter``
    takes LoRA adapters only). Errors name the path: missing directory (FileNotFoundError), no kind's, a kind other
    than expected or unreadable metadata (:class:`DrafterDirError`, a ValueError)."""
    path = Path(path)
    if not path.is_dir():
        if expect is not None:  # the expected kind's own message (the LoRA kind's: its first file, missing)
            kind_class(expect).open(path)
        raise FileNotFoundError(f"{path}: drafter directory not found")
    kind = next((k for k in KIND_CLASSES.values() if (path / k.marker).is_file()), None)
    if kind is None:
        raise DrafterDirError(f"{path}: {' and '.join(f'no {k.marker}' for k in KIND_CLASSES.values())}; a drafter "
                              f"directory is one of: {'; '.join(k.summary for k in KIND_CLASSES.values())}")
    artifact = kind.open(path)
    if expect is not None and artifact.kind != expect:
        raise DrafterDirError(f"{path}: a {artifact.kind} drafter where a {expect} one is expected"
                              + (" (--adapter takes LoRA adapters; pass a standalone drafter as --drafter)"
                                 if expect == LORA else ""))
    if not artifact.weights.is_file():
        raise DrafterDirError(f"{artifact.weights}: missing ({path} is a {artifact.kind} drafter without weights)")
    return artifact


def open_drafters(paths: Sequence[tuple[str | None, str]]) -> list[DrafterArtifact]:
    """Open every ``(expected kind or None, path)`` (``--adapter``: LoRA only; ``--drafter``: any) before any model
    loads: a bad directory fails fast, naming its path."""
    return [open_drafter(path, expect=kind) for kind, path in paths]


def describe(artifact: DrafterArtifact) -> dict:
    """``kind``, ``path``, ``parameters`` (the drafter's own, from the weights' header: LoRA factors; draft layers +
    fc + norms), ``block_size``, ``mask_token_id`` and the kind's details (``layers``, a phrase, ...)."""
    shapes = weight_shapes(artifact.weights)
    out = {"kind": artifact.kind, "path": str(artifact.path), "parameters": sum(numel(s) for s in shapes.values()),
           "block_size": int(artifact.meta.block_size), "mask_token_id": int(artifact.meta.mask_token_id)}
    out.update(kind_class(artifact.kind).describe(artifact, shapes))
    return out


def load_drafters(model: nn.Module, artifacts: Sequence[DrafterArtifact]) -> list[EvalDrafter]:
    """Fit ``artifacts`` (in order) to ``model`` (already on its device, in its dtype), each kind its own way (the
    LoRA adapters share one bank on the model: stack the projections afterwards). Names are the directories' (made
    unique)."""
    for a in artifacts:
        if not 0 <= a.meta.mask_token_id < model.config.vocab_size:
            raise ValueError(f"{a.path}: MASK id {a.meta.mask_token_id} is outside this model's vocabulary "
                             f"({model.config.vocab_size}): a drafter trained on another base model?")
    names = _unique_names([a.path.name or str(a.path) for a in artifacts])
    loaded: dict[int, EvalDrafter] = {}
    for kind in KINDS:
        mine = [i for i, a in enumerate(artifacts) if a.kind == kind]
        if mine:
            drafters = kind_class(kind).load(model, [artifacts[i] for i in mine], [names[i] for i in mine])
            loaded.update(zip(mine, drafters))
    out = []
    for i, a in enumerate(artifacts):
        d = loaded[i]
        d.info = {**{k: v for k, v in describe(a).items() if k != "kind"}, **d.info}
        out.append(d)
    return out


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


__all__ = ["KINDS", "KIND_CLASSES", "build_objective", "check_resume", "describe", "draft_kind", "export_state",
           "kind_class", "kind_of", "load_drafters", "open_drafter", "open_drafters", "state_kind"]

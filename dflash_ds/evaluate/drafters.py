"""The drafters of one evaluation (:class:`EvalDrafter`): a LoRA adapter on the eval's model or a standalone DFlash
drafter beside it, each with its report key, description (kind, layers, parameters) and table label.

:func:`load_drafters` opens directories of either kind through the artifact seam
(:func:`dflash_ds.speculative.open_drafter`) and fits them to ONE target model: every LoRA adapter through one
:class:`~dflash_ds.speculative.LoRABank` (the factors swapped in before each of its generations, outside the
timings), every standalone drafter loaded next to the target on its device and dtype. Every row then decodes on the
same model, KV cache conventions and compiled graphs as the one autoregressive baseline its speedup is measured
against. :func:`as_drafters` turns what :func:`~dflash_ds.evaluate.run_eval` was given (a ``DraftMeta`` for an
adapter already on the model, an :class:`EvalDrafter`, or a list of them) into the list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from ..speculative import DFLASH, LORA, DrafterArtifact, LoRABank, StandaloneMeta, describe, kind_of, open_drafter
from ..speculative.artifact import human_count, load_standalone
from .config import DRAFTER, DRAFTER_OTHER_LOOP, LOOP_LABELS


@dataclass
class EvalDrafter:
    """One drafter of an evaluation.

    ``meta``: :class:`~dflash_ds.lora.DraftMeta` (LoRA) or :class:`~dflash_ds.speculative.StandaloneMeta`;
    ``name``: its row's name (the directory's, or ``None`` for an in-memory drafter: then rows read ``drafter (...)``
    as before); ``info``: what the report says about it (``kind``, ``layers``, ``parameters``, ...);
    ``draft_model``: the standalone drafter's :class:`~dflash_ds.dflash_model.DFlashDraftModel`; ``bank``/``index``:
    where a LoRA adapter's factors are (None: already on the model). ``key`` is set by :func:`as_drafters`."""

    meta: Any
    name: str | None = None
    info: dict = field(default_factory=dict)
    draft_model: nn.Module | None = None
    bank: LoRABank | None = None
    index: int = 0
    key: str = DRAFTER

    @property
    def kind(self) -> str:
        return kind_of(self.meta)

    def activate(self) -> None:
        """Make this drafter the model's (a LoRA adapter's factors into the shared model; nothing otherwise)."""
        if self.bank is not None:
            self.bank.activate(self.index)

    @property
    def other_key(self) -> str:
        """The report key of this drafter through the loop ``--loop`` did not pick (``--loop both``)."""
        return DRAFTER_OTHER_LOOP if self.key == DRAFTER else f"{self.key}_other_loop"

    def label(self, loop: str) -> str:
        """Its table row: ``NAME [kind, layers, parameters] (loop)``; ``drafter (loop)`` for an unnamed one."""
        if self.name is None:
            return f"drafter ({LOOP_LABELS[loop]})"
        params = self.info.get("parameters")
        what = ", ".join(x for x in (self.kind, self.info.get("layers"),
                                     f"{human_count(params)} params" if params is not None else None) if x)
        return f"{self.name} [{what}] ({LOOP_LABELS[loop]})"

    def describe(self) -> dict[str, Any]:
        """The report's fields for this drafter (``kind`` always; layers and parameters where known)."""
        out = {"kind": self.kind, "name": self.name, **self.info}
        if self.bank is not None and self.bank.padded[self.index]:
            cfg = self.bank.config
            out["padded_to"] = {"r": cfg.r, "target_modules": list(cfg.target_modules),
                                "note": "LoRA adapters of different shapes share one model: this one is zero-padded "
                                        "(exact outputs; its draft forwards compute the padded rank)"}
        return out


def in_memory_lora(model: nn.Module, meta) -> EvalDrafter:
    """The adapter already on ``model`` (``apply_lora``/``load_adapter_dir``), e.g. the trainer's: unnamed, rows
    as before; layers and parameters counted from the model where they can be."""
    from ..lora import lora_modules

    info: dict[str, Any] = {}
    try:
        modules = list(lora_modules(model))
    except Exception:  # an unusual wrapper: the description is optional
        modules = []
    if modules:
        layers = {part for name, _ in modules for part in _layer_index(name)}
        info = {"layers": f"r{modules[0][1].r} over {len(layers)} target layer{'s' * (len(layers) != 1)}",
                "rank": modules[0][1].r, "target_layers": len(layers),
                "parameters": sum(getattr(p, "ds_numel", p.numel()) for _, m in modules
                                  for p in (m.lora_A.weight, m.lora_B.weight))}
    return EvalDrafter(meta, None, info)


def _layer_index(name: str) -> list[str]:
    parts = name.split(".")
    return [parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "layers"][:1]


def standalone_drafter(draft_model: nn.Module, name: str | None = None, meta: StandaloneMeta | None = None
                       ) -> EvalDrafter:
    """An in-memory standalone drafter (e.g. one being trained: ``run_eval(target, tokenizer,
    standalone_drafter(draft_model), prompts, config)``) for :func:`~dflash_ds.evaluate.run_eval`. ``meta``: any
    object with :class:`StandaloneMeta`'s fields (default: read from the model)."""
    if meta is None:
        cfg = draft_model.config
        meta = StandaloneMeta(block_size=int(draft_model.block_size), mask_token_id=int(draft_model.mask_token_id),
                              target_layer_ids=list(draft_model.target_layer_ids),
                              num_hidden_layers=len(draft_model.layers),
                              num_target_layers=int(draft_model.num_target_layers), hidden_size=int(cfg.hidden_size))
    L = meta.num_hidden_layers
    info = {"layers": f"{L} draft layer{'s' * (L != 1)}", "draft_layers": L,
            "target_layer_ids": list(meta.target_layer_ids),
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in draft_model.parameters()),
            "block_size": meta.block_size,
            "mask_token_id": meta.mask_token_id}
    return EvalDrafter(meta, name or "dflash drafter", info, draft_model=draft_model)


def open_drafters(paths: Sequence[tuple[str | None, str]]) -> list[DrafterArtifact]:
    """Open every ``(expected kind or None, path)`` (``--adapter``: LoRA only; ``--drafter``: either) before any
    model loads: a bad directory fails fast, naming its path."""
    return [open_drafter(path, expect=kind) for kind, path in paths]


def load_drafters(model: nn.Module, artifacts: Sequence[DrafterArtifact]) -> list[EvalDrafter]:
    """Fit ``artifacts`` (in order) to ``model`` (already on its device, in its dtype): the LoRA adapters share one
    :class:`LoRABank` on the model (applied here: stack the projections afterwards), the standalone drafters are
    loaded beside it. Names are the directories' (made unique)."""
    loras = [a for a in artifacts if a.kind == LORA]
    bank = LoRABank(model, loras) if loras else None
    names = _unique_names([a.path.name or str(a.path) for a in artifacts])
    out = []
    for a, name in zip(artifacts, names):
        if not 0 <= a.meta.mask_token_id < model.config.vocab_size:
            raise ValueError(f"{a.path}: MASK id {a.meta.mask_token_id} is outside this model's vocabulary "
                             f"({model.config.vocab_size}): a drafter trained on another base model?")
        info = {k: v for k, v in describe(a).items() if k != "kind"}
        if a.kind == LORA:
            out.append(EvalDrafter(a.meta, name, info, bank=bank, index=loras.index(a)))
        elif a.kind == DFLASH:
            out.append(EvalDrafter(a.meta, name, info, draft_model=load_standalone(a, model)))
    return out


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def as_drafters(model: nn.Module, given) -> list[EvalDrafter]:
    """``run_eval``'s drafters: a ``DraftMeta`` (the adapter on ``model``), one :class:`EvalDrafter` or a sequence of
    them; keys ``drafter``, ``drafter_2``, ... in order."""
    if isinstance(given, EvalDrafter):
        drafters = [given]
    elif isinstance(given, (list, tuple)):
        drafters = list(given)
        if not drafters or not all(isinstance(d, EvalDrafter) for d in drafters):
            raise ValueError("run_eval needs a DraftMeta, an EvalDrafter or a non-empty list of EvalDrafters")
    elif kind_of(given) == LORA:
        drafters = [in_memory_lora(model, given)]
    else:
        raise ValueError("a standalone drafter's metadata alone cannot decode: pass standalone_drafter(draft_model)")
    for i, d in enumerate(drafters):
        d.key = DRAFTER if i == 0 else f"{DRAFTER}_{i + 1}"
    return drafters

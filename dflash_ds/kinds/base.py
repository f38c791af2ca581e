"""The seam: what a drafter kind provides (:class:`DraftKind`), and the few types the shared machinery and every kind
exchange through it (:class:`Entry`, :class:`DrafterArtifact`, :class:`EvalDrafter`, :class:`DrafterDirError`).

The trainer, the checkpoints, the decode engine and the eval know a kind only through these; each kind lives in its
own folder (``kinds/lora``, ``kinds/dflash``) and is registered once in :mod:`dflash_ds.kinds`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from torch import nn

# the report's key of the first drafter's row; the loop --loop did not pick, with --loop both
DRAFTER = "drafter"
DRAFTER_OTHER_LOOP = "drafter_other_loop"


class DrafterDirError(ValueError):
    """A directory that is not a drafter of a known kind; the message names the path and what was found."""


@dataclass
class Entry:
    """One trainable tensor: its key in checkpoints and exports, the parameter, and how this rank's tensor (the
    weight or an optimizer state of its shape) becomes the full one (collective over TP) and back."""

    key: str
    param: nn.Parameter
    gather: Callable[[torch.Tensor], torch.Tensor]
    slice: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DrafterArtifact:
    """An opened drafter directory: its kind, its metadata, its weights file and whatever else the kind read of it
    (``extra``: the LoRA kind's adapter config). Weights are not loaded."""

    path: Path
    kind: str
    meta: Any
    weights: Path
    extra: Any = None


@dataclass
class EvalDrafter:
    """One drafter of an evaluation, fitted to the eval's target by its kind (:meth:`DraftKind.load`).

    ``meta``: the kind's metadata (``block_size``, ``mask_token_id``, ``kind``, ...); ``name``: its row's name (the
    directory's, or ``None`` for an in-memory drafter: then rows read ``drafter (...)``); ``info``: what the report
    says about it (``layers``, ``parameters``, ...); ``model``: a drafter with a model of its own (the standalone
    kind); ``make_current``: what makes it the target's current drafter before each of its generations (the LoRA
    kind: its factors into the shared model), and ``holder`` what holds its weights there (the LoRA kind: the
    :class:`~dflash_ds.kinds.lora.LoRABank`). ``key`` is set by the eval (``drafter``, ``drafter_2``, ...)."""

    meta: Any
    name: str | None = None
    info: dict = field(default_factory=dict)
    model: nn.Module | None = None
    make_current: Callable[[], None] | None = None
    holder: Any = None
    key: str = DRAFTER

    @property
    def kind(self) -> str:
        return self.meta.kind

    def activate(self) -> None:
        if self.make_current is not None:
            self.make_current()

    @property
    def other_key(self) -> str:
        """The report key of this drafter through the loop ``--loop`` did not pick (``--loop both``)."""
        return DRAFTER_OTHER_LOOP if self.key == DRAFTER else f"{self.key}_other_loop"

    def label(self, loop_label: str) -> str:
        """Its table row: ``NAME [kind, layers, parameters] (loop)``; ``drafter (loop)`` for an unnamed one."""
        if self.name is None:
            return f"drafter ({loop_label})"
        params = self.info.get("parameters")
        what = ", ".join(x for x in (self.kind, self.info.get("layers"),
                                     f"{human_count(params)} params" if params is not None else None) if x)
        return f"{self.name} [{what}] ({loop_label})"

    def describe(self) -> dict[str, Any]:
        """The report's fields for this drafter (``kind`` always; layers and parameters where known)."""
        return {"kind": self.kind, "name": self.name, **self.info}


class DraftKind:
    """One kind's behaviour, as class methods (a run's set-up, checkpoint record, resume check, export; opening,
    describing and loading its directories; its eval settings and decoders) and, on an instance wrapping the live
    objective (``engine.module``), its trainable tensors. A new kind subclasses this in a folder of its own and is
    added to :data:`dflash_ds.kinds.KIND_CLASSES`."""

    name = ""
    artifact_dir = ""  # OUTPUT/<artifact_dir>: where the trainer exports the final drafter
    weights_key = ""  # the checkpoint state's key of the gathered weights
    marker = ""  # the file whose presence makes a directory this kind's (the first kind whose marker is there opens it)
    summary = ""  # what its directory holds, for the error that lists every kind's

    def __init__(self, objective: nn.Module) -> None:
        self.objective = objective

    # -- training ---------------------------------------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps, in a fixed order (every rank and layout the same)."""
        return [e.param for e in self.entries()]

    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor, full (gathered over TP: every TP rank must call this) in fp32 on the CPU. Under
        ZeRO-3 call it inside ``deepspeed.zero.GatheredParameters(self.trainable_parameters())``."""
        return {e.key: e.gather(e.param.detach().float()).cpu().contiguous() for e in self.entries()}

    def eval_drafter(self, meta) -> EvalDrafter:
        """The objective's drafter for the trainer's periodic eval (``meta``: :meth:`build`'s)."""
        raise NotImplementedError

    @classmethod
    def check_target(cls, cfg, target_config) -> None:
        """Raise ValueError naming the flags when this run's drafter cannot be built for the target (before any
        weights load)."""

    @classmethod
    def prepare_data(cls, cfg, dataset, tokenizer, target_config) -> None:
        """What the kind derives from the tokenised training data before any model loads (rank 0 only; the other
        ranks wait at a barrier, then :meth:`build` reads what it wrote under ``cfg.output_dir``)."""

    @classmethod
    def build(cls, cfg, model: nn.Module, parallel, mask, dtype: torch.dtype):
        """``(objective, meta)`` for the loaded, frozen ``model`` (partitioned under ZeRO-3 without TP, whole
        otherwise): the module DeepSpeed wraps, with the target sharded over ``parallel.tp``."""
        raise NotImplementedError

    @classmethod
    def client_state(cls, cfg, meta) -> dict:
        raise NotImplementedError

    @classmethod
    def check_resume(cls, saved: dict, cfg, target_config, where: str) -> None:
        """Raise ValueError when the checkpoint (client state ``saved``, same kind) cannot continue as this run."""

    @classmethod
    def export(cls, state: dict, out_dir) -> Path:
        raise NotImplementedError

    # -- artifacts --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> DrafterArtifact:
        """Read the metadata (no weights) of a directory holding :attr:`marker`; :class:`DrafterDirError` naming the
        file when it is not this kind's after all or cannot be read."""
        raise NotImplementedError

    @classmethod
    def describe(cls, artifact: DrafterArtifact, shapes: dict[str, list[int]]) -> dict:
        """The kind's report fields (``layers``, a phrase, and details) from the metadata and the weights' shapes."""
        raise NotImplementedError

    @classmethod
    def load(cls, model: nn.Module, artifacts: Sequence[DrafterArtifact], names: Sequence[str]) -> list[EvalDrafter]:
        """Fit this kind's ``artifacts`` (in order, named ``names``) to the eval's ``model``."""
        raise NotImplementedError

    # -- decoding ---------------------------------------------------------------------------------------------------

    @classmethod
    def resolve_eval(cls, config, meta, who: str):
        """The eval config (``dflash_ds.evaluate.EvalConfig``) with ``auto``/None filled for this drafter: its loop,
        block size (checked against the trained one) and prompt lookup's K. ``who`` prefixes the errors."""
        raise NotImplementedError

    @classmethod
    def prepare_target(cls, model: nn.Module, meta) -> None:
        """What the target needs before any (compiled) forward of an eval with this drafter."""

    @classmethod
    def methods(cls, setup, drafter: EvalDrafter) -> list:
        """The eval's rows for ``drafter`` (``setup``: a :class:`~dflash_ds.speculative.decoders.DecodeSetup`
        resolved for it): :class:`~dflash_ds.speculative.decoders.Method` objects."""
        raise NotImplementedError


def checked_block_size(config, meta, who: str, lowest: int, what: str, note: str = "") -> int:
    """The eval's block size for a drafter trained with ``meta.block_size``: ``config.block_size`` or the trained
    one, which must lie in ``[lowest, trained]`` (ValueError naming the flag otherwise)."""
    trained = int(meta.block_size)
    B = int(config.block_size or trained)
    if not lowest <= B <= trained:
        raise ValueError(f"{who}--block-size must be in [{lowest}, {trained}] (the {what} was trained with "
                         f"{trained}{note})")
    return B


def weight_shapes(weights: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a safetensors file, from its header (nothing loaded)."""
    with safe_open(str(weights), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def plural(n: int, word: str) -> str:
    """``1 draft layer``, ``2 draft layers``."""
    return f"{n} {word}{'s' * (n != 1)}"


def human_count(n: int) -> str:
    """12345 -> '12.3k', 1.5e6 -> '1.50M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


__all__ = ["DRAFTER", "DRAFTER_OTHER_LOOP", "DraftKind", "DrafterArtifact", "DrafterDirError", "Entry", "EvalDrafter",
           "LAYER_INDEX", "checked_block_size", "human_count", "numel", "plural", "weight_shapes"]

"""Drafter kinds: each kind's home (``kinds/lora``, ``kinds/dflash``) behind one seam (:mod:`.base`), registered in
:mod:`.registry`. The trainer, the checkpoints, the decode engine and the eval import from here only."""

from .base import DRAFTER, DRAFTER_OTHER_LOOP, DraftKind, DrafterArtifact, DrafterDirError, Entry, EvalDrafter
from .dflash import DFLASH, DFlashConfig, StandaloneMeta, standalone_drafter
from .lora import CLEAN_PASSES, LORA, FusedConfig, in_memory_lora, resolve_clean_pass, untrained_floor_drafter
from .registry import (
    KIND_CLASSES, KINDS, build_objective, check_resume, describe, draft_kind, export_state, kind_class, kind_of,
    load_drafters, open_drafter, open_drafters, state_kind,
)

__all__ = ["CLEAN_PASSES", "DFLASH", "DFlashConfig", "DRAFTER", "DRAFTER_OTHER_LOOP", "DraftKind", "DrafterArtifact",
           "DrafterDirError", "Entry", "EvalDrafter", "FusedConfig", "KINDS", "KIND_CLASSES", "LORA", "StandaloneMeta",
           "build_objective", "check_resume", "describe", "draft_kind", "export_state", "in_memory_lora", "kind_class",
           "kind_of", "load_drafters", "open_drafter", "open_drafters", "resolve_clean_pass", "standalone_drafter", "state_kind",
           "untrained_floor_drafter"]

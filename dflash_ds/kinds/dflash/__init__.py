"""The standalone DFlash drafter: a few decoder layers reading the frozen target's hidden states, in the published
format SGLang and vLLM serve.

:mod:`.dflash_kind` (the kind behind the seam, its settings), :mod:`.dflash_model` (the model, its config, its
initialisation from the target), :mod:`.feature_tap` (the target's layer outputs it reads), :mod:`.dflash_objective`
(training), :mod:`.dflash_decode` (its drafter in the two-forward loop), :mod:`.dflash_artifact` (export and load).
"""

from .dflash_artifact import (
    WEIGHTS_NAME, DFlashMeta, StandaloneMeta, config_dict, export_dflash_drafter, load_dflash_draft, load_standalone,
    read_standalone_meta, save_dflash_draft,
)
from .dflash_decode import (
    DFlashBlockDrafter, DFlashDecodeState, DFlashSpecResult, dflash_autoregressive_generate, dflash_generate,
    extend_pending, resolve_block,
)
from .dflash_kind import (
    DFLASH, DRAFT_INITS, DFlashConfig, DFlashKind, StandaloneLoop, average_gradients_over_tp, init_drafter_from_target,
    standalone_drafter,
)
from .dflash_model import (
    ARCHITECTURE, DFlashContextCache, DFlashDraftModel, check_pairing, default_target_layer_ids, init_from_target,
    last_layer_ids, make_draft_config, target_layer_ids_of,
)
from .dflash_objective import DFlashDraftObjective, block_attention_mask
from .feature_tap import FeatureTap

__all__ = ["ARCHITECTURE", "DFLASH", "DFlashBlockDrafter", "DFlashConfig", "DFlashContextCache", "DFlashDecodeState",
           "DFlashDraftModel", "DFlashDraftObjective", "DFlashKind", "DFlashMeta", "DFlashSpecResult", "DRAFT_INITS",
           "FeatureTap", "StandaloneLoop", "StandaloneMeta", "WEIGHTS_NAME", "average_gradients_over_tp",
           "block_attention_mask", "check_pairing", "config_dict", "default_target_layer_ids",
           "dflash_autoregressive_generate", "dflash_generate", "export_dflash_drafter", "extend_pending",
           "init_drafter_from_target", "init_from_target", "last_layer_ids", "load_dflash_draft", "load_standalone",
           "make_draft_config", "read_standalone_meta", "resolve_block", "save_dflash_draft", "standalone_drafter",
           "target_layer_ids_of"]

"""The LoRA self-drafter: the target itself with a gated LoRA adapter (the layer: :mod:`dflash_ds.lora`).

:mod:`.lora_kind` (the kind behind the seam), :mod:`.lora_objective` (training), :mod:`.lora_decode` (its drafter in
the two-forward loop), :mod:`.fused` (the one-forward-per-step loop), :mod:`.lora_bank` (several adapters on one
target in an eval).
"""

from .fused import FALLBACKS, FusedConfig, FusedStep, choose_anchors, fused_generate, fused_step_layout
from .lora_bank import LoRABank, refresh_stacked_factors
from .lora_decode import LoRABlockDrafter, untrained_floor_drafter
from .lora_kind import LOOP_LABELS, LORA, FusedLoop, LoRAKind, default_loop, in_memory_lora
from .lora_objective import CLEAN_PASSES, LoRADraftObjective, PrefixCache, resolve_clean_pass

__all__ = ["CLEAN_PASSES", "FALLBACKS", "FusedConfig", "FusedLoop", "FusedStep", "LOOP_LABELS", "LORA", "LoRABank",
           "LoRABlockDrafter", "LoRADraftObjective", "LoRAKind", "PrefixCache", "choose_anchors", "default_loop",
           "fused_generate", "fused_step_layout", "in_memory_lora", "refresh_stacked_factors", "resolve_clean_pass",
           "untrained_floor_drafter"]

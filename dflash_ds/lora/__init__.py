"""Gated, tensor-parallel-aware LoRA for the drafter.

Why not PEFT's wrappers at training time:
  * DeepSpeed 0.19.8 AutoTP either crashes on PEFT LoRA or silently replaces its wrappers with plain TP layers
    (and trains no adapter), so the adapter has to know about tensor parallelism itself.
  * PEFT's ``disable_adapter()`` walks every module on each enter/exit (as long as a small forward on a CPU,
    docs/benchmarks.md); decoding toggles the adapter twice per step, so the toggle must be a flag.
  * Scope ``block`` needs a per-token gate on the adapter output.

The math, parameter names and initialisation are PEFT's (``lora_A`` kaiming-uniform, ``lora_B`` zero,
``scaling = alpha / r``), and :func:`peft_key` gives PEFT's key names, so an exported adapter loads with
``PeftModel.from_pretrained`` and gives the same logits (tested).

Modules: :mod:`.layers` (:class:`LoRALinear`, the :class:`AdapterControl` switch, the TP autograd functions),
:mod:`.apply` (:class:`LoRAConfig`, :func:`apply_lora`, the switch's accessors), :mod:`.tp` (how tensor
parallelism splits the weights: :func:`shard_target` splits the frozen target for either drafter kind),
:mod:`.weights` (PEFT-keyed factors, full state gathered and loaded),
:mod:`.adapter_dir` (the exported adapter directory, :class:`DraftMeta`), :mod:`.stacking` (decoding only:
projections that share an input as one matmul).
"""

from ..families import PROJECTIONS as DEFAULT_TARGETS
from .adapter_dir import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, DRAFT_META, DraftMeta, load_adapter_dir, read_adapter_dir, read_adapter_meta,
    save_adapter_dir,
)
from .apply import SCOPES, LoRAConfig, adapter_control, adapter_disabled, adapter_preserved, apply_lora
from .layers import AdapterControl, LoRALinear
from .stacking import StackedProjections, stack_projections
from .tp import projection_names, shard_target, tp_gather_factor, tp_slice_factor
from .weights import (
    FACTORS, gather_full_lora_state, load_full_lora_state, lora_factors, lora_modules, lora_parameters, peft_key,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterControl",
    "DEFAULT_TARGETS",
    "DRAFT_META",
    "DraftMeta",
    "FACTORS",
    "LoRAConfig",
    "LoRALinear",
    "SCOPES",
    "StackedProjections",
    "adapter_control",
    "adapter_disabled",
    "adapter_preserved",
    "apply_lora",
    "gather_full_lora_state",
    "load_adapter_dir",
    "load_full_lora_state",
    "lora_factors",
    "lora_modules",
    "lora_parameters",
    "peft_key",
    "projection_names",
    "read_adapter_dir",
    "read_adapter_meta",
    "save_adapter_dir",
    "shard_target",
    "stack_projections",
    "tp_gather_factor",
    "tp_slice_factor",
]

"""Lossless draft-then-verify decoding with a KV cache.

One step of the two-forward loop, with the verifier's KV cache holding the committed tokens except the last one
``t`` (cache length ``L``):

1. **draft**: the drafter proposes up to ``B - 1`` tokens ``d_1 .. d_k``. The LoRA block drafter does this in ONE
   forward of ``[t, MASK x (B-1)]`` at positions ``L .. L+B-1`` with the adapter on, every block query seeing all
   cached keys and every key of its block (exactly the training mask); block index ``k`` gives ``d_k``
   (same-position labelling). The drafted keys are cropped off again, so nothing drafted leaks into the cache.
2. **verify**: ONE causal forward of ``[t, d_1 .. d_k]`` at ``L .. L+k`` with the adapter off. Greedy: accept
   ``d_i`` while it equals the target's argmax after ``d_{i-1}``; temperature > 0: lossless rejection sampling
   (accept with ``min(1, p/q)``, on rejection resample from ``norm(max(0, p - q))``, bonus sample when all are
   accepted). Commit ``t, d_1 .. d_n`` (crop the cache to ``L + n + 1``); the bonus token is the next ``t``.

Scope ``block`` reads the verifier's own cache (clean tokens run through the exact base model). Scope ``all``
keeps a second cache computed with the adapter on; the tokens committed since the last draft are appended to it in
the same forward as the next block (one 4D mask: those tokens causal, the block bidirectional over them). The fused
loop (:mod:`.fused`, scope ``block``) does a step in one forward.

Modules: :mod:`.engine` (the session: model, cache, counted forwards), :mod:`.drafters`, :mod:`.accept`,
:mod:`.loop` (two-forward loop, autoregressive baseline, :class:`SpecResult`), :mod:`.fused`, :mod:`.lockstep` (rank 0
decides, the other ranks follow: the in-training eval under ZeRO-3 / tensor parallelism), :mod:`.dflash_loop` (the
standalone DFlash drafter in the two-forward loop: the target's features through a :class:`FeatureTap`) and
:mod:`.artifact` (a drafter directory of either kind: :func:`open_drafter`, :func:`describe`, :class:`LoRABank`).
"""

from .accept import accept_greedy, accept_greedy_lazy, accept_sampling
from .artifact import (
    DFLASH, KINDS, LORA, DrafterArtifact, DrafterDirError, LoRABank, StandaloneMeta, describe, kind_of,
    load_standalone, open_drafter,
)
from .drafters import Draft, Drafter, LoRABlockDrafter, NgramDrafter, untrained_floor_drafter
from .engine import DecodeSession, StaticDecoding, cache_len, crop_cache, eos_ids_of, unwrap_model
from .fused import FALLBACKS, FusedConfig, choose_anchors, FusedStep, fused_generate, fused_step_layout
from .lockstep import Lockstep
from .loop import SpecResult, autoregressive_generate, speculative_generate
from .dflash_loop import DFlashBlockDrafter, DFlashSpecResult, FeatureTap, dflash_generate

__all__ = [
    "DFLASH",
    "DFlashBlockDrafter",
    "DFlashSpecResult",
    "DecodeSession",
    "Draft",
    "Drafter",
    "DrafterArtifact",
    "DrafterDirError",
    "FALLBACKS",
    "FusedConfig",
    "FusedStep",
    "FeatureTap",
    "KINDS",
    "LORA",
    "LoRABank",
    "LoRABlockDrafter",
    "Lockstep",
    "NgramDrafter",
    "SpecResult",
    "StandaloneMeta",
    "StaticDecoding",
    "accept_greedy",
    "accept_greedy_lazy",
    "accept_sampling",
    "autoregressive_generate",
    "cache_len",
    "choose_anchors",
    "crop_cache",
    "describe",
    "dflash_generate",
    "eos_ids_of",
    "fused_generate",
    "fused_step_layout",
    "kind_of",
    "load_standalone",
    "open_drafter",
    "speculative_generate",
    "unwrap_model",
    "untrained_floor_drafter",
]

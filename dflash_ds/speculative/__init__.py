"""Lossless draft-then-verify decoding with a KV cache: the engine every drafter kind decodes on.

One step of the two-forward loop, with the verifier's KV cache holding the committed tokens except the last one
``t`` (cache length ``L``):

1. **draft**: the drafter (:class:`~.proposal.Drafter`) proposes up to ``B - 1`` tokens ``d_1 .. d_k``; each kind's
   drafter lives with its kind (:mod:`dflash_ds.kinds`), the model-free n-gram drafter here.
2. **verify**: ONE causal forward of ``[t, d_1 .. d_k]`` at ``L .. L+k`` with any adapter off. Greedy: accept
   ``d_i`` while it equals the target's argmax after ``d_{i-1}``; temperature > 0: lossless rejection sampling
   (accept with ``min(1, p/q)``, on rejection resample from ``norm(max(0, p - q))``, bonus sample when all are
   accepted). Commit ``t, d_1 .. d_n`` (crop the cache to ``L + n + 1``); the bonus token is the next ``t``.

Modules: :mod:`.engine` (the session: model, cache, counted forwards; the static cache), :mod:`.proposal` (the
drafter protocol, n-gram lookup), :mod:`.accept`, :mod:`.loop` (two-forward loop, autoregressive baseline,
:class:`SpecResult`), :mod:`.lockstep` (rank 0 decides, the other ranks follow: the in-training eval under ZeRO-3 /
tensor parallelism) and :mod:`.decoders` (the decoders an eval compares).
"""

from .accept import accept_greedy, accept_greedy_lazy, accept_sampling
from .engine import DecodeSession, StaticDecoding, cache_len, crop_cache, eos_ids_of, unwrap_model
from .lockstep import Lockstep
from .loop import SpecResult, autoregressive_generate, speculative_generate
from .proposal import Draft, Drafter, NgramDrafter, sample_rows

__all__ = ["DecodeSession", "Draft", "Drafter", "Lockstep", "NgramDrafter", "SpecResult", "StaticDecoding",
           "accept_greedy", "accept_greedy_lazy", "accept_sampling", "autoregressive_generate", "cache_len",
           "crop_cache", "eos_ids_of", "sample_rows", "speculative_generate", "unwrap_model"]

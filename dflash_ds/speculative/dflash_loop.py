"""Lossless draft-then-verify decoding with the standalone DFlash drafter (:mod:`dflash_ds.dflash_model`).

State between steps (batch 1), as in the LoRA loop (:mod:`.loop`): ``tokens`` is the committed sequence, the
target's KV cache holds ``tokens[:-1]`` (length ``L``); the last committed token ``t`` is the next block's anchor.
The drafter keeps its own :class:`DFlashContextCache` (per draft layer, the keys/values of the projected target
features of committed rows) plus ``pending``: captured features of committed rows not yet projected into it.
``context.length + pending rows == L`` always, and right after each draft forward ``context.length == L``.

One step:

1. **draft** (one drafter forward): ``[t, MASK x (B-1)]`` at positions ``L .. L+B-1``, embedded by the target's
   embedding; the pending features are projected (``fc`` + ``hidden_norm``) and appended to the context cache in
   the same forward; block rows see every context row and their whole block (no mask: at inference every context
   row is ``< anchor``). Rows ``1 .. B-1`` through the target's ``lm_head`` give ``d_1 .. d_{B-1}`` (argmax, or
   samples of ``q`` at ``temperature``).
2. **verify** (one target forward): ``[t, d_1 .. d_k]`` at ``L .. L+k`` against the target's cache, the layers
   ``target_layer_ids`` captured by a :class:`TargetFeatureHook`. Greedy: :func:`accept_greedy`; temperature > 0:
   :func:`accept_sampling` (lossless rejection sampling with ``q`` the drafter's softmax).
3. **commit** ``t, d_1 .. d_n`` + bonus (:meth:`SpecResult.commit`); crop the target cache to ``L + n + 1``; the
   captured features of those ``n + 1`` rows become ``pending`` (the rejected rows' features are dropped).

The prefill runs the target over ``tokens[:-1]`` with the hook: the prompt's features are the first ``pending``.
The target runs through a plain :class:`transformers.DynamicCache` (the LoRA loop's :class:`DecodeSession` static /
compiled paths are not used here yet). ``drafter=None`` gives the autoregressive baseline on this same engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..dflash_model import DFlashContextCache, DFlashDraftModel, TargetFeatureHook
from ..families import cache_kwarg, decoder
from .accept import accept_greedy, accept_sampling
from .drafters import sample_rows
from .engine import cache_len, crop_cache, unwrap_model
from .loop import SpecResult, prepare_generation


@dataclass
class DFlashSpecResult(SpecResult):
    """A :class:`SpecResult` (same fields, read the same way by eval) with the rows split by model: ``rows`` =
    ``target_rows`` (verify forwards) + ``draft_rows`` (``B`` per drafter forward), prefill excluded."""

    loop: str = "dflash"
    target_rows: int = 0
    draft_rows: int = 0


@dataclass
class DFlashDecodeState:
    """What one generation carries between steps (handed to ``step_callback`` after every full step).

    tokens        committed sequence (prompt + generated); ``target_cache`` holds ``tokens[:-1]``
    context       the drafter's context cache (None without a drafter)
    pending       ``[1, r, K*H]`` captured target features of committed rows not yet in ``context``, or None
    draft_start   ``L`` at this step's draft: the committed rows both caches held then
    drafted       this step's drafted tokens; ``draft_logits`` ``[len(drafted), V]`` their logits
    """

    tokens: list[int]
    target_cache: DynamicCache
    context: DFlashContextCache | None
    pending: torch.Tensor | None = None
    draft_start: int = 0
    drafted: list[int] = field(default_factory=list)
    draft_logits: torch.Tensor | None = None

    @property
    def committed_rows(self) -> int:
        """Rows of the target's KV cache: every committed token but the last."""
        return len(self.tokens) - 1

    @property
    def context_rows(self) -> int:
        """Committed rows the drafter knows: cached + pending (equals :attr:`committed_rows`)."""
        cached = self.context.length if self.context is not None else 0
        return cached + (0 if self.pending is None else self.pending.shape[1])


class TargetParts(NamedTuple):
    """The pieces of the target a step calls (found once per generation)."""

    decoder: nn.Module
    embed: nn.Module
    lm_head: nn.Module
    cache_kw: str  # "cache" or "past_key_values", by transformers version
    device: torch.device


def target_parts(target: nn.Module) -> TargetParts:
    dec = decoder(target)
    return TargetParts(dec, target.get_input_embeddings(), target.get_output_embeddings(), cache_kwarg(dec),
                       next(target.parameters()).device)


def resolve_block(drafter: DFlashDraftModel | None, block_size: int | None,
                  mask_token_id: int | None) -> tuple[int, int | None]:
    """``(B, MASK id)``: the arguments, else the drafter's config; ``(1, None)`` without a drafter (AR)."""
    if drafter is None:
        if block_size not in (None, 1):
            raise ValueError(f"without a drafter the loop is autoregressive (block_size 1), got {block_size}")
        return 1, None
    B = int(block_size if block_size is not None else drafter.block_size)
    mask = mask_token_id if mask_token_id is not None else drafter.mask_token_id
    if B < 2:
        raise ValueError(f"block_size must be >= 2 (an anchor and drafted tokens), got {B}")
    if mask is None:
        raise ValueError("no mask_token_id: pass one or use a drafter whose dflash_config names it")
    return B, int(mask)


def target_forward(parts: TargetParts, ids: list[int], start: int, cache: DynamicCache,
                   hook: TargetFeatureHook | None, logits: bool = True):
    """One target forward of ``ids`` (``q`` tokens) at positions ``start .. start+q-1``, appended to ``cache``.
    Returns ``(logits [q, V] or None, features [1, q, K*H] or None)``; features are the hook's, concatenated."""
    x = torch.tensor([ids], dtype=torch.long, device=parts.device)
    pos = torch.arange(start, start + len(ids), device=parts.device)[None]
    out = parts.decoder(input_ids=x, position_ids=pos, use_cache=True, **{parts.cache_kw: cache})
    feats = torch.cat(hook.features(), dim=-1) if hook is not None else None
    return (parts.lm_head(out.last_hidden_state[0]) if logits else None), feats


def draft_block(parts: TargetParts, drafter: DFlashDraftModel, state: DFlashDecodeState, block: torch.Tensor,
                num: int) -> torch.Tensor:
    """The drafter's logits ``[num, V]`` for positions ``L+1 .. L+num`` (``L`` = committed rows): one forward of
    ``block`` ``[1, B]`` (``[t, MASK, ...]``; its anchor is set here) that first appends ``state.pending`` to the
    context cache."""
    L, B = state.committed_rows, block.shape[1]
    block[0, 0] = state.tokens[-1]
    pos = torch.arange(L, L + B, device=parts.device)[None]
    context = drafter.project_context(state.pending) if state.pending is not None else None
    hidden = drafter(parts.embed(block), pos, context, cache=state.context)  # [1, B, H]
    state.pending = None
    assert state.context.length == L, f"draft context {state.context.length} rows != committed {L}"
    return parts.lm_head(hidden[0, 1:1 + num].to(parts.lm_head.weight.dtype))


def propose(logits: torch.Tensor, temperature: float, generator) -> tuple[list[int], torch.Tensor | None]:
    """Drafted tokens from the drafter's ``logits [k, V]``: argmax, or samples with their distribution ``q``."""
    if temperature > 0:
        tokens, probs = sample_rows(logits, temperature, generator)
        return tokens.tolist(), probs
    return logits.argmax(dim=-1).tolist(), None


def extend_pending(pending: torch.Tensor | None, feats: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``pending`` with the first ``rows`` rows of ``feats [1, q, K*H]`` (the committed ones) appended."""
    if feats is None:
        return pending
    new = feats[:, :rows]
    return new if pending is None else torch.cat([pending, new], dim=1)


@torch.no_grad()  # not inference_mode: ZeRO-3 re-partitions parameters in place after a forward
def dflash_generate(
    target: nn.Module,
    drafter: DFlashDraftModel | None,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    block_size: int | None = None,
    mask_token_id: int | None = None,
    step_callback: Callable[[DFlashDecodeState], None] | None = None,
) -> DFlashSpecResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (batch 1): the target verifies, ``drafter`` drafts
    ``B - 1`` tokens a step (``B`` = ``block_size``, default the drafter's; any ``B >= 2`` is lossless, the trained
    one drafts best). Greedy at ``temperature`` 0 (token for token transformers' greedy ``generate``), lossless
    rejection sampling above. Stops after the first EOS (kept) or ``max_new_tokens``. ``drafter=None``: the
    autoregressive baseline on the same engine. ``step_callback(state)`` runs after every step that committed all
    of ``d_1 .. d_n`` + bonus without stopping."""
    target = unwrap_model(target)
    B, mask = resolve_block(drafter, block_size, mask_token_id)
    tokens, eos, generator = prepare_generation(target, prompt_ids, eos_token_ids, temperature, generator,
                                                "dflash_generate")
    parts, prompt_len = target_parts(target), len(tokens)
    state = DFlashDecodeState(tokens, DynamicCache(config=target.config),
                              DFlashContextCache(len(drafter.layers)) if drafter is not None else None)
    result = DFlashSpecResult(loop="dflash" if drafter is not None else "dflash_autoregressive")
    hook = TargetFeatureHook(target, drafter.target_layer_ids) if drafter is not None else None
    block = torch.full((1, B), mask if mask is not None else 0, dtype=torch.long, device=parts.device)
    try:
        t0 = time.perf_counter()
        if len(tokens) > 1:
            _, feats = target_forward(parts, tokens[:-1], 0, state.target_cache, hook, logits=False)
            state.pending = extend_pending(None, feats, len(tokens) - 1)
            result.prefill_forwards = 1
        generated = 0
        while generated < max_new_tokens:
            L = state.committed_rows
            num = min(B - 1, max_new_tokens - generated - 1)  # never verify past max_new_tokens
            state.draft_start, state.drafted, state.draft_logits, probs_q = L, [], None, None
            if num > 0:
                state.draft_logits = draft_block(parts, drafter, state, block, num)
                state.drafted, probs_q = propose(state.draft_logits, temperature, generator)
                result.draft_forwards += 1
                result.draft_rows += B
            drafted = state.drafted
            k = len(drafted)
            logits, feats = target_forward(parts, [tokens[-1], *drafted], L, state.target_cache, hook)
            result.verify_forwards += 1
            result.target_rows += k + 1
            if temperature > 0:
                n, bonus = accept_sampling(drafted, probs_q, logits, temperature, generator)
            else:
                n, bonus = accept_greedy(drafted, logits)
            crop_cache(state.target_cache, k - n)  # keep t, d_1 .. d_n; the bonus becomes the next t
            state.pending = extend_pending(state.pending, feats, n + 1)  # rejected rows' features are dropped
            assert cache_len(state.target_cache) == L + n + 1
            new, hit = result.commit(tokens, drafted, n, bonus, eos, max_new_tokens)
            generated += len(new)
            if hit:
                result.hit_eos = True
                break
            if step_callback is not None and len(new) == n + 1:
                step_callback(state)
        result.wall_time = time.perf_counter() - t0
    finally:
        if hook is not None:
            hook.remove()
    result.rows = result.target_rows + result.draft_rows
    result.output_ids = tokens[prompt_len:]
    return result


def dflash_autoregressive_generate(target: nn.Module, prompt_ids, max_new_tokens: int, eos_token_ids=(),
                                   temperature: float = 0.0, generator=None) -> DFlashSpecResult:
    """The baseline for :func:`dflash_generate`'s speedup: one target forward per token, same engine."""
    return dflash_generate(target, None, prompt_ids, max_new_tokens, eos_token_ids, temperature, generator)


__all__ = ["DFlashDecodeState", "DFlashSpecResult", "dflash_autoregressive_generate", "dflash_generate",
           "draft_block", "extend_pending", "propose", "resolve_block", "target_forward", "target_parts"]

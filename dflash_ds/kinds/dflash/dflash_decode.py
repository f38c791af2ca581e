"""Lossless draft-then-verify decoding with the standalone DFlash drafter (:mod:`.dflash_model`), on the
same engine as the LoRA loops: :func:`speculative_generate`'s :class:`DecodeSession` (dynamic or static KV cache,
compiled verify forwards, lockstep decisions) with a :class:`DFlashBlockDrafter`.

State between steps (batch 1), as in every loop: ``tokens`` is the committed sequence, the target's KV cache
(``session.cache``) holds ``tokens[:-1]`` (length ``L``); the last committed token ``t`` is the next block's anchor.
The drafter keeps its own :class:`DFlashContextCache` (per draft layer, the keys/values of the projected target
features of committed rows) plus ``pending``: captured features of committed rows not yet projected into it.
``context.length + pending rows == L`` always, and right after each draft forward ``context.length == L``.

One step:

1. **draft** (one drafter forward, eager): ``[t, MASK x (B-1)]`` at positions ``L .. L+B-1``, embedded by the
   target's embedding; the pending features are projected (``fc`` + ``hidden_norm``) and appended to the context
   cache in the same forward; block rows see every context row and their whole block. Rows ``1 .. B-1`` through the
   target's ``lm_head`` give ``d_1 .. d_{B-1}`` (argmax, or samples of ``q`` at ``temperature``). A drafter with a
   draft vocabulary goes through its own ``lm_head`` over it and maps its picks to target ids (``d2t``); ``q`` is
   then zero outside the vocabulary, which rejection sampling handles as any other draft distribution.
2. **verify** (one target forward, the session's: adapter off, static/compiled when asked): ``[t, d_1 .. d_k]`` at
   ``L .. L+k``, the layers ``target_layer_ids`` captured by the model's :class:`FeatureTap`. Greedy or lossless
   rejection sampling (``q`` the drafter's softmax), rank 0's decision in a lockstep decode.
3. **commit** ``t, d_1 .. d_n`` + bonus; the target cache is cropped to ``L + n + 1``; the captured features of those
   ``n + 1`` rows become ``pending`` (:meth:`DFlashBlockDrafter.verified`; the rejected rows' are dropped).

The prefill runs the target over ``tokens[:-1]`` with the tap on: the prompt's features are the first ``pending``.
The drafter's own forward stays eager (its context cache grows by concatenation); only the target's forwards use
the static cache / compiled graphs. ``drafter=None`` gives the autoregressive baseline on this same engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ...speculative.engine import DecodeSession, StaticDecoding, unwrap_model
from ...speculative.lockstep import Lockstep
from ...speculative.loop import SpecResult, autoregressive_generate, speculative_generate
from ...speculative.proposal import Draft, sample_rows
from .dflash_model import DFlashContextCache, DFlashDraftModel
from .feature_tap import FeatureTap


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
    context       the drafter's context cache
    pending       ``[1, r, K*H]`` captured target features of committed rows not yet in ``context``, or None
    draft_start   ``L`` at this step's draft: the committed rows both caches held then
    drafted       this step's drafted tokens (target ids); ``draft_logits`` ``[len(drafted), V]`` their logits over
                  the drafter's vocabulary (the draft vocabulary's ids when it has one)
    """

    tokens: list[int]
    target_cache: object
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


def extend_pending(pending: torch.Tensor | None, feats: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``pending`` with the first ``rows`` rows of ``feats [1, q, K*H]`` (the committed ones) appended."""
    if feats is None:
        return pending
    new = feats[:, :rows]
    return new if pending is None else torch.cat([pending, new], dim=1)


class DFlashBlockDrafter:
    """The standalone drafter as a :class:`Drafter` of :func:`speculative_generate`: it reads the target's features
    of the committed rows (the prefill's in :meth:`start`, each verify's accepted rows in :meth:`verified`) and
    drafts ``B - 1`` tokens in one forward of its own (:meth:`propose`, counted as a draft forward of ``B`` rows)."""

    name = "dflash"

    def __init__(self, model: DFlashDraftModel, mask_token_id: int, tap: FeatureTap | None = None) -> None:
        self.model = model
        self.mask_token_id = int(mask_token_id)
        self.tap = tap
        self.state: DFlashDecodeState | None = None
        self._block: torch.Tensor | None = None
        self._embed: nn.Module | None = None

    def begin(self, session: DecodeSession) -> None:
        """Before the prefill: the tap on (every target forward of this generation records its features)."""
        if self.tap is None:
            self.tap = FeatureTap.of(session.model, self.model.target_layer_ids)
        self.tap.out.clear()
        self.tap.active = True

    def end(self, session: DecodeSession) -> None:
        self.tap.active = False
        self.tap.out.clear()

    def start(self, session: DecodeSession, tokens: list[int]) -> None:
        self._embed = session.model.get_input_embeddings()
        self._block = torch.full((1, session.block_size), self.mask_token_id, dtype=torch.long, device=session.device)
        pending = self.tap.take(self.model.target_layer_ids) if len(tokens) > 1 else None  # the prefill's features
        self.state = DFlashDecodeState(tokens, session.cache, DFlashContextCache(len(self.model.layers)), pending)

    def propose(self, session: DecodeSession, tokens: list[int], num: int, temperature: float,
                generator: torch.Generator | None) -> Draft:
        state = self.state
        L = state.committed_rows
        state.draft_start, state.drafted, state.draft_logits = L, [], None
        if num <= 0:
            return Draft([])
        block = self._block
        B = block.shape[1]
        block[0, 0] = tokens[-1]
        pos = session.positions[:, L : L + B]
        context = self.model.project_context(state.pending) if state.pending is not None else None
        hidden = self.model(self._embed(block), pos, context, cache=state.context)  # [1, B, H]
        state.pending = None
        assert state.context.length == L, f"draft context {state.context.length} rows != committed {L}"
        rows = hidden[0, 1 : 1 + num]
        own = self.model.has_own_lm_head
        logits = self.model.lm_head(rows) if own else session.lm_head(rows.to(session.dtype))  # [num, N or V]
        session.counts["draft"] += 1
        session.rows += B
        state.draft_logits = logits
        if temperature > 0:
            drafted, probs = sample_rows(logits, temperature, generator)
            if own:  # q over the target's vocabulary: zero outside the draft vocabulary
                drafted = self.model.draft_ids_to_target(drafted)
                probs = probs.new_zeros(num, self.model.config.vocab_size).index_copy_(1, self.model.vocab_ids(), probs)
            state.drafted = drafted.tolist()
            return Draft(state.drafted, probs)
        state.drafted = self.model.draft_ids_to_target(logits.argmax(dim=-1)).tolist()
        return Draft(state.drafted)

    def verified(self, session: DecodeSession, n: int) -> None:
        """After a verify forward committed ``t, d_1 .. d_n``: their features join ``pending``."""
        feats = self.tap.take(self.model.target_layer_ids)
        self.state.pending = extend_pending(self.state.pending, feats, n + 1)


def _as_dflash(r: SpecResult, loop: str, draft_rows: int) -> DFlashSpecResult:
    values = {f.name: getattr(r, f.name) for f in fields(SpecResult)}
    values["loop"] = loop
    return DFlashSpecResult(**values, target_rows=r.rows - draft_rows, draft_rows=draft_rows)


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
    static: StaticDecoding | None = None,
    lockstep: Lockstep | None = None,
    tap: FeatureTap | None = None,
) -> DFlashSpecResult:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (batch 1): the target verifies, ``drafter`` drafts
    ``B - 1`` tokens a step (``B`` = ``block_size``, default the drafter's; any ``B >= 2`` is lossless, the trained
    one drafts best). Greedy at ``temperature`` 0 (token for token transformers' greedy ``generate``), lossless
    rejection sampling above. Stops after the first EOS (kept) or ``max_new_tokens``. ``drafter=None``: the
    autoregressive baseline on the same engine. ``step_callback(state)`` runs after every step that committed all
    of ``d_1 .. d_n`` + bonus without stopping.

    ``static`` (a :class:`StaticDecoding` of ``target``): the target's forwards on its static cache, compiled if it
    is; the model's :class:`FeatureTap` must then exist before its first compiled forward. ``lockstep``: rank 0's
    drafts and decisions on every rank (:class:`Lockstep`). ``tap``: the model's tap (default :meth:`FeatureTap.of`).
    """
    target = unwrap_model(target)
    B, mask = resolve_block(drafter, block_size, mask_token_id)
    if drafter is None:
        r = autoregressive_generate(target, prompt_ids, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                                    temperature=temperature, generator=generator, static=static, lockstep=lockstep)
        return _as_dflash(r, "dflash_autoregressive", 0)
    block_drafter = DFlashBlockDrafter(drafter, mask, tap or FeatureTap.of(target, drafter.target_layer_ids))
    callback = None
    if step_callback is not None:
        def callback(session, tokens, d):
            step_callback(d.state)
    r = speculative_generate(target, prompt_ids, block_drafter, block_size=B, max_new_tokens=max_new_tokens,
                             eos_token_ids=eos_token_ids, temperature=temperature, generator=generator,
                             step_callback=callback, static=static, lockstep=lockstep)
    return _as_dflash(r, "dflash", B * r.draft_forwards)


def dflash_autoregressive_generate(target: nn.Module, prompt_ids, max_new_tokens: int, eos_token_ids=(),
                                   temperature: float = 0.0, generator=None) -> DFlashSpecResult:
    """The baseline for :func:`dflash_generate`'s speedup: one target forward per token, same engine."""
    return dflash_generate(target, None, prompt_ids, max_new_tokens, eos_token_ids, temperature, generator)


__all__ = ["DFlashBlockDrafter", "DFlashDecodeState", "DFlashSpecResult",
           "dflash_autoregressive_generate", "dflash_generate", "extend_pending", "resolve_block"]

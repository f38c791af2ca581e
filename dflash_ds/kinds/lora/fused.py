"""The fused loop: ONE forward per step verifies the last draft and drafts the next one (scope ``block``).

Rows of a step's forward, with the cache holding the committed tokens before ``t`` (length ``L``) and ``d_1 .. d_k``
the current draft::

    verify rows   [t, d_1, ..., d_k]                 positions L .. L+k        adapter off, causal
    group i       [d_i, MASK x (B-1)]  (d_0 = t)     positions L+i .. L+i+B-1  adapter on, for each anchor i

Group ``i`` sees the cache, the verify rows before its anchor and its own block: the training visibility
(:func:`dflash_ds.blocks.visibility`), so an adapter trained for the two-forward loop drafts here unchanged. After
the verify rows accept ``n`` drafts and give the bonus, the group anchored at ``d_n`` was conditioned on exactly the
accepted text: its block positions ``2 .. B-1`` are the next step's drafts.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ...blocks import visibility
from ...lora import adapter_preserved
from ...settings import check_choices, setting
from ...speculative.accept import accept_greedy_lazy, accept_sampling
from ...speculative.engine import DecodeSession, StaticDecoding, cache_len, crop_cache
from ...speculative.lockstep import Lockstep
from ...speculative.loop import SpecResult, finish_result, prefill_cache, prepare_generation
from ...speculative.proposal import sample_rows
from .lora_decode import LoRABlockDrafter


FALLBACKS = ("refill", "draft")


def _groups(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of groups or 'all', got {text!r}") from None


@dataclass
class FusedConfig:
    """Fused loop (one forward per step: the verify rows and draft groups)."""

    groups: int | None = setting(
        None, "draft groups per forward (default all: one per possible outcome n = 0 .. k); with fewer, the anchors "
        "are the likeliest outcomes by the drafter's own confidence", flag="fused-groups", parse=_groups,
        metavar="N|all")
    fallback: str = setting(
        "refill", "when no group is anchored at the accepted outcome (or its drafts were dropped): refill (the next "
        "forward verifies the bonus alone and drafts afresh) or draft (one draft-only forward now, as the two-forward "
        "loop does)", flag="fused-fallback", choices=FALLBACKS)
    reject_mismatch: bool = setting(
        False, "drop a group's drafts when its guess for the bonus slot is not the bonus (its later guesses were "
        "made without knowing that token)", flag="fused-reject-mismatch")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"--fused-groups must be >= 1 (or all), got {self.groups}")


def fused_step_layout(num_drafts: int, anchors: Sequence[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Visibility and position offsets of one fused forward.

    Rows: the verify rows ``[t, d_1 .. d_k]`` (offsets ``0 .. k``), then one group ``[d_i, MASK x (B-1)]`` per anchor
    ``i`` (offsets ``i .. i+B-1``; ``d_0 = t``). Verify rows are causal; group ``i`` sees the verify rows before its
    anchor and its own block: the training layout (:func:`dflash_ds.blocks.visibility`) with the verify rows as the
    clean tokens. Every row also sees the whole KV cache (added by the caller).

    Returns ``visible [R, R]`` bool and ``offsets [R]`` long, ``R = k + 1 + len(anchors) * B``.
    """
    V, B = num_drafts + 1, block_size
    a = torch.tensor([list(anchors)], dtype=torch.long)
    visible = visibility(a, torch.ones_like(a, dtype=torch.bool), B, torch.ones(1, V, dtype=torch.bool))[0]
    offsets = torch.cat([torch.arange(V), *(torch.arange(i, i + B) for i in anchors)])
    return visible, offsets


def choose_anchors(k: int, groups: int | None, outcome_counts: list[int],
                    confidence: list[float] | None = None) -> tuple[int, ...]:
    """Anchors ``i`` in ``0 .. k`` for this step's groups: all, or the ``groups`` likeliest outcomes ``n``.

    With the drafter's confidence ``c_j`` in each draft (its top probability), ``P(n = i) = c_1 .. c_i (1 - c_{i+1})``
    (``n = k``: all accepted); without (drafts from a draft-only forward), the outcomes seen most often so far.
    Ties go to the smaller ``i``."""
    if groups is None or groups >= k + 1:
        return tuple(range(k + 1))
    if confidence is not None and len(confidence) == k:
        score, reach = [], 1.0
        for c in confidence:
            score.append(reach * (1.0 - c))
            reach *= c
        score.append(reach)
    else:
        score = [float(c) for c in outcome_counts[: k + 1]]
    ranked = sorted(range(k + 1), key=lambda i: (-score[i], i))
    return tuple(sorted(ranked[:groups]))


class FusedStep:
    """Builds and caches the per-step inputs of the fused forward (the in-step mask depends only on ``k`` and the
    anchors, so it is built once per distinct pair).

    The verify rows take ``verify_slots`` rows (``k + 1``, or ``B`` with a static cache: padding rows that see only
    themselves fill the rest), so the groups, where the adapter starts, always begin at the same row of a compiled
    graph. Returns ``(ids [1, R], positions [1, R], mask, first group row)``.
    """

    def __init__(self, session: DecodeSession, mask_token_id: int) -> None:
        self.session = session
        self.mask_token_id = mask_token_id
        self._layouts: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _layout(self, k: int, anchors: tuple[int, ...]):
        session, B = self.session, self.session.block_size
        visible, offsets = fused_step_layout(k, anchors, B)
        V = k + 1
        slots = max(V, B) if session.static is not None else V
        R = slots + len(anchors) * B
        where = torch.cat([torch.arange(V), torch.arange(slots, R)])  # layout row -> row of the forward
        full = torch.zeros(R, R, dtype=torch.bool)
        full[where[:, None], where[None, :]] = visible
        full[torch.arange(V, slots), torch.arange(V, slots)] = True  # padding rows see only themselves
        rows = torch.full((R,), k, dtype=torch.long)
        rows[where] = offsets
        pattern = torch.zeros(R, R, dtype=session.dtype)
        pattern.masked_fill_(~full, torch.finfo(session.dtype).min)
        return pattern.to(session.device), rows.to(session.device), slots

    def inputs(self, L: int, t: int, drafted: list[int], anchors: tuple[int, ...]):
        session, B = self.session, self.session.block_size
        key = (len(drafted), anchors)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = self._layout(len(drafted), anchors)
        pattern, offsets, slots = layout
        verify = [t, *drafted]
        ids = verify + [0] * (slots - len(verify))
        for i in anchors:
            ids.append(verify[i])
            ids.extend([self.mask_token_id] * (B - 1))
        return session.ids(ids), (offsets + L)[None], session.mask(L, pattern), slots


@torch.no_grad()
def fused_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    mask_token_id: int,
    *,
    block_size: int,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    config: FusedConfig | None = None,
    static: StaticDecoding | None = None,
    step_callback: Callable[[DecodeSession, list[int], list[int]], None] | None = None,
    lockstep: Lockstep | None = None,
) -> SpecResult:
    """Speculative decoding with ONE forward per step (scope ``block`` adapters only).

    Each step runs ``[t, d_1 .. d_k | groups]`` in one forward (:func:`fused_step_layout`): the verify rows with the
    adapter off (gate 0: the exact target) and draft groups with the adapter on. The verify rows accept ``n``
    drafts and give the bonus ``b`` exactly as :func:`speculative_generate` does (greedy or lossless rejection
    sampling, ``q`` the group's distribution), so the output is the target's. The group anchored at ``d_n`` saw
    exactly the accepted text: its block positions ``2 .. B-1`` are the next step's drafts (position 1 guessed the
    bonus slot). Group keys never stay in the cache: it is cropped to the committed tokens after every forward.
    ``step_callback(session, tokens, drafts)`` runs after every step (``session.cache`` holds ``tokens[:-1]``).
    With ``lockstep`` (every rank decoding the same prompt, their forwards collective) rank 0 decides the anchors,
    the accepted count, the bonus and the next drafts for every rank.
    """
    cfg = config or FusedConfig()
    if block_size < 3:
        raise ValueError(f"the fused loop needs block_size >= 3 (a group drafts positions 2 .. B-1), got {block_size}")
    tokens, eos, generator = prepare_generation(model, prompt_ids, eos_token_ids, temperature, generator, "fused_generate")
    B = block_size
    session = DecodeSession(model, len(tokens) + max_new_tokens + B, B, static=static, lockstep=lockstep)
    if session.control is None:
        raise ValueError("the fused loop needs a dflash-ds LoRA adapter on the model (apply_lora / --adapter)")
    result = SpecResult(loop="fused")
    sample = temperature > 0
    cache, lm_head = session.cache, session.lm_head
    step = FusedStep(session, mask_token_id)
    # a static cache pads every fused forward to its largest shape: B verify slots and one group per outcome
    pad_to = B + min(cfg.groups or B, B) * B if static is not None else None
    fresh = LoRABlockDrafter(mask_token_id, scope="block")
    outcome_counts = [0] * B
    drafted: list[int] = []
    probs_q: torch.Tensor | None = None
    confidence: list[float] | None = None
    with adapter_preserved(session.model):
        t0 = time.perf_counter()
        L = prefill_cache(session, tokens)
        fresh.start(session, tokens)
        generated = 0
        while generated < max_new_tokens:
            remaining = max_new_tokens - generated
            drafted = drafted[: remaining - 1]  # never verify past max_new_tokens
            confidence = confidence[: len(drafted)] if confidence is not None else None
            k = len(drafted)
            # groups are worth their rows only if the next step can still verify a drafted token
            anchors = choose_anchors(k, cfg.groups, outcome_counts, confidence) if remaining >= 3 else ()
            if cfg.groups is not None:  # chosen by float confidences (all groups: by k, already agreed)
                anchors = tuple(session.agree(anchors))
            ids, positions, mask, first_group = step.inputs(L, tokens[-1], drafted, anchors)
            hidden = session.forward_hidden(ids, positions, mask, rows_from=first_group, kind="verify", pad_to=pad_to)
            if sample:
                n, bonus = accept_sampling(drafted, probs_q[:k] if probs_q is not None else None,
                                            lm_head(hidden[: k + 1]), temperature, generator)
            else:  # the lm_head on the verify rows the decision reads
                n, bonus = accept_greedy_lazy(drafted, hidden[: k + 1], lm_head, session.verify_first_rows)
            n, bonus = session.agree([n, bonus])  # what is committed, and so when to stop
            crop_cache(cache, ids.shape[1] - (n + 1))  # keep t, d_1 .. d_n; groups and rejected drafts go
            L += n + 1
            assert cache_len(cache) == L, f"verifier cache length {cache_len(cache)} != committed {L}"
            outcome_counts[n] += 1
            new, hit = result.commit(tokens, drafted, n, bonus, eos, max_new_tokens)
            generated += len(new)
            if hit:
                result.hit_eos = True
                break
            drafted, probs_q, confidence = [], None, None
            if n in anchors:
                r = first_group + anchors.index(n) * B
                group_logits = lm_head(hidden[r + 1 : r + B])  # block positions 1 .. B-1
                if not (cfg.reject_mismatch and int(group_logits[0].argmax()) != bonus):
                    if sample:
                        d, probs_q = sample_rows(group_logits[1:], temperature, generator)
                        drafted = d.tolist()
                    else:
                        drafted = group_logits[1:].argmax(dim=-1).tolist()
                    if cfg.groups is not None:  # the next step's anchors follow the drafter's confidence
                        q = probs_q if sample else torch.softmax(group_logits[1:].float(), dim=-1)
                        confidence = q.max(dim=-1).values.tolist()
                drafted = session.agree(drafted)  # whether a fallback forward runs, and the next forward's input
            num = min(B - 1, max_new_tokens - generated - 1)
            if not drafted and anchors and num > 0:  # no usable group
                result.fallbacks += 1
                if cfg.fallback == "draft":
                    draft = fresh.propose(session, tokens, num, temperature, generator)
                    drafted, probs_q = session.agree([int(x) for x in draft.tokens]), draft.probs
            if step_callback is not None:
                step_callback(session, tokens, drafted)
        result.wall_time = time.perf_counter() - t0
    return finish_result(result, session, tokens, len(tokens) - result.num_committed)

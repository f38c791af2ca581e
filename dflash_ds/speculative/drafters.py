"""Drafters: what proposes the tokens the verify forward checks (the trained adapter, the untrained floor, n-gram
prompt lookup)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from .engine import DecodeSession, cache_len, crop_cache


@dataclass
class Draft:
    """Proposed tokens and, for sampled proposals, the drafter's distribution ``q`` (``[len(tokens), V]``).

    ``probs`` None means a deterministic proposal (``q`` one-hot on the proposed token).
    """

    tokens: list[int]
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """What the verify loop needs from a drafter.

    ``tokens`` is the committed sequence (prompt + generated) whose last entry is ``t``, the token not yet in the
    verifier cache; ``session.cache`` holds ``tokens[:-1]``. ``propose`` returns at most ``num`` tokens (possibly
    none) for the positions after ``t``; with ``temperature > 0`` a drafter with a distribution samples from it and
    returns it as ``probs``. Model forwards go through ``session.forward(..., kind="draft")`` so they are counted.

    Optional, for a drafter that reads the target's own forwards (:class:`~.dflash_loop.DFlashBlockDrafter`):
    ``begin(session)`` before the prefill, ``verified(session, n)`` after each verify forward (``t, d_1 .. d_n``
    committed, the cache cropped to them) and ``end(session)`` when the generation ends.
    """

    name: str

    def start(self, session: DecodeSession, tokens: list[int]) -> None: ...

    def propose(
        self, session: DecodeSession, tokens: list[int], num: int, temperature: float, generator: torch.Generator | None
    ) -> Draft: ...


def sample_rows(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs


class LoRABlockDrafter:
    """The trained adapter: one adapter-on forward of ``[t, MASK x (B-1)]`` drafts ``B - 1`` tokens.

    ``adapter=False`` drafts with the adapter off, which is exactly an untrained adapter (``lora_B = 0`` adds 0):
    the floor baseline, without touching the weights of an in-memory model being trained.
    """

    def __init__(self, mask_token_id: int, scope: str = "block", adapter: bool = True, name: str | None = None):
        if scope not in ("block", "all"):
            raise ValueError(f"scope must be 'block' or 'all', got {scope!r}")
        self.mask_token_id = int(mask_token_id)
        self.scope = scope
        self.adapter = adapter
        self.name = name or ("drafter" if adapter else "untrained_floor")
        # Scope "all" with the adapter on needs its own adapter-on cache of the committed tokens.
        self.own_cache = scope == "all" and adapter
        self.cache: DynamicCache | None = None
        self.own_cache_len = 0
        self._block: torch.Tensor | None = None
        self._all_visible: torch.Tensor | None = None

    def start(self, session: DecodeSession, tokens: list[int]) -> None:
        B = session.block_size
        if self.own_cache and session.static is not None:
            raise ValueError("a static (compiled) cache supports scope 'block' adapters only: scope 'all' drafts "
                             "from a second, adapter-on cache")
        self._block = torch.full((1, B), self.mask_token_id, dtype=torch.long, device=session.device)
        self._all_visible = None
        self.cache, self.own_cache_len = None, 0
        if self.own_cache:
            self.cache = session.new_cache()
            if len(tokens) > 1:
                session.set_adapter(True)
                session.forward(session.ids(tokens[:-1]), 0, self.cache, kind="draft_prefill")
            self.own_cache_len = len(tokens) - 1
            assert cache_len(self.cache) == self.own_cache_len

    def _all_scope_mask(self, session: DecodeSession, start: int, pending: int, B: int) -> torch.Tensor:
        """Rows: ``pending`` committed tokens (causal) then the block (sees everything before it and its block)."""
        rows, cols = pending + B, start + pending + B
        visible = torch.ones(rows, cols, dtype=torch.bool, device=session.device)
        if pending:
            tri = torch.ones(pending, pending + B, dtype=torch.bool, device=session.device).tril()
            visible[:pending, start:] = tri
        mask = torch.zeros(rows, cols, dtype=session.dtype, device=session.device)
        mask.masked_fill_(~visible, torch.finfo(session.dtype).min)
        return mask[None, None]

    def propose(
        self, session: DecodeSession, tokens: list[int], num: int, temperature: float, generator: torch.Generator | None
    ) -> Draft:
        if num <= 0:
            return Draft([])
        B = session.block_size
        L = len(tokens) - 1
        block = self._block
        block[0, 0] = tokens[-1]
        session.set_adapter(self.adapter)
        if self.own_cache:
            cache, start = self.cache, self.own_cache_len
            pending = tokens[start:L]
            ids = torch.cat([session.ids(pending), block], dim=1) if pending else block
            mask = self._all_scope_mask(session, start, len(pending), B)
        else:
            cache, start, ids = session.cache, L, block
            if self._all_visible is None:
                self._all_visible = torch.zeros(B, B, dtype=session.dtype, device=session.device)
            mask = session.mask(L, self._all_visible)  # block queries see every cached key and their whole block
        logits = session.forward(ids, start, cache, mask=mask, keep=B - 1, kind="draft")  # [B-1, V]
        crop_cache(cache, B)  # drafted keys never stay in a cache
        if self.own_cache:
            self.own_cache_len = L
        assert cache_len(cache) == L, f"draft cache length {cache_len(cache)} != committed {L}"
        logits = logits[:num]
        if temperature > 0:
            drafted, probs = sample_rows(logits, temperature, generator)
            return Draft(drafted.tolist(), probs)
        return Draft(logits.argmax(dim=-1).tolist())


def untrained_floor_drafter(mask_token_id: int) -> LoRABlockDrafter:
    """The floor: an untrained (zero ``lora_B``) adapter, i.e. the base model drafting from MASK tokens."""
    return LoRABlockDrafter(mask_token_id, scope="block", adapter=False, name="untrained_floor")


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the last ``n``-gram of the committed text (``n`` from
    ``max_ngram`` down to ``min_ngram``) and propose the tokens that followed it. Deterministic (``q`` one-hot);
    no model forward. The n-gram index is updated incrementally (O(1) per committed token)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, name: str = "ngram"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.name = max_ngram, min_ngram, name
        self._index: dict[int, dict[tuple[int, ...], int]] = {}
        self._done: dict[int, int] = {}

    def start(self, session: DecodeSession | None, tokens: list[int]) -> None:
        self._index = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self._done = {n: 0 for n in self._index}

    def propose(
        self, session: DecodeSession | None, tokens: list[int], num: int, temperature: float = 0.0, generator=None
    ) -> Draft:
        if num <= 0:
            return Draft([])
        N = len(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if N < n + 1:
                continue
            index = self._index[n]
            # index every n-gram that has a follower and does not overlap the current suffix's start
            for s in range(self._done[n], N - n):
                index[tuple(tokens[s : s + n])] = s
            self._done[n] = max(self._done[n], N - n)
            s = index.get(tuple(tokens[N - n :]))
            if s is not None:
                return Draft(tokens[s + n : s + n + num])
        return Draft([])

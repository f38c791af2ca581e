"""What proposes the tokens a verify forward checks: the :class:`Drafter` protocol every drafter kind's decoder
follows, its :class:`Draft`, and the model-free n-gram prompt-lookup drafter (:class:`NgramDrafter`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .engine import DecodeSession


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

    Optional, for a drafter that reads the target's own forwards (the standalone kind's ``DFlashBlockDrafter``):
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


__all__ = ["Draft", "Drafter", "NgramDrafter", "sample_rows"]

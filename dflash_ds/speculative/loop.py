"""The two-forward loop (draft, then verify) and the autoregressive baseline on the same session, and what every
loop records per generation (:class:`SpecResult`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..lora import adapter_preserved
from .accept import accept_greedy_lazy, accept_sampling
from .proposal import Draft, Drafter
from .engine import DecodeSession, StaticDecoding, cache_len, crop_cache, unwrap_model
from .lockstep import Lockstep


@dataclass
class SpecResult:
    """One generation.

    output_ids           generated tokens (EOS included when hit), without the prompt
    committed_per_step   tokens committed by each verify forward, bonus included, after EOS/max truncation
    accepted_per_step    drafted tokens accepted by each verify forward (before truncation)
    proposed_per_step    drafted tokens verified by each verify forward
    step_starts          number of tokens generated before each step
    draft_forwards / verify_forwards / prefill_forwards   model forwards by kind (draft includes a scope-all
                         drafter's own prefill; prefill is the verifier's prompt prefill)
    wall_time            seconds, prefill included
    """

    output_ids: list[int] = field(default_factory=list)
    committed_per_step: list[int] = field(default_factory=list)
    accepted_per_step: list[int] = field(default_factory=list)
    proposed_per_step: list[int] = field(default_factory=list)
    step_starts: list[int] = field(default_factory=list)
    draft_forwards: int = 0
    verify_forwards: int = 0
    prefill_forwards: int = 0
    wall_time: float = 0.0
    hit_eos: bool = False
    loop: str = "two_forward"
    rows: int = 0  # query rows over all forwards after the prefill
    fallbacks: int = 0  # fused loop: steps whose next drafts needed a draft-only forward or a refill

    def commit(self, tokens: list[int], drafted: list[int], n: int, bonus: int, eos: frozenset[int],
               max_new_tokens: int) -> tuple[list[int], bool]:
        """Append ``d_1 .. d_n`` and the bonus to ``tokens`` (cut after an EOS or at ``max_new_tokens``) and record
        the step. Returns ``(committed tokens, hit_eos)``."""
        generated = self.step_starts[-1] + self.committed_per_step[-1] if self.step_starts else 0
        new = drafted[:n] + [bonus]
        hit = False
        for i, tok in enumerate(new):
            if tok in eos:
                new, hit = new[: i + 1], True
                break
        new = new[: max_new_tokens - generated]
        self.step_starts.append(generated)
        self.committed_per_step.append(len(new))
        self.accepted_per_step.append(n)
        self.proposed_per_step.append(len(drafted))
        tokens.extend(new)
        return new, hit

    @property
    def num_committed(self) -> int:
        return sum(self.committed_per_step)

    @property
    def num_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def tau(self) -> float:
        """Tokens committed per verify forward, bonus included."""
        return self.num_tokens / self.verify_forwards if self.verify_forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.wall_time if self.wall_time > 0 else 0.0


def prepare_generation(model: nn.Module, prompt_ids, eos_token_ids, temperature: float, generator, caller: str):
    """Validated ``(prompt tokens, EOS ids, generator)`` shared by both loops."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    tokens = [int(x) for x in prompt_ids]
    if not tokens:
        raise ValueError(f"{caller}: the prompt is empty")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = frozenset(int(e) for e in (eos_token_ids or ()))
    if temperature > 0 and generator is None:
        generator = torch.Generator(device=next(unwrap_model(model).parameters()).device)
    return tokens, eos, generator


def prefill_cache(session: DecodeSession, tokens: list[int]) -> int:
    """Adapter-off prefill of every committed token but the last; returns the cache length."""
    if len(tokens) > 1:
        session.set_adapter(False)
        session.forward(session.ids(tokens[:-1]), 0, session.cache, kind="prefill")
    L = len(tokens) - 1
    assert cache_len(session.cache) == L
    return L


def finish_result(result: SpecResult, session: DecodeSession, tokens: list[int], prompt_len: int) -> SpecResult:
    result.output_ids = tokens[prompt_len:]
    result.draft_forwards = session.counts["draft"] + session.counts["draft_prefill"]
    result.verify_forwards = session.counts["verify"]
    result.prefill_forwards = session.counts["prefill"]
    result.rows = session.rows
    return result


class _ARDrafter:
    name = "autoregressive"

    def start(self, session, tokens) -> None:
        pass

    def propose(self, session, tokens, num, temperature, generator) -> Draft:
        return Draft([])


@torch.no_grad()  # not inference_mode: ZeRO-3 re-partitions parameters in place after the forward
def speculative_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    drafter: Drafter,
    *,
    block_size: int,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    step_callback: Callable[[DecodeSession, list[int], Drafter], None] | None = None,
    static: StaticDecoding | None = None,
    lockstep: Lockstep | None = None,
) -> SpecResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1), drafting with ``drafter``.

    ``block_size`` is the draft block ``B`` (``B - 1`` drafted tokens per step; may be smaller than the trained
    block). Stops after the first EOS (kept in the output) or ``max_new_tokens``. ``step_callback(session, tokens,
    drafter)`` runs after every step with ``tokens`` the committed sequence (``session.cache`` holds ``tokens[:-1]``).
    The model's adapter switch is restored on return. With ``lockstep`` (every rank of a process group decoding
    the same prompt, their forwards collective), rank 0's drafts, accepted counts and bonus tokens are every rank's.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tokens, eos, generator = prepare_generation(model, prompt_ids, eos_token_ids, temperature, generator, "speculative_generate")
    session = DecodeSession(model, len(tokens) + max_new_tokens, block_size, static=static, lockstep=lockstep)
    result = SpecResult()
    # optional drafter hooks (a drafter that reads the target's features: the standalone kind's): before the prefill,
    # after each verify forward (n drafts accepted, the cache cropped), and at the end
    begin, verified, end = (getattr(drafter, name, None) for name in ("begin", "verified", "end"))
    with adapter_preserved(session.model):
        if begin is not None:
            begin(session)
        try:
            _two_forward_steps(session, tokens, drafter, result, block_size, max_new_tokens, eos, temperature,
                               generator, step_callback, verified)
        finally:
            if end is not None:
                end(session)
    return finish_result(result, session, tokens, len(tokens) - result.num_committed)


def _two_forward_steps(session: DecodeSession, tokens: list[int], drafter: Drafter, result: SpecResult,
                       block_size: int, max_new_tokens: int, eos: frozenset[int], temperature: float, generator,
                       step_callback, verified) -> None:
    """:func:`speculative_generate`'s prefill and steps, timed into ``result.wall_time``."""
    sample = temperature > 0
    cache = session.cache
    t0 = time.perf_counter()
    L = prefill_cache(session, tokens)
    drafter.start(session, tokens)
    generated = 0
    while generated < max_new_tokens:
        remaining = max_new_tokens - generated
        num = min(block_size - 1, remaining - 1)  # never verify past max_new_tokens
        draft = drafter.propose(session, tokens, num, temperature, generator)
        drafted = [int(x) for x in draft.tokens[:num]]
        if num > 0:  # the verify forward's input: the same on every rank (num is: it follows agreed tokens)
            drafted = session.agree(drafted)
        k = len(drafted)
        session.set_adapter(False)
        # greedy: the final hidden states [k+1, H], the lm_head run only on the rows the decision reads
        out = session.forward(session.ids([tokens[-1], *drafted]), L, cache, kind="verify", head=sample)
        assert cache_len(cache) == L + k + 1
        if sample:
            probs_q = draft.probs[:k] if draft.probs is not None else None
            n, bonus = accept_sampling(drafted, probs_q, out, temperature, generator)  # out: logits [k+1, V]
        else:
            n, bonus = accept_greedy_lazy(drafted, out, session.lm_head, session.verify_first_rows)
        n, bonus = session.agree([n, bonus])  # what is committed, and so when to stop
        crop_cache(cache, k - n)  # keep t, d_1 .. d_n; the bonus becomes the next t
        L += n + 1
        assert cache_len(cache) == L, f"verifier cache length {cache_len(cache)} != committed {L}"
        if verified is not None:
            verified(session, n)
        new, hit = result.commit(tokens, drafted, n, bonus, eos, max_new_tokens)
        generated += len(new)
        if step_callback is not None and not hit and len(new) == n + 1:
            step_callback(session, tokens, drafter)
        if hit:
            result.hit_eos = True
            break
    result.wall_time = time.perf_counter() - t0


def autoregressive_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    static: StaticDecoding | None = None,
    lockstep: Lockstep | None = None,
) -> SpecResult:
    """The AR baseline on the same session: prefill, then one adapter-off forward per token."""
    return speculative_generate(
        model,
        prompt_ids,
        _ARDrafter(),
        block_size=1,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        temperature=temperature,
        generator=generator,
        static=static,
        lockstep=lockstep,
    )

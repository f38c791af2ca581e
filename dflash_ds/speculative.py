"""Lossless draft-then-verify decoding with a KV cache (SPEC section 7, issues 4 and 7).

One step, with the verifier's KV cache holding the committed tokens except the last one ``t`` (cache length ``L``):

1. **draft**: the drafter proposes up to ``B - 1`` tokens ``d_1 .. d_k``. The LoRA block drafter does this in ONE
   forward of ``[t, MASK x (B-1)]`` at positions ``L .. L+B-1`` with the adapter on, every block query seeing all
   cached keys and every key of its block (exactly the training mask, SPEC 3); block index ``k`` gives ``d_k``
   (same-position labelling). The drafted keys are cropped off again, so nothing drafted leaks into the cache.
2. **verify**: ONE causal forward of ``[t, d_1 .. d_k]`` at ``L .. L+k`` with the adapter off. Greedy: accept
   ``d_i`` while it equals the target's argmax after ``d_{i-1}``; temperature > 0: lossless rejection sampling
   (accept with ``min(1, p/q)``, on rejection resample from ``norm(max(0, p - q))``, bonus sample when all are
   accepted). Commit ``t, d_1 .. d_n`` (crop the cache to ``L + n + 1``); the bonus token is the next ``t``.

Scope ``block`` reads the verifier's own cache (clean tokens run through the exact base model). Scope ``all``
keeps a second cache computed with the adapter on; the tokens committed since the last draft are appended to it in
the same forward as the next block (one 4D mask: those tokens causal, the block bidirectional over them).

Public API::

    Draft(tokens, probs=None)
    Drafter                      protocol: start(engine, tokens) / propose(engine, tokens, num, temperature, gen)
    LoRABlockDrafter(mask_token_id, scope="block", adapter=True, name=None)
    untrained_floor_drafter(mask_token_id)   # == an adapter with lora_B = 0, without touching the weights
    NgramDrafter(max_ngram=3, min_ngram=1)   # prompt lookup through this loop
    SpecResult                   output ids, per-step accounting, forward counts, wall time
    speculative_generate(model, prompt_ids, drafter, *, block_size, max_new_tokens, eos_token_ids, ...)
    autoregressive_generate(model, prompt_ids, *, max_new_tokens, eos_token_ids, ...)
    eos_ids_of(tokenizer, model) -> list[int]
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn
from transformers import DynamicCache

__all__ = [
    "Draft",
    "Drafter",
    "Engine",
    "LoRABlockDrafter",
    "NgramDrafter",
    "SpecResult",
    "autoregressive_generate",
    "eos_ids_of",
    "speculative_generate",
    "untrained_floor_drafter",
]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a DeepSpeed / DDP wrapper."""
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    return model


def eos_ids_of(tokenizer=None, model=None) -> list[int]:
    """Every end-of-sequence id the tokenizer and the model's generation config name (sorted, unique)."""
    ids: set[int] = set()

    def add(value) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple, set)):
            for v in value:
                add(v)
        else:
            ids.add(int(value))

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        gen = getattr(unwrap_model(model), "generation_config", None)
        if gen is not None:
            add(getattr(gen, "eos_token_id", None))
    return sorted(ids)


# --------------------------------------------------------------------------------------------------------------
# The engine: one model, one verifier cache, cheap forwards
# --------------------------------------------------------------------------------------------------------------


class Engine:
    """Runs forwards of one causal LM against a :class:`transformers.DynamicCache` and counts them.

    Everything per-step is kept cheap (per-forward overhead dominates on CPU, SPEC 11): the adapter toggle is a
    flag (:class:`dflash_ds.lora.AdapterControl`), position ids are slices of one preallocated ``arange``, and the
    all-visible draft mask is a slice of one preallocated zero buffer.
    """

    def __init__(self, model: nn.Module, max_len: int, block_size: int) -> None:
        self.model = unwrap_model(model)
        self.control = getattr(self.model, "dflash_adapter", None)
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        params = inspect.signature(self.model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated, SPEC 11)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.block_size = block_size
        self.max_len = max_len
        self.positions = torch.arange(max_len + block_size + 1, device=self.device)[None]
        self._zeros: torch.Tensor | None = None
        self.cache = self.new_cache()
        self.counts = {"prefill": 0, "draft": 0, "draft_prefill": 0, "verify": 0}

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def set_adapter(self, on: bool) -> None:
        """Adapter on for every token (gate None) or off (exact base model). Set before every forward."""
        control = self.control
        if control is None:
            if on:
                raise ValueError("this drafter needs a dflash-ds LoRA adapter on the model (apply_lora / --adapter)")
            return
        control.enabled = on
        control.gate = None

    def zeros_mask(self, rows: int, cols: int) -> torch.Tensor:
        """An all-visible additive mask ``[1, 1, rows, cols]`` (a view of a preallocated zero buffer)."""
        z = self._zeros
        if z is None or z.shape[2] < rows or z.shape[3] < cols:
            z = self._zeros = torch.zeros(
                1, 1, max(rows, self.block_size), max(cols, self.max_len + self.block_size + 1),
                dtype=self.dtype, device=self.device,
            )
        return z[:, :, :rows, :cols]

    def ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        start: int,
        cache: DynamicCache,
        *,
        mask: torch.Tensor | None = None,
        keep: int = 0,
        kind: str = "verify",
    ) -> torch.Tensor:
        """Logits ``[q or keep, V]`` of ``input_ids [1, q]`` at positions ``start .. start+q-1``; appends to ``cache``.

        ``mask`` None: causal (built by transformers). Otherwise an additive ``[1, 1, q, start+q]`` mask.
        """
        q = input_ids.shape[1]
        out = self.model(
            input_ids=input_ids,
            position_ids=self.positions[:, start : start + q],
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=keep,
            **{self.cache_kw: cache},
        )
        self.counts[kind] += 1
        return out.logits[0]


def _cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def _crop(cache: DynamicCache, remove: int) -> None:
    # DynamicCache.crop takes minus the number of tokens to drop in transformers 5.24 (a positive length raises)
    if remove > 0:
        cache.crop(-remove)


# --------------------------------------------------------------------------------------------------------------
# Drafters
# --------------------------------------------------------------------------------------------------------------


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
    verifier cache; ``engine.cache`` holds ``tokens[:-1]``. ``propose`` returns at most ``num`` tokens (possibly
    none) for the positions after ``t``; with ``temperature > 0`` a drafter with a distribution samples from it and
    returns it as ``probs``. Model forwards go through ``engine.forward(..., kind="draft")`` so they are counted.
    """

    name: str

    def start(self, engine: Engine, tokens: list[int]) -> None: ...

    def propose(
        self, engine: Engine, tokens: list[int], num: int, temperature: float, generator: torch.Generator | None
    ) -> Draft: ...


def _sample_rows(logits: torch.Tensor, temperature: float, generator: torch.Generator | None):
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
        self.cache_len = 0
        self._block: torch.Tensor | None = None

    def start(self, engine: Engine, tokens: list[int]) -> None:
        B = engine.block_size
        self._block = torch.full((1, B), self.mask_token_id, dtype=torch.long, device=engine.device)
        self.cache, self.cache_len = None, 0
        if self.own_cache:
            self.cache = engine.new_cache()
            if len(tokens) > 1:
                engine.set_adapter(True)
                engine.forward(engine.ids(tokens[:-1]), 0, self.cache, kind="draft_prefill")
            self.cache_len = len(tokens) - 1
            assert _cache_len(self.cache) == self.cache_len

    def _all_scope_mask(self, engine: Engine, start: int, pending: int, B: int) -> torch.Tensor:
        """Rows: ``pending`` committed tokens (causal) then the block (sees everything before it and its block)."""
        rows, cols = pending + B, start + pending + B
        visible = torch.ones(rows, cols, dtype=torch.bool, device=engine.device)
        if pending:
            tri = torch.ones(pending, pending + B, dtype=torch.bool, device=engine.device).tril()
            visible[:pending, start:] = tri
        mask = torch.zeros(rows, cols, dtype=engine.dtype, device=engine.device)
        mask.masked_fill_(~visible, torch.finfo(engine.dtype).min)
        return mask[None, None]

    def propose(
        self, engine: Engine, tokens: list[int], num: int, temperature: float, generator: torch.Generator | None
    ) -> Draft:
        if num <= 0:
            return Draft([])
        B = engine.block_size
        L = len(tokens) - 1
        block = self._block
        block[0, 0] = tokens[-1]
        engine.set_adapter(self.adapter)
        if self.own_cache:
            cache, start = self.cache, self.cache_len
            pending = tokens[start:L]
            ids = torch.cat([engine.ids(pending), block], dim=1) if pending else block
            mask = self._all_scope_mask(engine, start, len(pending), B)
        else:
            cache, start, ids = engine.cache, L, block
            mask = engine.zeros_mask(B, L + B)  # block queries see every cached key and their whole block
        logits = engine.forward(ids, start, cache, mask=mask, keep=B - 1, kind="draft")  # [B-1, V]
        _crop(cache, B)  # drafted keys never stay in a cache
        if self.own_cache:
            self.cache_len = L
        assert _cache_len(cache) == L, f"draft cache length {_cache_len(cache)} != committed {L}"
        logits = logits[:num]
        if temperature > 0:
            drafted, probs = _sample_rows(logits, temperature, generator)
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

    def start(self, engine: Engine | None, tokens: list[int]) -> None:
        self._index = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self._done = {n: 0 for n in self._index}

    def propose(
        self, engine: Engine | None, tokens: list[int], num: int, temperature: float = 0.0, generator=None
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


# --------------------------------------------------------------------------------------------------------------
# The verify loop
# --------------------------------------------------------------------------------------------------------------


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


def _accept_greedy(drafted: list[int], logits: torch.Tensor) -> tuple[int, int]:
    target = logits.argmax(dim=-1).tolist()  # [k+1]
    n = 0
    for d, g in zip(drafted, target):
        if d != g:
            break
        n += 1
    return n, target[n]


def _accept_sampling(
    drafted: list[int], probs_q: torch.Tensor | None, logits: torch.Tensor, temperature: float, generator
) -> tuple[int, int]:
    """Lossless rejection sampling (Leviathan et al. / Chen et al.) with ``q`` the drafter's distribution."""
    k = len(drafted)
    p = torch.softmax(logits.float() / temperature, dim=-1)  # [k+1, V]
    n = k
    if k:
        d = torch.tensor(drafted, device=p.device)
        rows = torch.arange(k, device=p.device)
        p_d = p[rows, d]
        q_d = probs_q[rows, d] if probs_q is not None else torch.ones_like(p_d)
        u = torch.rand(k, generator=generator, device=p.device if generator is None else generator.device)
        rejected = (u.to(p.device) * q_d >= p_d).nonzero()
        if rejected.numel():
            n = int(rejected[0, 0])
            if probs_q is not None:
                residual = (p[n] - probs_q[n]).clamp_min(0.0)
            else:  # q one-hot on d_n: max(0, p - q) is p without d_n
                residual = p[n].clone()
                residual[drafted[n]] = 0.0
            if float(residual.sum()) <= 0.0:  # p == q exactly: cannot reject in exact arithmetic
                residual = p[n]
            return n, int(torch.multinomial(residual, 1, generator=generator))
    return n, int(torch.multinomial(p[n], 1, generator=generator))


class _ARDrafter:
    name = "autoregressive"

    def start(self, engine, tokens) -> None:
        pass

    def propose(self, engine, tokens, num, temperature, generator) -> Draft:
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
    step_callback: Callable[[Engine, list[int], Drafter], None] | None = None,
) -> SpecResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1), drafting with ``drafter``.

    ``block_size`` is the draft block ``B`` (``B - 1`` drafted tokens per step; may be smaller than the trained
    block). Stops after the first EOS (kept in the output) or ``max_new_tokens``. ``step_callback(engine, tokens,
    drafter)`` runs after every step with ``tokens`` the committed sequence (``engine.cache`` holds ``tokens[:-1]``).
    The model's adapter switch is restored on return.
    """
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    tokens = [int(x) for x in prompt_ids]
    if not tokens:
        raise ValueError("speculative_generate: the prompt is empty")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = frozenset(int(e) for e in (eos_token_ids or ()))
    engine = Engine(model, len(tokens) + max_new_tokens, block_size)
    control = engine.control
    saved = (control.enabled, control.gate) if control is not None else None
    result = SpecResult()
    sample = temperature > 0
    if sample and generator is None:
        generator = torch.Generator(device=engine.device)
    cache = engine.cache
    try:
        t0 = time.perf_counter()
        if len(tokens) > 1:
            engine.set_adapter(False)
            engine.forward(engine.ids(tokens[:-1]), 0, cache, kind="prefill")
        L = len(tokens) - 1
        assert _cache_len(cache) == L
        drafter.start(engine, tokens)
        generated = 0
        while generated < max_new_tokens:
            remaining = max_new_tokens - generated
            num = min(block_size - 1, remaining - 1)  # never verify past max_new_tokens
            draft = drafter.propose(engine, tokens, num, temperature, generator)
            drafted = [int(x) for x in draft.tokens[:num]]
            k = len(drafted)
            engine.set_adapter(False)
            logits = engine.forward(engine.ids([tokens[-1], *drafted]), L, cache, kind="verify")  # [k+1, V]
            assert _cache_len(cache) == L + k + 1
            if sample:
                probs_q = draft.probs[:k] if draft.probs is not None else None
                n, bonus = _accept_sampling(drafted, probs_q, logits, temperature, generator)
            else:
                n, bonus = _accept_greedy(drafted, logits)
            _crop(cache, k - n)  # keep t, d_1 .. d_n; the bonus becomes the next t
            L += n + 1
            assert _cache_len(cache) == L, f"verifier cache length {_cache_len(cache)} != committed {L}"
            new = drafted[:n] + [bonus]
            hit = False
            for i, tok in enumerate(new):
                if tok in eos:
                    new, hit = new[: i + 1], True
                    break
            new = new[:remaining]
            result.step_starts.append(generated)
            result.committed_per_step.append(len(new))
            result.accepted_per_step.append(n)
            result.proposed_per_step.append(k)
            tokens.extend(new)
            generated += len(new)
            if step_callback is not None and not hit and len(new) == n + 1:
                step_callback(engine, tokens, drafter)
            if hit:
                result.hit_eos = True
                break
        result.wall_time = time.perf_counter() - t0
    finally:
        if control is not None:
            control.enabled, control.gate = saved
    result.output_ids = tokens[len(prompt_ids) :]
    result.draft_forwards = engine.counts["draft"] + engine.counts["draft_prefill"]
    result.verify_forwards = engine.counts["verify"]
    result.prefill_forwards = engine.counts["prefill"]
    return result


def autoregressive_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> SpecResult:
    """The AR baseline on the same engine: prefill, then one adapter-off forward per token."""
    return speculative_generate(
        model,
        prompt_ids,
        _ARDrafter(),
        block_size=1,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        temperature=temperature,
        generator=generator,
    )

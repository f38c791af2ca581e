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

import argparse
import contextlib
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from .settings import check_choices, setting

__all__ = [
    "Draft",
    "Drafter",
    "Engine",
    "LoRABlockDrafter",
    "NgramDrafter",
    "SpecResult",
    "StaticDecoding",
    "autoregressive_generate",
    "FusedConfig",
    "eos_ids_of",
    "fused_generate",
    "fused_step_layout",
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


class StaticDecoding:
    """A static KV cache, and optionally a ``torch.compile``-d decoder, shared by every generation of one evaluation.

    Compiled graphs need fixed shapes and fixed addresses: the cache is allocated once (``max_cache_len`` slots,
    reset between generations), every mask spans all slots, and each kind of forward is padded to one row count
    (:meth:`Engine.decode`), so each kind compiles once. Stale slots past the committed tokens are masked, so
    "cropping" is moving the cache's length back. Scope ``block`` only (scope ``all`` keeps a second cache).
    """

    def __init__(self, model: nn.Module, max_cache_len: int, compile: bool = False, mode: str | None = None) -> None:
        from transformers import StaticCache

        self.model = unwrap_model(model)
        self.max_cache_len = int(max_cache_len)
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_cache_len)
        decoder = self.model.get_decoder()
        # dynamic=False: one graph per padded row count; the adapter switch is read as a Python value, so each kind
        # of forward (AR, verify, draft, fused) keeps one (enabled, rows_from) pair and one graph
        if compile:
            import torch._dynamo.config as dynamo_config

            # four kinds of forward per block size: past dynamo's default of 8 graphs it would fall back to eager
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        self.decode = torch.compile(decoder, dynamic=False, mode=mode) if compile else decoder
        self.compiled = compile

    def fresh_cache(self):
        self.cache.reset()
        return self.cache


class Engine:
    """Runs forwards of one causal LM against a KV cache and counts them.

    Everything per-step is kept cheap (per-forward overhead dominates on CPU and on a GPU at batch 1): the adapter
    toggle is a flag (:class:`dflash_ds.lora.AdapterControl`), logits are computed only for the rows a step reads.
    The cache is a :class:`transformers.DynamicCache`, or with ``static`` the shared
    :class:`StaticDecoding` cache (and compiled decoder).
    """

    def __init__(self, model: nn.Module, max_len: int, block_size: int, static: StaticDecoding | None = None) -> None:
        self.model = unwrap_model(model)
        self.control = getattr(self.model, "dflash_adapter", None)
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        params = inspect.signature(self.decoder.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated, SPEC 11)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.block_size = block_size
        self.max_len = max_len
        self.static = static
        if static is not None and max_len + block_size * (block_size + 2) > static.max_cache_len:
            raise ValueError(f"the static cache holds {static.max_cache_len} tokens; this generation needs up to "
                             f"{max_len + block_size * (block_size + 2)} (prompt + new tokens + one fused step)")
        self.positions = torch.arange(max_len + 2 * block_size * (block_size + 2), device=self.device)[None]
        self.cache = static.fresh_cache() if static is not None else self.new_cache()
        self.counts = {"prefill": 0, "draft": 0, "draft_prefill": 0, "verify": 0}
        self.rows = 0  # query rows of every forward after the prefill (what the step pays for on a CPU)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def set_adapter(self, on: bool) -> None:
        """Adapter on for every token or off (exact base model). Set before every forward."""
        control = self.control
        if control is None:
            if on:
                raise ValueError("this drafter needs a dflash-ds LoRA adapter on the model (apply_lora / --adapter)")
            return
        control.set(on)

    def mask(self, start: int, pattern: torch.Tensor) -> torch.Tensor:
        """The additive mask ``[1, 1, q, cols]`` of ``q`` rows whose in-step visibility is ``pattern [q, q]``
        (additive) and who all see the ``start`` cached tokens; ``cols`` is ``start + q`` (dynamic cache) or every
        slot of the static cache (stale slots masked)."""
        q = pattern.shape[0]
        if self.static is None:
            mask = torch.zeros(1, 1, q, start + q, dtype=self.dtype, device=self.device)
        else:
            mask = torch.full((1, 1, q, self.static.max_cache_len), torch.finfo(self.dtype).min, dtype=self.dtype,
                              device=self.device)
            mask[..., :start] = 0
        mask[0, 0, :, start : start + q] = pattern
        return mask

    def causal(self, q: int) -> torch.Tensor:
        """The additive causal pattern ``[q, q]``."""
        return torch.full((q, q), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device).triu(1)

    def ids(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.device)

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache,
               pad_to: int | None = None) -> torch.Tensor:
        """Final hidden states ``[q, H]``; appends ``q`` rows to ``cache``. With a static cache and ``pad_to``, the
        forward runs on ``pad_to`` rows (padding rows see only themselves and are cropped off at once), so a
        compiled decoder sees one shape per kind of forward."""
        q = input_ids.shape[1]
        decode = self.decoder
        if self.static is not None:
            if mask is None:
                mask = self.mask(int(positions[0, 0]), self.causal(q))
            if pad_to is not None and q < pad_to:
                extra = pad_to - q
                L = int(cache.get_seq_length())
                input_ids = torch.cat([input_ids, input_ids.new_zeros(1, extra)], dim=1)
                positions = torch.cat([positions, positions[:, -1:].expand(1, extra)], dim=1)
                pad = torch.full((1, 1, extra, mask.shape[-1]), torch.finfo(self.dtype).min, dtype=self.dtype,
                                 device=self.device)
                slots = torch.arange(L + q, L + pad_to, device=self.device)
                pad[0, 0, torch.arange(extra, device=self.device), slots] = 0  # a padding row sees its own slot
                mask = torch.cat([mask, pad], dim=2)
            if pad_to is not None:
                decode = self.static.decode
                # a fresh [1, q] tensor with strides (q, 1): a slice's strides differ per engine (a new graph each)
                positions = positions.reshape(-1).clone().view(1, -1)
        out = decode(input_ids=input_ids, position_ids=positions, attention_mask=mask, use_cache=True,
                     **{self.cache_kw: cache})
        hidden = out.last_hidden_state[0]
        if hidden.shape[0] > q:
            cache.crop(-(hidden.shape[0] - q))
            hidden = hidden[:q]
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        start: int,
        cache,
        *,
        mask: torch.Tensor | None = None,
        keep: int = 0,
        kind: str = "verify",
    ) -> torch.Tensor | None:
        """Logits ``[q or keep, V]`` of ``input_ids [1, q]`` at positions ``start .. start+q-1``; appends to ``cache``.
        A prefill computes no logits (returns None).

        ``mask`` None: causal. Otherwise an additive mask from :meth:`mask` (or ``[1, 1, q, start+q]``).
        """
        q = input_ids.shape[1]
        positions = self.positions[:, start : start + q]
        pad_to = None if kind == "prefill" else (1 if q == 1 else self.block_size)
        hidden = self.decode(input_ids, positions, mask, cache, pad_to=pad_to)
        self.counts[kind] += 1
        if kind == "prefill":
            return None
        self.rows += q
        return self.lm_head(hidden[-keep:] if keep else hidden)

    def forward_hidden(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rows_from: int, kind: str,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[q, H]`` of ``input_ids [1, q]`` at ``positions [1, q]`` against ``self.cache``,
        the adapter on for rows ``rows_from ..`` only (the gate of scope ``block``); ``mask`` from :meth:`mask`."""
        control = self.control
        if control is not None:
            control.set(rows_from < (pad_to or input_ids.shape[1]), rows_from)
        hidden = self.decode(input_ids, positions, mask, self.cache, pad_to=pad_to)
        self.counts[kind] += 1
        self.rows += input_ids.shape[1]
        return hidden


def _cache_len(cache) -> int:
    return int(cache.get_seq_length())  # a 0-d tensor for a static cache


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
        self._all_visible: torch.Tensor | None = None

    def start(self, engine: Engine, tokens: list[int]) -> None:
        B = engine.block_size
        if self.own_cache and engine.static is not None:
            raise ValueError("a static (compiled) cache supports scope 'block' adapters only: scope 'all' drafts "
                             "from a second, adapter-on cache")
        self._block = torch.full((1, B), self.mask_token_id, dtype=torch.long, device=engine.device)
        self._all_visible = None
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
            if self._all_visible is None:
                self._all_visible = torch.zeros(B, B, dtype=engine.dtype, device=engine.device)
            mask = engine.mask(L, self._all_visible)  # block queries see every cached key and their whole block
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


def _prepare(model: nn.Module, prompt_ids, eos_token_ids, temperature: float, generator, caller: str):
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


def _preserved(engine: Engine):
    """The model's adapter switch is restored when a generation returns."""
    return engine.control.preserved() if engine.control is not None else contextlib.nullcontext()


def _prefill(engine: Engine, tokens: list[int]) -> int:
    """Adapter-off prefill of every committed token but the last; returns the cache length."""
    if len(tokens) > 1:
        engine.set_adapter(False)
        engine.forward(engine.ids(tokens[:-1]), 0, engine.cache, kind="prefill")
    L = len(tokens) - 1
    assert _cache_len(engine.cache) == L
    return L


def _finish(result: SpecResult, engine: Engine, tokens: list[int], prompt_len: int) -> SpecResult:
    result.output_ids = tokens[prompt_len:]
    result.draft_forwards = engine.counts["draft"] + engine.counts["draft_prefill"]
    result.verify_forwards = engine.counts["verify"]
    result.prefill_forwards = engine.counts["prefill"]
    result.rows = engine.rows
    return result


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
    static: StaticDecoding | None = None,
) -> SpecResult:
    """Generate up to ``max_new_tokens`` tokens after ``prompt_ids`` (batch 1), drafting with ``drafter``.

    ``block_size`` is the draft block ``B`` (``B - 1`` drafted tokens per step; may be smaller than the trained
    block). Stops after the first EOS (kept in the output) or ``max_new_tokens``. ``step_callback(engine, tokens,
    drafter)`` runs after every step with ``tokens`` the committed sequence (``engine.cache`` holds ``tokens[:-1]``).
    The model's adapter switch is restored on return.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tokens, eos, generator = _prepare(model, prompt_ids, eos_token_ids, temperature, generator, "speculative_generate")
    engine = Engine(model, len(tokens) + max_new_tokens, block_size, static=static)
    result = SpecResult()
    sample = temperature > 0
    cache = engine.cache
    with _preserved(engine):
        t0 = time.perf_counter()
        L = _prefill(engine, tokens)
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
            new, hit = result.commit(tokens, drafted, n, bonus, eos, max_new_tokens)
            generated += len(new)
            if step_callback is not None and not hit and len(new) == n + 1:
                step_callback(engine, tokens, drafter)
            if hit:
                result.hit_eos = True
                break
        result.wall_time = time.perf_counter() - t0
    return _finish(result, engine, tokens, len(tokens) - result.num_committed)


# --------------------------------------------------------------------------------------------------------------
# The fused loop: one forward verifies the last draft and drafts the next one (scope block)
# --------------------------------------------------------------------------------------------------------------

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
    from .blocks import visibility

    V, B = num_drafts + 1, block_size
    a = torch.tensor([list(anchors)], dtype=torch.long)
    visible = visibility(a, torch.ones_like(a, dtype=torch.bool), B, torch.ones(1, V, dtype=torch.bool))[0]
    offsets = torch.cat([torch.arange(V), *(torch.arange(i, i + B) for i in anchors)])
    return visible, offsets


def _choose_anchors(k: int, groups: int | None, outcome_counts: list[int],
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


class _FusedStep:
    """Builds and caches the per-step inputs of the fused forward (the in-step mask depends only on ``k`` and the
    anchors, so it is built once per distinct pair).

    The verify rows take ``verify_slots`` rows (``k + 1``, or ``B`` with a static cache: padding rows that see only
    themselves fill the rest), so the groups, where the adapter starts, always begin at the same row of a compiled
    graph. Returns ``(ids [1, R], positions [1, R], mask, first group row)``.
    """

    def __init__(self, engine: Engine, mask_token_id: int) -> None:
        self.engine = engine
        self.mask_token_id = mask_token_id
        self._layouts: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def _layout(self, k: int, anchors: tuple[int, ...]):
        engine, B = self.engine, self.engine.block_size
        visible, offsets = fused_step_layout(k, anchors, B)
        V = k + 1
        slots = max(V, B) if engine.static is not None else V
        R = slots + len(anchors) * B
        where = torch.cat([torch.arange(V), torch.arange(slots, R)])  # layout row -> row of the forward
        full = torch.zeros(R, R, dtype=torch.bool)
        full[where[:, None], where[None, :]] = visible
        full[torch.arange(V, slots), torch.arange(V, slots)] = True  # padding rows see only themselves
        rows = torch.full((R,), k, dtype=torch.long)
        rows[where] = offsets
        pattern = torch.zeros(R, R, dtype=engine.dtype)
        pattern.masked_fill_(~full, torch.finfo(engine.dtype).min)
        return pattern.to(engine.device), rows.to(engine.device), slots

    def inputs(self, L: int, t: int, drafted: list[int], anchors: tuple[int, ...]):
        engine, B = self.engine, self.engine.block_size
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
        return engine.ids(ids), (offsets + L)[None], engine.mask(L, pattern), slots


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
    step_callback: Callable[[Engine, list[int], list[int]], None] | None = None,
) -> SpecResult:
    """Speculative decoding with ONE forward per step (scope ``block`` adapters only).

    Each step runs ``[t, d_1 .. d_k | groups]`` in one forward (:func:`fused_step_layout`): the verify rows with the
    adapter off (gate 0: the exact target) and draft groups with the adapter on. The verify rows accept ``n``
    drafts and give the bonus ``b`` exactly as :func:`speculative_generate` does (greedy or lossless rejection
    sampling, ``q`` the group's distribution), so the output is the target's. The group anchored at ``d_n`` saw
    exactly the accepted text: its block positions ``2 .. B-1`` are the next step's drafts (position 1 guessed the
    bonus slot). Group keys never stay in the cache: it is cropped to the committed tokens after every forward.
    ``step_callback(engine, tokens, drafts)`` runs after every step (``engine.cache`` holds ``tokens[:-1]``).
    """
    cfg = config or FusedConfig()
    if block_size < 3:
        raise ValueError(f"the fused loop needs block_size >= 3 (a group drafts positions 2 .. B-1), got {block_size}")
    tokens, eos, generator = _prepare(model, prompt_ids, eos_token_ids, temperature, generator, "fused_generate")
    B = block_size
    engine = Engine(model, len(tokens) + max_new_tokens + B, B, static=static)
    if engine.control is None:
        raise ValueError("the fused loop needs a dflash-ds LoRA adapter on the model (apply_lora / --adapter)")
    result = SpecResult(loop="fused")
    sample = temperature > 0
    cache, lm_head = engine.cache, engine.lm_head
    step = _FusedStep(engine, mask_token_id)
    # a static cache pads every fused forward to its largest shape: B verify slots and one group per outcome
    pad_to = B + min(cfg.groups or B, B) * B if static is not None else None
    fresh = LoRABlockDrafter(mask_token_id, scope="block")
    outcome_counts = [0] * B
    drafted: list[int] = []
    probs_q: torch.Tensor | None = None
    confidence: list[float] | None = None
    with _preserved(engine):
        t0 = time.perf_counter()
        L = _prefill(engine, tokens)
        fresh.start(engine, tokens)
        generated = 0
        while generated < max_new_tokens:
            remaining = max_new_tokens - generated
            drafted = drafted[: remaining - 1]  # never verify past max_new_tokens
            confidence = confidence[: len(drafted)] if confidence is not None else None
            k = len(drafted)
            # groups are worth their rows only if the next step can still verify a drafted token
            anchors = _choose_anchors(k, cfg.groups, outcome_counts, confidence) if remaining >= 3 else ()
            ids, positions, mask, first_group = step.inputs(L, tokens[-1], drafted, anchors)
            hidden = engine.forward_hidden(ids, positions, mask, rows_from=first_group, kind="verify", pad_to=pad_to)
            logits = lm_head(hidden[: k + 1])  # [k+1, V]
            if sample:
                n, bonus = _accept_sampling(drafted, probs_q[:k] if probs_q is not None else None, logits,
                                            temperature, generator)
            else:
                n, bonus = _accept_greedy(drafted, logits)
            _crop(cache, ids.shape[1] - (n + 1))  # keep t, d_1 .. d_n; groups and rejected drafts go
            L += n + 1
            assert _cache_len(cache) == L, f"verifier cache length {_cache_len(cache)} != committed {L}"
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
                        d, probs_q = _sample_rows(group_logits[1:], temperature, generator)
                        drafted = d.tolist()
                    else:
                        drafted = group_logits[1:].argmax(dim=-1).tolist()
                    if cfg.groups is not None:  # the next step's anchors follow the drafter's confidence
                        q = probs_q if sample else torch.softmax(group_logits[1:].float(), dim=-1)
                        confidence = q.max(dim=-1).values.tolist()
            num = min(B - 1, max_new_tokens - generated - 1)
            if not drafted and anchors and num > 0:  # no usable group
                result.fallbacks += 1
                if cfg.fallback == "draft":
                    draft = fresh.propose(engine, tokens, num, temperature, generator)
                    drafted, probs_q = [int(x) for x in draft.tokens], draft.probs
            if step_callback is not None:
                step_callback(engine, tokens, drafted)
        result.wall_time = time.perf_counter() - t0
    return _finish(result, engine, tokens, len(tokens) - result.num_committed)


def autoregressive_generate(
    model: nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] | int | None = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    static: StaticDecoding | None = None,
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
        static=static,
    )

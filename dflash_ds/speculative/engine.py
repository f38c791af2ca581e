"""The decoding session: one model, one verifier KV cache (dynamic, or static and compiled), cheap counted forwards."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..families import check_decode_length
from .lockstep import Lockstep


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


class StaticDecoding:
    """A static KV cache, and optionally a ``torch.compile``-d decoder, shared by every generation of one evaluation.

    Compiled graphs need fixed shapes and fixed addresses: the cache is allocated once (``max_cache_len`` slots,
    reset between generations), every mask spans all slots, and each kind of forward is padded to one row count
    (:meth:`DecodeSession.decode`), so each kind compiles once. Stale slots past the committed tokens are masked, so
    "cropping" is moving the cache's length back. Scope ``block`` only (scope ``all`` keeps a second cache).
    """

    def __init__(self, model: nn.Module, max_cache_len: int, compile: bool = False, mode: str | None = None) -> None:
        from transformers import StaticCache

        self.model = unwrap_model(model)
        self.max_cache_len = int(max_cache_len)
        check_decode_length(self.model.config, self.max_cache_len, "the static cache")
        # the cache allocates on its first forward and keeps that device and dtype, and compiled graphs are
        # specialised to them: a model moved or cast after the first generation is refused (fresh_cache)
        self.placement: tuple[torch.device, torch.dtype] | None = None
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
        now = _placement(self.model)
        if self.placement is None:
            self.placement = now
        elif now != self.placement:
            raise RuntimeError(f"this StaticDecoding has decoded a model in {self.placement[1]} on "
                               f"{self.placement[0]}, the model is now {now[1]} on {now[0]}: build the static "
                               "cache (and compiled decoder) after moving the model")
        self.cache.reset()
        return self.cache


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model computes: its first parameter's device and dtype."""
    param = next(model.parameters())
    return param.device, param.dtype


class DecodeSession:
    """One generation's model, verifier KV cache and forward counts: runs forwards of one causal LM against the cache.

    Everything per-step is kept cheap (per-forward overhead dominates on CPU and on a GPU at batch 1): the adapter
    toggle is a flag (:class:`dflash_ds.lora.AdapterControl`), logits are computed only for the rows a step reads.
    The cache is a :class:`transformers.DynamicCache`, or with ``static`` the shared
    :class:`StaticDecoding` cache (and compiled decoder). Everything it derives from the model (device, dtype,
    masks, positions) is read when the session starts, so a session lives for one generation. With ``lockstep``,
    the loops take every decision through :meth:`agree` (rank 0 decides, the other ranks follow).
    """

    def __init__(self, model: nn.Module, max_len: int, block_size: int, static: StaticDecoding | None = None,
                 lockstep: Lockstep | None = None) -> None:
        self.model = unwrap_model(model)
        self.control = getattr(self.model, "dflash_adapter", None)
        self.decoder = self.model.get_decoder()
        self.lm_head = self.model.get_output_embeddings()
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        params = inspect.signature(self.decoder.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name is deprecated)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.block_size = block_size
        # rows of a greedy verify's first lm_head call (accept_greedy_lazy): on a CPU rows cost compute and most are
        # never read (bench/lazy_head.py: 0.85x at 0-1 accepted on SmolLM2); on a GPU at batch 1 rows are nearly free
        # and each further call is a launch and a host sync (not measured there): one call, every row, as before
        self.verify_first_rows = 2 if self.device.type == "cpu" else block_size
        self.max_len = max_len
        self.static = static
        if static is not None and max_len + block_size * (block_size + 2) > static.max_cache_len:
            raise ValueError(f"the static cache holds {static.max_cache_len} tokens; this generation needs up to "
                             f"{max_len + block_size * (block_size + 2)} (prompt + new tokens + one fused step)")
        check_decode_length(self.model.config, max_len + block_size * (block_size + 2), "this generation")
        self.lockstep = lockstep
        self.positions = torch.arange(max_len + 2 * block_size * (block_size + 2), device=self.device)[None]
        self.cache = static.fresh_cache() if static is not None else self.new_cache()
        self.counts = {"prefill": 0, "draft": 0, "draft_prefill": 0, "verify": 0}
        self._causal: dict[int, torch.Tensor] = {}
        self.rows = 0  # query rows of every forward after the prefill (what the step pays for on a CPU)

    def agree(self, values: Sequence[int]) -> list[int]:
        """Rank 0's decision on every rank in a lockstep decode (:class:`Lockstep`); ``values`` itself otherwise.
        Every decision a loop takes from logits goes through here: at most ``block_size + 1`` ints."""
        if self.lockstep is None:
            return list(values)
        return self.lockstep.agree(values, self.block_size + 1, self.device)

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
        """The additive causal pattern ``[q, q]`` (cached per ``q``: read, never written)."""
        pattern = self._causal.get(q)
        if pattern is None:
            pattern = torch.full((q, q), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device).triu(1)
            self._causal[q] = pattern
        return pattern

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
                # a fresh [1, q] tensor with strides (q, 1): a slice's strides differ per session (a new graph each)
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
        head: bool = True,
    ) -> torch.Tensor | None:
        """Logits ``[q or keep, V]`` of ``input_ids [1, q]`` at positions ``start .. start+q-1``; appends to ``cache``.
        A prefill computes no logits (returns None). ``head`` False: the final hidden states ``[q, H]`` instead (the
        caller runs :attr:`lm_head` on the rows it reads: :func:`accept_greedy_lazy`).

        ``mask`` None: causal. Otherwise an additive mask from :meth:`mask` (or ``[1, 1, q, start+q]``).
        """
        q = input_ids.shape[1]
        positions = self.positions[:, start : start + q]
        if mask is None and q > 1 and kind != "prefill":
            # a block's causal mask from the cached pattern: transformers would build one per call, 7-8% of a
            # verify forward of 8-16 rows of the tiny target on a CPU (docs/benchmarks.md). One row needs none, and
            # a prefill keeps transformers' causal path (no q x q mask, flash attention on a GPU).
            mask = self.mask(start, self.causal(q))
        pad_to = None if kind == "prefill" else (1 if q == 1 else self.block_size)
        hidden = self.decode(input_ids, positions, mask, cache, pad_to=pad_to)
        self.counts[kind] += 1
        if kind == "prefill":
            return None
        self.rows += q
        if not head:
            return hidden
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


def cache_len(cache) -> int:
    return int(cache.get_seq_length())  # a 0-d tensor for a static cache


def crop_cache(cache: DynamicCache, remove: int) -> None:
    # DynamicCache.crop takes minus the number of tokens to drop in transformers 5.24 (a positive length raises)
    if remove > 0:
        cache.crop(-remove)

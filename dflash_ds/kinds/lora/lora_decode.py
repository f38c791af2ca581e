"""How the LoRA kind drafts: :class:`LoRABlockDrafter`, one adapter-on forward of ``[t, MASK x (B-1)]`` drafts
``B - 1`` tokens (the engine's two-forward loop; the fused loop, :mod:`.fused`, drafts inside its verify forward),
and the untrained-adapter floor."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ...speculative.engine import DecodeSession, cache_len, crop_cache
from ...speculative.proposal import Draft, sample_rows

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


__all__ = ["LoRABlockDrafter", "untrained_floor_drafter"]

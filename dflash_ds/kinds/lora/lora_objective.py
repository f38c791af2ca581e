"""The LoRA kind's training objective: the target's forward over ``[clean | blocks]`` and the fused loss.

:class:`LoRADraftObjective` wraps a causal LM that :func:`dflash_ds.lora.apply_lora` has fitted with an adapter. It is
the module DeepSpeed wraps. Two ways to run the clean tokens, the same numbers (tested):

* ``joint``: one forward over the concatenation under the block mask;
* ``cached`` (scope ``block``): the clean tokens first, without autograd and with the adapter off, into a KV cache;
  then the block rows alone against that cache, as the decoder's draft forward does. The clean stream is the
  frozen target whatever the adapter holds, so nothing the loss needs flows back through it, and the joint
  forward's backward over the clean rows (about half of a step's rows) is skipped.

The loss runs inside the shared :class:`~dflash_ds.objective.LMHeadLoss` submodule (ZeRO-3 gathers ``lm_head`` for
that call: :func:`~dflash_ds.objective.register_lm_head`); this file stays plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from transformers import DynamicCache

from ...blocks import IGNORE_INDEX, BlockLayout, build_attention_mask, build_flex_block_mask, build_split_attention_masks
from ...families import cache_kwarg, decoder
from ...lora import adapter_control
from ...loss import LossConfig
from ...objective import LMHeadLoss, ObjectiveOutput, block_metrics, gather_rows


CLEAN_PASSES = ("auto", "cached", "joint")


def resolve_clean_pass(clean_pass: str, scope: str, attn_implementation: str | None = None) -> str:
    """``auto`` (the choices: :data:`CLEAN_PASSES`) -> ``cached`` for scope ``block`` with SDPA or
    eager attention; ``joint`` for scope ``all`` (whose clean rows carry the adapter, so the loss needs their
    backward) and for FlexAttention (the cached pass is untested there: the CPU's compiled FlexAttention fails on
    the split masks, so no test here can check it)."""
    if clean_pass not in CLEAN_PASSES:
        raise ValueError(f"--clean-pass must be auto, cached or joint, got {clean_pass!r}")
    flex = attn_implementation == "flex_attention"
    if clean_pass == "auto":
        return "cached" if scope == "block" and not flex else "joint"
    if clean_pass == "cached" and scope != "block":
        raise ValueError("--clean-pass cached needs --lora-scope block (scope all runs the adapter on the clean "
                         "tokens, so their backward is part of the gradient); use --clean-pass joint")
    if clean_pass == "cached" and flex:
        raise ValueError("--clean-pass cached is not supported with --attn-implementation flex_attention; use "
                         "--clean-pass joint (or auto)")
    return clean_pass


class PrefixCache(DynamicCache):
    """A KV cache written by one forward (the clean tokens) and then only read: once ``frozen``, ``update`` returns
    the cached keys/values with the new rows appended and stores nothing. A gradient-checkpointing replay of a layer
    therefore reads exactly what the first pass read, and the decoder layers may keep it under checkpointing.
    ``reads`` records which layers read it once frozen: a layer that did not was handed no cache."""

    frozen = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: set[int] = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.frozen:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.reads.add(layer_idx)
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


class LoRADraftObjective(nn.Module):
    """The training objective as the module DeepSpeed wraps: the target with its adapter, its forward over
    ``[clean | blocks]`` (``clean_pass``: see the module docstring) and the fused loss.
    ``forward(input_ids [b, S], attention_mask [b, S], layout)`` returns an :class:`ObjectiveOutput`."""

    drafter_kind = "lora"  # dflash_ds.kinds: how checkpoints gather and export what this objective trains

    def __init__(
        self,
        model: nn.Module,
        loss_config: LossConfig,
        scope: str,
        clean_pass: str = "auto",
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_config = loss_config
        self.scope = scope
        self.clean_pass = resolve_clean_pass(clean_pass, scope, getattr(model.config, "_attn_implementation", None))
        self.loss_head = LMHeadLoss(loss_config)
        self._cache_kw = cache_kwarg(decoder(model))  # "cache" or "past_key_values", by transformers version
        if self.clean_pass == "cached":
            # transformers drops a layer's cache under gradient checkpointing unless the layer only reads it;
            # the block forward's PrefixCache is frozen, so it does
            for layer in decoder(model).layers:
                layer._can_checkpoint_with_cache = True

    def _check_blocks_read_the_cache(self, cache: "PrefixCache") -> None:
        """Every decoder layer of the block forward must have read the clean tokens' cache. Transformers decides
        that under gradient checkpointing through a private class attribute (``_can_checkpoint_with_cache``, set
        above); a release that renames or ignores it would hand the layers no cache, and the blocks would train
        without their context, silently. This makes that loud, whatever the transformers version."""
        layers = len(decoder(self.model).layers)
        if len(cache.reads) != layers:
            import transformers

            missed = sorted(set(range(layers)) - cache.reads)
            raise RuntimeError(
                f"the block forward's decoder layers {missed} did not read the clean tokens' KV cache (transformers "
                f"{transformers.__version__} dropped it, likely under gradient checkpointing): the blocks would "
                "train without their context. Use --clean-pass joint, or a transformers version this project "
                "tests (setup.py)"
            )

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """Final hidden states ``[b, S+N*B, H]``: the clean tokens, then every block (each block sees the clean
        tokens before its anchor and itself)."""
        dtype = next(self.model.parameters()).dtype
        if self.clean_pass == "cached":
            return self._cached_hidden_states(input_ids, attention_mask, layout, dtype)
        S = input_ids.shape[1]
        full_ids = torch.cat([input_ids, layout.block_input_ids], dim=1)
        if getattr(self.model.config, "_attn_implementation", None) == "flex_attention":
            mask = build_flex_block_mask(layout, attention_mask)
        else:
            mask = build_attention_mask(layout, attention_mask, dtype)
        # Left set on purpose (not a context manager): non-reentrant gradient checkpointing re-runs this forward
        # during backward and must see the same gate. Every forward that uses the model sets it again.
        # Scope block: the adapter runs on the block rows (after the S clean ones) only.
        adapter_control(self.model).set(True, rows_from=S if self.scope == "block" else 0)
        out = decoder(self.model)(input_ids=full_ids, attention_mask=mask, position_ids=layout.position_ids)
        return out.last_hidden_state

    def _cached_hidden_states(self, input_ids, attention_mask, layout, dtype) -> torch.Tensor:
        S = input_ids.shape[1]
        stack = decoder(self.model)
        clean_mask, block_mask = build_split_attention_masks(layout, attention_mask, dtype)
        control = adapter_control(self.model)
        cache = PrefixCache()
        with torch.no_grad(), control.disabled():
            clean = stack(input_ids=input_ids, attention_mask=clean_mask, position_ids=layout.position_ids[:, :S],
                          use_cache=True, **{self._cache_kw: cache}).last_hidden_state
        cache.frozen = True
        # Left set on purpose, as in the joint forward: a checkpointing replay must see the same gate.
        control.set(True, rows_from=0)
        try:
            blocks = stack(input_ids=layout.block_input_ids, attention_mask=block_mask,
                           position_ids=layout.position_ids[:, S:], use_cache=False,
                           **{self._cache_kw: cache}).last_hidden_state
        except RuntimeError:
            self._check_blocks_read_the_cache(cache)  # SDPA fails on the mask's clean columns: say why
            raise
        self._check_blocks_read_the_cache(cache)  # eager attention slices the mask and runs on: say so
        return torch.cat([clean, blocks], dim=1)

    def teacher_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Clean-stream hidden states ``[b, S, H]`` of the base model (adapter off), detached."""
        S = input_ids.shape[1]
        if self.scope == "block":
            return hidden[:, :S].detach()  # the adapter is off there (gated, or a no-grad pass): the base model
        control = adapter_control(self.model)
        with torch.no_grad(), control.disabled():
            return decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout,
                examples=None) -> ObjectiveOutput:
        """``examples`` (the rows' dataset indices, for a kind that reads stored features) is not used here."""
        S = input_ids.shape[1]
        hidden = self.hidden_states(input_ids, attention_mask, layout)
        supervised = layout.labels != IGNORE_INDEX  # [b, N*B]
        student = hidden[:, S:][supervised]  # [n, H]
        teacher = None
        if self.loss_config.kl_weight > 0:
            clean = self.teacher_hidden(input_ids, attention_mask, hidden)
            teacher = gather_rows(clean, layout.teacher_positions)[supervised]
        lm_head = self.model.get_output_embeddings()
        out = self.loss_head.loss(student, lm_head.weight, layout.labels[supervised], layout.weights[supervised],
                                  teacher)
        return block_metrics(out, supervised, layout)


__all__ = ["CLEAN_PASSES", "LoRADraftObjective", "PrefixCache", "resolve_clean_pass"]

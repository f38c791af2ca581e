"""What dflash-ds needs to know about each target model family, in one place.

Every supported family is a decoder-only causal LM with the Llama layer layout: ``CausalLM.model`` is the decoder
stack (it returns ``last_hidden_state``; ``lm_head`` is applied by the fused loss), attention has separate
``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the MLP ``gate_proj``/``up_proj``/``down_proj``. Attention reshapes
with ``view(..., -1, head_dim)``, so a tensor-parallel shard that holds whole heads needs no config change.

What differs between them, and where it matters:

* Qwen3: ``q_norm``/``k_norm`` over ``head_dim`` (per head, so whole-head TP shards keep them exact); separate
  ``lm_head`` on the large models, tied on the small ones.
* Llama (Llama 2/3, SmolLM2): optional ``attention_bias``/``mlp_bias``; SmolLM2 ties ``lm_head`` to the embedding.
* Qwen2: biases on ``q/k/v`` (a column-parallel shard slices its bias with its rows); sliding-window layers only
  when ``layer_types`` names them.
* Mistral: ``sliding_window`` (v0.1: 4096, later versions: none).

The sliding window matters because the training forward passes its own 4D mask (clean tokens causal, blocks
bidirectional inside a block): the window is not applied there, so a sequence longer than the window would train the
drafter against a different model than the one that decodes. :func:`check_max_length` refuses that. Decoding is the
same story (its cache keeps every key, its draft/verify/fused masks have no window, and transformers' sliding cache
layers cannot be cropped back once they drop keys): :func:`check_decode_length` refuses a decode that could reach
the window, so what dflash-ds decodes is exactly the model's output.

Fused-projection families (Phi-3's ``qkv_proj``/``gate_up_proj``), MoE MLPs and Gemma's scaled embeddings are not
covered: :func:`family_of` names the supported ``model_type`` values instead of failing later.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

#: The default LoRA targets (every attention and MLP projection) and the order adapter files list them in.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelFamily:
    """The per-family facts the trainer, the LoRA and the decoder read.

    ``column_parallel``: projections split by output rows under TP (heads / intermediate channels), input replicated.
    ``row_parallel``: projections split by input columns, output all-reduced (one all-reduce per attention / MLP).
    ``tp_divides``: config attributes the TP size must divide (the base weights are split along them).
    ``decoder_attr``: attribute of the ``*ForCausalLM`` holding the decoder stack.
    ``stack_groups``: projections that read the same input, which decoding stacks into one product
    (:func:`dflash_ds.lora.stack_projections`).
    ``sliding_window``: whether ``config.sliding_window`` is in force for this family (see :func:`sliding_window`).
    """

    name: str
    model_types: tuple[str, ...]
    decoder_attr: str = "model"
    column_parallel: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    row_parallel: tuple[str, ...] = ("o_proj", "down_proj")
    tp_divides: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    stack_groups: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    sliding_window: str = "none"  # "none" | "always" (Mistral: when set) | "layer_types" (Qwen2: per layer)

    def parallel_kind(self, projection: str) -> str | None:
        """``"column"``, ``"row"`` or None (not split) for a projection's short name."""
        if projection in self.column_parallel:
            return "column"
        if projection in self.row_parallel:
            return "row"
        return None


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily("qwen3", ("qwen3",)),
    ModelFamily("llama", ("llama",)),
    ModelFamily("qwen2", ("qwen2",), sliding_window="layer_types"),
    ModelFamily("mistral", ("mistral",), sliding_window="always"),
)


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_of(config_or_model) -> ModelFamily:
    """The family of a model or its config (by ``config.model_type``); a clear error for anything else."""
    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"unsupported target model_type {model_type!r}: dflash-ds supports {supported_model_types()} "
        "(decoder-only models with separate q/k/v/o and gate/up/down projections; see dflash_ds/families.py)"
    )


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a ``*ForCausalLM`` (returns ``last_hidden_state``; no ``lm_head``)."""
    return getattr(model, family_of(model).decoder_attr)


def cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes a KV cache: ``cache`` in transformers 5.24 (``past_key_values`` is the
    deprecated name), ``past_key_values`` in older releases."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def check_tp_compatible(config, tp_size: int) -> None:
    """Fail fast, naming the setting, when the model cannot be split ``tp_size`` ways."""
    if tp_size <= 1:
        return
    family = family_of(config)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if tp_size > kv_heads:
        raise ValueError(
            f"tensor_parallel.autotp_size={tp_size} exceeds the model's key-value head count ({kv_heads})"
        )
    for attr in family.tp_divides:
        value = getattr(config, attr, None)
        if attr == "num_key_value_heads" and value is None:
            value = config.num_attention_heads  # no GQA: as many key-value heads as query heads
        if value % tp_size:
            raise ValueError(
                f"autotp_size={tp_size} must divide the model's {attr}={value} (the base weights are split along it)"
            )


def sliding_window(config) -> int | None:
    """The attention window the base model applies (None: full causal attention)."""
    family = family_of(config)
    window = getattr(config, "sliding_window", None)
    if family.sliding_window == "always":
        return window
    if family.sliding_window == "layer_types" and "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return window
    return None


def check_max_length(config, max_length: int) -> None:
    """Refuse sequences the training mask would treat differently from the base model (sliding window)."""
    window = sliding_window(config)
    if window is not None and max_length > window:
        raise ValueError(
            f"--max-length {max_length} exceeds the model's sliding_window={window}: the training forward uses its "
            "own attention mask (no window), so longer sequences would train against a different model; "
            f"use --max-length <= {window}"
        )


def _any_sliding_window(config) -> int | None:
    """:func:`sliding_window`, and for a model outside :data:`FAMILIES` (the decoder itself is family-agnostic) the
    transformers convention: ``sliding_window`` where ``layer_types`` names sliding layers, or where there are none."""
    try:
        return sliding_window(config)
    except ValueError:
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        return window if layer_types is None or "sliding_attention" in layer_types else None


def check_decode_length(config, slots: int, what: str) -> None:
    """Refuse a decode that a sliding-window model would attend differently (:func:`sliding_window`).

    The decoder keeps every key in its cache and passes its own masks (draft blocks, verify rows, fused groups), with
    no window, and transformers' sliding-window cache layers drop keys past the window (a dropped key cannot be
    cropped back). Both agree with the model while the cache never holds ``window`` slots: every query then sees
    every earlier key under the window too. ``slots``: the most cache slots this decode can fill (``what`` names it).
    """
    window = _any_sliding_window(config)
    if window is not None and slots >= window:
        raise ValueError(
            f"{what} needs up to {slots} KV-cache slots, but this model attends within sliding_window={window}: "
            "dflash-ds's decoder keeps a full cache with its own attention masks, so past the window its output "
            f"would not be the model's. Keep the longest prompt + --max-new-tokens + 2*B*(B+2) below {window} "
            "(shorter prompts, fewer new tokens, a smaller --block-size), or use a model without a sliding window "
            "(Mistral v0.2 and later, Qwen2 with use_sliding_window false)")

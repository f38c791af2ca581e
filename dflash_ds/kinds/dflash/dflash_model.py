"""The standalone DFlash draft model (the published design): its config, its context cache and its initialisation
from the target. Its export format is :mod:`.dflash_artifact`.

A few decoder layers that draft a block of ``B`` tokens in one forward, reading the frozen target's hidden states:

* **Context.** The outputs of the target's decoder layers ``target_layer_ids`` (HF ``hidden_states[id + 1]``),
  concatenated (``K*H``), then ``fc`` (Linear ``K*H -> H``, no bias) and the RMSNorm ``hidden_norm``:
  :meth:`DFlashDraftModel.project_context`. The same projected context feeds every draft layer.
* **Draft layer** = a Qwen3 decoder layer (pre-norm, per-head ``q_norm``/``k_norm``, SwiGLU MLP) whose queries come
  from the block rows only and whose keys/values are ``cat(k/v_proj(context), k/v_proj(block))``: the context is
  projected by the same ``k_proj``/``v_proj`` *without* the layer's ``input_layernorm`` (it is already normalised by
  ``hidden_norm``), ``k_norm`` applies to every key, RoPE runs over context and block positions. The context never
  enters the residual stream. A final ``norm``; the target's embedding and lm_head (frozen, shared, not saved).
* **Block.** Position 0 = the anchor (the last committed token), 1..B-1 = MASK; row ``k`` predicts
  ``token[anchor + k]`` (same-position labels). Training: a block sees context rows ``< anchor`` (strictly) and its
  own block bidirectionally, never another block (:func:`dflash_ds.blocks.block_rows_visibility`). Inference: the committed
  context (cached per layer in :class:`DFlashContextCache`) and the block, no mask.

The layers are always Qwen3-shaped, also for a Llama target (dims, RoPE and biases from the target; fresh
``q_norm``/``k_norm``): that is the published format. z-lab ``dflash/model.py`` and SpecForge
``specforge/modeling/draft/dflash.py`` build ``DFlashDraftModel`` from Qwen3 modules, and the serving loaders (SGLang
``srt/models/dflash.py``, vLLM ``qwen3_dflash.py``, registered for architecture ``DFlashDraftModel``) always create
``q_norm``/``k_norm`` and bias-free SwiGLU MLPs, so a Llama-style layer without them could not be served.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from ...blocks import additive_mask
from ...families import decoder

ARCHITECTURE = "DFlashDraftModel"
SUPPORTED_TARGETS = ("qwen3", "llama")


# ---------------------------------------------------------------------------------------------------------------
# configuration


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference rule (z-lab ``build_target_layer_ids``, SGLang ``dflash_utils.build_target_layer_ids``): one
    draft layer -> ``[N // 2]``; else ``round(1 + i*(N-4)/(L-1))`` for ``i < L`` (Python's ``round``, as there):
    Qwen3-8B (N=36, L=5) -> [1, 9, 17, 25, 33]. The number of features equals the number of draft layers."""
    N, L = int(num_target_layers), int(num_draft_layers)
    if N < 1 or L < 1:
        raise ValueError(f"need num_target_layers >= 1 and num_draft_layers >= 1, got {N}, {L}")
    if L == 1:  # N // 2 is the last layer only for N = 2, whose last feature is excluded (below): then layer 0
        return [min(N // 2, max(N - 2, 0))]
    if N < 4:
        raise ValueError(f"the default target_layer_ids rule needs a target of >= 4 layers (got {N}); pass the ids")
    return [int(round(1 + i * (N - 4) / (L - 1))) for i in range(L)]


def _check_layer_ids(ids: Sequence[int], num_target_layers: int) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("target_layer_ids must not be empty")
    # The last layer is excluded: HF returns hidden_states[N] after the final norm, the serving engines capture the
    # residual stream before it, so a feature of layer N-1 would differ between training and serving.
    bad = [i for i in ids if not 0 <= i < num_target_layers - 1]
    if bad:
        raise ValueError(f"target_layer_ids {bad} out of range: each must be in [0, {num_target_layers - 2}] for a "
                         f"{num_target_layers}-layer target (the last layer's HF feature is post-norm)")
    return ids


def target_layer_ids_of(dflash_config: dict | None, num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The ids a config's ``dflash_config`` names; an export without them (older z-lab configs) reads the default
    rule's (:func:`default_target_layer_ids`)."""
    ids = (dflash_config or {}).get("target_layer_ids")
    return [int(i) for i in ids] if ids is not None else default_target_layer_ids(num_target_layers, num_draft_layers)


def last_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The target layers a ``--draft-init target`` drafter copies: its last ``L``, in order (they feed the lm_head
    the drafter's output goes through)."""
    N, L = int(num_target_layers), int(num_draft_layers)
    if L > N:
        raise ValueError(f"--draft-init target copies the target's last --draft-layers layers: {L} > the target's "
                         f"{N}; use fewer layers or --draft-init random")
    return list(range(N - L, N))


def check_pairing(target_config, num_target_layers: int, hidden_size: int, vocab_size: int | None = None) -> None:
    """ValueError unless a drafter built for a target of that depth, width (and vocabulary) can read
    ``target_config``'s: the one pairing rule of training, export and loading."""
    for key, ours in (("num_hidden_layers", num_target_layers), ("hidden_size", hidden_size),
                      ("vocab_size", vocab_size)):
        if ours is not None and int(getattr(target_config, key)) != int(ours):
            raise ValueError(f"draft/target mismatch: target {key}={getattr(target_config, key)}, drafter expects "
                             f"{ours}")


def make_draft_config(target_config, num_hidden_layers: int = 1, target_layer_ids: Sequence[int] | None = None,
                      block_size: int = 16, mask_token_id: int | None = None, draft_vocab_size: int | None = None):
    """The draft's config (a ``Qwen3Config`` carrying the DFlash keys) from the target's config.

    Dims (hidden, intermediate, heads, kv heads, head_dim, eps, RoPE, vocab, attention bias) are the target's;
    ``num_hidden_layers`` draft layers; ``num_target_layers`` = the target's depth; ``block_size``;
    ``dflash_config = {mask_token_id, target_layer_ids}`` (default ids: :func:`default_target_layer_ids`);
    ``draft_vocab_size`` (when the drafter drafts over a draft vocabulary, :mod:`.draft_vocab`: its own lm_head)."""
    model_type = getattr(target_config, "model_type", None)
    if model_type not in SUPPORTED_TARGETS:
        raise ValueError(f"the standalone DFlash drafter supports targets {SUPPORTED_TARGETS}, got {model_type!r}")
    if getattr(target_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"the published DFlash format has SwiGLU (silu) MLPs; the target uses "
                         f"{target_config.hidden_act}")
    if getattr(target_config, "mlp_bias", False):
        raise ValueError("the published DFlash format has no MLP biases; this target has mlp_bias=True")
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    if mask_token_id is not None and (isinstance(mask_token_id, bool) or int(mask_token_id) < 0):
        raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
    N = int(target_config.num_hidden_layers)
    ids = _check_layer_ids(
        target_layer_ids if target_layer_ids is not None else default_target_layer_ids(N, num_hidden_layers), N)
    V = int(target_config.vocab_size)
    if draft_vocab_size is not None and not 1 <= int(draft_vocab_size) < V:
        raise ValueError(f"--draft-vocab must be in [1, {V}) (fewer than the target's {V} tokens), got "
                         f"{draft_vocab_size}")
    extra = {} if draft_vocab_size is None else {"draft_vocab_size": int(draft_vocab_size)}
    heads = int(target_config.num_attention_heads)
    rope = getattr(target_config, "rope_parameters", None)
    if rope is None:  # an older config object: rope_theta + rope_scaling
        rope = dict(getattr(target_config, "rope_scaling", None) or {"rope_type": "default"})
        rope["rope_theta"] = getattr(target_config, "rope_theta", 10000.0)
    return Qwen3Config(
        architectures=[ARCHITECTURE],
        vocab_size=int(target_config.vocab_size),
        hidden_size=int(target_config.hidden_size),
        intermediate_size=int(target_config.intermediate_size),
        num_hidden_layers=int(num_hidden_layers),
        num_attention_heads=heads,
        num_key_value_heads=int(getattr(target_config, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(target_config, "head_dim", None) or target_config.hidden_size // heads),
        hidden_act="silu",
        max_position_embeddings=int(target_config.max_position_embeddings),
        initializer_range=float(getattr(target_config, "initializer_range", 0.02)),
        rms_norm_eps=float(target_config.rms_norm_eps),
        rope_parameters=dict(rope),
        attention_bias=bool(getattr(target_config, "attention_bias", False)),
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=int(num_hidden_layers),
        layer_types=["full_attention"] * int(num_hidden_layers),
        tie_word_embeddings=False,
        bos_token_id=getattr(target_config, "bos_token_id", None),
        eos_token_id=getattr(target_config, "eos_token_id", None),
        block_size=int(block_size),
        num_target_layers=N,
        dflash_config={"mask_token_id": None if mask_token_id is None else int(mask_token_id),
                       "target_layer_ids": ids},
        **extra,
    )


# ---------------------------------------------------------------------------------------------------------------
# masks and the context cache


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[b, M, keys]`` or ``[b, 1, M, keys]``, bool (True = visible) or additive -> additive ``[b, 1, M, keys]``."""
    if mask.dim() == 4:
        mask = mask[:, 0]
    return additive_mask(mask, dtype) if mask.dtype == torch.bool else mask[:, None].to(dtype)


class DFlashContextCache:
    """Keys/values of the committed context rows, one ``[b, kv_heads, T, head_dim]`` pair per draft layer (after
    ``k_norm`` and RoPE). Block rows are never stored. All rows of the batch share one length ``T``."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v



# ---------------------------------------------------------------------------------------------------------------
# the model


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[b, h, L, d]``, cos/sin ``[b, L, d]`` (HF's half-split rotation, as Qwen3/Llama)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, L, _ = x.shape
    return x.view(b, L, -1, head_dim)


def draft_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    repeat_kv: bool | None = None) -> torch.Tensor:
    """SDPA over ``q [b, h, M, d]``, ``k``/``v`` ``[b, h_kv, T, d]``. With a mask (training) on a GPU the K/V heads
    are repeated to the query heads: there SDPA's memory-efficient kernel takes a mask but not ``enable_gqa``, and
    the math kernel it would fall back to holds the ``[b, h, M, T]`` fp32 scores (Qwen3-8B, 2,048 block rows over
    4,096 keys: 1 GiB per layer and sample). The CPU's kernel takes both: repeating there cost 0.41 GiB against
    0.20 (``bench/dflash_attention.py``), so GQA stays as it is, as it does without a mask (decoding).
    ``repeat_kv`` overrides that choice (tests run the GPU's path on the CPU)."""
    if repeat_kv is None:
        repeat_kv = mask is not None and q.is_cuda
    if q.shape[1] != k.shape[1]:
        if not repeat_kv:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class DraftHead(nn.Module):
    """The drafter's own lm_head over its draft vocabulary (:mod:`.draft_vocab`): ``weight [N, H]``, initialised
    from the target's rows. Trained, it is a parameter; frozen, a buffer, so it stays out of the optimizer and of
    ZeRO-3's partitioning (every rank holds it, as it holds the drafter's ``d2t``)."""

    def __init__(self, num_tokens: int, hidden_size: int, trainable: bool = False) -> None:
        super().__init__()
        weight = torch.zeros(num_tokens, hidden_size)
        if trainable:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class DFlashDraftModel(nn.Module):
    """The draft layers, ``fc``, ``hidden_norm`` and ``norm``; no embedding and no lm_head (the target's), unless the
    config names a ``draft_vocab_size``: then ``lm_head`` (a :class:`DraftHead`, ``train_head``: a parameter) and
    ``d2t [N]`` (target id = draft id + ``d2t[draft id]``), the names vLLM's DFlash loader reads.

    State dict keys (the published names): ``layers.{i}.self_attn.{q,k,v,o}_proj.weight`` (+ ``.bias`` when
    ``attention_bias``), ``layers.{i}.self_attn.{q,k}_norm.weight``, ``layers.{i}.mlp.{gate,up,down}_proj.weight``,
    ``layers.{i}.{input,post_attention}_layernorm.weight``, ``fc.weight`` ``[H, K*H]``, ``hidden_norm.weight``,
    ``norm.weight``. Each layer is a transformers ``Qwen3DecoderLayer`` (its submodules; the forward is here)."""

    def __init__(self, config, train_head: bool = False) -> None:
        super().__init__()
        self.config = config
        self.target_layer_ids = target_layer_ids_of(config.dflash_config, config.num_target_layers,
                                                    config.num_hidden_layers)
        self.mask_token_id = config.dflash_config.get("mask_token_id")
        self.block_size = int(config.block_size)
        self.num_target_layers = int(config.num_target_layers)
        H = config.hidden_size
        self.head_dim = config.head_dim
        self.layers = nn.ModuleList(Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.fc = nn.Linear(len(self.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)  # inv_freq is a non-persistent buffer: not in the state dict
        self.gradient_checkpointing = False
        self.reset_parameters()
        N = getattr(config, "draft_vocab_size", None)
        self.draft_vocab_size = None if N is None or int(N) == int(config.vocab_size) else int(N)
        if self.draft_vocab_size is not None:
            self.lm_head = DraftHead(self.draft_vocab_size, H, trainable=train_head)
            self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.long))

    @property
    def has_own_lm_head(self) -> bool:
        return self.draft_vocab_size is not None

    def draft_ids_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Target ids of draft ids (the identity without a draft vocabulary)."""
        return draft_ids + self.d2t[draft_ids] if self.has_own_lm_head else draft_ids

    def vocab_ids(self) -> torch.Tensor:
        """``[N]`` long: the target id of every draft id (ascending). Only with a draft vocabulary."""
        return self.d2t + torch.arange(self.d2t.numel(), device=self.d2t.device)

    def reset_parameters(self) -> None:
        """Random init as the references' ``post_init``: Linear weights ~ N(0, initializer_range), biases 0,
        RMSNorm weights 1."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, self.config.initializer_range)
                    if m.bias is not None:
                        m.bias.zero_()
                elif hasattr(m, "variance_epsilon"):
                    m.weight.fill_(1.0)

    def _apply(self, fn, recurse: bool = True):
        """``.to(dtype)`` and friends leave RoPE's ``inv_freq`` in fp32, as the target and the serving engines keep
        it: in bf16 its phases drift by 0.12 rad between tokens 100 apart, 1.16 at 1,000 and 4.6 at 4,000 (head_dim
        128, theta 1e6), so a bf16 drafter would see positions the target never wrote."""
        inv_freq = self.rotary_emb.inv_freq
        super()._apply(fn, recurse)
        moved = self.rotary_emb.inv_freq
        if moved.dtype != inv_freq.dtype:
            self.rotary_emb.inv_freq = inv_freq.to(device=moved.device)
        return self

    def gradient_checkpointing_enable(self, enable: bool = True) -> None:
        self.gradient_checkpointing = enable

    # -- context ---------------------------------------------------------------------------------------------------

    def context_features(self, hidden_states) -> torch.Tensor:
        """``[b, T, K*H]`` from one of: that tensor itself; a sequence of the ``K`` per-layer features
        ``[b, T, H]`` (in ``target_layer_ids`` order, e.g. from :class:`~.feature_tap.FeatureTap`); or the target's HF
        ``hidden_states`` tuple (``num_target_layers + 1`` entries; layer ``id`` is entry ``id + 1``)."""
        if isinstance(hidden_states, torch.Tensor):
            return hidden_states
        hidden_states = list(hidden_states)
        if len(hidden_states) == self.num_target_layers + 1:
            hidden_states = [hidden_states[i + 1] for i in self.target_layer_ids]
        elif len(hidden_states) != len(self.target_layer_ids):
            raise ValueError(f"expected {len(self.target_layer_ids)} features or the target's "
                             f"{self.num_target_layers + 1} hidden states, got {len(hidden_states)} tensors")
        return torch.cat(hidden_states, dim=-1)

    def project_context(self, hidden_states) -> torch.Tensor:
        """Target features (see :meth:`context_features`) -> projected context ``[b, T, H]`` =
        ``hidden_norm(fc(cat(features)))``."""
        feats = self.context_features(hidden_states)
        return self.hidden_norm(self.fc(feats.to(self.fc.weight.dtype)))

    # -- forward ---------------------------------------------------------------------------------------------------

    def _layer(self, i: int, h: torch.Tensor, ctx: torch.Tensor | None, cos_sin, mask, cache):
        layer = self.layers[i]
        attn, d = layer.self_attn, self.head_dim
        cos_c, sin_c, cos_b, sin_b = cos_sin
        x = layer.input_layernorm(h)
        q = _rope(attn.q_norm(_heads(attn.q_proj(x), d)).transpose(1, 2), cos_b, sin_b)
        k = _rope(attn.k_norm(_heads(attn.k_proj(x), d)).transpose(1, 2), cos_b, sin_b)
        v = _heads(attn.v_proj(x), d).transpose(1, 2)
        if ctx is not None:  # the context rows: same k/v projections, no input_layernorm, k_norm + RoPE
            k_c = _rope(attn.k_norm(_heads(attn.k_proj(ctx), d)).transpose(1, 2), cos_c, sin_c)
            v_c = _heads(attn.v_proj(ctx), d).transpose(1, 2)
            if cache is not None:
                k_c, v_c = cache.append(i, k_c, v_c)
        elif cache is not None and cache.keys[i] is not None:
            k_c, v_c = cache.keys[i], cache.values[i]
        else:
            k_c = v_c = None
        if k_c is not None:
            k, v = torch.cat([k_c, k], dim=2), torch.cat([v_c, v], dim=2)
        out = draft_attention(q, k, v, mask, d ** -0.5)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def forward(self, block_embeds: torch.Tensor, block_position_ids: torch.Tensor,
                context: torch.Tensor | None = None, context_position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                cache: DFlashContextCache | None = None) -> torch.Tensor:
        """Final hidden states of the block rows ``[b, M, H]`` (before the target's lm_head).

        ``block_embeds`` ``[b, M, H]``: the target's embedding of the block tokens (``M = n_blocks * B``; each block
        ``[anchor, MASK, ...]``); ``block_position_ids`` ``[b, M]`` (block ``j``: ``a_j .. a_j+B-1``).
        ``context`` ``[b, T, H]``: projected context (:meth:`project_context`) with ``context_position_ids``
        ``[b, T]`` (default ``arange``, after the cached rows when ``cache`` is given). With a ``cache`` the new
        context rows are appended to it and every cached row is a key; the block rows are never cached.
        ``attention_mask`` over the keys ``[cached rows | context rows | block rows]``: bool (True = visible) or
        additive, ``[b, 1, M, keys]`` or ``[b, M, keys]``; None = all visible (inference). Training:
        :func:`dflash_ds.blocks.block_rows_visibility`."""
        b, M, _ = block_embeds.shape
        past = cache.length if cache is not None else 0
        T = 0 if context is None else context.shape[1]
        if context is not None and context_position_ids is None:
            context_position_ids = torch.arange(past, past + T, device=context.device).expand(b, T)
        h = block_embeds.to(self.fc.weight.dtype)
        if context is not None:
            cos, sin = self.rotary_emb(h, torch.cat([context_position_ids, block_position_ids], dim=1))
            cos_sin = (cos[:, :T], sin[:, :T], cos[:, T:], sin[:, T:])
            context = context.to(h.dtype)
        else:
            cos, sin = self.rotary_emb(h, block_position_ids)
            cos_sin = (None, None, cos, sin)
        if attention_mask is not None:
            attention_mask = _additive(attention_mask, h.dtype)
            if attention_mask.shape[-1] != past + T + M:
                raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} keys, expected {past + T + M} "
                                 f"({past} cached + {T} context + {M} block rows)")
        for i in range(len(self.layers)):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
                h = checkpoint(self._layer, i, h, context, cos_sin, attention_mask, None, use_reentrant=False)
            else:
                h = self._layer(i, h, context, cos_sin, attention_mask, cache)
        return self.norm(h)


# ---------------------------------------------------------------------------------------------------------------
# initialisation from the target


@torch.no_grad()
def init_from_target(draft: DFlashDraftModel, target_model: nn.Module,
                     source_layers: Sequence[int] | None = None) -> list[int]:
    """Copy target decoder layers into the draft layers; returns the target layer index of each draft layer.

    ``source_layers`` default: the last L target layers, in order (:func:`last_layer_ids`). The draft's output goes
    through ``norm`` and the target's lm_head, and the last layers are the ones whose outputs that head reads, so
    the copy starts the MASK rows "predicting the next token from late features"; ``norm`` copies the target's
    final norm. ``fc`` starts as the mean of the K features (``[I/K ... I/K]``), so the projected context lies in
    the residual space the copied k/v projections read. Llama targets have no ``q_norm``/``k_norm``: those stay at
    1 (not an identity: they normalise per head)."""
    dec = decoder(target_model)
    N, L = len(dec.layers), len(draft.layers)
    src = last_layer_ids(N, L) if source_layers is None else [int(i) for i in source_layers]
    if len(src) != L or any(not 0 <= i < N for i in src):
        raise ValueError(f"need {L} target layer indices in [0, {N}), got {src}")
    for d_layer, i in zip(draft.layers, src):
        own = d_layer.state_dict()
        theirs = {k: v for k, v in dec.layers[i].state_dict().items() if k in own}
        missing = [k for k in own if k not in theirs and not k.endswith(("q_norm.weight", "k_norm.weight"))]
        if missing:
            raise ValueError(f"target layer {i} lacks {missing}")
        d_layer.load_state_dict(theirs, strict=False)
        for name, p in d_layer.named_parameters():
            if name not in theirs:  # Llama: no q_norm/k_norm in the source
                p.fill_(1.0)
    draft.norm.weight.copy_(dec.norm.weight)
    K, H = len(draft.target_layer_ids), draft.config.hidden_size
    eye = torch.eye(H, dtype=draft.fc.weight.dtype, device=draft.fc.weight.device) / K
    draft.fc.weight.copy_(eye.repeat(1, K))
    draft.hidden_norm.weight.fill_(1.0)
    return src


@torch.no_grad()
def init_draft_head(draft: DFlashDraftModel, target_lm_head_weight: torch.Tensor, ids: torch.Tensor) -> None:
    """The draft vocabulary's lm_head rows copied from the target's ``[V, H]`` (the rows of target ids ``ids [N]``,
    ascending) and ``d2t`` set to their offsets."""
    if not draft.has_own_lm_head or ids.numel() != draft.draft_vocab_size:
        raise ValueError(f"a drafter with draft_vocab_size {draft.draft_vocab_size} cannot take {ids.numel()} ids")
    draft.lm_head.weight.copy_(target_lm_head_weight[ids.to(target_lm_head_weight.device)])
    draft.d2t.copy_(ids - torch.arange(ids.numel()))


__all__ = ["ARCHITECTURE", "DFlashContextCache", "DFlashDraftModel", "DraftHead", "check_pairing",
           "default_target_layer_ids", "draft_attention", "init_draft_head", "init_from_target", "last_layer_ids",
           "make_draft_config", "target_layer_ids_of"]

"""Block layout for the one-step block-diffusion objective, as pure functions.

One training sequence of ``S`` clean tokens is followed by ``N`` blocks of ``B`` tokens. Block ``j`` starts at
anchor ``a_j`` (a committed token) and its ``B - 1`` followers are MASK (or, with a noise schedule, partly
revealed). Everything here is deterministic given per-sample seeds, so every parallel layout of a run draws the
same anchors and noise for the same example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .settings import check_choices, setting

IGNORE_INDEX = -100
ANCHOR_STRATEGIES = ("random", "tile")


@dataclass
class BlockConfig:
    """Blocks (the objective)."""

    block_size: int = setting(16, "tokens per block: the anchor and B-1 followers the drafter fills in one forward")
    num_anchors: int | None = setting(None, "blocks per sequence (default: S // block size, S the sample's own length)")
    anchors: str = setting("random", "where blocks start: random valid anchors, or tiled back to back",
                           choices=ANCHOR_STRATEGIES)
    context_ratio: tuple[float, float] = setting((0.0, 0.0), "LO,HI: anchors start at floor(r*S), r ~ U[LO, HI]")
    noise_min: float | None = setting(None, "noise schedule: each block masks a fraction rho ~ U[noise_min, 1] of its "
                                      "followers (default none: one-step, all masked)")
    gamma: float | None = setting(7.0, "loss decay exp(-(k-1)/gamma) over block positions; none = uniform")
    mask_token_id: int | None = setting(None, "MASK id (default: <|mask|>, else an unused embedding row, else an "
                                        "unused special token; dflash.json records which)")
    anchor_on_prompt: bool = setting(True, "blocks may start on a prompt's last token (the SPEC's rule). "
                                     "--no-anchor-on-prompt: an anchor is itself an answer token, as at inference, "
                                     "where the target writes each answer's first token (SpecForge's rule; measured no "
                                     "better: docs/recipes.md)")
    allow_ordinary_mask_token: bool = setting(False, "accept an ordinary vocabulary token as --mask-token-id (only "
                                              "for a tokenizer with no spare embedding row and no unused special "
                                              "token; training lines containing it are reported per --bad-lines)")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.block_size < 2:
            raise ValueError(f"--block-size must be >= 2 (a block is an anchor plus followers), got {self.block_size}")
        lo, hi = self.context_ratio
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"--context-ratio needs 0 <= lo <= hi < 1, got {self.context_ratio}")
        if self.noise_min is not None and not 0.0 < self.noise_min <= 1.0:
            raise ValueError(f"--noise-min must be in (0, 1], got {self.noise_min}")
        if self.gamma is not None and self.gamma <= 0:
            raise ValueError(f"--gamma must be > 0 (or 'none'), got {self.gamma}")
        if self.num_anchors is not None and self.num_anchors < 1:
            raise ValueError(f"--num-anchors must be >= 1, got {self.num_anchors}")
        if self.mask_token_id is not None and self.mask_token_id < 0:
            raise ValueError(f"--mask-token-id must be >= 0, got {self.mask_token_id}")

    def anchors_for_length(self, seq_len: int) -> int:
        """Blocks drawn for one sample of ``seq_len`` real tokens (its own length, never the padded batch's)."""
        return self.num_anchors if self.num_anchors is not None else max(1, seq_len // self.block_size)


@dataclass
class BlockLayout:
    """Tensors describing ``N`` blocks per sample for a batch of ``b`` sequences of padded length ``S``.

    anchors            [b, N] long   anchor position per block (0 for padding blocks)
    block_valid        [b, N] bool   False for padding blocks (sample had fewer valid anchors)
    block_input_ids    [b, N*B] long [x[a], MASK, ...] per block (followers revealed under a noise schedule)
    labels             [b, N*B] long x[a+k] where supervised, IGNORE_INDEX elsewhere (always at k = 0)
    weights            [b, N*B] float decay weight w_k where supervised, 0 elsewhere
    position_ids       [b, S+N*B] long  clean 0..S-1, block j: a_j .. a_j+B-1
    teacher_positions  [b, N*B] long clean position a+k-1 whose next-token distribution teaches block position k
    num_skipped        samples with no valid anchor (they contribute no blocks)
    """

    anchors: torch.Tensor
    block_valid: torch.Tensor
    block_input_ids: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor
    position_ids: torch.Tensor
    teacher_positions: torch.Tensor
    block_size: int
    num_skipped: int = 0

    @property
    def num_blocks(self) -> int:
        return self.anchors.shape[1]

    def to(self, device: torch.device | str) -> "BlockLayout":
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return BlockLayout(**fields)


def decay_weights(block_size: int, gamma: float | None) -> torch.Tensor:
    """``[B]`` weights: 0 at the anchor (k = 0), ``exp(-(k-1)/gamma)`` for followers (uniform with gamma None)."""
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.ones(block_size) if gamma is None else torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def valid_anchor_positions(loss_mask: torch.Tensor, length: int, context_start: int,
                           on_prompt: bool = True) -> torch.Tensor:
    """Positions ``i`` with ``context_start <= i <= length-2``, ``loss_mask[i+1] == 1`` and, unless ``on_prompt``,
    ``loss_mask[i] == 1`` (``loss_mask``: [S]). Decoding never anchors a block on a prompt's last token (the target
    writes each answer's first token); training on those blocks too measured no worse (docs/recipes.md)."""
    if length < 2:
        return torch.zeros(0, dtype=torch.long)
    i = torch.arange(max(context_start, 0), length - 1)
    ok = loss_mask[i + 1].bool()
    if not on_prompt:
        ok &= loss_mask[i].bool()
    return i[ok]


def sample_anchors(
    loss_mask: torch.Tensor, length: int, cfg: BlockConfig, num_anchors: int, generator: torch.Generator
) -> torch.Tensor:
    """Sorted anchor positions (at most ``num_anchors``) for one sequence; may be empty."""
    lo, hi = cfg.context_ratio
    r = lo + (hi - lo) * torch.rand((), generator=generator).item() if hi > lo else lo
    valid = valid_anchor_positions(loss_mask, length, int(math.floor(r * length)), cfg.anchor_on_prompt)
    if valid.numel() == 0:
        return valid
    if cfg.anchors == "random":
        pick = torch.randperm(valid.numel(), generator=generator)[:num_anchors]
        return valid[pick].sort().values
    # tile: back-to-back blocks over the supervised region, jumping to the next valid anchor past each block
    chosen: list[int] = []
    next_free = -1
    for a in valid.tolist():
        if a >= next_free:
            chosen.append(a)
            next_free = a + cfg.block_size
            if len(chosen) == num_anchors:
                break
    return torch.tensor(chosen, dtype=torch.long)


def _noise_keep_mask(num_followers: int, noise_min: float | None, generator: torch.Generator) -> torch.Tensor:
    """``[B-1]`` bool: True where a follower is revealed. One-step (noise_min None): none revealed."""
    if noise_min is None:
        return torch.zeros(num_followers, dtype=torch.bool)
    rho = noise_min + (1.0 - noise_min) * torch.rand((), generator=generator).item()
    masked = torch.rand(num_followers, generator=generator) < rho
    if not masked.any():  # at least one follower must stay masked, or the block teaches nothing
        masked[torch.randint(num_followers, (), generator=generator)] = True
    return ~masked


def build_block_layout(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: BlockConfig,
    sample_seeds: list[int],
) -> BlockLayout:
    """Draw anchors and noise for a batch (``input_ids``, ``loss_mask``, ``attention_mask``: [b, S]).

    ``sample_seeds[i]`` seeds sample ``i``'s anchors, context ratio and noise, and its number of blocks comes from
    its own length (``attention_mask[i].sum()``), so a sample gets the same blocks whichever rank or micro-batch
    it lands in and whatever it is padded to; ``N`` is the largest count in the batch, the rest are padding blocks.
    """
    if cfg.mask_token_id is None:
        raise ValueError("BlockConfig.mask_token_id is not set (resolve it with resolve_mask_token)")
    b, S = input_ids.shape
    B = cfg.block_size
    lengths = attention_mask.sum(dim=1).tolist()
    # Per sample, not from the padded S: a 100-token sample batched with a 1,000-token one would otherwise draw
    # 62 blocks instead of 6 and carry half the batch's loss weight.
    per_sample = [cfg.anchors_for_length(int(n)) for n in lengths]
    N = max(per_sample)
    weights_k = decay_weights(B, cfg.gamma)
    k = torch.arange(B)

    anchors = torch.zeros(b, N, dtype=torch.long)
    block_valid = torch.zeros(b, N, dtype=torch.bool)
    block_ids = torch.full((b, N, B), cfg.mask_token_id, dtype=torch.long)
    labels = torch.full((b, N, B), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros(b, N, B)
    skipped = 0
    for i in range(b):
        gen = torch.Generator().manual_seed(int(sample_seeds[i]))
        length = int(lengths[i])
        chosen = sample_anchors(loss_mask[i], length, cfg, per_sample[i], gen)
        if chosen.numel() == 0:
            skipped += 1
            continue
        for j, a in enumerate(chosen.tolist()):
            anchors[i, j] = a
            block_valid[i, j] = True
            pos = a + k  # [B]
            in_seq = pos < length
            target = torch.where(in_seq, input_ids[i, pos.clamp(max=S - 1)], torch.full_like(pos, cfg.mask_token_id))
            revealed = torch.zeros(B, dtype=torch.bool)
            revealed[1:] = _noise_keep_mask(B - 1, cfg.noise_min, gen)
            revealed[0] = True  # the anchor token is always shown
            block_ids[i, j] = torch.where(revealed & in_seq, target, block_ids[i, j])
            supervised = ~revealed & in_seq & loss_mask[i, pos.clamp(max=S - 1)].bool()
            supervised[0] = False
            labels[i, j] = torch.where(supervised, target, labels[i, j])
            weights[i, j] = torch.where(supervised, weights_k, weights[i, j])

    block_pos = anchors[:, :, None] + k  # [b, N, B]
    position_ids = torch.cat([torch.arange(S).expand(b, S), block_pos.reshape(b, N * B)], dim=1)
    teacher_positions = (block_pos - 1).clamp(min=0, max=S - 1).reshape(b, N * B)
    return BlockLayout(
        anchors=anchors,
        block_valid=block_valid,
        block_input_ids=block_ids.reshape(b, N * B),
        labels=labels.reshape(b, N * B),
        weights=weights.reshape(b, N * B),
        position_ids=position_ids,
        teacher_positions=teacher_positions,
        block_size=B,
        num_skipped=skipped,
    )


def block_visibility(layout: BlockLayout, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, S+N*B, S+N*B]`` bool, True where query (row) may attend to key (column).

    Clean query p: clean keys <= p that are not padding. Block query in block j: clean keys < a_j and every key
    of block j. Padding blocks see nothing.
    """
    return visibility(layout.anchors, layout.block_valid, layout.block_size, attention_mask.bool())


def visibility(anchors: torch.Tensor, block_valid: torch.Tensor, block_size: int, key_real: torch.Tensor) -> torch.Tensor:
    """The rule of :func:`block_visibility` from its parts: ``anchors``/``block_valid`` ``[b, N]``, ``key_real``
    ``[b, S]`` (False on padding). The decoder's fused step uses it too, with its verify rows as the clean tokens and
    its draft groups as the blocks, so decoding sees exactly what training saw."""
    b, S = key_real.shape
    N, B = anchors.shape[1], block_size
    causal = torch.ones(S, S, dtype=torch.bool, device=key_real.device).tril()
    clean_rows = torch.cat(
        [causal[None] & key_real[:, None, :], torch.zeros(b, S, N * B, dtype=torch.bool, device=key_real.device)], dim=2
    )
    return torch.cat([clean_rows, block_rows_visibility(anchors, block_valid, B, key_real)], dim=1)


def block_rows_visibility(anchors: torch.Tensor, block_valid: torch.Tensor, block_size: int,
                          key_real: torch.Tensor) -> torch.Tensor:
    """The block rows of :func:`visibility` alone: ``[b, N*B, S+N*B]`` bool over the keys ``[clean | blocks]``.
    Block ``j`` sees the real clean keys ``< anchors[:, j]`` (strictly: the anchor's own feature is not committed at
    inference) and every key of its own block; never another block; an invalid block sees nothing. The standalone
    drafter trains under exactly these rows (its keys are the target's context rows, then the blocks)."""
    b, S = key_real.shape
    N, B = anchors.shape[1], block_size
    device = key_real.device
    anchors = anchors.to(device)  # [b, N]
    valid = block_valid.to(device=device, dtype=torch.bool)
    sees_clean = torch.arange(S, device=device)[None, None, :] < anchors[:, :, None]  # [b, N, S]
    sees_clean = sees_clean & key_real[:, None, :] & valid[:, :, None]
    own_block = torch.eye(N, dtype=torch.bool, device=device)[None] & valid[:, :, None]  # [b, N, N]
    sees_blocks = own_block[:, :, :, None].expand(b, N, N, B).reshape(b, N, N * B)
    block_rows = torch.cat([sees_clean, sees_blocks], dim=2)  # [b, N, S+N*B] per block
    return block_rows[:, :, None, :].expand(b, N, B, S + N * B).reshape(b, N * B, S + N * B)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[b, T, T]`` bool -> ``[b, 1, T, T]`` additive float mask (0 or ``finfo.min``).

    Additive rather than boolean because eager attention adds the mask to the scores (a boolean mask is silently
    wrong there), and ``finfo.min`` rather than ``-inf`` so fully masked rows give no NaN.
    """
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[:, None]


def build_attention_mask(layout: BlockLayout, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 4D additive mask ``[b, 1, S+N*B, S+N*B]`` for SDPA and eager attention."""
    return additive_mask(block_visibility(layout, attention_mask), dtype)


def build_split_attention_masks(
    layout: BlockLayout, attention_mask: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of :func:`build_attention_mask` split for a clean forward and a block forward that reads the clean
    tokens' KV cache: ``([b, 1, S, S], [b, 1, N*B, S+N*B])`` additive masks."""
    S = attention_mask.shape[1]
    visible = block_visibility(layout, attention_mask)
    return additive_mask(visible[:, :S, :S], dtype), additive_mask(visible[:, S:], dtype)


def build_flex_block_mask(layout: BlockLayout, attention_mask: torch.Tensor, block: int = 128):
    """The same visibility as :func:`block_visibility` as a FlexAttention ``BlockMask`` (sparse: fully masked
    tiles are skipped, so long sequences pay for the visible part only). Pass it as ``attention_mask`` to a model
    loaded with ``attn_implementation="flex_attention"``."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, S = attention_mask.shape
    N, B = layout.num_blocks, layout.block_size
    device = attention_mask.device
    block_of = torch.cat([torch.full((b, S), -1, device=device), torch.arange(N, device=device).repeat_interleave(B).expand(b, -1)], 1)
    anchor_of = torch.cat([torch.zeros(b, S, dtype=torch.long, device=device), layout.anchors.to(device).repeat_interleave(B, dim=1)], 1)
    query_ok = torch.cat([torch.ones(b, S, dtype=torch.bool, device=device), layout.block_valid.to(device).repeat_interleave(B, dim=1)], 1)
    key_real = torch.cat([attention_mask.bool(), torch.ones(b, N * B, dtype=torch.bool, device=device)], 1)

    def mask_mod(bi, _h, q, kv):
        q_block, kv_block = block_of[bi, q], block_of[bi, kv]
        clean_limit = torch.where(q_block < 0, kv <= q, kv < anchor_of[bi, q])  # causal, or before the anchor
        sees_clean = (kv_block < 0) & key_real[bi, kv] & clean_limit
        sees_own_block = (q_block >= 0) & (kv_block == q_block)
        return (sees_clean | sees_own_block) & query_ok[bi, q]

    T = S + N * B
    return create_block_mask(mask_mod, b, None, T, T, device=str(device), BLOCK_SIZE=block)

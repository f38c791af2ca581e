"""The training objective of the standalone DFlash drafter (:mod:`dflash_ds.dflash_model`), as the module the
trainer hands to DeepSpeed: a drop-in for :class:`dflash_ds.model.DFlashObjective` (same ``forward`` signature,
same :class:`~dflash_ds.model.ObjectiveOutput`), the same layout, loss and metrics.

One step, for a batch of ``b`` sequences of ``S`` clean tokens and a :class:`~dflash_ds.blocks.BlockLayout` of ``N``
blocks of ``B`` rows:

1. **Target** (frozen, ``no_grad``, one forward over the clean tokens): a :class:`TargetFeatureHook` records the
   outputs of the decoder layers ``target_layer_ids`` (``K x [b, S, H]``: the drafter's context) and the final
   (post-norm) hidden states ``[b, S, H]``: the KL teacher, whose row ``a+k-1`` is the target's next-token
   distribution for block position ``k`` (``layout.teacher_positions``, SPEC 5).
2. **Drafter** (the only trainable parameters): block tokens ``layout.block_input_ids`` embedded by the target's
   (frozen) embedding, keys/values over ``[project_context(features) | block rows]`` under
   :func:`training_attention_mask` (context rows ``< anchor`` that are not padding, the own block bidirectional,
   padding blocks see nothing), optional gradient checkpointing of its layers.
3. **Loss**: the supervised block rows through the target's ``lm_head`` in the fused chunked CE + KL
   (:class:`~dflash_ds.model.LMHeadLoss`); metrics by :meth:`DFlashObjective._metrics`.

ZeRO-3: target and drafter are both submodules of this module, so DeepSpeed partitions both and gathers each
module's parameters around its own call; the target's embedding is called as a module (gathered by its hook), but
``lm_head.weight`` is read as a tensor inside :attr:`loss_head`, so the trainer must register it there
(:func:`register_zero3_external_parameters`), as it does for the LoRA objective.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .blocks import IGNORE_INDEX, BlockLayout
from .dflash_model import DFlashDraftModel, TargetFeatureHook, training_attention_mask
from .families import decoder
from .loss import LossConfig, LossOutput
from .model import DFlashObjective, LMHeadLoss, ObjectiveOutput


def check_pairing(target: nn.Module, drafter: DFlashDraftModel) -> None:
    """Raise if ``drafter`` was not built for ``target`` (depth, width, vocab)."""
    tc, dc = target.config, drafter.config
    pairs = (("num_hidden_layers", drafter.num_target_layers), ("hidden_size", dc.hidden_size),
             ("vocab_size", dc.vocab_size))
    for key, ours in pairs:
        if int(getattr(tc, key)) != int(ours):
            raise ValueError(f"draft/target mismatch: target {key}={getattr(tc, key)}, drafter expects {ours}")


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [b, S, H]``, ``positions [b, M]`` long -> ``[b, M, H]`` (row ``positions[i, m]`` of sample ``i``)."""
    return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))


def block_attention_mask(layout: BlockLayout, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, 1, N*B, S+N*B]`` bool over the drafter's keys ``[context rows | block rows]``: the training visibility
    (:func:`training_attention_mask`), padding context rows (``attention_mask [b, S]`` 0) never visible."""
    return training_attention_mask(layout.anchors, layout.block_size, attention_mask.shape[1],
                                   block_valid=layout.block_valid, context_valid=attention_mask.bool())


class DFlashDraftObjective(nn.Module):
    """The standalone drafter's objective: ``forward(input_ids [b, S], attention_mask [b, S], layout)`` ->
    :class:`ObjectiveOutput` (as :class:`DFlashObjective`). ``target``: the frozen causal LM (its parameters are set
    ``requires_grad=False`` here and it is kept in eval mode); ``drafter``: a :class:`DFlashDraftModel` for it.
    Trainable parameters: :meth:`trainable_parameters` (the drafter's)."""

    drafter_kind = "dflash"  # dflash_ds.drafters: how checkpoints gather and export what this objective trains

    def __init__(self, target: nn.Module, drafter: DFlashDraftModel, loss_config: LossConfig,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        check_pairing(target, drafter)
        target.requires_grad_(False)
        self.target = target.eval()
        self.drafter = drafter
        self.loss_config = loss_config
        self.loss_head = LMHeadLoss(loss_config)
        drafter.gradient_checkpointing_enable(gradient_checkpointing)

    def train(self, mode: bool = True) -> "DFlashDraftObjective":
        """The drafter follows ``mode``; the target stays in eval mode (frozen: no dropout, no checkpointing)."""
        super().train(mode)
        self.target.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps: the drafter's parameters (``fc``, ``hidden_norm``, layers, ``norm``)."""
        return [p for p in self.drafter.parameters() if p.requires_grad]

    def target_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The frozen target over the clean tokens, without autograd: ``(features, final)`` with ``features`` the
        ``K`` outputs ``[b, S, H]`` of the layers ``target_layer_ids`` (in that order) and ``final`` ``[b, S, H]``
        the decoder's last (post-norm) hidden states."""
        S = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(input_ids.shape[0], S)
        with torch.no_grad(), TargetFeatureHook(self.target, self.drafter.target_layer_ids) as hook:
            out = decoder(self.target)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
            return hook.features(), out.last_hidden_state

    def block_hidden_states(self, attention_mask: torch.Tensor, layout: BlockLayout,
                            features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The drafter's final hidden states of every block row ``[b, N*B, H]`` (before the lm_head), from the
        target's ``features`` of the ``S`` clean tokens (:meth:`target_pass`)."""
        S = attention_mask.shape[1]
        with torch.no_grad():  # the target's embedding is frozen: nothing flows back into it
            embeds = self.target.get_input_embeddings()(layout.block_input_ids)
        context = self.drafter.project_context(features)
        return self.drafter(embeds, layout.position_ids[:, S:], context, layout.position_ids[:, :S],
                            attention_mask=block_attention_mask(layout, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout) -> ObjectiveOutput:
        S = input_ids.shape[1]
        features, final = self.target_pass(input_ids, attention_mask, layout.position_ids[:, :S])
        hidden = self.block_hidden_states(attention_mask, layout, features)
        del features
        supervised = layout.labels != IGNORE_INDEX  # [b, N*B]
        lm_head = self.target.get_output_embeddings()
        student = hidden[supervised].to(lm_head.weight.dtype)  # [n, H]
        teacher = None
        if self.loss_config.kl_weight > 0:
            teacher = gather_rows(final, layout.teacher_positions)[supervised]  # [n, H], no grad
        out = LossOutput(*self.loss_head(student, lm_head.weight, layout.labels[supervised],
                                         layout.weights[supervised], teacher))
        return DFlashObjective._metrics(out, supervised, layout, layout.block_size)


def register_zero3_external_parameters(objective: DFlashDraftObjective) -> bool:
    """Under ZeRO-3, register the target's ``lm_head.weight`` (read as a tensor by the fused loss) as an external
    parameter of :attr:`DFlashDraftObjective.loss_head`, so DeepSpeed gathers it for that call. Call before
    ``deepspeed.initialize``. Returns whether anything was registered (False: not partitioned)."""
    weight = objective.target.get_output_embeddings().weight
    if not hasattr(weight, "ds_id"):
        return False
    import deepspeed

    deepspeed.zero.register_external_parameter(objective.loss_head, weight)
    return True


__all__ = ["DFlashDraftObjective", "block_attention_mask", "check_pairing", "gather_rows",
           "register_zero3_external_parameters"]

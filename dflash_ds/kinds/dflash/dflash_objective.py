"""The training objective of the standalone DFlash drafter (:mod:`.dflash_model`), as the module the trainer hands to
DeepSpeed: the same ``forward`` signature, :class:`~dflash_ds.objective.ObjectiveOutput`, layout, loss and metrics
as the LoRA kind's.

One step, for a batch of ``b`` sequences of ``S`` clean tokens and a :class:`~dflash_ds.blocks.BlockLayout` of ``N``
blocks of ``B`` rows:

1. **Target** (frozen, ``no_grad``, one forward over the clean tokens): the model's :class:`~.feature_tap.FeatureTap`
   records the
   outputs of the decoder layers ``target_layer_ids`` (``K x [b, S, H]``: the drafter's context) and the final
   (post-norm) hidden states ``[b, S, H]``: the KL teacher, whose row ``a+k-1`` is the target's next-token
   distribution for block position ``k`` (``layout.teacher_positions``, SPEC 5).
2. **Drafter** (the only trainable parameters): block tokens ``layout.block_input_ids`` embedded by the target's
   (frozen) embedding, keys/values over ``[project_context(features) | block rows]`` under
   :func:`dflash_ds.blocks.block_rows_visibility` (context rows ``< anchor`` that are not padding, the own block
   bidirectionally, padding blocks see nothing), optional gradient checkpointing of its layers.
3. **Loss**: the supervised block rows through the target's ``lm_head`` in the fused chunked CE + KL
   (:class:`~dflash_ds.objective.LMHeadLoss`); metrics by :func:`~dflash_ds.objective.block_metrics`. A drafter with
   a draft vocabulary (:mod:`.draft_vocab`) goes through its own ``lm_head`` instead: labels become draft ids (-1
   outside the vocabulary: no CE term, only the KL; ``drop_outside``: no term at all), and the KL teacher is the
   target's distribution renormalised over the vocabulary (the target's rows of it, kept aside when the head
   itself trains).

ZeRO-3: target and drafter are both submodules of this module, so DeepSpeed partitions both and gathers each
module's parameters around its own call; the target's embedding is called as a module (gathered by its hook), but
``lm_head.weight`` is read as a tensor inside :attr:`loss_head`, so the kind registers it there
(:func:`dflash_ds.objective.register_lm_head`), as the LoRA kind does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ...blocks import IGNORE_INDEX, BlockLayout, block_rows_visibility
from ...families import decoder
from ...loss import LossConfig
from ...objective import LMHeadLoss, ObjectiveOutput, block_metrics, gather_rows
from .dflash_model import DFlashDraftModel, check_pairing
from .draft_vocab import target_to_draft
from .feature_cache import FeatureStore
from .feature_tap import FeatureTap


def block_attention_mask(layout: BlockLayout, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[b, N*B, S+N*B]`` bool over the drafter's keys ``[context rows | block rows]``: the training visibility,
    padding context rows (``attention_mask [b, S]`` 0) never visible."""
    return block_rows_visibility(layout.anchors, layout.block_valid, layout.block_size, attention_mask.bool())


class DFlashDraftObjective(nn.Module):
    """The standalone drafter's objective: ``forward(input_ids [b, S], attention_mask [b, S], layout)`` ->
    :class:`ObjectiveOutput` (as the LoRA kind's objective). ``target``: the frozen causal LM (its parameters are set
    ``requires_grad=False`` here and it is kept in eval mode); ``drafter``: a :class:`DFlashDraftModel` for it.
    Trainable parameters: :meth:`trainable_parameters` (the drafter's)."""

    drafter_kind = "dflash"  # dflash_ds.kinds: how checkpoints gather and export what this objective trains

    def __init__(self, target: nn.Module, drafter: DFlashDraftModel, loss_config: LossConfig,
                 gradient_checkpointing: bool = False, features: FeatureStore | None = None,
                 drop_outside: bool = False) -> None:
        super().__init__()
        check_pairing(target.config, drafter.num_target_layers, drafter.config.hidden_size, drafter.config.vocab_size)
        target.requires_grad_(False)
        self.target = target.eval()
        self.drafter = drafter
        self.loss_config = loss_config
        self.loss_head = LMHeadLoss(loss_config)
        self.features = features  # offline mode: the target's features read from disk, its decoder layers never run
        self.drop_outside = drop_outside  # rows whose label is outside the draft vocabulary: weight 0
        drafter.gradient_checkpointing_enable(gradient_checkpointing)
        # a trained draft head moves away from the target's rows it starts as (init_draft_head): the KL teacher
        # keeps them (None: the teacher goes through the head the student does)
        trained_head = drafter.has_own_lm_head and isinstance(drafter.lm_head.weight, nn.Parameter)
        self.register_buffer("teacher_head", drafter.lm_head.weight.detach().clone() if trained_head else None,
                             persistent=False)

    def train(self, mode: bool = True) -> "DFlashDraftObjective":
        """The drafter follows ``mode``; the target stays in eval mode (frozen: no dropout, no checkpointing)."""
        super().train(mode)
        self.target.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer steps: the drafter's parameters (``fc``, ``hidden_norm``, layers, ``norm``)."""
        return [p for p in self.drafter.parameters() if p.requires_grad]

    def target_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen target over the clean tokens, without autograd: ``(features, final)`` with ``features``
        ``[b, S, K*H]`` the outputs of the layers ``target_layer_ids`` (concatenated in that order) and ``final``
        ``[b, S, H]`` the decoder's last (post-norm) hidden states."""
        S = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device).expand(input_ids.shape[0], S)
        ids = self.drafter.target_layer_ids
        tap = FeatureTap.of(self.target, ids)
        with torch.no_grad(), tap.recording():
            out = decoder(self.target)(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, use_cache=False)
            return tap.take(ids), out.last_hidden_state

    def block_hidden_states(self, attention_mask: torch.Tensor, layout: BlockLayout,
                            features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The drafter's final hidden states of every block row ``[b, N*B, H]`` (before the lm_head), from the
        target's ``features`` of the ``S`` clean tokens (:meth:`target_pass`)."""
        S = attention_mask.shape[1]
        with torch.no_grad():  # the target's embedding is frozen: nothing flows back into it
            embeds = self.target.get_input_embeddings()(layout.block_input_ids)
        context = self.drafter.project_context(features)
        return self.drafter(embeds, layout.position_ids[:, S:], context, layout.position_ids[:, :S],
                            attention_mask=block_attention_mask(layout, attention_mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout,
                examples: Sequence[int] | None = None) -> ObjectiveOutput:
        """``examples``: the rows' indices in the training set (offline mode reads their features by them)."""
        S = input_ids.shape[1]
        if self.features is None:
            features, final = self.target_pass(input_ids, attention_mask, layout.position_ids[:, :S])
        else:
            if examples is None:
                raise ValueError("offline features (--features) need the examples' dataset indices")
            dtype = self.target.get_input_embeddings().weight.dtype
            features, final = self.features.batch(examples, S, input_ids.device, self.loss_config.kl_weight > 0)
            features = features.to(dtype)
            final = final.to(dtype) if final is not None else None
        hidden = self.block_hidden_states(attention_mask, layout, features)
        del features
        supervised = layout.labels != IGNORE_INDEX  # [b, N*B]
        head = self.head_weight()
        student = hidden[supervised].to(head.dtype)  # [n, H]
        labels, weights = layout.labels[supervised], layout.weights[supervised]
        if self.drafter.has_own_lm_head:
            labels = self.target_to_draft()[labels]
            if self.drop_outside:
                weights = weights * (labels >= 0)
        teacher = None
        if self.loss_config.kl_weight > 0:
            teacher = gather_rows(final, layout.teacher_positions)[supervised]  # [n, H], no grad
        out = self.loss_head.loss(student, head, labels, weights, teacher, self.teacher_head)
        return block_metrics(out, supervised, layout)

    def head_weight(self) -> torch.Tensor:
        """What the drafted rows go through: the drafter's own draft-vocabulary head ``[N, H]``, else the target's
        ``lm_head.weight [V, H]``."""
        if self.drafter.has_own_lm_head:
            return self.drafter.lm_head.weight
        return self.target.get_output_embeddings().weight

    def target_to_draft(self) -> torch.Tensor:
        """``[V]`` long: each target id's draft id, -1 outside the draft vocabulary."""
        return target_to_draft(self.drafter.vocab_ids(), self.drafter.config.vocab_size)


__all__ = ["DFlashDraftObjective", "block_attention_mask"]

"""What every drafter kind's training objective shares: the step's output (:class:`ObjectiveOutput`), the module
boundary of the fused loss (:class:`LMHeadLoss`), the block metrics computed from it (:func:`block_metrics`) and the
ZeRO-3 registration of the target's ``lm_head`` for that boundary (:func:`register_lm_head`).

An objective is the ``nn.Module`` DeepSpeed wraps: ``forward(input_ids [b, S], attention_mask [b, S], layout)`` ->
:class:`ObjectiveOutput`, with a class attribute ``drafter_kind`` naming its kind (:mod:`dflash_ds.kinds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import BlockLayout
from .loss import LossConfig, LossOutput, accepted_lengths, fused_ce_kl_loss


@dataclass
class ObjectiveOutput:
    """loss: differentiable scalar. Metric tensors are sums and counts so ranks can add them up:
    correct_by_pos/count_by_pos [B] (block position k; k = 0 is the anchor and always 0), accept_sum/accept_count
    (simulated acceptance over fully supervised blocks), ce/kl (weighted means of this micro-batch)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    correct_by_pos: torch.Tensor
    count_by_pos: torch.Tensor
    accept_sum: torch.Tensor
    accept_count: torch.Tensor
    supervised_rows: int


class LMHeadLoss(nn.Module):
    """Holds no parameters: a module boundary around :func:`fused_ce_kl_loss` for ZeRO-3's parameter hooks (the
    target's ``lm_head.weight`` is read as a tensor here, so :func:`register_lm_head` makes DeepSpeed gather it for
    exactly this call). ``forward(student [n, H], lm_head_weight [V, H], labels [n], weights [n], teacher [n, H] or
    None, teacher_weight [V, H] or None)`` -> ``(loss, ce, kl, correct)``; :meth:`loss` wraps them."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, student, lm_head_weight, labels, weights, teacher, teacher_weight=None):
        # a plain tuple out of the module: ZeRO-3 finds tensors to hook in tuples, not in dataclasses
        out = fused_ce_kl_loss(student, lm_head_weight, labels, weights, teacher, self.config, teacher_weight)
        return out.loss, out.ce, out.kl, out.correct

    def loss(self, student, lm_head_weight, labels, weights, teacher, teacher_weight=None) -> LossOutput:
        """This module's call (so ZeRO-3's hooks run) as a :class:`~dflash_ds.loss.LossOutput`."""
        return LossOutput(*self(student, lm_head_weight, labels, weights, teacher, teacher_weight))


def register_lm_head(loss_head: LMHeadLoss, target: nn.Module, weight: torch.Tensor | None = None) -> bool:
    """Under ZeRO-3, register the target's ``lm_head.weight`` (or ``weight``: another head the loss reads) as an
    external parameter of ``loss_head`` so DeepSpeed gathers it for the loss's forward. Call before
    ``deepspeed.initialize``. Returns whether anything was registered (False: the weight is not partitioned)."""
    weight = target.get_output_embeddings().weight if weight is None else weight
    if not hasattr(weight, "ds_id"):
        return False
    import deepspeed

    deepspeed.zero.register_external_parameter(loss_head, weight)
    return True


def gather_rows(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``hidden [b, S, H]``, ``positions [b, M]`` long -> ``[b, M, H]`` (row ``positions[i, m]`` of sample ``i``)."""
    return hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))


def block_metrics(out: LossOutput, supervised: torch.Tensor, layout: BlockLayout) -> ObjectiveOutput:
    """The step's :class:`ObjectiveOutput` from the fused loss's ``out`` over the rows ``supervised [b, N*B]``
    (bool) of ``layout``: per-position accuracy and the simulated acceptance of the fully supervised blocks."""
    b, N, B = supervised.shape[0], layout.num_blocks, layout.block_size
    correct = torch.zeros_like(supervised)
    correct[supervised] = out.correct
    correct, supervised_3d = correct.view(b, N, B), supervised.view(b, N, B)
    full = supervised_3d[:, :, 1:].all(dim=-1).reshape(-1)
    return ObjectiveOutput(
        loss=out.loss,
        ce=out.ce,
        kl=out.kl,
        correct_by_pos=correct.sum(dim=(0, 1)).float(),
        count_by_pos=supervised_3d.sum(dim=(0, 1)).float(),
        accept_sum=accepted_lengths(correct[:, :, 1:].reshape(b * N, B - 1)[full]).sum(),
        accept_count=full.sum().float(),
        supervised_rows=int(supervised.sum()),
    )


__all__ = ["LMHeadLoss", "ObjectiveOutput", "block_metrics", "gather_rows", "register_lm_head"]

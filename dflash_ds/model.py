"""The training objective: one forward over ``[clean | blocks]`` and the fused loss.

:class:`DFlashObjective` wraps a causal LM that :func:`dflash_ds.lora.apply_lora` has fitted with an adapter. It is
the module DeepSpeed wraps. The loss runs inside the :class:`LMHeadLoss` submodule so that, under ZeRO-3, the
trainer can register ``lm_head.weight`` as that module's external parameter and DeepSpeed gathers it for exactly
that call; this file stays plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from .blocks import IGNORE_INDEX, BlockLayout, build_attention_mask, build_flex_block_mask
from .loss import LossConfig, LossOutput, accepted_lengths, fused_ce_kl_loss
from .families import decoder
from .lora import adapter_control


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
    """Holds no parameters: a module boundary around :func:`fused_ce_kl_loss` for ZeRO-3's parameter hooks."""

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, student, lm_head_weight, labels, weights, teacher):
        # a plain tuple: ZeRO-3 finds tensors to hook in tuples, not in dataclasses
        out = fused_ce_kl_loss(student, lm_head_weight, labels, weights, teacher, self.config)
        return out.loss, out.ce, out.kl, out.correct


class DFlashObjective(nn.Module):
    """The training objective as the module DeepSpeed wraps: the target with its adapter, one forward over
    ``[clean | blocks]`` and the fused loss. ``forward(input_ids [b, S], attention_mask [b, S], layout)`` returns an
    :class:`ObjectiveOutput`."""

    def __init__(
        self,
        model: nn.Module,
        loss_config: LossConfig,
        scope: str,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_config = loss_config
        self.scope = scope
        self.loss_head = LMHeadLoss(loss_config)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """Final hidden states ``[b, S+N*B, H]`` of one forward over the clean tokens followed by all blocks."""
        b, S = input_ids.shape
        full_ids = torch.cat([input_ids, layout.block_input_ids], dim=1)
        dtype = next(self.model.parameters()).dtype
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

    def teacher_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, hidden: torch.Tensor
    ) -> torch.Tensor:
        """Clean-stream hidden states ``[b, S, H]`` of the base model (adapter off), detached."""
        S = input_ids.shape[1]
        if self.scope == "block":
            return hidden[:, :S].detach()  # the gate kept the adapter off there: this *is* the base model
        control = adapter_control(self.model)
        with torch.no_grad(), control.disabled():
            return decoder(self.model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layout: BlockLayout) -> ObjectiveOutput:
        b, S = input_ids.shape
        B = layout.block_size
        hidden = self.hidden_states(input_ids, attention_mask, layout)
        supervised = layout.labels != IGNORE_INDEX  # [b, N*B]
        student = hidden[:, S:][supervised]  # [n, H]
        teacher = None
        if self.loss_config.kl_weight > 0:
            clean = self.teacher_hidden(input_ids, attention_mask, hidden)
            index = layout.teacher_positions[:, :, None].expand(-1, -1, clean.shape[-1])
            teacher = clean.gather(1, index)[supervised]
        lm_head = self.model.get_output_embeddings()
        out = LossOutput(*self.loss_head(student, lm_head.weight, layout.labels[supervised], layout.weights[supervised], teacher))
        return self._metrics(out, supervised, layout, B)

    @staticmethod
    def _metrics(out, supervised: torch.Tensor, layout: BlockLayout, B: int) -> ObjectiveOutput:
        b = supervised.shape[0]
        N = layout.num_blocks
        correct = torch.zeros_like(supervised)
        correct[supervised] = out.correct
        correct, supervised_3d = correct.view(b, N, B), supervised.view(b, N, B)
        correct_by_pos = correct.sum(dim=(0, 1)).float()
        count_by_pos = supervised_3d.sum(dim=(0, 1)).float()
        full = supervised_3d[:, :, 1:].all(dim=-1).reshape(-1)
        accept_sum = accepted_lengths(correct[:, :, 1:].reshape(b * N, B - 1)[full]).sum()
        return ObjectiveOutput(
            loss=out.loss,
            ce=out.ce,
            kl=out.kl,
            correct_by_pos=correct_by_pos,
            count_by_pos=count_by_pos,
            accept_sum=accept_sum,
            accept_count=full.sum().float(),
            supervised_rows=int(supervised.sum()),
        )

"""Fused, chunked CE + KL over the frozen ``lm_head``.

The loss never holds ``[rows, vocab]`` logits for all rows at once: it walks the supervised rows in chunks,
computes each chunk's logits, its CE/KL and the gradient with respect to the student hidden rows, then frees the
logits. The gradient is computed in forward (the loss is the graph's last node, so ``grad_output`` is a scalar that
only rescales it), which keeps peak extra memory at ``O(chunk * vocab)`` plus the ``[rows, hidden]`` gradient (and
the ``[vocab, hidden]`` one when the head itself is trained: the standalone drafter's own draft-vocabulary head).

A label of -1 marks a row whose true token the head cannot produce (outside a draft vocabulary): it gets no CE term,
only the divergence from the teacher (``teacher_weight``: the target's rows of that vocabulary, so the teacher is the
target's distribution renormalised over it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .settings import check_choices, setting

KL_TYPES = ("forward", "reverse", "tvd")


@dataclass
class LossConfig:
    """Loss (fused chunked CE + KL)."""

    ce_weight: float = setting(1.0, "weight of the cross-entropy against the true next tokens")
    kl_weight: float = setting(1.0, "weight of the divergence from the target's own next-token distribution")
    kl_type: str = setting("forward", "KL(teacher || student), KL(student || teacher) or total variation",
                           choices=KL_TYPES)
    kl_temperature: float = setting(1.0, "temperature of both distributions in the divergence")
    chunk_size: int = setting(512, "rows per lm_head chunk in the fused loss", flag="loss-chunk-size")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.ce_weight < 0 or self.kl_weight < 0 or self.ce_weight + self.kl_weight == 0:
            raise ValueError(f"--ce-weight/--kl-weight must be >= 0 and not both 0, got {self.ce_weight}/{self.kl_weight}")
        if self.kl_temperature <= 0:
            raise ValueError(f"--kl-temperature must be > 0, got {self.kl_temperature}")
        if self.chunk_size < 1:
            raise ValueError(f"--loss-chunk-size must be >= 1, got {self.chunk_size}")


def _divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kl_type: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row divergence ``[c]`` and its gradient w.r.t. the student logits ``[c, V]`` (fp32)."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    if kl_type == "forward":  # KL(p || q)
        value = (p * (log_p - log_q)).sum(-1)
        grad = q - p
    elif kl_type == "reverse":  # KL(q || p)
        diff = log_q - log_p
        value = (q * diff).sum(-1)
        grad = q * (diff - value[:, None])
    else:  # total variation 0.5 * |p - q|_1
        sign = torch.sign(q - p)
        value = 0.5 * (p - q).abs().sum(-1)
        g = 0.5 * sign
        grad = q * (g - (q * g).sum(-1, keepdim=True))
    return value, grad / temperature


def _chunk_loss_and_grad(
    logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, t_logits: torch.Tensor | None, cfg: LossConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted CE and divergence sums of one chunk and d(weighted sum)/d logits, built in ``logits``' buffer.

    ``logits``/``t_logits`` [c, V] fp32 are overwritten. The default objective (CE + forward KL at T = 1) shares
    one softmax: grad = (ce_w + kl_w) q - kl_w p - ce_w onehot, so a chunk holds about four vocab-sized buffers.
    """
    rows = torch.arange(logits.shape[0], device=logits.device)
    zero = logits.new_zeros(())
    ce_sum, kl_sum, lse = zero, zero, None
    inside = (labels >= 0).float()  # -1: a label the head cannot produce, no CE term
    labels = labels.clamp(min=0)
    ce_w, kl_w = cfg.ce_weight * w * inside, cfg.kl_weight * w  # [c]
    if cfg.ce_weight > 0:
        lse = torch.logsumexp(logits, dim=-1)
        ce_sum = (w * inside * (lse - logits[rows, labels])).sum()
    if cfg.kl_weight > 0 and cfg.kl_type == "forward" and cfg.kl_temperature == 1.0:
        log_p = t_logits.sub_(torch.logsumexp(t_logits, dim=-1, keepdim=True))
        log_q = logits.sub_((lse if lse is not None else torch.logsumexp(logits, dim=-1))[:, None])
        diff = log_p - log_q
        p = log_p.exp_()
        kl_sum = (w * diff.mul_(p).sum(-1)).sum()
        del diff
        grad = log_q.exp_().mul_((ce_w + kl_w)[:, None]).sub_(p.mul_(kl_w[:, None]))
    else:
        kl_grad = None
        if cfg.kl_weight > 0:
            kl, kl_grad = _divergence(logits, t_logits, cfg.kl_type, cfg.kl_temperature)
            kl_sum = (w * kl).sum()
            kl_grad.mul_(kl_w[:, None])
        if lse is not None:
            grad = logits.sub_(lse[:, None]).exp_().mul_(ce_w[:, None])
            if kl_grad is not None:
                grad.add_(kl_grad)
        else:
            grad = kl_grad
    if cfg.ce_weight > 0:
        grad[rows, labels] -= ce_w
    return ce_sum, kl_sum, grad


class _FusedCEKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, weight, labels, row_weights, teacher, cfg: LossConfig, teacher_weight,
                weight_grad: bool):  # type: ignore[override]
        n = student.shape[0]
        total_w = row_weights.sum()
        grad_student = torch.zeros_like(student, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        ce_sum = student.new_zeros((), dtype=torch.float32)
        kl_sum = student.new_zeros((), dtype=torch.float32)
        correct = torch.zeros(n, dtype=torch.bool, device=student.device)
        scale = 1.0 / total_w.clamp(min=1e-12)
        for start in range(0, n, cfg.chunk_size):
            rows = slice(start, min(start + cfg.chunk_size, n))
            logits = (student[rows] @ weight.t()).float()  # [c, V]: vocab-sized buffers live for one chunk only
            correct[rows] = logits.argmax(-1) == labels[rows]
            t_logits = (teacher[rows] @ teacher_weight.t()).float() if cfg.kl_weight > 0 else None
            ce, kl, grad_logits = _chunk_loss_and_grad(logits, labels[rows], row_weights[rows].float(), t_logits, cfg)
            ce_sum += ce
            kl_sum += kl
            # back to hidden space in the weight's dtype (bf16 on GPU) to avoid an fp32 copy of lm_head
            grad_logits = grad_logits * scale
            if grad_weight is not None:  # in fp32: a bf16 product would round each chunk's share before the sum
                grad_weight += grad_logits.t() @ student[rows].float()
            grad_student[rows] = (grad_logits.to(weight.dtype) @ weight).float()
            del logits, t_logits, grad_logits
        ce_mean, kl_mean = ce_sum * scale, kl_sum * scale
        loss = cfg.ce_weight * ce_mean + cfg.kl_weight * kl_mean
        ctx.save_for_backward(grad_student, grad_weight)
        ctx.student_dtype, ctx.weight_dtype = student.dtype, weight.dtype
        ctx.mark_non_differentiable(ce_mean, kl_mean, correct)
        return loss, ce_mean, kl_mean, correct

    @staticmethod
    def backward(ctx, grad_loss, _g_ce, _g_kl, _g_correct):  # type: ignore[override]
        grad_student, grad_weight = ctx.saved_tensors
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return (grad_student * grad_loss).to(ctx.student_dtype), grad_weight, None, None, None, None, None, None


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student rows
    ce: torch.Tensor  # scalar weighted-mean CE (detached)
    kl: torch.Tensor  # scalar weighted-mean divergence (detached; 0 when kl_weight is 0)
    correct: torch.Tensor  # [n] bool, student argmax == label


def fused_ce_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    row_weights: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    cfg: LossConfig,
    teacher_weight: torch.Tensor | None = None,
) -> LossOutput:
    """``ce_weight * CE + kl_weight * KL``, each a ``row_weights``-weighted mean over the ``n`` rows.

    student_hidden [n, H] (requires grad), lm_head_weight [V, H] (gets a gradient only when it requires one: a
    trained draft head), labels [n] long (-1: no CE term for the row), row_weights [n] (> 0 for every row given),
    teacher_hidden [n, H] (detached) or None when ``kl_weight`` is 0, through ``teacher_weight [V, H]`` (default
    ``lm_head_weight``). With ``n == 0`` the loss is a differentiable zero, so a batch without supervised rows still
    steps cleanly.
    """
    if cfg.kl_weight > 0 and teacher_hidden is None:
        raise ValueError("kl_weight > 0 needs teacher_hidden")
    teacher = teacher_hidden.detach() if teacher_hidden is not None else student_hidden.detach()
    if student_hidden.shape[0] == 0:
        zero = student_hidden.sum() * 0.0
        empty = torch.zeros(0, dtype=torch.bool, device=student_hidden.device)
        return LossOutput(zero, zero.detach(), zero.detach(), empty)
    weight_grad = lm_head_weight.requires_grad and torch.is_grad_enabled()
    teacher_weight = (lm_head_weight if teacher_weight is None else teacher_weight).detach()
    loss, ce, kl, correct = _FusedCEKL.apply(
        student_hidden, lm_head_weight if weight_grad else lm_head_weight.detach(), labels, row_weights.float(),
        teacher, cfg, teacher_weight, weight_grad,
    )
    return LossOutput(loss, ce, kl, correct)


def reference_ce_kl_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    row_weights: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    cfg: LossConfig,
    teacher_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain materialised loss the fused one must equal (tests and ``bench/loss_memory.py``)."""
    logits = (student_hidden @ lm_head_weight.t()).float()
    w = row_weights.float()
    total = w.sum().clamp(min=1e-12)
    loss = logits.new_zeros(())
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=-1)
        loss = loss + cfg.ce_weight * (w * ce).sum() / total
    if cfg.kl_weight > 0:
        head = (lm_head_weight if teacher_weight is None else teacher_weight).detach()
        t = (teacher_hidden.detach() @ head.t()).float() / cfg.kl_temperature
        s = logits / cfg.kl_temperature
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        if cfg.kl_type == "forward":
            div = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        elif cfg.kl_type == "reverse":
            div = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        else:
            div = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
        loss = loss + cfg.kl_weight * (w * div).sum() / total
    return loss


def accepted_lengths(correct_followers: torch.Tensor) -> torch.Tensor:
    """Simulated acceptance per block: the leading run of correct argmax predictions + 1 (the bonus token).

    correct_followers [blocks, B-1] bool (follower k = 1..B-1 predicted right) -> [blocks] float.
    """
    return correct_followers.long().cumprod(dim=1).sum(dim=1).float() + 1.0

"""What an optimizer step logs: :class:`StepMetrics` (sums over micro-batches and data-parallel ranks, turned into
means in one place) and :class:`MetricsLog` (``OUTPUT/metrics.jsonl`` and TensorBoard)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from . import collectives
from .blocks import BlockLayout
from .files import write_text_atomic
from .objective import ObjectiveOutput
from .parallel import ParallelLayout


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a blank or torn one (a run killed while appending it)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return None


class MetricsLog:
    """``OUTPUT/metrics.jsonl`` (one object per optimizer step) and TensorBoard through DeepSpeed's monitor."""

    def __init__(self, output_dir: str, engine, resume_step: int, is_main: bool) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.engine, self.is_main = engine, is_main
        if is_main:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # a resumed run rewrites the steps after its checkpoint, so the file reads like an uninterrupted run
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if _step_of(l) is not None and _step_of(l) <= step]
        write_text_atomic(self.path, "".join(l + "\n" for l in keep))

    def write(self, record: dict, per_position: list[float] | None = None) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            step = record["step"]
            events = [(f"train/{k}", float(v), step) for k, v in record.items() if k != "step" and isinstance(v, (int, float))]
            events += [(f"train/acc_pos_{k}", v, step) for k, v in enumerate(per_position or []) if k > 0]
            monitor.write_events(events)


class StepMetrics:
    """What one optimizer step logs. Sums and counts while the micro-batches run (so ranks can add them up), then
    :meth:`reduce` gives the record: loss, ce, kl (means over the micro-batches that counted), acc (top-1 over
    supervised block positions), sim_tau (simulated acceptance over fully supervised blocks), tokens_per_s,
    skipped_samples (samples with no valid anchor), nonfinite_micro_batches, and the accuracy by block position for
    TensorBoard.

    A micro-batch whose loss was non-finite (skipped: it added no gradient) adds nothing to the loss, ce, kl and
    accuracy sums: its NaN would make the step's means NaN, and its zero stand-in loss would pull them down. It
    still counts in tokens_per_s (its forward ran). A step with no micro-batch left logs NaN means."""

    def __init__(self, step: int, block_size: int) -> None:
        self.step, self.t0 = step, time.perf_counter()
        z = torch.zeros
        self.sums = {
            "loss": z(()), "ce": z(()), "kl": z(()), "correct": z(block_size), "count": z(block_size),
            "accept_sum": z(()), "accept_count": z(()), "tokens": z(()), "skipped_samples": z(()),
            "counted": z(()), "nonfinite": z(()),
        }
        self.record: dict[str, Any] = {}
        self.per_position: list[float] = []

    def add(self, out: ObjectiveOutput, loss: torch.Tensor, batch: dict, blocks: BlockLayout, *,
            skipped: bool = False) -> None:
        """One micro-batch's numbers; ``skipped``: its loss was non-finite on some rank (see the class docstring)."""
        s = self.sums
        s["tokens"] += float(batch["attention_mask"].sum() + blocks.block_valid.sum() * blocks.block_size)
        if skipped:
            s["nonfinite"] += 1
            return
        s["counted"] += 1
        s["loss"] += loss.detach().float().cpu()
        s["ce"] += out.ce.float().cpu()
        s["kl"] += out.kl.float().cpu()
        s["correct"] += out.correct_by_pos.cpu()
        s["count"] += out.count_by_pos.cpu()
        s["accept_sum"] += out.accept_sum.cpu()
        s["accept_count"] += out.accept_count.cpu()
        s["skipped_samples"] += blocks.num_skipped

    def reduce(self, parallel: ParallelLayout, accum: int, **extra) -> dict[str, Any]:
        """Sum over data-parallel ranks (TP ranks hold the same numbers) and turn sums into means (collective).
        ``accum``: the micro-batches each rank ran this step (counted or skipped)."""
        flat = torch.cat([v.reshape(-1) for v in self.sums.values()])
        if parallel.dp_size > 1:
            collectives.all_reduce(flat, group=parallel.dp_group)  # CPU sums: the group's gloo backend
        parts, offset = {}, 0
        for k, v in self.sums.items():
            parts[k] = flat[offset : offset + v.numel()].reshape(v.shape)
            offset += v.numel()
        counted = float(parts["counted"])  # micro-batches over all data-parallel ranks
        if counted + float(parts["nonfinite"]) != accum * parallel.dp_size:
            raise RuntimeError(f"step {self.step}: {counted:g} counted + {float(parts['nonfinite']):g} skipped "
                               f"micro-batches, expected {accum} on each of {parallel.dp_size} ranks")
        mean = (lambda key: float(parts[key]) / counted) if counted else (lambda key: float("nan"))
        self.per_position = (parts["correct"] / parts["count"].clamp(min=1)).tolist()
        accepted = parts["accept_count"] > 0
        self.record = {
            "step": self.step,
            "loss": mean("loss"),
            "ce": mean("ce"),
            "kl": mean("kl"),
            "acc": float(parts["correct"].sum() / parts["count"].sum().clamp(min=1)) if counted else float("nan"),
            "sim_tau": float(parts["accept_sum"] / parts["accept_count"]) if accepted else float("nan"),
            "skipped_samples": int(parts["skipped_samples"]),
            # every rank skips the same micro-batches: count each once
            "nonfinite_micro_batches": int(parts["nonfinite"]) // parallel.dp_size,
            **extra,
            "tokens_per_s": float(parts["tokens"]) / max(time.perf_counter() - self.t0, 1e-9),
        }
        return self.record

"""Statistics of an evaluation: intervals over repeated timings, bootstrap intervals over prompts, and how much a
model's output repeats itself. Used by ``dflash-ds eval``, the demo, the tiny target's build report and the benches."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch

# two-sided 95% Student t quantiles, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% Student-t interval of a few repeated measurements (the interval is null for one value)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / n
    ci = None
    if n > 1:
        half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * statistics.stdev(values) / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {"mean": mean, "ci95": ci, "min": min(values), "max": max(values), "n": n}


def bootstrap_ci(values: Sequence[float], stat: str = "mean", num: int = 2000, seed: int = 0) -> list[float] | None:
    """Percentile 95% bootstrap interval of the mean or median of ``values`` (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    x = torch.tensor([float(v) for v in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (num, len(values)), generator=gen)
    samples = x[idx]
    stats = samples.mean(dim=1) if stat == "mean" else samples.median(dim=1).values
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [lo, hi]


def repetition_counts(token_ids: Sequence[int], n: int = 4) -> tuple[int, int]:
    """(``n``-grams that already occurred earlier in the same sequence, all ``n``-grams)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[int, ...]] = set()
    repeated = total = 0
    for i in range(len(token_ids) - n + 1):
        gram = tuple(token_ids[i : i + n])
        total += 1
        repeated += gram in seen
        seen.add(gram)
    return repeated, total


def repetition_rate(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Share of the ``n``-grams of ``sequences`` (pooled) that already occurred earlier in their own sequence: 0.0
    when nothing repeats, near 1.0 for a model stuck in a loop, 0.0 when no sequence is ``n`` long."""
    repeated = total = 0
    for ids in sequences:
        r, t = repetition_counts(ids, n)
        repeated, total = repeated + r, total + t
    return repeated / total if total else 0.0

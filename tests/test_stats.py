"""dflash_ds.stats against hand-computed values."""

from __future__ import annotations

import pytest

from dflash_ds.stats import bootstrap_ci, repetition_counts, repetition_rate, t_interval


def test_repetition_counts_and_rate():
    assert repetition_counts([1, 2, 3, 4, 1, 2, 3, 4, 1]) == (2, 6)
    assert repetition_counts([1, 2, 3]) == (0, 0)
    assert repetition_rate([[1, 2, 3, 4, 5, 6]]) == 0.0
    # 4-grams of 1 2 3 4 1 2 3 4: (1234)(2341)(3412)(4123)(1234) -> one of five repeats.
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    assert repetition_rate([[7] * 10]) == pytest.approx(6 / 7)
    assert repetition_rate([[1, 2, 3]]) == 0.0
    assert repetition_rate([[1, 2, 1, 2]], n=2) == pytest.approx(1 / 3)
    # pooled over sequences, and an n-gram repeats only within its own sequence
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4]]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError):
        repetition_rate([[1, 2]], n=0)


def test_intervals():
    ci = t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["ci95"][0] == pytest.approx(2 - 4.303 / 3 ** 0.5)
    assert t_interval([5.0])["ci95"] is None
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 4.0, 10.0], "median")
    assert 1.0 <= lo <= 3.0 <= hi <= 10.0
    assert bootstrap_ci([1.0]) is None

import math

import pytest

from parity.gate import stats


def test_accuracy_stderr_is_lm_evals_sample_stderr():
    a = stats.accuracy([True] * 80 + [False] * 20)
    assert a.acc == 0.8 and a.correct == 80 and a.n == 100
    assert a.stderr == pytest.approx(math.sqrt(0.8 * 0.2 / 99))
    assert stats.accuracy([True]).stderr != stats.accuracy([True]).stderr  # nan for n = 1
    assert math.isnan(stats.accuracy([]).acc)


@pytest.mark.parametrize("b,c,p", [
    (0, 0, 1.0),
    (0, 5, 2 / 32),
    (5, 0, 2 / 32),
    (1, 9, 2 * (1 + 10) / 1024),
    (3, 3, 1.0),
    (10, 30, 2 * sum(math.comb(40, i) for i in range(11)) / 2 ** 40),
])
def test_mcnemar_exact(b, c, p):
    assert stats.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)


def test_mcnemar_large_n_stays_finite():
    p = stats.mcnemar_exact(400, 600)
    assert 0 < p < 1e-9


def test_paired_counts_and_agreement():
    p = stats.paired([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], ["1", "2", "x", "y", "5"], ["1", "3", "x", "z", "5"])
    assert (p.both_correct, p.only_run, p.only_baseline, p.neither) == (2, 1, 1, 1)
    assert p.agree == 3 and p.agreement == pytest.approx(0.6)
    assert p.p_value == 1.0


def test_rules():
    acc = stats.accuracy([True] * 70 + [False] * 30)
    assert stats.check_min_accuracy(acc, 0.7).passed
    assert not stats.check_min_accuracy(acc, 0.71).passed
    se = acc.stderr
    assert stats.check_baseline(acc, 0.7 + 1.9 * se, 2.0).passed
    assert not stats.check_baseline(acc, 0.7 + 2.1 * se, 2.0).passed
    worse = stats.paired([0] * 8 + [1] * 92, [1] * 100, ["x"] * 100, ["y"] * 8 + ["x"] * 92)
    assert not stats.check_mcnemar(worse, 0.05).passed
    better = stats.paired([1] * 100, [0] * 8 + [1] * 92, ["x"] * 100, ["x"] * 100)
    c = stats.check_mcnemar(better, 0.05)
    assert c.passed and "significantly better" in c.detail
    assert not stats.check_agreement(worse, 0.95).passed
    assert stats.check_agreement(worse, 0.92).passed

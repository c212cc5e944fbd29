"""The certified threshold's guarantee by simulation: many validation draws from a known score distribution,
the true precision of each certified threshold computed exactly, the violation rate at most delta within
its binomial noise; the bounds against scipy and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import betainc
from scipy.stats import binom

from trustmatch.evaluation.certify import LEVELS, NotCertifiable, betting_upper, certify, clopper_pearson_upper

DRAWS = 300


def _true_risk(threshold: float, a: float, b: float) -> float:
    """E[1 - c | c > threshold] for c ~ Beta(a, b) and P(correct | c) = c (calibrated scores)."""
    tail = 1 - betainc(a, b, threshold)
    tail_mean = a / (a + b) * (1 - betainc(a + 1, b, threshold))  # E[c; c > threshold]
    return 1 - tail_mean / tail


def _violations(rule, precision: float, a: float = 6.0, b: float = 1.0, m: int = 400) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(violations, certified draws) of ``rule(scores, losses) -> threshold`` over DRAWS validation draws."""
    rng = np.random.default_rng(0)
    scores = rng.beta(a, b, size=(DRAWS, m))
    losses = (rng.random((DRAWS, m)) >= scores).astype(np.float64)
    bad = done = 0
    for s, loss in zip(scores, losses):
        try:
            threshold = rule(s, loss)
        except NotCertifiable:
            continue
        done += 1
        bad += 1 - _true_risk(threshold, a, b) < precision
    return bad, done


def test_violation_rate_is_at_most_delta() -> None:
    precision, delta = 0.9, 0.2
    bad, done = _violations(lambda s, loss: certify(s, loss, precision, delta).threshold, precision)
    assert done > 0.8 * DRAWS  # the target is reachable: the test is not vacuous
    assert bad <= binom.ppf(0.999, done, delta)  # at most delta, within its binomial noise

    # the simulation can see a violation: choosing the threshold by the validation precision alone breaks it
    def naive(s: np.ndarray, loss: np.ndarray) -> float:
        order = np.argsort(-s)
        precisions = 1 - np.cumsum(loss[order]) / np.arange(1, len(s) + 1)
        ok = np.nonzero(precisions >= precision)[0]
        return float(s[order][ok[-1] + 1]) if len(ok) and ok[-1] + 1 < len(s) else 0.0

    naive_bad, _ = _violations(naive, precision)
    assert naive_bad > binom.ppf(0.999, DRAWS, delta)


def test_certified_threshold_is_useful() -> None:
    """Not only valid: at 0.93 the threshold keeps a good share of what an oracle would (P(c > t*) for the
    exact t* with precision 0.93 on Beta(6, 1) scores is about 0.4)."""
    rng = np.random.default_rng(1)
    s = rng.beta(6, 1, size=2000)
    loss = (rng.random(2000) >= s).astype(np.float64)
    c = certify(s, loss, 0.93, 0.05)
    assert 0.15 < c.coverage < 0.5 and c.validation_precision >= 0.93 and c.tests == LEVELS


def test_clopper_pearson_matches_the_binomial_tail() -> None:
    upper = clopper_pearson_upper(np.array([0, 3, 10]), np.array([59, 100, 10]), 0.05)
    assert upper[0] == pytest.approx(1 - 0.05 ** (1 / 59), abs=1e-12)  # zero errors: 1 - delta^(1/n)
    assert binom.cdf(3, 100, upper[1]) == pytest.approx(0.05, abs=1e-9)  # the rate at which 3 errors is the tail
    assert upper[2] == 1.0


def test_betting_bound_covers_and_beats_hoeffding() -> None:
    rng = np.random.default_rng(2)
    delta, n = 0.1, 100
    draws = rng.beta(1, 30, size=(DRAWS, n))  # pixel error rates of images: mean 1/31
    bounds = np.array([betting_upper(x, delta) for x in draws])
    assert (bounds < 1 / 31).sum() <= binom.ppf(0.999, DRAWS, delta)
    hoeffding = draws.mean(axis=1) + math.sqrt(math.log(1 / delta) / (2 * n))
    assert (bounds < hoeffding).mean() > 0.95
    assert betting_upper(np.zeros(n), delta) < 0.03 and betting_upper(np.ones(5), delta) == 1.0


def test_betting_certificate_holds_for_image_precision() -> None:
    """Segmentation's unit: an image's score s ~ U(0, 1) and its pixel error ~ Beta with mean 0.4 (1 - s), so
    the true selective risk above t is 0.2 (1 - t): the target 0.85 holds for t >= 0.25 only, and everything
    (t = 0) has precision 0.8, so a threshold chosen too low is a violation the simulation sees."""
    rng = np.random.default_rng(3)
    precision, delta, draws, m = 0.85, 0.2, 100, 300
    s = rng.random((draws, m))
    mean = 0.4 * (1 - s)
    losses = rng.beta(2 * mean / (1 - mean), 2.0)  # Beta(a, 2) has mean a / (a + 2) = mean

    def violated(threshold: np.ndarray) -> np.ndarray:
        return 1 - 0.2 * (1 - threshold) < precision

    bad = done = 0
    for scores, loss in zip(s, losses):
        try:
            c = certify(scores, loss, precision, delta, bound="betting")
        except NotCertifiable:
            continue
        done += 1
        bad += violated(c.threshold)
    assert done > 0.8 * draws and bad <= binom.ppf(0.999, done, delta)

    # the naive rule, the lowest threshold whose validation precision reaches the target, breaks it
    order = np.argsort(-s, axis=1)
    ranked, ranked_losses = np.take_along_axis(s, order, 1), np.take_along_axis(losses, order, 1)
    reached = 1 - np.cumsum(ranked_losses, axis=1) / np.arange(1, m + 1) >= precision  # top k + 1 kept
    last = m - 1 - np.argmax(reached[:, ::-1], axis=1)  # the most units still reaching it
    naive = np.where(last + 1 < m, ranked[np.arange(draws), np.minimum(last + 1, m - 1)], 0.0)
    assert reached.any(axis=1).all() and violated(naive).sum() > binom.ppf(0.999, draws, delta)


def test_refusal_names_the_best_certifiable_precision() -> None:
    rng = np.random.default_rng(4)
    s = rng.beta(6, 1, size=100)
    loss = (rng.random(100) >= s).astype(np.float64)
    with pytest.raises(NotCertifiable) as refused:
        certify(s, loss, 0.999, 0.05)
    best = refused.value.best
    assert 0 < best < 0.999 and refused.value.units == 100
    assert certify(s, loss, best - 1e-9, 0.05).certified_precision == pytest.approx(best)

"""Selective-risk metrics from the streamed confidence histogram, against a direct numpy sort, brute-force
tie averaging, hand values and the closed-form oracle."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from trustmatch.evaluation import selective
from trustmatch.evaluation.metrics import ClassificationMeter, SegmentationMeter
from trustmatch.evaluation.selective import BINS, LOG10_MIN, histogram, risk_coverage, selective_metrics


def _exact(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, np.ndarray]:
    """AURC by sorting (no ties expected) and the risk at every k."""
    order = np.argsort(-confidence, kind="stable")
    risks = np.cumsum(1 - correct[order]) / np.arange(1, len(order) + 1)
    return float(risks.mean()), risks


def _metrics(confidence: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    log_c = torch.from_numpy(np.log(confidence))
    return selective_metrics(histogram(log_c, torch.from_numpy(correct.astype(np.float64))))


def _one_per_bin(rng: np.random.Generator, n: int) -> np.ndarray:
    """Confidences at the centres of n distinct bins: no two share a bin, so the histogram sorts exactly."""
    bins = rng.choice(np.arange(BINS // 4, BINS), size=n, replace=False)  # 1 - c from 1e-15 to 1
    u = 10 ** (LOG10_MIN + (bins + 0.5) * (-LOG10_MIN / BINS))
    return 1 - u


def test_hand_values() -> None:
    got = _metrics(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 1]))
    # risks at k = 1..4: 0, 1/2, 1/3, 1/4; the oracle (the error last): 0, 0, 0, 1/4
    aurc = (0 + 1 / 2 + 1 / 3 + 1 / 4) / 4
    assert got["aurc"] == pytest.approx(aurc, abs=1e-12)
    assert got["eaurc"] == pytest.approx(aurc - 1 / 16, abs=1e-12)
    # coverage 50 %: the 2 most confident; 80 % and 90 %: ceil(3.2) = ceil(3.6) = 4
    assert got["accuracy_at_coverage_50"] == pytest.approx(0.5, abs=1e-12)
    assert got["accuracy_at_coverage_80"] == got["accuracy_at_coverage_90"] == pytest.approx(0.75, abs=1e-12)


def test_matches_a_direct_sort_when_no_bin_is_shared() -> None:
    rng = np.random.default_rng(0)
    conf = _one_per_bin(rng, 3000)
    correct = (rng.random(3000) < conf).astype(np.float64)
    got = _metrics(conf, correct)
    aurc, risks = _exact(conf, correct)
    assert got["aurc"] == pytest.approx(aurc, abs=1e-12)
    for p in (50, 80, 90):
        assert got[f"accuracy_at_coverage_{p}"] == pytest.approx(1 - risks[math.ceil(p * 3000 / 100) - 1], abs=1e-12)
    curve = risk_coverage(histogram(torch.from_numpy(np.log(conf)), torch.from_numpy(correct)))
    assert len(curve["coverage"]) == 100 and curve["coverage"][-1] == 1.0
    ks = np.round(np.array(curve["coverage"]) * 3000).astype(int)
    np.testing.assert_allclose(curve["risk"], risks[ks - 1], atol=1e-12)


def test_ties_are_averaged_over_random_orders() -> None:
    """Exact ties: the mean over every order of the tied samples, by enumerating the orders."""
    conf = np.array([0.9, 0.9, 0.9, 0.7, 0.7, 0.5, 0.3])
    correct = np.array([1, 0, 1, 0, 1, 1, 0], dtype=np.float64)
    aurcs, acc80 = [], []
    for order in itertools.permutations(range(len(conf))):
        if np.all(np.diff(conf[list(order)]) <= 0):  # a confidence-descending order
            risks = np.cumsum(1 - correct[list(order)]) / np.arange(1, len(conf) + 1)
            aurcs.append(risks.mean())
            acc80.append(1 - risks[math.ceil(0.8 * len(conf)) - 1])
    got = _metrics(conf, correct)
    assert got["aurc"] == pytest.approx(np.mean(aurcs), abs=1e-12)
    assert got["accuracy_at_coverage_80"] == pytest.approx(np.mean(acc80), abs=1e-12)


def test_continuous_confidences_within_a_bin_width_of_the_sort() -> None:
    rng = np.random.default_rng(1)
    conf = 1 - rng.beta(0.3, 3, size=20_000) * 0.9  # many near 1, as an over-confident model's
    correct = (rng.random(20_000) < conf).astype(np.float64)
    got = _metrics(conf, correct)
    aurc, risks = _exact(conf, correct)
    assert got["aurc"] == pytest.approx(aurc, abs=1e-4)
    assert got["accuracy_at_coverage_80"] == pytest.approx(1 - risks[15_999], abs=1e-3)


def test_eaurc_is_zero_for_the_oracle_and_matches_the_closed_form() -> None:
    rng = np.random.default_rng(2)
    conf = _one_per_bin(rng, 5000)
    correct = np.zeros(5000)
    correct[np.argsort(-conf)[:4000]] = 1  # every correct prediction more confident than every error
    got = _metrics(conf, correct)
    assert got["eaurc"] == pytest.approx(0.0, abs=1e-12)
    r = 0.2
    assert got["aurc"] == pytest.approx(r + (1 - r) * math.log(1 - r), abs=1e-3)  # the large-n limit
    shuffled = _metrics(conf, rng.permutation(correct))
    assert shuffled["eaurc"] > 0.1  # a random ranking: AURC near the error rate


def test_streamed_meters_add_histograms_and_skip_ignored_pixels() -> None:
    torch.manual_seed(0)
    logits, labels = 3 * torch.randn(600, 4), torch.randint(0, 4, (600,))
    whole, parts = ClassificationMeter(4), ClassificationMeter(4)
    whole.update(logits, labels)
    for chunk in (slice(0, 100), slice(100, 450), slice(450, 600)):
        parts.update(logits[chunk], labels[chunk])
    keys = ("aurc", "eaurc", *(f"accuracy_at_coverage_{p}" for p in selective.COVERAGES))
    assert {k: parts.compute()[k] for k in keys} == {k: whole.compute()[k] for k in keys}  # integer counts: exact
    assert parts.risk_coverage() == whole.risk_coverage()

    pixels, masks = 3 * torch.randn(2, 4, 5, 6), torch.randint(0, 4, (2, 5, 6), dtype=torch.uint8)
    masks[0, :2] = 255
    seg = SegmentationMeter(4)
    seg.update(pixels, masks)
    valid = masks.flatten() != 255
    flat = ClassificationMeter(4)
    flat.update(pixels.permute(0, 2, 3, 1).reshape(-1, 4)[valid], masks.flatten()[valid].long())
    got, want = seg.compute(), flat.compute()
    for key in keys:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    curves = seg.risk_coverage(), flat.risk_coverage()
    for key in ("coverage", "risk"):
        assert curves[0][key] == pytest.approx(curves[1][key], abs=1e-12)

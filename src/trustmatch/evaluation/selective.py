"""Selective-prediction metrics (risk-coverage curve, AURC, excess AURC, accuracy at a coverage),
streamed like ECE's bins: a fixed-size confidence histogram whose counts add over batches and processes.

Keeping the most confident fraction of predictions and measuring the error of what is kept is the
risk-coverage curve (Geifman and El-Yaniv, 2017; AURC and excess AURC: Geifman et al., ICLR 2019).
Segmentation scores up to ~10^9 pixels per split, more than can be kept and sorted, so instead of
sorting the samples each one is counted in one of :data:`BINS` bins of its confidence, with its
correct count beside it. The bins are uniform in log10(1 - c) over [-20, 0] (1,638 bins per decade, a
relative width of 0.14 % in 1 - c): a bin's width in c shrinks as c nears 1, where over-confident
SSL models put most of their predictions (a uniform grid in c would lump every c > 1 - 10^-4 into one
bin). 1 - c is computed as -expm1(log c), so it is exact to the last bit near 1; c > 1 - 10^-20 falls
in the first bin.

**Ties.** Samples in one bin are treated as tied, and a tie as in a uniformly random order: the risk at
coverage k/n is its expectation over the orders of the tied samples, and AURC the mean of those
risks. Where no bin holds samples of different confidences (e.g. fewer samples than bins, spread out)
this equals the exact sort; otherwise it differs only by the order inside a bin of width 0.14 % of
1 - c (``tests/test_selective.py`` measures it against a direct sort).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BINS", "COVERAGES", "confidence_bin", "histogram", "risk_coverage", "selective_metrics"]

BINS = 1 << 15
LOG10_MIN = -20.0  # log10(1 - c) of the first bin's lower edge; anything more confident lands in it
COVERAGES = (50, 80, 90)  # accuracy_at_coverage_<p>: the accuracy of the ceil(p n / 100) most confident
CURVE_POINTS = 100


def confidence_bin(top_log_prob: Tensor) -> Tensor:
    """The bin (int64) of each top-class log-probability: 0 = most confident, BINS - 1 = least."""
    u = -torch.expm1(top_log_prob.to(torch.float64))  # 1 - c, exact near c = 1
    position = (u.log10() - LOG10_MIN) * (BINS / -LOG10_MIN)  # u = 0: -inf, clamped into bin 0
    return position.floor().clamp(0, BINS - 1).long()


def histogram(top_log_prob: Tensor, correct: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-bin (count, correct count) as the rows of a float64 [2, BINS] tensor, on the inputs' device.

    Like ECE's bin sums these add over batches and processes; ``weight`` (0 or 1) leaves elements out
    without indexing (ignored pixels). ``index_put_`` with ``accumulate`` sums in a fixed order on CUDA.
    """
    index = confidence_bin(top_log_prob.flatten())
    ones = torch.ones_like(index, dtype=torch.float64) if weight is None else weight.flatten().to(torch.float64)
    values = torch.stack([ones, correct.flatten().to(torch.float64) * ones])
    return values.new_zeros(BINS, 2).index_put_((index,), values.T, accumulate=True).T


def _harmonic_gap(upper: Tensor, lower: Tensor) -> Tensor:
    """H(upper) - H(lower), H(m) = sum_{t=1}^m 1/t, as a digamma difference (counts up to ~10^9)."""
    return torch.special.digamma(upper + 1) - torch.special.digamma(lower + 1)


def _cumulative(hist: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, float, float]:
    """Per non-empty bin in confidence order: its count, its errors, and the counts and errors before it."""
    count, hits = hist.detach().to("cpu", torch.float64)
    keep = count > 0
    count, errors = count[keep], (count - hits)[keep]
    n, e = float(count.sum()), float(errors.sum())
    return count, errors, count.cumsum(0) - count, errors.cumsum(0) - errors, n, e


def _risks_at(hist: Tensor, ks: list[int]) -> list[float]:
    """Expected error rate of the k most confident (ties in a random order), for each k in 1..n."""
    count, errors, before, errors_before, _, _ = _cumulative(hist)
    k = torch.tensor(ks, dtype=torch.float64)
    j = torch.searchsorted(before + count, k)  # the first bin that reaches k samples
    return ((errors_before[j] + (k - before[j]) * errors[j] / count[j]) / k).tolist()


def _oracle_aurc(n: float, e: float) -> float:
    """AURC of the oracle ranking (every correct prediction first) at n samples with e errors, exactly:
    (1/n) sum_{k=n-e+1}^{n} (k - (n - e)) / k = (e - (n - e)(H(n) - H(n - e))) / n. For large n it tends
    to r + (1 - r) ln(1 - r) with r = e / n."""
    c = n - e
    gap = float(_harmonic_gap(torch.tensor(n, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)))
    return (e - c * gap) / n


def selective_metrics(hist: Tensor) -> dict[str, float]:
    """``aurc``, ``eaurc`` and ``accuracy_at_coverage_<p>`` (p in :data:`COVERAGES`) of a :func:`histogram`.

    AURC = (1/n) sum_{k=1}^{n} risk(k), risk(k) the error rate of the k most confident; in a bin of c
    samples, e of them wrong, after N samples with E errors, the risks at k = N + t (t = 1..c) average
    (E + t e / c) / (N + t), whose sum is e + (E - N e / c)(H(N + c) - H(N)). e-AURC = AURC minus the
    oracle's AURC at the same errors (the exact finite-n value, :func:`_oracle_aurc`).
    """
    count, errors, before, errors_before, n, e = _cumulative(hist)
    if n == 0:
        raise ValueError("selective metrics need at least one sample, got none")
    rate = errors / count
    sums = errors + (errors_before - before * rate) * _harmonic_gap(before + count, before)
    aurc = float(sums.sum()) / n
    total = round(n)
    ks = [-(-p * total // 100) for p in COVERAGES]  # ceil(p n / 100), in integers
    accuracy = {f"accuracy_at_coverage_{p}": 1 - r for p, r in zip(COVERAGES, _risks_at(hist, ks))}
    return {"aurc": aurc, "eaurc": aurc - _oracle_aurc(n, e), **accuracy}


def risk_coverage(hist: Tensor, points: int = CURVE_POINTS) -> dict[str, list[float]]:
    """The curve at ``points`` evenly spaced coverages: ``coverage`` k/n and ``risk`` of the k most confident,
    k = ceil(i n / points) for i = 1..points (for a plot; the metrics above use every k)."""
    total = round(float(hist[0].sum()))
    if total == 0:
        raise ValueError("a risk-coverage curve needs at least one sample, got none")
    ks = sorted({-(-i * total // points) for i in range(1, points + 1)})
    return {"coverage": [k / total for k in ks], "risk": _risks_at(hist, ks)}

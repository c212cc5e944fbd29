"""A confidence threshold with a guaranteed precision, chosen on a labeled validation split: selection
with guaranteed risk (Geifman and El-Yaniv, NeurIPS 2017) with exact bounds, its thresholds tested as in
Learn-then-Test (Angelopoulos et al., 2021) with a Bonferroni correction over a fixed grid.

Given per-unit confidences s_i and losses l_i in [0, 1] (classification: 0 right, 1 wrong; segmentation:
an image's pixel error rate) of m validation units, a threshold theta accepts the units with s > theta.
The candidates are order statistics at a grid fixed by m alone: for n_j = ceil(j m / 20), j = 1..20,
theta_j is the (n_j + 1)-th largest validation confidence (0, accepting everything, for n_j = m).
Conditionally on theta_j (continuous scores), the units above it are an i.i.d. sample of the units
with s > theta_j, so an upper confidence bound computed from them bounds the selective risk
R(theta_j) = E[l | s > theta_j] of new data at level delta / 20, and by the union bound all 20 hold
at once with probability at least 1 - delta. The lowest theta_j whose bound is at most 1 - precision
is returned: with probability at least 1 - delta over the validation draw, the expected (population)
precision of what it accepts on new data, E[1 - l | s > theta], is at least the target. That is a
statement about the distribution, not about any one batch: a finite set of new predictions can fall below
the target by chance, the more likely the fewer are accepted. SGR's binary search over every validation
confidence (each test at delta / ceil(log2 m)) was not used: the bound is U-shaped in the threshold
(loose where few units are kept, high where many wrong ones are), which misleads a binary search, and its
union bound treats data-chosen thresholds as fixed; the order-statistic grid makes the conditional
argument above hold for each candidate, given a score and a loss that the validation split did not shape.

Bounds: for 0/1 losses the exact binomial (Clopper-Pearson) upper bound, Beta(1 - delta; e + 1, n - e);
for losses in [0, 1] (an image's pixel error) the betting bound of Waudby-Smith and Ramdas (JRSS-B
2024): a nonnegative capital process prod_t (1 + lambda_t (m - l_t)) with predictable bets lambda_t in
[0, 1] (their plug-in rule) is a supermartingale when the mean is at least m, so by Ville's inequality
the means m whose capital reaches 1 / delta are rejected; the bound is the smallest rejected m (the
capital grows with m, so the rejected means are an upper interval), found by a 64-way search.

Assumptions: the validation units and the new data are exchangeable (drawn alike from one
distribution), the threshold is chosen on validation only, the model does not change after, and ties
between confidences are rare (tied units at a threshold are all left out). It does not hold under
distribution shift, nor on data the model was trained on. Exchangeable includes the class mix: a
validation split of a fixed number of images per class (``data.split.stratified_pick``) is balanced by
construction, not drawn from the data, so the guarantee is for new data with that class mix; on
imbalanced deployment data, where the classes the model gets wrong are commoner or rarer, the precision
can differ. The model and the score must not have been chosen on the same validation units: a checkpoint
picked by its validation accuracy (``best.pt``) or settings tuned on that split make the guarantee
approximate (``trustmatch predict --precision`` certifies ``last.pt`` by default). So does a score fitted
on that split when it reorders the units. One temperature T does not change a classifier's predicted
class, and with two classes its top-class probability is an increasing function of the raw one, so the
same units are accepted at the matching threshold; with more classes it is not: two images with the same
raw top-class probability but differently spread runners-up get different confidences under T (gaps
z_max - z_j of (1, 1) and of (1 - ln 2, inf) both give 0.576 raw, but 0.452 and 0.538 at T = 2), so a
T fitted on the certifying split could reorder them. So both tasks certify a score computed from the
raw probabilities (``Task.selective_units``): a classifier's raw top-class probability (``predict``'s
``raw_confidence`` column), an image's mean raw pixel confidence; the predictions themselves keep the
temperature. Per-class temperatures can change a mask's classes, and that certificate is approximate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

__all__ = ["BOUNDS", "Certificate", "NotCertifiable", "betting_upper", "certify", "clopper_pearson_upper"]

BOUNDS = ("binomial", "betting")
BET_CAP = 1.0  # lambda <= 1 keeps 1 + lambda (m - l) >= 0 for every m in [0, 1], so capital grows with m
GRID, ROUNDS = 64, 5  # the betting bound's search: to 64^-5 ~ 1e-9
LEVELS = 20  # candidate coverages 5 %, 10 %, ..., 100 % of the validation units, each tested at delta / 20


@dataclass(frozen=True)
class Certificate:
    """A certified threshold and what it was certified on (every field goes into ``certified.json``)."""

    precision: float  # the target
    delta: float
    threshold: float  # accept a unit when its confidence is > this
    risk_bound: float  # upper bound (at 1 - delta) on the selective risk: 1 - the certified precision
    accepted: int  # validation units above the threshold
    units: int  # validation units
    validation_precision: float  # mean 1 - loss of the accepted validation units
    tests: int  # candidate thresholds, each tested at delta / tests
    bound: str  # "binomial" (Clopper-Pearson) or "betting" (Waudby-Smith and Ramdas)

    @property
    def certified_precision(self) -> float:
        return 1 - self.risk_bound

    @property
    def coverage(self) -> float:
        """Fraction of the validation units accepted."""
        return self.accepted / self.units

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "precision": self.precision,
            "delta": self.delta,
            "threshold": self.threshold,
            "certified_precision": self.certified_precision,
            "risk_bound": self.risk_bound,
            "validation_coverage": self.coverage,
            "validation_precision": self.validation_precision,
            "validation_accepted": self.accepted,
            "validation_units": self.units,
            "tests": self.tests,
            "bound": self.bound,
        }


class NotCertifiable(ValueError):
    """No threshold reaches the target on this validation split; ``best``: the highest certifiable precision."""

    def __init__(self, best: float, units: int) -> None:
        super().__init__(f"best certifiable precision {best:.4f} on {units} validation units")
        self.best, self.units = best, units


def clopper_pearson_upper(errors: np.ndarray, n: np.ndarray, delta: float) -> np.ndarray:
    """Exact one-sided upper (1 - delta) bounds on a binomial rate from ``errors`` of ``n`` (1 where n = 0)."""
    errors, n = np.asarray(errors, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = beta.ppf(1 - delta, errors + 1, np.maximum(n - errors, 1e-300))
    return np.where((n == 0) | (errors >= n), 1.0, upper)


def betting_upper(losses: np.ndarray, delta: float) -> float:
    """Upper (1 - delta) confidence bound on the mean of ``losses`` in [0, 1], in the order given (which
    must not depend on their values), by Waudby-Smith and Ramdas's betting with the plug-in bets."""
    x = np.asarray(losses, dtype=np.float64)
    n = len(x)
    if n == 0:
        return 1.0
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(x)) / (t + 1)
    variance = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1)
    previous = np.concatenate([[0.25], variance[:-1]])  # predictable: from the losses before t only
    bets = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * previous)), BET_CAP)
    level = math.log(1 / delta)

    def rejected(means: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            capital = np.cumsum(np.log1p(bets[:, None] * (means[None, :] - x[:, None])), axis=0)
        return capital.max(axis=0) >= level

    if not rejected(np.array([1.0]))[0]:
        return 1.0
    low, high = 0.0, 1.0  # the bound lies in (low, high]: high is rejected
    for _ in range(ROUNDS):  # each round narrows it 64-fold: one matrix of n x 64 capitals
        means = np.linspace(low, high, GRID + 1)[1:]
        first = int(np.argmax(rejected(means)))  # the capital grows with the mean: rejected from here on
        low, high = (means[first - 1] if first else low), means[first]
    return float(high)


def certify(
    scores: np.ndarray, losses: np.ndarray, precision: float, delta: float, bound: str = "binomial"
) -> Certificate:
    """The lowest of the :data:`LEVELS` candidate thresholds whose precision is certified at ``precision``
    with probability ``1 - delta`` (module docstring); :class:`NotCertifiable` where none is."""
    if not 0 < precision < 1 or not 0 < delta < 1:
        raise ValueError(f"precision and delta must lie in (0, 1), got {precision!r} and {delta!r}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    scores, losses = np.asarray(scores, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    m = len(scores)
    if m == 0 or losses.shape != scores.shape:
        raise ValueError(f"need as many losses as scores, at least one, got {losses.shape} and {scores.shape}")
    if bound == "binomial" and not np.isin(losses, (0.0, 1.0)).all():
        raise ValueError("the binomial bound needs 0/1 losses: use bound='betting' for losses in [0, 1]")
    descending = np.sort(scores)[::-1]
    counts = sorted({-(-j * m // LEVELS) for j in range(1, LEVELS + 1)})  # ceil(j m / LEVELS): fixed by m alone
    tests = len(counts)
    thresholds = np.array([descending[n] if n < m else 0.0 for n in counts])  # (n + 1)-th largest; 0: all
    accepted = scores[None, :] > thresholds[:, None]  # [tests, m]
    sizes, errors = accepted.sum(axis=1), (accepted * losses).sum(axis=1)
    if bound == "binomial":
        uppers = clopper_pearson_upper(errors, sizes, delta / tests)
    else:  # each accepted set in validation order, which ignores the scores
        uppers = np.array([betting_upper(losses[row], delta / tests) for row in accepted])
    candidates = [
        (float(t), float(u), int(k), 1 - float(e) / k) for t, u, k, e in zip(thresholds, uppers, sizes, errors) if k
    ]
    certified = [c for c in candidates if c[1] <= 1 - precision]
    if not certified:
        best = max((1 - c[1] for c in candidates), default=0.0)
        raise NotCertifiable(best, m)
    threshold, upper, accepted_count, kept_precision = min(certified, key=lambda c: c[0])
    return Certificate(precision, delta, threshold, upper, accepted_count, m, kept_precision, tests, bound)

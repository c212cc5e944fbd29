"""Metrics cross-checked against independent implementations (netcal, torchmetrics, sklearn).

Conventions of the references, checked by printing both sides before asserting:

* netcal 1.4 ``ECE``/``MCE``: equal-width bins from ``np.linspace(0, 1, n + 1)`` through
  ``np.histogramdd`` (half-open bins, last closed), confidences clipped to
  ``[eps, 1 - eps]``; MCE takes the max over all bins, empty ones counting 0.
  ``np.linspace`` edges are not always exactly ``k / n``: for ``n = 10`` edges 3, 6, 7
  are one ulp above ``0.3``, ``0.6``, ``0.7``, so netcal puts a confidence of exactly
  ``0.3`` in bin 2 where we (bin ``b = [b/n, (b+1)/n)``) put it in bin 3. For ``n = 15``
  the edges coincide. Random confidences never hit an edge, so the comparisons hold.
  With at most two distinct labels netcal switches to binary mode and reads ``y`` as
  "is correct" for confidence ``X``, which is exactly (confidence, correct) input.
* torchmetrics 1.9 ``MulticlassCalibrationError``: casts confidences to float32 (hence the
  1e-6 tolerance) and buckets with ``bucketize(right=True)`` over all ``n + 1`` edges,
  so a confidence of exactly 1.0 gets an extra bin of its own instead of the last bin.
  For the hand example below it gives ECE 0.475 and MCE 1.0 (ours: 0.225 and 0.25).
* sklearn 1.9 ``brier_score_loss``: multi-class support with ``scale_by_half="auto"``, which
  halves only binary problems; multi-class scores are the unhalved sum over classes,
  our convention. ``log_loss`` is the mean natural-log cross-entropy.

The references are imported inside the tests that use them: the all-reduce test's two spawned
processes import this module, and netcal, sklearn and torchmetrics would triple their start-up.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmatch.evaluation import selective
from trustmatch.evaluation.metrics import (
    ClassificationMeter,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    max_calibration_error,
    reliability_bins,
)

N, K = 1000, 10
SELECTIVE = ("aurc", "eaurc", *(f"accuracy_at_coverage_{p}" for p in selective.COVERAGES))
SEEDS = [0, 1, 2, 3]


def _random_case(seed: int, regime: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels; 'calibrated' draws labels from the softmax so ECE is small."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(N, K, generator=gen, dtype=torch.float64)
    if regime == "calibrated":
        labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)
    else:
        labels = torch.randint(0, K, (N,), generator=gen)
    return logits, labels


@pytest.fixture(params=[(s, r) for s in SEEDS for r in ("calibrated", "overconfident")], ids=str)
def case(request: pytest.FixtureRequest) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    logits, labels = _random_case(*request.param)
    return logits, labels, torch.softmax(logits, dim=1).numpy(), labels.numpy()


@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_and_mce_match_netcal(case, n_bins: int) -> None:
    from netcal.metrics import ECE, MCE

    logits, labels, probs, y = case
    got = classification_metrics(logits, labels)
    assert got[f"ece_{n_bins}"] == pytest.approx(ECE(bins=n_bins).measure(probs, y), abs=1e-12)
    assert got[f"mce_{n_bins}"] == pytest.approx(MCE(bins=n_bins).measure(probs, y), abs=1e-12)


@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_and_mce_match_torchmetrics(case, n_bins: int) -> None:
    from torchmetrics.classification import MulticlassCalibrationError

    logits, labels, probs, _ = case
    got = classification_metrics(logits, labels)
    p = torch.from_numpy(probs)
    ece = MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm="l1")(p, labels).item()
    mce = MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm="max")(p, labels).item()
    assert got[f"ece_{n_bins}"] == pytest.approx(ece, abs=1e-6)
    assert got[f"mce_{n_bins}"] == pytest.approx(mce, abs=1e-6)


def test_accuracy_nll_brier_confidence_match_sklearn_and_numpy(case) -> None:
    from sklearn.metrics import accuracy_score, brier_score_loss, log_loss

    logits, labels, probs, y = case
    got = classification_metrics(logits, labels)
    onehot = np.eye(K)[y]
    assert got["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(axis=1)), abs=1e-12)
    assert got["nll"] == pytest.approx(log_loss(y, probs, labels=list(range(K))), abs=1e-10)
    assert got["brier"] == pytest.approx(((probs - onehot) ** 2).sum(axis=1).mean(), abs=1e-12)
    assert got["brier"] == pytest.approx(brier_score_loss(y, probs, labels=list(range(K))), abs=1e-12)
    assert got["mean_confidence"] == pytest.approx(probs.max(axis=1).mean(), abs=1e-12)
    assert got["n"] == N


def test_binary_brier_is_not_halved() -> None:
    """sklearn halves binary Brier by default; ours stays the sum over both classes."""
    from sklearn.metrics import brier_score_loss

    logits, labels = torch.randn(200, 2, dtype=torch.float64), torch.randint(0, 2, (200,))
    probs, y = torch.softmax(logits, dim=1).numpy(), labels.numpy()
    got = classification_metrics(logits, labels)["brier"]
    assert got == pytest.approx(brier_score_loss(y, probs, labels=[0, 1], scale_by_half=False), abs=1e-12)
    assert got == pytest.approx(2 * brier_score_loss(y, probs, labels=[0, 1]), abs=1e-12)


def test_hand_computed_example() -> None:
    from netcal.metrics import ECE, MCE

    # 2 bins: [0, 0.5) and [0.5, 1].
    # bin 0: conf {0.2, 0.4}, correct {0, 1} -> mean conf 0.30, acc 0.5, gap 0.20
    # bin 1: conf {0.5, 1.0}, correct {1, 0} -> mean conf 0.75, acc 0.5, gap 0.25
    # ECE = 2/4 * 0.20 + 2/4 * 0.25 = 0.225; MCE = 0.25.
    # (Were 0.5 in the lower bin, ECE would be 0.025 instead.)
    conf = torch.tensor([0.2, 0.4, 0.5, 1.0], dtype=torch.float64)
    correct = torch.tensor([False, True, True, False])
    assert expected_calibration_error(conf, correct, 2) == pytest.approx(0.225, abs=1e-15)
    assert max_calibration_error(conf, correct, 2) == pytest.approx(0.25, abs=1e-15)
    bins = calibration_bins(conf, correct, 2)
    assert bins["count"] == [2, 2]
    assert bins["confidence"] == pytest.approx([0.30, 0.75])
    assert bins["accuracy"] == pytest.approx([0.5, 0.5])
    # netcal in binary mode agrees (its clip of 1.0 to 1 - eps moves the result by ~1e-16).
    assert ECE(bins=2).measure(conf.numpy(), correct.numpy().astype(int)) == pytest.approx(0.225, abs=1e-12)
    assert MCE(bins=2).measure(conf.numpy(), correct.numpy().astype(int)) == pytest.approx(0.25, abs=1e-12)


def test_confidence_one_goes_to_last_bin_and_half_to_upper_bin() -> None:
    ones = torch.ones(3, dtype=torch.float64)
    assert calibration_bins(ones, torch.ones(3, dtype=torch.bool), 15)["count"] == [0] * 14 + [3]
    half = torch.tensor([0.5], dtype=torch.float64)
    assert calibration_bins(half, torch.tensor([True]), 2)["count"] == [0, 1]


@pytest.mark.parametrize("n_bins", [2, 10, 15])
def test_each_inner_edge_starts_its_bin(n_bins: int) -> None:
    edges = torch.arange(n_bins, dtype=torch.float64) / n_bins  # 0, 1/n, ..., (n-1)/n
    bins = calibration_bins(edges, torch.zeros(n_bins, dtype=torch.bool), n_bins)
    assert bins["count"] == [1] * n_bins


def test_calibration_bins_layout_and_empty_bins() -> None:
    conf = torch.tensor([0.05, 0.07, 0.95])
    bins = calibration_bins(conf, torch.tensor([True, False, True]), 10)
    assert set(bins) == {"lower", "upper", "count", "confidence", "accuracy"}
    assert all(len(v) == 10 for v in bins.values())
    assert bins["lower"] == pytest.approx([b / 10 for b in range(10)])
    assert bins["upper"] == pytest.approx([b / 10 for b in range(1, 11)])
    assert bins["count"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins["confidence"][0] == pytest.approx(0.06)
    assert bins["accuracy"] == pytest.approx([0.5] + [0.0] * 8 + [1.0])
    assert bins["confidence"][1:9] == [0.0] * 8


def test_ece_is_weighted_bin_gap(case) -> None:
    logits, labels, _, _ = case
    bins = reliability_bins(logits, labels)
    assert len(bins["count"]) == 15 and sum(bins["count"]) == N
    weighted = sum(c / N * abs(p - a) for c, p, a in zip(bins["count"], bins["confidence"], bins["accuracy"]))
    assert classification_metrics(logits, labels)["ece_15"] == pytest.approx(weighted, abs=1e-12)


def test_perfect_confident_predictions_are_calibrated() -> None:
    labels = torch.arange(5)
    metrics = classification_metrics(100.0 * torch.eye(5), labels)
    assert metrics["accuracy"] == 1.0
    assert metrics["ece_15"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["mce_15"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["brier"] == pytest.approx(0.0, abs=1e-12)


def test_nll_is_stable_for_extreme_float32_logits() -> None:
    logits = torch.tensor([[1000.0, 0.0], [0.0, -1000.0]], dtype=torch.float32)
    metrics = classification_metrics(logits, torch.tensor([1, 0]))
    assert metrics["nll"] == pytest.approx(500.0)  # (1000 + 0) / 2
    assert math.isfinite(metrics["brier"]) and metrics["accuracy"] == 0.5


def test_float32_input_is_evaluated_in_float64() -> None:
    logits, labels = _random_case(0, "calibrated")
    lo = classification_metrics(logits.float(), labels)
    hi = classification_metrics(logits.float().double(), labels)
    assert lo == hi


@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "N=0"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "shapes"),
        (torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), "shapes"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"\[0, 2\]"),
        (torch.zeros(2, 3), torch.tensor([0.0, 1.0]), "integer"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "NaN"),
    ],
)
def test_classification_metrics_rejects_bad_input(logits, labels, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(logits, labels)


def test_binning_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="N=0"):
        calibration_bins(torch.zeros(0), torch.zeros(0, dtype=torch.bool), 15)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(torch.tensor([1.5]), torch.tensor([True]), 15)
    with pytest.raises(ValueError, match="n_bins"):
        max_calibration_error(torch.tensor([0.5]), torch.tensor([True]), 0)
    with pytest.raises(ValueError, match="N=0"):
        reliability_bins(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    logits, labels = _random_case(1, "calibrated")
    assert classification_metrics(logits.cuda(), labels.cuda()) == pytest.approx(
        classification_metrics(logits, labels), abs=1e-12
    )


def _streamed(logits: torch.Tensor, labels: torch.Tensor, sizes: list[int]) -> ClassificationMeter:
    meter = ClassificationMeter(K)
    for chunk, chunk_labels in zip(logits.split(sizes), labels.split(sizes)):
        meter.update(chunk, chunk_labels)
    return meter


def _assert_same_bins(got: dict[str, list], want: dict[str, list]) -> None:
    assert set(got) == set(want) and got["count"] == want["count"]
    for key in ("lower", "upper", "confidence", "accuracy"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_streaming_over_uneven_chunks_equals_whole_set(case) -> None:
    logits, labels, _, _ = case
    meter = _streamed(logits, labels, [1, 7, 100, N - 108])
    got, want = meter.compute(), classification_metrics(logits, labels)
    assert set(got) == set(want) and got["n"] == want["n"] == N
    assert got == pytest.approx(want, abs=1e-12)
    for n_bins in (10, 15):
        _assert_same_bins(meter.bins(n_bins), reliability_bins(logits, labels, n_bins))


def test_streamed_ece_matches_netcal(case) -> None:
    from netcal.metrics import ECE

    logits, labels, probs, y = case
    meter = _streamed(logits, labels, [333, 333, N - 666])
    assert meter.compute()["ece_15"] == pytest.approx(ECE(bins=15).measure(probs, y), abs=1e-12)


def test_meter_state_does_not_grow_with_n() -> None:
    meter = ClassificationMeter(K, bins=(7,))
    for seed in range(3):
        meter.update(*_random_case(seed, "calibrated"))
    assert meter.state.shape == (5 + 3 * 7 + K * K + 2 * selective.BINS,)
    keys = {"accuracy", "balanced_accuracy", "ece_7", "mce_7", "nll", "brier", "mean_confidence", "n", *SELECTIVE}
    assert set(meter.compute()) == keys
    assert meter.compute()["n"] == 3 * N


def test_empty_meter_and_unknown_bin_count_raise() -> None:
    meter = ClassificationMeter(K)
    with pytest.raises(ValueError, match="N=0"):
        meter.compute()
    with pytest.raises(ValueError, match="N=0"):
        meter.bins()
    meter.update(*_random_case(0, "calibrated"))
    with pytest.raises(ValueError, match="bins by"):
        meter.bins(20)
    with pytest.raises(ValueError, match=f"{K} classes"):
        meter.update(torch.zeros(4, K + 1), torch.zeros(4, dtype=torch.long))


def _all_reduce_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: stream this rank's share of a fixed set, reduce, and rank 0 writes the metrics."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, labels = _random_case(0, "overconfident")
        half = slice(0, 400) if rank == 0 else slice(400, N)  # uneven halves: sums, not means, are reduced
        meter = _streamed(logits[half], labels[half], [50, len(labels[half]) - 50])
        meter.all_reduce()
        if rank == 0:
            Path(out).write_text(json.dumps({"metrics": meter.compute(), "bins": meter.bins()}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_over_two_processes_equals_whole_set(tmp_path: Path) -> None:
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "rank0.json"
    torch.multiprocessing.spawn(_all_reduce_worker, args=(port, str(out)), nprocs=2)
    got = json.loads(out.read_text())
    logits, labels = _random_case(0, "overconfident")
    assert got["metrics"] == pytest.approx(classification_metrics(logits, labels), abs=1e-12)
    _assert_same_bins(got["bins"], reliability_bins(logits, labels))


@pytest.mark.parametrize("case", ["calibrated", "overconfident"])
def test_streamed_confusion_and_balanced_accuracy_match_sklearn(case: str) -> None:
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    logits, labels = _random_case(3, case)
    meter = _streamed(logits, labels, [100, 400, N - 500])
    predictions = logits.argmax(dim=1).numpy()
    expected = confusion_matrix(labels.numpy(), predictions, labels=list(range(K)))
    assert (meter.confusion().numpy() == expected).all()
    assert meter.compute()["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(labels.numpy(), predictions), abs=1e-12
    )

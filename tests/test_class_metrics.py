"""Per-class accuracy, IoU and calibration (``ClassMeter``) against sklearn and netcal.

Per-class calibration conditions on the predicted class: netcal's ECE of the (confidence, correct) pairs
of the samples predicted c, in its binary mode (the same convention as tests/test_metrics.py: random
confidences never sit on a bin edge, where netcal's ``linspace`` edges may differ by an ulp).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trustmatch.evaluation.class_metrics import ClassMeter

K = 6


def _case(seed: int, n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Over-confident logits, right about half the time, with a class the model never predicts."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=gen)
    logits = 3.0 * torch.randn(n, K, generator=gen)
    logits[: n // 2].scatter_add_(1, labels[: n // 2, None], torch.full((n // 2, 1), 4.0))
    logits[:, K - 1] -= 50.0  # never predicted: its precision, confidence and ECE have nothing to rest on
    return logits, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_per_class_values_match_sklearn_and_netcal(seed: int) -> None:
    from netcal.metrics import ECE
    from sklearn.metrics import jaccard_score, precision_score, recall_score

    logits, labels = _case(seed)
    meter = ClassMeter(K)
    for part in zip(logits.split(700), labels.split(700)):  # streamed: batches add up to the whole set
        meter.update(*part)
    rows = meter.rows([f"c{c}" for c in range(K)])

    probs = logits.double().softmax(dim=1).numpy()
    y, pred, conf = labels.numpy(), probs.argmax(axis=1), probs.max(axis=1)
    every = list(range(K))
    recall = recall_score(y, pred, labels=every, average=None, zero_division=np.nan)
    precision = precision_score(y, pred, labels=every, average=None, zero_division=np.nan)
    iou = jaccard_score(y, pred, labels=every, average=None, zero_division=0)  # every class is in y: no 0/0
    for c, row in enumerate(rows):
        assert row["class"] == f"c{c}" and row["support"] == int((y == c).sum())
        assert row["predicted"] == int((pred == c).sum())
        assert row["recall"] == pytest.approx(recall[c], abs=1e-12)
        assert row["iou"] == pytest.approx(iou[c], abs=1e-12)
        mine = pred == c
        if not mine.any():
            assert np.isnan(precision[c]) and row["precision"] is None
            assert row["confidence"] is None and row["ece"] is None
            continue
        assert row["precision"] == pytest.approx(precision[c], abs=1e-12)
        assert row["confidence"] == pytest.approx(conf[mine].mean(), abs=1e-12)
        correct = (y[mine] == c).astype(np.int64)
        assert row["ece"] == pytest.approx(ECE(bins=15).measure(conf[mine], correct), abs=1e-12)
    assert rows[K - 1]["predicted"] == 0 and rows[K - 1]["recall"] == 0.0  # a real class, just never predicted


def test_pixels_with_ignored_ones_equal_the_flattened_valid_pixels() -> None:
    """[B, K, H, W] with masks: the same as the valid pixels flattened to [N, K]; 255 enters nothing; a class
    absent from both truth and prediction has no IoU. Chunking (a small CHUNK) changes nothing."""
    gen = torch.Generator().manual_seed(3)
    logits = 2.0 * torch.randn(3, K, 9, 7, generator=gen)
    logits[:, 2] -= 50.0
    masks = torch.randint(0, K, (3, 9, 7), generator=gen, dtype=torch.long)
    masks[masks == 2] = 0
    masks[:, :2] = 255
    pixels = ClassMeter(K, ignore_index=255)
    pixels.CHUNK = 40 * K  # pieces of 40 pixels
    pixels.update(logits, masks.to(torch.uint8))
    valid = masks != 255
    flat = ClassMeter(K)
    flat.update(logits.movedim(1, -1)[valid], masks[valid])
    names = [str(c) for c in range(K)]
    assert pixels.rows(names) == flat.rows(names)
    assert sum(r["support"] for r in pixels.rows(names)) == int(valid.sum())
    assert pixels.rows(names)[2]["iou"] is None and pixels.rows(names)[2]["support"] == 0


def test_bad_shapes_and_labels_are_refused() -> None:
    meter = ClassMeter(K)
    with pytest.raises(ValueError, match="expected logits"):
        meter.update(torch.zeros(4, K + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expected logits"):
        meter.update(torch.zeros(4, K), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="class ids"):
        meter.update(torch.zeros(2, K), torch.tensor([0, K]))
    with pytest.raises(ValueError, match="class ids"):
        ClassMeter(K).update(torch.zeros(1, K), torch.tensor([255]))  # 255 is a class id without ignore_index

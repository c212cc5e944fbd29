"""SegmentationMeter against torchmetrics, netcal and hand counts; segmentation overlays render.

torchmetrics 1.9 ``MulticlassJaccardIndex(average=None)`` returns 0 (``zero_division``) for a class
absent from both target and prediction, where the meter reports None and leaves it out of the mIoU;
the comparisons below therefore run over the classes with a defined IoU. netcal's ECE is fed the
valid pixels' top-class (confidence, correct) pairs, its binary mode (see tests/test_metrics.py).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trustmatch.evaluation import selective
from trustmatch.evaluation.metrics import SegmentationMeter, expected_calibration_error
from trustmatch.reporting.plots import _NEUTRAL, _overlay, segmentation_overlays

K = 5  # class 4 never occurs in the masks and is never predicted: its IoU is undefined
IGNORE = 255


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [4, K, 13, 17] that mostly agree with the masks, 15 % ignored pixels, uint8 masks."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, K - 1, (4, 13, 17), generator=g)
    logits = 2.0 * torch.randn(4, K, 13, 17, generator=g) + 2.5 * F.one_hot(masks, K).permute(0, 3, 1, 2)
    logits[:, K - 1] = -30.0
    masks[torch.rand(masks.shape, generator=g) < 0.15] = IGNORE
    return logits, masks.to(torch.uint8)


def _valid_pairs(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per valid pixel: probabilities [P, K], prediction and target, by flattening and boolean indexing."""
    probs = logits.double().softmax(dim=1).permute(0, 2, 3, 1).reshape(-1, K)
    target = masks.long().flatten()
    keep = target != IGNORE
    return probs[keep], probs[keep].argmax(dim=1), target[keep]


def _meter(logits: torch.Tensor, masks: torch.Tensor, splits: list[int] | None = None) -> SegmentationMeter:
    meter = SegmentationMeter(K)
    for lg, mk in zip(logits.split(splits or [len(logits)]), masks.split(splits or [len(masks)])):
        meter.update(lg, mk)
    return meter


def test_iou_and_accuracies_match_torchmetrics() -> None:
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    logits, masks = _case()
    meter = _meter(logits, masks)
    got, per_class = meter.compute(), meter.per_class_iou()
    reference = MulticlassJaccardIndex(K, average=None, ignore_index=IGNORE)(logits, masks.long())
    assert per_class[K - 1] is None and all(v is not None for v in per_class[: K - 1])
    assert per_class[: K - 1] == pytest.approx(reference[: K - 1].tolist(), abs=1e-6)
    assert got["miou"] == pytest.approx(reference[: K - 1].mean().item(), abs=1e-6)
    micro = MulticlassAccuracy(K, average="micro", ignore_index=IGNORE)(logits, masks.long())
    recall = MulticlassAccuracy(K, average=None, ignore_index=IGNORE)(logits, masks.long())
    assert got["pixel_accuracy"] == pytest.approx(micro.item(), abs=1e-6)
    assert got["mean_class_accuracy"] == pytest.approx(recall[: K - 1].mean().item(), abs=1e-6)


def test_ece_nll_and_count_match_flattened_valid_pixels() -> None:
    from netcal.metrics import ECE

    logits, masks = _case(1)
    got = _meter(logits, masks).compute()
    probs, prediction, target = _valid_pairs(logits, masks)
    confidence, correct = probs.max(dim=1).values, (prediction == target).double()
    assert got["n_pixels"] == len(target) == int((masks != IGNORE).sum())
    assert got["pixel_ece_15"] == pytest.approx(expected_calibration_error(confidence, correct, 15), abs=1e-12)
    assert got["pixel_ece_15"] == pytest.approx(ECE(bins=15).measure(confidence.numpy(), correct.numpy()), abs=1e-9)
    nll = F.cross_entropy(logits.double(), masks.long(), ignore_index=IGNORE)
    assert got["pixel_nll"] == pytest.approx(nll.item(), abs=1e-12)


def test_hand_computed_example() -> None:
    # 1 image 2 x 3, K = 3. Predictions (argmax): [[0, 0, 1], [1, 1, 0]]; truth [[0, 1, 1], [1, 255, 2]].
    # Valid pixels: (t, p) = (0,0) (1,0) (1,1) (1,1) (2,0). Class 0: I 1, U 1 + 3 - 1 = 3 -> 1/3;
    # class 1: I 2, U 3 + 2 - 2 = 3 -> 2/3; class 2: I 0, U 1 -> 0. mIoU = (1/3 + 2/3 + 0) / 3.
    # Pixel accuracy 3/5; recalls 1, 2/3, 0 -> mean 5/9. Confidence: 1-hot logits of 10 -> all in the last bin.
    pred = torch.tensor([[0, 0, 1], [1, 1, 0]])
    logits = 10.0 * F.one_hot(pred, 3).permute(2, 0, 1)[None].float()
    masks = torch.tensor([[[0, 1, 1], [1, IGNORE, 2]]], dtype=torch.uint8)
    meter = SegmentationMeter(3)
    meter.update(logits, masks)
    got = meter.compute()
    assert meter.per_class_iou() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert got["miou"] == pytest.approx(1 / 3)
    assert got["pixel_accuracy"] == pytest.approx(0.6)
    assert got["mean_class_accuracy"] == pytest.approx(5 / 9)
    assert got["n_pixels"] == 5
    top = 1 / (1 + 2 * np.exp(-10.0))
    assert got["pixel_ece_15"] == pytest.approx(abs(top - 0.6), abs=1e-12)
    assert got["pixel_nll"] == pytest.approx((3 * -np.log(top) + 2 * -np.log((1 - top) / 2)) / 5, abs=1e-12)
    assert meter.confusion().tolist() == [[1, 0, 0], [1, 2, 0], [1, 0, 0]]
    bins = meter.bins()
    assert bins["count"] == [0] * 14 + [5] and bins["accuracy"][-1] == pytest.approx(0.6)


def test_class_absent_from_truth_and_prediction_is_left_out() -> None:
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 0, 0, 0] = logits[0, 2, 0, 1] = 5.0
    meter = SegmentationMeter(4)
    meter.update(logits, torch.tensor([[[0, 2]]]))
    assert meter.per_class_iou() == [1.0, None, 1.0, None]
    assert meter.compute()["miou"] == 1.0


@pytest.mark.parametrize("splits", [[1, 3], [2, 1, 1], [3, 1]])
def test_streaming_and_chunking_equal_whole(splits: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    logits, masks = _case(2)
    whole = _meter(logits, masks)
    streamed = _meter(logits, masks, splits)
    torch.testing.assert_close(streamed.state, whole.state, rtol=0, atol=1e-9)
    for chunk in (K * 13 * 17 * 2, K * 17 * 4, 1):  # groups of 2 images, 4-row blocks, one row at a time
        monkeypatch.setattr(SegmentationMeter, "CHUNK", chunk)
        torch.testing.assert_close(_meter(logits, masks, splits).state, whole.state, rtol=0, atol=1e-9)


def test_big_image_goes_through_in_bounded_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 x 21 x 1024 x 2048 input (an expanded view: no 176 MB allocation) is split into pieces of at most
    CHUNK logits covering every row exactly once."""
    logits = torch.zeros(1, 21, 1, 1).expand(1, 21, 1024, 2048)
    masks = torch.zeros(1, 1, 1, dtype=torch.uint8).expand(1, 1024, 2048)
    pieces: list[tuple[int, ...]] = []
    monkeypatch.setattr(SegmentationMeter, "_add", lambda self, lg, mk: pieces.append(tuple(lg.shape)))
    SegmentationMeter(21).update(logits, masks)
    assert max(np.prod(p) for p in pieces) <= SegmentationMeter.CHUNK
    assert sum(p[2] for p in pieces) == 1024 and all(p[3] == 2048 for p in pieces)


def test_int64_masks_and_device_state() -> None:
    logits, masks = _case(3)
    meter = _meter(logits, masks.long())
    torch.testing.assert_close(meter.state, _meter(logits, masks).state)
    assert meter.state.dtype == torch.float64 and meter.state.numel() == K * K + 3 * 15 + 2 + 2 * selective.BINS


@pytest.mark.parametrize(
    ("logits", "masks", "match"),
    [
        (torch.zeros(1, K, 4, 4), torch.zeros(1, 4, 5, dtype=torch.uint8), "expected logits"),
        (torch.zeros(1, K + 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.uint8), f"{K} classes"),
        (torch.zeros(1, K, 4, 4), torch.zeros(1, 4, 4, dtype=torch.int32), "uint8 or int64"),
        (torch.zeros(1, K, 4, 4), torch.full((1, 4, 4), K, dtype=torch.uint8), "mask ids"),
        (torch.zeros(1, K, 4, 4), torch.full((1, 4, 4), -1), "mask ids"),
        (torch.full((1, K, 4, 4), float("nan")), torch.zeros(1, 4, 4, dtype=torch.uint8), "NaN"),
    ],
)
def test_rejects_bad_input(logits: torch.Tensor, masks: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SegmentationMeter(K).update(logits, masks)


def test_all_ignored_meter_refuses_to_compute() -> None:
    meter = SegmentationMeter(K)
    meter.update(torch.zeros(1, K, 2, 2), torch.full((1, 2, 2), IGNORE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        meter.compute()


def _all_reduce_worker(rank: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        logits, masks = _case(4)
        share = slice(0, 1) if rank == 0 else slice(1, None)  # uneven shares: sums are reduced
        meter = _meter(logits[share], masks[share])
        meter.all_reduce()
        if rank == 0:
            Path(out).write_text(json.dumps({"metrics": meter.compute(), "iou": meter.per_class_iou()}))
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
    whole = _meter(*_case(4))
    assert got["metrics"] == pytest.approx(whole.compute(), abs=1e-12)
    assert got["iou"] == pytest.approx(whole.per_class_iou(), abs=1e-12)


PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]


@pytest.mark.parametrize("with_masks", [True, False])
def test_segmentation_overlays_write_a_png(tmp_path: Path, with_masks: bool) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 20, 28), generator=g, dtype=torch.uint8)
    masks = torch.randint(0, 3, (3, 20, 28), generator=g, dtype=torch.uint8)
    masks[:, :2] = IGNORE
    predictions = torch.randint(0, 3, (3, 20, 28), generator=g)
    path = segmentation_overlays(images, masks if with_masks else None, predictions, PALETTE, tmp_path / "o.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]  # no temp file left behind


def test_overlay_colours_and_neutral_ignore() -> None:
    image = np.full((1, 3, 3), 100.0)
    lut = np.full((256, 3), _NEUTRAL, dtype=np.float64)
    lut[:3] = PALETTE
    out = _overlay(image, np.array([[0, 1, IGNORE]]), lut)
    assert out.tolist() == [[[50, 50, 50], [177, 50, 50], list(_NEUTRAL)]]


def test_segmentation_overlays_reject_bad_input(tmp_path: Path) -> None:
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"expected \[3, H, W\]"):
        segmentation_overlays(images, None, torch.zeros(2, 4, 5, dtype=torch.long), PALETTE, tmp_path / "a.png", "t")
    with pytest.raises(ValueError, match="palette"):
        segmentation_overlays(images, None, torch.full((2, 4, 4), 3), PALETTE, tmp_path / "a.png", "t")

"""Segmentation end to end: UniMatch's step against its formula, runs on digitscenes (directory,
resume in one process and under torchrun), a user's folders through train / evaluate / predict,
and bad input as one line with exit code 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from test_train import assert_same_state, check_torchrun_resume
from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.methods import FixMatchSelector, Selection
from trustmatch.methods.unimatch_step import (
    SegBatch,
    labeled_loss,
    ohem_keep,
    paste,
    pixel_loss,
    selection_logs,
    unimatch_step,
)
from trustmatch.models.output import Output
from trustmatch.run.checkpoint import load_checkpoint
from trustmatch.run.checkpoint_findings import saved_findings
from trustmatch.run.trainer import Trainer

SMALL = [
    "data.scenes=40",
    "data.labeled_images=8",
    "data.val_images=6",
    "train.batch_size=4",
    "train.steps=6",
    "train.eval_every=3",
    "train.log_every=2",
    "train.eval_batch_size=64",
]


class PixelNet(nn.Module):
    """1x1 convolutions with BatchNorm: per-pixel logits; ``perturb`` drops encoder channels."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, classes, 1)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, perturb: bool = False) -> Output:
        self.modes.append(self.training)
        f = self.encoder(x)
        if perturb:
            f = torch.cat([f, F.dropout2d(f, 0.5, self.training)])
        return Output(self.head(f), f.mean(dim=(2, 3)))


def _batch(n: int = 2, size: int = 6, seed: int = 0) -> SegBatch:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    y = torch.randint(0, 3, (n, size, size), generator=g)
    y[:, 0] = 255
    valid_u = torch.rand(n, size, size, generator=g) > 0.2
    valid_mix = torch.rand(n, size, size, generator=g) > 0.2
    boxes = tuple(torch.rand(n, size, size, generator=g) > 0.5 for _ in range(2))
    views = [rand(n, 3, size, size) for _ in range(4)]
    return SegBatch(views[0], y, views[1], (views[2], views[3]), valid_u, rand(n, 3, size, size), valid_mix, boxes)


def reference_forwards(
    reference: nn.Module, batch: SegBatch
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """By hand, under seed 1: the partner's probabilities in eval mode, then labeled, weak and
    feature-perturbed weak logits from one training-mode forward."""
    torch.manual_seed(1)
    reference.eval()
    with torch.no_grad():
        p_mix = reference(batch.mix_weak).logits.softmax(1)
    reference.train()
    both = reference(torch.cat([batch.x_lb, batch.u_weak]), perturb=True).logits
    n = len(batch.x_lb)
    return p_mix, both[:n], both[n : 2 * n], both[3 * n :]


def test_unimatch_step_is_unimatch_loss() -> None:
    """Against a hand computation: the partner predicted in eval mode, pasted pseudo-labels, losses
    normalised by valid pixels, (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2."""
    torch.manual_seed(0)
    model, batch, selector = PixelNet(), _batch(), FixMatchSelector(0.4)
    reference = PixelNet()
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    out = unimatch_step(model, batch, selector, 1.0, 0, 10)
    assert model.modes == [False, True, True]  # partner in eval mode, then training forwards

    p_mix, logits_lb, logits_w, logits_fp = reference_forwards(reference, batch)
    s1, s2 = reference(torch.cat(batch.u_strong)).logits.chunk(2)
    p_w = logits_w.detach().softmax(1)

    def loss_u(logits: torch.Tensor, conf: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, label, reduction="none")
        return (ce * ((conf >= 0.4) & valid)).sum() / valid.sum()

    conf_w, lab_w = p_w.max(1)
    conf_m, lab_m = p_mix.max(1)
    terms = []
    for box, logits in zip(batch.boxes, (s1, s2)):
        conf = torch.where(box, conf_m, conf_w)
        label = torch.where(box, lab_m, lab_w)
        valid = torch.where(box, batch.valid_mix, batch.valid_u)
        terms.append(loss_u(logits, conf, label, valid))
    loss_x = F.cross_entropy(logits_lb, batch.y_lb, ignore_index=255)
    loss_fp = loss_u(logits_fp, conf_w, lab_w, batch.valid_u)
    expected = (loss_x + 0.25 * terms[0] + 0.25 * terms[1] + 0.5 * loss_fp) / 2
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.logs["loss_fp"], loss_fp.detach())


def norm_by_hand(net: PixelNet, x: torch.Tensor, batch_statistics: bool) -> tuple[torch.Tensor, ...]:
    """PixelNet's encoder output for ``x`` normalised with the batch's statistics (biased variance) or
    the running ones, its head's probabilities, and the batch's mean and unbiased variance."""
    conv, bn = net.encoder
    with torch.no_grad():
        f = conv(x)
        mean, var = f.mean(dim=(0, 2, 3)), f.var(dim=(0, 2, 3), unbiased=False)
        mu, sigma2 = (mean, var) if batch_statistics else (bn.running_mean, bn.running_var)
        normed = (f - mu.view(1, -1, 1, 1)) / (sigma2.view(1, -1, 1, 1) + bn.eps).sqrt()
        probs = net.head(normed * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)).softmax(1)
        n = f.numel() / f.shape[1]
        return probs, mean, var * n / (n - 1)


def start_running_statistics(net: PixelNet) -> tuple[torch.Tensor, torch.Tensor]:
    """Running statistics away from their defaults, so that a restored value shows."""
    bn = net.encoder[1]
    g = torch.Generator().manual_seed(5)
    bn.running_mean.copy_(torch.randn(4, generator=g))
    bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    bn.num_batches_tracked.fill_(7)
    return bn.running_mean.clone(), bn.running_var.clone()


def test_unimatch_step_batchnorm_is_unchanged() -> None:
    """UniMatch as released: the partner in eval mode (running statistics, not moved); the weak and
    the strong forward each move the running statistics, by hand with momentum 0.1."""
    torch.manual_seed(0)
    model, batch = PixelNet(), _batch()
    mean0, var0 = start_running_statistics(model)
    seen: list[torch.Tensor] = []

    class Recording(FixMatchSelector):
        def select(self, probs, indices=None, valid=None, update=True):
            if not update:
                seen.append(probs)
            return super().select(probs, indices, valid, update)

    expected_partner, _, _ = norm_by_hand(model, batch.mix_weak, batch_statistics=False)
    _, mean_w, var_w = norm_by_hand(model, torch.cat([batch.x_lb, batch.u_weak]), True)
    _, mean_s, var_s = norm_by_hand(model, torch.cat(batch.u_strong), True)
    unimatch_step(model, batch, Recording(0.4), 1.0, 0, 10)
    torch.testing.assert_close(seen[0], expected_partner)
    bn = model.encoder[1]
    torch.testing.assert_close(bn.running_mean, 0.9 * (0.9 * mean0 + 0.1 * mean_w) + 0.1 * mean_s)
    torch.testing.assert_close(bn.running_var, 0.9 * (0.9 * var0 + 0.1 * var_w) + 0.1 * var_s)
    assert bn.num_batches_tracked == 9


def test_paste_and_pixel_loss() -> None:
    inside = Selection(torch.full((1, 2, 2), 1), torch.full((1, 2, 2), 0.5))
    outside = Selection(torch.full((1, 2, 2), 2), torch.ones(1, 2, 2))
    box = torch.tensor([[[True, False], [False, False]]])
    pasted = paste(inside, outside, box)
    assert pasted.labels.tolist() == [[[1, 2], [2, 2]]] and pasted.weights.tolist() == [[[0.5, 1.0], [1.0, 1.0]]]
    logits = torch.zeros(1, 3, 2, 2)
    valid = torch.tensor([[[True, True], [True, False]]])
    pasted.weights[~valid] = 0
    # uniform logits: CE = log 3 everywhere; weights 0.5 + 1 + 1 over 3 valid pixels
    torch.testing.assert_close(
        pixel_loss(logits, pasted, valid), torch.tensor(2.5 * np.log(3) / 3, dtype=torch.float32)
    )


def ohem_example() -> tuple[torch.Tensor, torch.Tensor]:
    """One 2 x 3 image, 2 classes, logits log p: true-class probabilities 0.9, 0.2, 0.6 (class 1), 0.8, an
    ignored pixel at 0.5 (it would be kept were it valid) and 0.95."""
    p0 = torch.tensor([0.9, 0.2, 0.4, 0.8, 0.5, 0.95]).view(1, 1, 2, 3)
    target = torch.tensor([0, 0, 1, 0, 255, 0]).view(1, 2, 3)
    return torch.cat([p0, 1 - p0], dim=1).log(), target


@pytest.mark.parametrize(
    "min_kept,kept",
    [
        (0, [0, 1, 2, 3, 5]),  # no minimum: every valid pixel, as the release (its threshold needs min_kept > 0)
        (1, [1, 2]),  # the smallest (0.2) is below 0.7: probability <= 0.7
        (2, [1, 2]),  # the 2nd smallest (0.6) is below 0.7: the threshold stays 0.7
        (3, [1, 2, 3]),  # the 3rd smallest (0.8) is above: it becomes the threshold
        (5, [0, 1, 2, 3, 5]),  # every valid pixel
        (6, [0, 1, 2, 3, 5]),  # more than the 5 valid pixels: no mining, every valid pixel
    ],
)
def test_ohem_keeps_the_hard_pixels_by_hand(min_kept: int, kept: list[int]) -> None:
    logits, target = ohem_example()
    assert ohem_keep(logits, target, 0.7, min_kept).flatten().nonzero().flatten().tolist() == kept
    true_prob = torch.tensor([0.9, 0.2, 0.6, 0.8, 0.5, 0.95])
    expected = -true_prob[kept].log().mean()  # the mean CE over the kept pixels
    torch.testing.assert_close(labeled_loss(logits, target, (0.7, min_kept)), expected)


def test_ohem_min_kept_counts_per_image_and_ce_is_the_default() -> None:
    logits, target = ohem_example()
    two = labeled_loss(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1), (0.7, 3))  # 6 kept of 10: the same
    torch.testing.assert_close(two, -torch.tensor([0.2, 0.6, 0.8]).log().mean())
    torch.testing.assert_close(labeled_loss(logits, target), F.cross_entropy(logits, target, ignore_index=255))
    no_minimum = labeled_loss(logits.repeat(2, 1, 1, 1), target.repeat(2, 1, 1), (0.7, 0))  # the 10 valid pixels
    torch.testing.assert_close(no_minimum, -torch.tensor([0.9, 0.2, 0.6, 0.8, 0.95]).log().mean())
    assert load_config("digitscenes-unimatch", ["method.labeled_loss=ohem"]).method.ohem() == (0.7, 100_000)
    assert load_config("digitscenes-unimatch").method.ohem() is None


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["supervised", *(pytest.param(m, marks=SLOW) for m in ("unimatch", "softmatch"))])
def test_digitscenes_run_directory(tmp_path: Path, method: str) -> None:
    metrics = Trainer(load_config(f"digitscenes-{method}", SMALL), tmp_path / "run", progress=False).fit()
    run = tmp_path / "run"
    for name in [
        "config.yaml",
        "metrics.json",
        "last.pt",
        "best.pt",
        "reliability_final.png",
        "reliability_final_calibrated.png",
        "curves.png",
        "overlays.png",
        "findings.pt",
    ]:
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved_findings(run, saved["steps"]) is not None  # what the HTML report reads, of the final step
    final = saved["final"]
    assert 0.0 <= final["miou"] <= 1.0 and 0.0 <= final["pixel_ece_15"] <= 1.0
    assert set(final["per_class_iou"]) == {"background", *map(str, range(10))}
    assert saved["best"]["val"]["miou"] >= 0 and "temperature_note" not in saved
    assert 0.01 <= saved["temperature"] <= 100 and set(saved["final_calibrated"]) == set(final)
    assert 0 <= final["eaurc"] <= final["aurc"] <= 1  # per pixel, over the valid ones
    curve, calibrated = saved["final_calibrated_risk_coverage"], saved["final_calibrated"]
    assert curve["risk"][-1] == pytest.approx(1 - calibrated["pixel_accuracy"], abs=1e-12)
    assert metrics["final"] == final and [h["step"] for h in saved["history"]] == [3, 6]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [2, 4, 6] and all(0 <= e["loss_sup"] for e in log)
    if method != "supervised":  # digitscenes knows the unlabeled truth: the selection's worth, by part
        diagnostics = {"pl_acc_bg", "pl_acc_fg", "weight_fg", "trusted_fg", "fg_pseudo", "wrong_loss_share"}
        assert diagnostics <= set(log[0]) and all(0 <= log[-1][k] <= 1 for k in diagnostics)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digitscenes-unimatch", "digitscenes-csl"])
def test_digitscenes_resume_is_bit_exact(tmp_path: Path, config: str) -> None:
    """CSL adds its selection snapshots and a varying number of draws per batch (mild vs strong).

    On the CPU: CUDA's backward of bilinear upsampling and its 2-D NLL loss add with atomics, so two
    segmentation runs on a GPU differ in the last bits (seen on an H200), resumed or not."""
    overrides = [*SMALL, "train.device=cpu"]
    straight = Trainer(load_config(config, overrides), tmp_path / "a", progress=False)
    straight.fit()
    Trainer(load_config(config, overrides), tmp_path / "b", progress=False).fit(stop_at=4)
    with open(tmp_path / "b" / "train_log.jsonl", "a") as f:  # logged after last.pt by a run that then died
        f.write(json.dumps({"step": 5, "loss_sup": -1.0}) + "\n")
    Trainer.resume(tmp_path / "b", progress=False).fit()
    logs = [(tmp_path / r / "train_log.jsonl").read_text() for r in "ab"]
    assert logs[0] == logs[1] and '"step": 5' not in logs[1]
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert {"selector", "lb_stream", "ulb_stream", "mix_stream"} <= set(a["parts"])
    assert ("csl_snapshots" in a["parts"]) == (config == "digitscenes-csl")
    assert_same_state(a, b)
    assert_same_state(*(json.loads((tmp_path / r / "metrics.json").read_text()) for r in "ab"))


@pytest.mark.slow
def test_digitscenes_torchrun_resume_is_bit_exact(tmp_path: Path) -> None:
    check_torchrun_resume(tmp_path, "digitscenes-unimatch", SMALL)  # global batch 4: 2 crops per process


# ----------------------------------------------------------------------------- the user's folders


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A red square (class 1) and a blue one (class 2) on grey; the square borders are ignored."""
    h, w = size
    image = np.full((h, w, 3), 128, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for cls, colour in ((1, (220, 20, 20)), (2, (20, 20, 220))):
        y, x = rng.integers(0, h - 10), rng.integers(0, w - 10)
        image[y : y + 8, x : x + 8] = colour
        mask[y : y + 8, x : x + 8] = cls
        mask[y, x : x + 8] = 255
    return image, mask


def _folders(root: Path, labeled: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", labeled), ("val", 3)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for i in range(count):
            image, mask = _scene(rng, (40 + 4 * i, 48))
            Image.fromarray(image).save(root / split / "images" / f"s{i}.jpg", quality=95)
            Image.fromarray(mask).save(root / split / "masks" / f"s{i}.png")
    (root / "train" / "classes.txt").write_text("background\nred\nblue\n")
    (root / "unlabeled").mkdir()
    for i in range(8):
        Image.fromarray(_scene(rng, (44, 44))[0]).save(root / "unlabeled" / f"u{i}.png")


def _folder_args(root: Path) -> list[str]:
    return [
        "data.name=folder",
        f"data.root={root / 'train'}",
        f"data.unlabeled_dir={root / 'unlabeled'}",
        f"data.val_dir={root / 'val'}",
        "data.crop_size=32",
        "train.batch_size=2",
        "train.steps=4",
        "train.eval_every=2",
        "train.eval_batch_size=1",
    ]


@pytest.mark.slow
def test_user_folders_train_evaluate_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _folders(tmp_path)
    run = tmp_path / "run"
    assert main(["train", "digitscenes-unimatch", *_folder_args(tmp_path), "--out", str(run), "--quiet"]) == 0
    assert "final test" in capsys.readouterr().out or (run / "metrics.json").is_file()
    assert main(["evaluate", str(run), "--split", "val"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and 0.0 <= result["miou"] <= 1.0
    out = tmp_path / "predictions"
    assert main(["predict", str(run), str(tmp_path / "val" / "images"), "--out", str(out), "--confidence-maps"]) == 0
    for i in range(3):
        mask = Image.open(out / f"s{i}.png")
        assert mask.mode == "P" and mask.size == (48, 40 + 4 * i)
        assert set(np.unique(np.array(mask))) <= {0, 1, 2}
        confidence = np.array(Image.open(out / f"s{i}_confidence.png"))
        assert confidence.shape == (40 + 4 * i, 48) and confidence.min() >= 255 // 3 - 1


@pytest.mark.parametrize(
    "breakage, named",
    [
        ("size", "s1.png"),
        ("unknown id", "s2.png"),
        ("no mask", "s3.jpg"),
        ("jpeg mask", "masks/s2.jpg"),
    ],
)
def test_bad_folders_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, named: str
) -> None:
    _folders(tmp_path)
    masks = tmp_path / "train" / "masks"
    if breakage == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "s1.png")
    elif breakage == "unknown id":
        Image.fromarray(np.full((48, 48), 7, np.uint8)).save(masks / "s2.png")
    elif breakage == "jpeg mask":
        Image.open(masks / "s2.png").convert("L").save(masks / "s2.jpg")
        (masks / "s2.png").unlink()
    else:
        (masks / "s3.png").unlink()
    assert main(["train", "digitscenes-unimatch", *_folder_args(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and named in err and "Traceback" not in err


def test_split_file_naming_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    split = root / "splits" / "92"
    split.mkdir(parents=True)
    (split / "labeled.txt").write_text("JPEGImages/a.jpg SegmentationClass/a.png\n")
    (split / "unlabeled.txt").write_text("JPEGImages/b.jpg SegmentationClass/b.png\n")
    (root / "splits" / "val.txt").write_text("JPEGImages/a.jpg SegmentationClass/a.png\n")
    code = main(
        ["train", "pascal-unimatch-92", f"data.root={root}", "model.weights=none", "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "labeled.txt" in err and "a.jpg" in err


def test_selection_logs_by_hand() -> None:
    """One 2 x 2 image, K = 3: pseudo-labels [[0, 1], [0, 2]], truth [[0, 1], [1, 255]], weights
    [[1, 0.5], [0.2, 1]]. Known pixels: three; right: the first two. Uniform logits give every pixel the
    same cross-entropy, so the wrong pixels' loss share is their weight share: 0.2 / 1.7."""
    selection = Selection(torch.tensor([[[0, 1], [0, 2]]]), torch.tensor([[[1.0, 0.5], [0.2, 1.0]]]))
    truth = torch.tensor([[[0, 1], [1, 255]]])
    logs = selection_logs(selection, torch.ones(1, 2, 2, dtype=torch.bool), truth, torch.zeros(1, 3, 2, 2))
    expected = {
        "mask": 2.7 / 4,
        "pl_acc": 2 / 3,
        "pl_acc_selected": 1.5 / 1.7,
        "pl_acc_bg": 1.0,
        "weight_bg": 1.0,
        "trusted_bg": 1.0,
        "pl_acc_fg": 0.5,
        "weight_fg": 0.35,
        "trusted_fg": 0.0,
        "fg_pseudo": 1 / 3,
        "fg_true": 2 / 3,
        "wrong_loss_share": 0.2 / 1.7,
    }
    assert set(logs) == set(expected)
    for key, value in expected.items():
        assert float(logs[key]) == pytest.approx(value, rel=1e-6), key
    assert set(selection_logs(selection, torch.ones(1, 2, 2, dtype=torch.bool), None)) == {"mask"}

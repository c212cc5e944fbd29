"""CSL's segmentation step against its formula, the TMP view, and CSL runs in both tasks."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from csl_reference import reference_csl
from test_segmentation_train import SMALL, PixelNet, _batch, norm_by_hand, reference_forwards, start_running_statistics
from trustmatch.config import load_config
from trustmatch.data.segviews import SegViews
from trustmatch.methods import FixMatchSelector
from trustmatch.methods.csl import CSLSelector, csl_step, hide_trusted
from trustmatch.methods.unimatch_step import labeled_loss, supervised_pixel_step, unimatch_step
from trustmatch.run.trainer import Trainer

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _tmp_batch(seed: int = 0):
    batch = _batch(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    n, size = batch.x_lb.shape[0], batch.x_lb.shape[-1]
    batch.u_strong, batch.boxes = batch.u_strong[:1], batch.boxes[:1]
    batch.u_tmp = torch.randn(n, 3, size, size, generator=g)
    batch.cover = torch.rand(n, size, size, generator=g) > 0.3
    return batch


@pytest.mark.parametrize("confident", [False, True], ids=["mixed", "all_confident"])
def test_csl_step_is_the_csl_loss(confident: bool) -> None:
    """By hand: partner in training mode, CSL selection of the weak view (the per-image SVD reference, as
    the release's loop), the TMP view with covered trusted pixels zeroed, (L_x + 0.25 L_s + 0.25 L_m +
    0.5 L_fp) / 2. ``all_confident``: a head biased to one class puts every pixel at c > 0.99, where
    l2 / l1 of the boundary falls below 1e-12 and the release still splits each image."""
    torch.manual_seed(0)
    model, batch, selector = PixelNet(), _tmp_batch(), CSLSelector(8.0, "csl", False, "confidence")
    if confident:
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([9.0, 0.0, 0.0]))
    reference = PixelNet()
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    out = csl_step(model, batch, selector, 1.0, 0, 10)
    assert model.modes == [True, True, True]

    _, logits_lb, logits_w, logits_fp = reference_forwards(reference, batch)
    with torch.no_grad():
        p_mix = reference(batch.mix_weak).logits.softmax(1)  # training mode: the partner's own statistics
    weak = reference_csl(logits_w.detach().softmax(1).double(), batch.valid_u)
    mix = reference_csl(p_mix.double(), batch.valid_mix)
    if confident:
        s1, s2 = selector.select(logits_w.detach().softmax(1), valid=batch.valid_u).boundary.singular.unbind(1)
        assert ((s2 / s1) ** 2 < 1e-12).all() and (s2 > 0).all()
    hidden = batch.cover & weak.reliable
    tmp_image = torch.where(hidden[:, None], 0.0, batch.u_tmp)
    s, m = reference(torch.cat([batch.u_strong[0], tmp_image])).logits.chunk(2)

    def loss_u(logits, label, weight, valid):
        return (F.cross_entropy(logits, label, reduction="none") * weight.float()).sum() / valid.sum()

    (box,) = batch.boxes
    label_s = torch.where(box, mix.labels, weak.labels)
    weight_s = torch.where(box, mix.weights, weak.weights)
    valid_s = torch.where(box, batch.valid_mix, batch.valid_u)
    loss_x = F.cross_entropy(logits_lb, batch.y_lb, ignore_index=255)
    loss_s = loss_u(s, label_s, weight_s, valid_s)
    loss_m = loss_u(m, weak.labels, weak.weights, batch.valid_u)  # hidden pixels keep their target
    loss_fp = loss_u(logits_fp, weak.labels, weak.weights, batch.valid_u)
    expected = (loss_x + 0.25 * loss_s + 0.25 * loss_m + 0.5 * loss_fp) / 2
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)  # the bar: within 1e-5
    torch.testing.assert_close(out.logs["loss_tmp"], loss_m.detach(), rtol=0, atol=1e-5)
    assert out.logs["hidden"] == hidden.sum() / batch.valid_u.sum()


def test_csl_step_batchnorm_as_released() -> None:
    """CSL's release: the partner predicted with its own batch statistics, and of the three forwards
    only the labeled + weak one moves the running statistics (by hand, momentum 0.1)."""
    torch.manual_seed(0)
    model, batch = PixelNet(), _tmp_batch()
    mean0, var0 = start_running_statistics(model)
    seen: list[torch.Tensor] = []

    class Recording(CSLSelector):
        def select(self, probs, indices=None, valid=None, update=True):
            if not update:
                seen.append(probs)
            return super().select(probs, indices, valid, update)

    expected_partner, _, _ = norm_by_hand(model, batch.mix_weak, batch_statistics=True)
    _, mean_w, var_w = norm_by_hand(model, torch.cat([batch.x_lb, batch.u_weak]), True)
    out = csl_step(model, batch, Recording(8.0, "csl", False, "confidence"), 1.0, 0, 10)
    torch.testing.assert_close(seen[0], expected_partner)
    bn = model.encoder[1]
    torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * mean_w)
    torch.testing.assert_close(bn.running_var, 0.9 * var0 + 0.1 * var_w)
    assert bn.num_batches_tracked == 8 and bn.track_running_stats
    out.loss.backward()  # the strong/TMP forward's graph is a training-mode one
    assert model.head.weight.grad is not None and model.head.weight.grad.isfinite().all()


def test_every_segmentation_step_takes_the_ohem_labeled_loss() -> None:
    ohem = (0.3, 5)  # an untrained net: every true-class probability near 1/3, so 0.3 mines
    csl = CSLSelector(8.0, "csl", False, "confidence")
    steps = {  # name: (step, its batch)
        "supervised": (lambda model, batch: supervised_pixel_step(model, batch, 0, 10, ohem), _batch),
        "unimatch": (lambda m, b: unimatch_step(m, b, FixMatchSelector(0.4), 1.0, 0, 10, ohem), _batch),
        "csl": (lambda model, batch: csl_step(model, batch, csl, 1.0, 0, 10, ohem), _tmp_batch),
    }
    for name, (step, make_batch) in steps.items():
        torch.manual_seed(0)
        out = step(PixelNet(), make_batch())
        logits, target = out.logits["lb"].detach(), make_batch().y_lb
        assert labeled_loss(logits, target, ohem) != labeled_loss(logits, target), name  # OHEM changes it
        torch.testing.assert_close(out.logs["loss_sup"], labeled_loss(logits, target, ohem), msg=name)


def test_hide_trusted_zeroes_only_covered_trusted_pixels() -> None:
    image = torch.ones(1, 3, 2, 2)
    cover = torch.tensor([[[True, True], [False, False]]])
    reliable = torch.tensor([[[True, False], [True, False]]])
    assert hide_trusted(image, cover, reliable)[0, :, 0, 0].eq(0).all()
    assert hide_trusted(image, cover, reliable).sum() == 9


def test_trusted_mask_view_cover_grid_and_views() -> None:
    """Half the images mild + a grid of round(c / cell)^2 cells at ~cover; the rest strong and uncovered;
    the same generator state gives the same view."""
    views = SegViews(MEAN, STD, 64)
    images = torch.randint(0, 256, (200, 3, 64, 64), dtype=torch.uint8)
    x, cover = views.trusted_mask_view(images, torch.Generator().manual_seed(0), cell=16, cover=0.7)
    x2, cover2 = views.trusted_mask_view(images, torch.Generator().manual_seed(0), cell=16, cover=0.7)
    assert torch.equal(x, x2) and torch.equal(cover, cover2)
    assert x.shape == (200, 3, 64, 64) and cover.shape == (200, 64, 64) and cover.dtype == torch.bool
    covered = cover.flatten(1).any(1)
    assert 0.35 < covered.float().mean() < 0.65  # p 1/2 of the mild branch (and ~1 of them with no cell on)
    cells = cover[covered][:, ::16, ::16]  # a 4 x 4 grid: constant within each 16-px cell
    assert torch.equal(cover[covered], cells.repeat_interleave(16, 1).repeat_interleave(16, 2))
    assert 0.6 < cells.float().mean() < 0.8
    gray = (x[:, 0] == x[:, 1]).flatten(1).all(1) & (x[:, 1] == x[:, 2]).flatten(1).all(1)
    assert gray[~covered].any() and not gray[covered].any()  # grayscale (p 0.2) is the strong view's only
    blank = torch.zeros(8, 3, 321, 321, dtype=torch.uint8)
    odd = SegViews(MEAN, STD, 321).trusted_mask_view(blank, torch.Generator().manual_seed(1), cell=32, cover=1.0)[1]
    assert odd.shape == (8, 321, 321)  # round(321 / 32) = 10 cells per side, resized nearest
    assert all(image.all() or not image.any() for image in odd)  # cover 1: a mild image is covered whole


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digitscenes-csl", "digitscenes-csl-notmp"])
def test_digitscenes_csl_runs(tmp_path: Path, config: str) -> None:
    metrics = Trainer(load_config(config, SMALL), tmp_path / "run", progress=False).fit()
    assert 0.0 <= metrics["final"]["miou"] <= 1.0 and (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "csl_selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_classification_csl_with_calibratemix(tmp_path: Path) -> None:
    overrides = [
        "train.steps=4",
        "train.eval_every=2",
        "train.batch_size=8",
        "calibratemix.mode=faithful",
        "calibratemix.warmup=0",
    ]
    metrics = Trainer(load_config("digits-csl", overrides), tmp_path / "run", progress=False).fit()
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0
    assert (tmp_path / "run" / "csl_selection.png").is_file() and (tmp_path / "run" / "datamap.png").is_file()

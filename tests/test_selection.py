"""Selectors checked against values worked out by hand from the papers' formulas."""

import math

import pytest
import torch

from trustmatch.methods import (
    FixMatchSelector,
    FlexMatchSelector,
    FreeMatchSelector,
    SoftMatchSelector,
    align_to_uniform,
    build_method,
    fixed_threshold,
    flexmatch_class_thresholds,
    freematch_fairness_loss,
    method_config,
    softmatch_weights,
)


def test_fixed_threshold_selects_confident_samples() -> None:
    probs = torch.tensor([[0.96, 0.04], [0.94, 0.06], [0.02, 0.98], [0.5, 0.5]])
    sel = fixed_threshold(probs, 0.95)
    assert sel.labels.tolist() == [0, 0, 1, 0]
    assert sel.weights.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_fixmatch_selector_is_shape_agnostic() -> None:
    probs = torch.rand(2, 3, 4, 5).softmax(dim=1)
    sel = FixMatchSelector(0.4).select(probs)
    assert sel.labels.shape == (2, 4, 5) and sel.weights.shape == (2, 4, 5)
    assert torch.equal(sel.labels, probs.argmax(dim=1))


def test_flexmatch_thresholds_hand_computed() -> None:
    # stored predictions: class 0 twice, class 1 once, 3 unused, K=3
    stored = torch.tensor([0, 0, 1, -1, -1, -1])
    # warm-up: denominator max(max sigma = 2, unused = 3) = 3 -> beta = [2/3, 1/3, 0]
    t = flexmatch_class_thresholds(stored, 3, 0.9, warmup=True)
    beta = torch.tensor([2 / 3, 1 / 3, 0.0])
    assert torch.allclose(t, beta / (2 - beta) * 0.9)
    assert t[0].item() == pytest.approx((2 / 3) / (4 / 3) * 0.9)  # 0.45
    # without warm-up: denominator max sigma = 2 -> beta = [1, 1/2, 0]
    t = flexmatch_class_thresholds(stored, 3, 0.9, warmup=False)
    assert t.tolist() == pytest.approx([0.9, (0.5 / 1.5) * 0.9, 0.0])


def test_flexmatch_selector_updates_state_with_confident_samples_only() -> None:
    sel = FlexMatchSelector(tau=0.9, num_classes=2, num_unlabeled=4, warmup=True)
    probs = torch.tensor([[0.95, 0.05], [0.3, 0.7]])
    out = sel.select(probs, torch.tensor([2, 0]))
    # nothing stored yet: every threshold is 0 (M(0) = 0), so both samples are used
    assert out.weights.tolist() == [1.0, 1.0]
    assert sel.stored.tolist() == [-1, -1, 0, -1]
    # now sigma = [1, 0], unused = 3 -> T_0 = (1/3)/(5/3)*0.9 = 0.18, T_1 = 0
    assert sel.thresholds().tolist() == pytest.approx([0.18, 0.0])
    with pytest.raises(ValueError, match="indices"):
        sel.select(probs)


def test_freematch_ema_thresholds_hand_computed() -> None:
    sel = FreeMatchSelector(num_classes=2, momentum=0.5, fairness_weight=0.0)
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    out = sel.select(probs)
    # tau = 0.5 * 1/2 + 0.5 * mean(0.9, 0.6) = 0.625; p~ = 0.5*[.5,.5] + 0.5*[.75,.25] = [.625, .375]
    assert sel.global_tau.item() == pytest.approx(0.625)
    assert sel.class_probs.tolist() == pytest.approx([0.625, 0.375])
    # tau(c) = p~(c)/max p~ * tau = [0.625, 0.375]; both predicted class 0: 0.9 >= .625, 0.6 < .625
    assert out.weights.tolist() == [1.0, 0.0]
    # label histogram EMA: both pseudo-labels are class 0 -> 0.5*[.5,.5] + 0.5*[1, 0]
    assert sel.label_hist.tolist() == pytest.approx([0.75, 0.25])


def test_freematch_fairness_loss_hand_computed() -> None:
    # two selected samples with strong-view probabilities q1 = [0.8, 0.2], q2 = [0.4, 0.6]
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]]))
    mask = torch.tensor([1.0, 1.0, 0.0])
    class_probs = torch.tensor([0.6, 0.4])
    label_hist = torch.tensor([0.75, 0.25])
    # p_bar = [0.6, 0.4]; h_bar = [0.5, 0.5] -> p_bar/h_bar = [1.2, 0.8] -> SumNorm = [0.6, 0.4]
    # p~/h~ = [0.8, 1.6] -> SumNorm = [1/3, 2/3]; L_f = 1/3 log 0.6 + 2/3 log 0.4
    expected = (1 / 3) * math.log(0.6) + (2 / 3) * math.log(0.4)
    loss = freematch_fairness_loss(logits, mask, class_probs, label_hist)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_freematch_fairness_loss_no_selection_is_zero_with_grad() -> None:
    logits = torch.randn(3, 4, requires_grad=True)
    loss = freematch_fairness_loss(logits, torch.zeros(3), torch.full((4,), 0.25), torch.full((4,), 0.25))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))  # finite, zero


def test_freematch_fairness_gradient_flows_only_through_strong_view() -> None:
    logits = torch.randn(6, 3, requires_grad=True)
    class_probs = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
    freematch_fairness_loss(logits, torch.ones(6), class_probs, torch.tensor([0.4, 0.4, 0.2])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_align_to_uniform() -> None:
    probs = torch.tensor([[0.5, 0.5]])
    aligned = align_to_uniform(probs, torch.tensor([0.8, 0.2]))
    # p (1/K + 1e-6) / (p~ + 1e-6) normalised: [0.5/0.800001, 0.5/0.200001] / sum -> [0.2000006, 0.7999994]
    first = (1 / 0.800001) / (1 / 0.800001 + 1 / 0.200001)
    assert aligned.tolist()[0] == pytest.approx([first, 1 - first], rel=1e-6)


def test_align_to_uniform_adds_usbs_epsilon_where_a_class_mean_is_small() -> None:
    """USB: p (1/K + 1e-6) / (p~ + 1e-6). By hand, p = (0.5, 0.5), p~ = (1 - 2e-6, 2e-6): the aligned
    ratio is (1 - 1e-6) / 3e-6, so the first class gets 3e-6 / (1 + 2e-6) where without the epsilon it
    would get 2e-6; the same per pixel ([B, K, H, W])."""
    probs = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    mean = torch.tensor([1 - 2e-6, 2e-6], dtype=torch.float64)
    first = 3e-6 / (1 + 2e-6)
    assert align_to_uniform(probs, mean)[0].tolist() == pytest.approx([first, 1 - first], rel=1e-12)
    pixels = probs.view(1, 2, 1, 1).expand(2, 2, 3, 3)
    torch.testing.assert_close(align_to_uniform(pixels, mean)[:, 0], torch.full((2, 3, 3), first, dtype=torch.float64))


def test_softmatch_weights_truncated_gaussian() -> None:
    conf = torch.tensor([0.9, 0.7, 0.5])
    w = softmatch_weights(conf, torch.tensor(0.7), torch.tensor(0.04), n_sigma=2.0)
    # above or at mu: 1; below: exp(-(0.2)^2 / (2 * 0.04 / 4)) = exp(-2)
    assert w.tolist() == pytest.approx([1.0, 1.0, math.exp(-2.0)])


def test_softmatch_selector_ema_and_label_source() -> None:
    probs = torch.tensor([[0.6, 0.4], [0.45, 0.55]])
    raw = SoftMatchSelector(2, momentum=0.0, n_sigma=2.0, dist_align=True, label_from="raw")
    out = raw.select(probs)
    # momentum 0: p~ = batch mean = [0.525, 0.475]; aligned = normalise(p / (p~ + 1e-6)), in float64
    aligned = probs.double() / (torch.tensor([0.525, 0.475], dtype=torch.float64) + 1e-6)
    aligned = aligned / aligned.sum(1, keepdim=True)
    conf = aligned.max(1).values
    assert raw.mu.item() == pytest.approx(conf.mean().item())
    assert raw.var.item() == pytest.approx(conf.var(unbiased=True).item(), rel=1e-4)  # 6.4e-7: float32 rounding
    assert out.labels.tolist() == probs.argmax(1).tolist()
    aligned_labels = SoftMatchSelector(2, 0.0, 2.0, True, "aligned").select(probs).labels
    assert aligned_labels.tolist() == aligned.argmax(1).tolist()


def test_softmatch_initial_state_and_checkpoint_roundtrip() -> None:
    sel = SoftMatchSelector(4, 0.999, 2.0, True, "raw")
    assert sel.mu.item() == pytest.approx(0.25) and sel.var.item() == 1.0
    sel.select(torch.rand(8, 4).softmax(1))
    other = SoftMatchSelector(4, 0.999, 2.0, True, "raw")
    other.load_state_dict(sel.state_dict())
    assert torch.equal(other.mu, sel.mu) and torch.equal(other.class_probs, sel.class_probs)


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "freematch", "softmatch"])
def test_registry_builds_every_method(name: str) -> None:
    sel = build_method(method_config(name)).selector(num_classes=3, num_unlabeled=10)
    probs = torch.rand(5, 3).softmax(1)
    out = sel.select(probs, torch.arange(5))
    assert out.labels.shape == (5,) and ((out.weights >= 0) & (out.weights <= 1)).all()


def test_softmatch_class_mean_starts_at_the_first_batch_mean_as_usb() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    sel = SoftMatchSelector(2, momentum=0.999, n_sigma=2.0, dist_align=True, label_from="raw")
    sel.select(probs)
    assert sel.class_probs.tolist() == pytest.approx([0.8, 0.2])  # not 0.999 * 0.5 + 0.001 * 0.8
    sel.select(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    assert sel.class_probs.tolist() == pytest.approx([0.999 * 0.8 + 0.001 * 0.5, 0.999 * 0.2 + 0.001 * 0.5])


def _segmentation_like(valid_fraction: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(2, 4, 5, 6, generator=g).mul(3).softmax(dim=1)
    valid = torch.rand(2, 5, 6, generator=g) < valid_fraction
    return probs, valid


@pytest.mark.parametrize("name", ["fixmatch", "freematch", "softmatch"])
def test_ignored_pixels_get_no_weight_and_enter_no_statistic(name: str) -> None:
    """Changing the probabilities of invalid pixels changes neither the state nor the valid weights."""
    probs, valid = _segmentation_like()
    noisy = torch.where(valid.unsqueeze(1), probs, torch.rand_like(probs).softmax(dim=1))
    a, b = (build_method(method_config(name)).selector(num_classes=4, num_unlabeled=0) for _ in range(2))
    out_a, out_b = a.select(probs, valid=valid), b.select(noisy, valid=valid)
    assert (out_a.weights[~valid] == 0).all() and (out_b.weights[~valid] == 0).all()
    torch.testing.assert_close(out_a.weights[valid], out_b.weights[valid])
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, msg=key)


def test_masked_statistics_equal_those_of_the_valid_pixels_alone() -> None:
    probs, valid = _segmentation_like()
    flat = probs.movedim(1, -1)[valid]  # [n_valid, K]
    masked, alone = SoftMatchSelector(4, 0.0, 2.0, True, "raw"), SoftMatchSelector(4, 0.0, 2.0, True, "raw")
    masked.select(probs, valid=valid)
    alone.select(flat)
    for key in ("class_probs", "mu", "var"):
        torch.testing.assert_close(getattr(masked, key), getattr(alone, key), msg=key)
    free_masked, free_alone = FreeMatchSelector(4, 0.0, 0.0), FreeMatchSelector(4, 0.0, 0.0)
    free_masked.select(probs, valid=valid)
    free_alone.select(flat)
    for key in ("global_tau", "class_probs", "label_hist"):
        torch.testing.assert_close(getattr(free_masked, key), getattr(free_alone, key), msg=key)


@pytest.mark.parametrize("name", ["freematch", "softmatch"])
def test_a_batch_without_valid_elements_moves_no_statistic(name: str) -> None:
    """An all-ignored crop (NaN in its ignored pixels, even) leaves the state as it was."""
    sel = build_method(method_config(name, ema_m=0.5)).selector(num_classes=4, num_unlabeled=0)
    before = {k: v.clone() for k, v in sel.state_dict().items()}
    probs = torch.full((2, 4, 3, 3), float("nan"))
    out = sel.select(probs, valid=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert (out.weights == 0).all()
    for key, value in sel.state_dict().items():
        assert torch.equal(value, before[key]), key
    probs, valid = _segmentation_like()
    sel.select(probs, valid=valid)  # then a real batch moves it, with finite values
    assert all(torch.isfinite(v.float()).all() for v in sel.state_dict().values())


@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "freematch", "softmatch"])
def test_select_without_update_changes_no_state(name: str) -> None:
    sel = build_method(method_config(name)).selector(num_classes=3, num_unlabeled=10)
    sel.select(torch.rand(6, 3).softmax(1), torch.arange(6))  # some state first
    before = {k: v.clone() for k, v in sel.state_dict().items()}
    probs = torch.rand(4, 3).mul(20).softmax(1)
    first = sel.select(probs, torch.arange(6, 10), update=False)
    second = sel.select(probs, torch.arange(6, 10), update=False)
    for key, value in sel.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(first.weights, second.weights) and torch.equal(first.labels, second.labels)


def test_flexmatch_skips_invalid_samples_and_needs_no_float64() -> None:
    sel = FlexMatchSelector(0.5, num_classes=2, num_unlabeled=4)
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    sel.select(probs, torch.arange(4), valid=torch.tensor([True, False, True, True]))
    assert sel.stored.tolist() == [0, -1, 0, 1]
    assert sel.thresholds().dtype == torch.float32

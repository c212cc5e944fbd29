"""CSL selection: the batched closed form against the per-image SVD reference (tests/csl_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csl_reference import reference_csl
from trustmatch.config import from_dict, from_saved, load_config
from trustmatch.core.errors import UserError
from trustmatch.methods import build_method, csl_features, csl_select, csl_selection, method_config

OPTIONS = [
    {},
    {"dispersion": "simple_covar"},
    {"scaled": True},
    {"reliable_rule": "covar"},
    {"alpha": 2.0, "dispersion": "simple_covar", "scaled": True, "reliable_rule": "covar"},
]


def _probs(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Softmax of logits with a per-element sharpness, so confidences span 1/K to ~1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g, dtype=torch.float64)
    sharp = torch.rand((shape[0], 1, *shape[2:]), generator=g, dtype=torch.float64) * 8
    return (logits * sharp).softmax(dim=1).to(dtype)


def _edge_case_valid(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random validity, plus an image with no valid pixel, one with one, one with two."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, h, w, generator=g) < 0.8
    valid[0] = False
    valid[1] = False
    valid[1, 2, 3] = True
    valid[2] = False
    valid[2, 0, :2] = True
    return valid


def _assert_matches(probs: torch.Tensor, valid: torch.Tensor | None, **options) -> None:
    got = csl_select(probs, valid, **options)
    ref = reference_csl(probs, valid, **options)
    assert torch.equal(got.labels, ref.labels)
    torch.testing.assert_close(got.weights, ref.weights, rtol=1e-9, atol=1e-9)
    assert torch.equal(got.reliable, ref.reliable)
    assert torch.equal(got.boundary.reliable, ref.chosen)
    torch.testing.assert_close(got.boundary.mean.double(), ref.mean, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.boundary.var.double(), ref.var, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "csl")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_matches_per_image_svd(options: dict, seed: int) -> None:
    probs = _probs((6, 7, 9, 11), seed)
    _assert_matches(probs, _edge_case_valid(6, 9, 11, seed), **options)
    _assert_matches(probs, None, **options)


@pytest.mark.parametrize("options", OPTIONS[:2] + OPTIONS[-1:])
def test_one_group_for_a_classification_batch(options: dict) -> None:
    probs = _probs((64, 10), 3)
    _assert_matches(probs, None, **options)
    got = csl_select(probs, None, **options)
    assert got.boundary.mean.shape == (1, 2, 2) and got.weights.shape == (64,)


def test_clusters_with_zero_and_one_member() -> None:
    """Identical pixels span one line: all in cluster 0, cluster 1 empty (mean 0, variance 0); a
    one-member cluster has variance 0, not the NaN of an unbiased variance of one value."""
    same = torch.zeros(1, 5, 4, 4, dtype=torch.float64)
    same[:, 0], same[:, 1:] = 0.6, 0.1
    probs = torch.cat([same, _probs((1, 5, 4, 4), 4)])
    got = csl_select(probs)
    assert got.boundary.counts[0].tolist() == [16, 0]
    assert got.boundary.mean[1].tolist() != [[0.0, 0.0], [0.0, 0.0]]
    assert got.boundary.var[0, 1].tolist() == [0.0, 0.0] and got.boundary.mean[0, 1].tolist() == [0.0, 0.0]
    torch.testing.assert_close(got.weights[0], torch.ones(4, 4, dtype=torch.float64))  # on the mean: z ~ 0
    _assert_matches(probs[1:], None)
    two = torch.zeros(1, 4, 4, dtype=torch.bool)
    two[0, 0, :2] = True
    got = csl_select(_probs((1, 5, 4, 4), 5), two)
    assert got.boundary.counts[0].sum() == 2 and torch.isfinite(got.weights).all()
    assert got.boundary.var.isfinite().all()


def test_no_valid_pixel_gives_zero_weight_and_the_documented_statistics() -> None:
    got = csl_select(_probs((2, 4, 3, 3), 6), torch.zeros(2, 3, 3, dtype=torch.bool))
    assert got.weights.abs().sum() == 0 and not got.reliable.any()
    assert got.boundary.mean[:, :, 0].eq(1).all() and got.boundary.mean[:, :, 1].eq(0).all()
    assert got.boundary.var.eq(1).all()


def test_invalid_pixels_do_not_move_the_boundary() -> None:
    """NaN or junk in ignored pixels changes nothing for the valid ones."""
    probs = _probs((2, 6, 8, 8), 7)
    valid = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.7
    junk = probs.clone()
    junk[:, :, ~valid[0]] = torch.nan  # same spatial mask on both images' invalid set of image 0
    both = valid & valid[0]
    a, b = csl_select(probs, both), csl_select(junk, both)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.reliable, b.reliable)


def test_float32_agrees_with_the_float64_reference() -> None:
    """Rounding may flip a pixel that lies on a boundary line; nearly all must agree."""
    probs = _probs((4, 21, 41, 41), 8)
    got = csl_select(probs.float())
    ref = reference_csl(probs)
    assert (got.reliable == ref.reliable).float().mean() > 0.999
    assert (got.weights.double() - ref.weights).abs().max() < 1e-3 or (
        ((got.weights.double() - ref.weights).abs() > 1e-3).float().mean() < 1e-3
    )


def test_dispersion_is_stable_for_confident_pixels() -> None:
    """v of a pixel at c = 1 - 1e-6 keeps its value in float32 (sum p^2 - c^2 alone would not)."""
    k = 21
    p = torch.full((1, k), 1e-6 / (k - 1), dtype=torch.float64)
    p[0, 3] = 1 - 1e-6
    p[0, 4] += 1e-7
    p = p / p.sum()
    _, _, v64 = csl_features(p)
    _, _, v32 = csl_features(p.float())
    torch.testing.assert_close(v32.double(), v64, rtol=1e-2, atol=0)


def test_selector_registry_reads_the_method_keys() -> None:
    cfg = method_config("csl", csl_alpha=2.0, csl_dispersion="simple_covar", csl_scaled=True, csl_reliable="covar")
    selector = build_method(cfg).selector(5, 100)
    probs = _probs((3, 5, 4, 4), 9)
    got = selector.select(probs.float())
    ref = reference_csl(probs.float(), alpha=2.0, dispersion="simple_covar", scaled=True, reliable_rule="covar")
    assert torch.equal(got.reliable, ref.reliable)
    assert selector.select(probs.float(), update=False).weights.shape == (3, 4, 4)


# Two pixels, K = 5; the second has tied maxima (only the first copy is zeroed). By hand: row 0 has
# r = (0, .2, .15, .1, .05), m = .5 / 4 = .125, squared deviations of the four non-max entries
# .005625 + .000625 + .000625 + .005625 = .0125 and of the zeroed slot .125^2 = .015625.
TINY = np.array([[0.5, 0.2, 0.15, 0.1, 0.05], [0.25, 0.25, 0.2, 0.2, 0.1]])


def test_csl_dispersion_keeps_the_zeroed_max_slot() -> None:
    """'csl' (CSL's release, CoVar's segmentation code): the variance over all K slots of p with the max
    set to 0, around the mean of the K-1 others, over K-1."""
    nonmax = [np.delete(row, row.argmax()) for row in TINY]
    expected = [(np.sum((rest - rest.mean()) ** 2) + rest.mean() ** 2) / 4 for rest in nonmax]
    np.testing.assert_allclose(expected[0], (0.0125 + 0.015625) / 4)
    _, labels, v = csl_features(torch.from_numpy(TINY), "csl")
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-12)
    assert labels.tolist() == [0, 0]


def test_simple_covar_dispersion_is_over_the_non_max_classes() -> None:
    """'simple_covar' (SimPLE+CoVar): the population variance of the K-1 non-max classes."""
    expected = [np.var(np.delete(row, row.argmax())) for row in TINY]
    np.testing.assert_allclose(expected[0], 0.0125 / 4)
    _, _, v = csl_features(torch.from_numpy(TINY), "simple_covar")
    np.testing.assert_allclose(v.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("old", "new"), [("release", "csl"), ("nonmax", "simple_covar")])
def test_old_dispersion_names_are_refused_with_the_new_one(old: str, new: str) -> None:
    """A user's config or call is refused with the new name; a run saved under the old one still loads."""
    with pytest.raises(UserError, match=f"did you mean '{new}'"):
        load_config("digits-csl", [f"method.csl_dispersion={old}"])
    with pytest.raises(ValueError, match=f"did you mean '{new}'"):
        csl_select(torch.from_numpy(TINY), dispersion=old)
    saved = load_config("digits-csl").to_dict()
    saved["method"]["csl_dispersion"] = old
    assert from_saved(saved).method.csl_dispersion == new
    assert from_saved(saved).calibratemix.second_pass_stats  # present in the saved config: kept
    del saved["calibratemix"]["second_pass_stats"]  # saved before the key existed: once a step, as it ran
    assert not from_saved(saved).calibratemix.second_pass_stats
    with pytest.raises(UserError, match=f"did you mean '{new}'"):
        from_dict(saved)


@pytest.mark.parametrize("bad", [{"dispersion": "other"}, {"reliable_rule": "other"}])
def test_unknown_options_are_named(bad: dict) -> None:
    with pytest.raises(ValueError, match="other"):
        csl_select(_probs((1, 3, 2, 2), 0), **bad)


def test_tied_maxima_keep_one_copy_in_the_residual() -> None:
    """Only the argmax slot is zeroed: a second class at the same probability stays in r."""
    probs = _probs((2, 6, 5, 5), 10)
    probs[:, :, :2] = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64).view(1, 6, 1, 1)
    probs[:, :, 2, :2] = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0, 0.0], dtype=torch.float64).view(1, 6, 1)
    for options in OPTIONS:
        _assert_matches(probs, None, **options)
    _, _, v = csl_features(probs)
    m = 0.7 / 5  # r = (0, 0.3, 0.1, 0.1, 0.1, 0.1)
    expected = ((0.3 - m) ** 2 + 4 * (0.1 - m) ** 2 + m**2) / 5
    torch.testing.assert_close(v[:, :2], torch.full_like(v[:, :2], expected))


def test_cpu_row_blocks_give_the_same_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache-sized row blocks (one row at a time here) change nothing."""
    probs, valid = _probs((3, 5, 7, 9), 11), _edge_case_valid(3, 7, 9, 11)
    whole = csl_select(probs, valid)
    monkeypatch.setattr(csl_selection, "CACHE_BLOCK", 1)
    blocked = csl_select(probs, valid)
    assert torch.equal(whole.labels, blocked.labels) and torch.equal(whole.reliable, blocked.reliable)
    torch.testing.assert_close(whole.weights, blocked.weights, rtol=1e-12, atol=1e-12)
    _assert_matches(probs, valid)
    _assert_matches(probs[:, :, 0, 0], None)  # [N, K] in blocks of rows too


def test_empty_batch() -> None:
    got = csl_select(torch.empty(0, 4))
    assert got.weights.shape == (0,) and got.labels.shape == (0,)


def _regime(name: str, dtype: torch.dtype, seed: int, k: int = 11, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Four images of one regime late or early training lives in: every pixel confident (c >= 0.98, so
    l2 / l1 of X^T X falls to 1e-17), nearly all (two rows uncertain), all near-uniform, one valid
    pixel, or every pixel the same probability vector."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, k, size, size, generator=g, dtype=torch.float64)
    top = torch.randint(0, k, (4, 1, size, size), generator=g)
    margin = 10 + 12 * torch.rand(4, 1, size, size, generator=g, dtype=torch.float64)
    valid = torch.ones(4, size, size, dtype=torch.bool)
    if name == "nearly_all_confident":
        margin[:, :, :2] = 0.5
    if name in ("all_confident", "nearly_all_confident"):
        logits = logits.scatter_add(1, top, margin)
    elif name == "all_uncertain":
        logits = logits * 0.3
    elif name == "one_pixel":
        valid[:] = False
        valid[:, 3, 5] = True
    elif name == "constant":
        logits = logits[:, :, :1, :1].expand_as(logits).clone()
    return logits.softmax(dim=1).to(dtype), valid


REGIMES = ["all_confident", "nearly_all_confident", "all_uncertain", "one_pixel", "constant"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", REGIMES)
def test_degenerate_images_split_as_the_release(name: str, dtype: torch.dtype) -> None:
    """The release splits every image whose s2 > 0, however small beside s1 (no tolerance): all-confident
    images included, where l2 / l1 reaches 1e-17. One cluster only for one pixel or identical pixels.
    float64: equal to the reference's loop to rounding. float32: the reference's own float32 means and
    variances move its weights by up to 2e-4 from its float64 result on the same inputs (ours computes
    them in float64), so ours is held to 1e-4 of that float64 result and to 5e-4 of its float32 one;
    labels and the trusted mask are identical to both."""
    for seed in range(3):
        probs, valid = _regime(name, dtype, seed)
        got = csl_select(probs, valid)
        assert torch.isfinite(got.weights).all() and torch.isfinite(got.boundary.singular).all()
        if name == "all_confident":
            assert got.confidence.min() > 0.98
            ratio = got.boundary.singular[:, 1] / got.boundary.singular[:, 0]
            assert (ratio**2 < 1e-12).all() and (ratio > 0).all()  # the old rule's one cluster; split now
            assert (got.boundary.counts.min(dim=1).values > 0).all()
        if name in ("one_pixel", "constant"):
            assert got.boundary.singular[:, 1].eq(0).all() and got.boundary.counts[:, 1].eq(0).all()
        ref64 = reference_csl(probs.double(), valid)
        assert torch.equal(got.labels, ref64.labels) and torch.equal(got.reliable, ref64.reliable)
        torch.testing.assert_close(
            got.weights.double(), ref64.weights, rtol=0, atol=1e-9 if dtype == torch.float64 else 1e-4
        )
        if dtype == torch.float32:
            ref32 = reference_csl(probs, valid)
            assert torch.equal(got.labels, ref32.labels)
            torch.testing.assert_close(got.weights, ref32.weights, rtol=0, atol=5e-4)
            if name != "constant":  # see test_constant_images_in_float32
                assert torch.equal(got.reliable, ref32.reliable)


def test_constant_images_in_float32_trust_every_pixel() -> None:
    """Identical pixels: whatever the split, both clusters' mean is the point and its variance 0, so every
    weight is 1 (the release's float64 result, and ours in any dtype). The release's float32 mean of n equal
    values may land an ulp off, leaving weights 1 - 6e-8 for some images: rounding, not a selection."""
    probs, valid = _regime("constant", torch.float32, 2)
    got = csl_select(probs, valid)
    assert got.reliable.all() and got.weights.eq(1).all()
    ref32 = reference_csl(probs, valid)
    assert (ref32.weights - 1).abs().max() < 1e-6

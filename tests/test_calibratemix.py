"""CalibrateMix: trackers against hand-computed values, the split, pairing and mix loss, both modes
end to end, exact resume, temperature scaling, UDA and the data map."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from test_train import TINY, assert_same_state
from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.evaluation.temperature import fit_temperature
from trustmatch.methods import Selection, UDASelector, sharpen
from trustmatch.methods.calibratemix import NAME, least_similar_partners, mix_loss, pool_size, split_halves
from trustmatch.methods.training_dynamics import APMTracker, AUMTracker, aum_margins, pseudo_margins
from trustmatch.methods.weak_to_strong import consistency_loss
from trustmatch.run.checkpoint import load_checkpoint
from trustmatch.run.trainer import Trainer

MIXING = ["calibratemix.warmup=0.3"]  # mixing from step 1 of TINY's 6


# ----------------------------------------------------------------------------- trackers


def test_margins_match_their_definitions() -> None:
    z = torch.randn(7, 5)
    y = torch.randint(0, 5, (7,))
    for i in range(7):
        others = [z[i, j] for j in range(5) if j != y[i]]
        assert math.isclose(float(aum_margins(z, y)[i]), float(z[i, y[i]] - max(others)), abs_tol=1e-6)
        order = z[i].argsort(descending=True)
        top1, top2 = z[i, order[0]], z[i, order[1]]
        for c in range(5):
            expected = top1 - top2 if c == order[0] else z[i, c] - top1
            assert math.isclose(float(pseudo_margins(z)[i, c]), float(expected), abs_tol=1e-6)


def test_aum_is_the_mean_margin_over_every_visit() -> None:
    tracker = AUMTracker(4)
    history: dict[int, list[float]] = {i: [] for i in range(4)}
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.tensor([0, 2, 2, 3])  # a batch spanning two epochs repeats a sample: both count
        z, y = torch.randn(4, 3, generator=g), torch.randint(0, 3, (4,), generator=g)
        tracker.update(z, y, idx)
        for i, m in zip(idx.tolist(), aum_margins(z, y).tolist()):
            history[i].append(m)
    expected = torch.tensor([np.mean(v) if v else 0.0 for v in history.values()], dtype=torch.float32)
    torch.testing.assert_close(tracker.scores(), expected)
    assert tracker.count.tolist() == [5, 0, 10, 5]


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 2e-2)])
def test_apm_follows_the_marginmatch_update(dtype: str, tol: float) -> None:
    tracker = APMTracker(3, 4, delta=0.997, dtype=dtype)
    apm, visits = np.zeros((3, 4)), np.zeros(3)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        idx = torch.tensor([2, 0, 2])  # twice in one batch: updated once, with the last occurrence
        z = torch.randn(3, 4, generator=g) * 3
        tracker.update(z, idx)
        pm = pseudo_margins(z).numpy()
        for i, row in ((0, pm[1]), (2, pm[2])):
            a = 0.997 / (1 + visits[i])
            apm[i] = a * row + (1 - a) * apm[i]
            visits[i] += 1
    np.testing.assert_allclose(tracker.apm.float().numpy(), apm, atol=tol, rtol=tol)
    assert tracker.visits.tolist() == [6, 0, 6]
    labels = torch.tensor([1, 3])
    np.testing.assert_allclose(tracker.scores(torch.tensor([0, 2]), labels).numpy(), apm[[0, 2], [1, 3]], atol=tol)


def test_split_pairing_and_mix_loss() -> None:
    easy, hard = split_halves(torch.tensor([0.5, -2.0, 3.0, 1.0, -1.0]))
    assert easy.tolist() == [2, 3] and hard.tolist() == [0, 4, 1]

    anchors, candidates = torch.randn(6, 8), torch.randn(40, 8)
    sim = F.normalize(anchors, dim=1) @ F.normalize(candidates, dim=1).T
    torch.testing.assert_close(least_similar_partners(anchors, candidates, 1), sim.argmin(dim=1))
    allowed = sim.topk(5, dim=1, largest=False).indices
    drawn = torch.stack([least_similar_partners(anchors, candidates, 5) for _ in range(200)], dim=1)
    for row in range(6):
        assert set(drawn[row].tolist()) == set(allowed[row].tolist())  # uniform over exactly those 5

    logits, targets = torch.randn(6, 4), torch.rand(6, 4).softmax(dim=1)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    bce = torch.stack([F.binary_cross_entropy_with_logits(logits[s], targets[s]) for s in (slice(0, 3), slice(3, 6))])
    torch.testing.assert_close(mix_loss(logits, targets, groups, "bce"), bce.sum())
    ce = -(targets * logits.log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(mix_loss(logits, targets, groups, "ce"), ce[:3].mean() + ce[3:].mean())


@pytest.mark.parametrize("k", [3, 3.0, 0.3, 0.25])
def test_k_is_a_count_or_a_fraction_of_the_candidates(k: float) -> None:
    """Candidates at angles 0, 20, ..., 180 degrees from the anchor: similarity falls with the index, so
    the pool is the last ones; 3 of 10 as a count, as 0.3 and as 0.25 (2.5 rounds to 2 candidates)."""
    angles = torch.deg2rad(torch.arange(10) * 20.0)
    candidates = torch.stack([angles.cos(), angles.sin()], dim=1)
    anchor = torch.tensor([[1.0, 0.0]])
    size = 2 if k == 0.25 else 3
    assert pool_size(k, 10) == size
    drawn = {int(least_similar_partners(anchor, candidates, k)) for _ in range(200)}
    assert drawn == set(range(10 - size, 10))


def test_k_fraction_keeps_the_release_share_at_other_batch_sizes() -> None:
    assert pool_size(15, 224) == pool_size(0.067, 224) == 15  # the release: 15 of 224
    assert pool_size(0.067, 112) == 8 and pool_size(15, 112) == 15  # this project's 112: the share, or the count
    assert pool_size(15, 4) == 4 and pool_size(0.01, 4) == 1  # never more than the candidates, never none


@pytest.mark.parametrize("second_pass_stats,updates", [(True, 2), (False, 1)])
def test_faithful_second_pass_moves_softmatch_statistics_as_configured(
    tmp_path: Path, second_pass_stats: bool, updates: int
) -> None:
    """After one mixing step, SoftMatch's mu and var are the EMA of the pass-1 weak confidences, then
    (release) of the pass-2 ones: m_{t+1} = m_t + (1 - m) (batch stat - m_t), computed here by hand."""
    overrides = [*TINY, *MIXING, "calibratemix.mode=faithful", "train.amp=false", "method.dist_align=false"]
    cfg = load_config("digits-softmatch", [*overrides, f"calibratemix.second_pass_stats={second_pass_stats}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    counting = CountingModel(trainer.train_model)
    trainer.train_model = counting
    trainer.train_step()  # warm-up: no second pass
    selector, m = trainer.task.selector, cfg.method.ema_m
    mu, var = float(selector.mu), float(selector.var)
    outputs: list[torch.Tensor] = []
    counting.register_forward_hook(lambda module, args, out: outputs.append(out.logits.detach()))
    trainer.train_step()
    assert [len(o) for o in outputs] == [40, 48]  # pass 1: lb 8, weak 16, strong 16; pass 2: + 8 mixes
    for weak in (outputs[0][8:24], outputs[1][16:32])[:updates]:
        conf = weak.softmax(dim=1).amax(dim=1)
        mu, var = mu + (1 - m) * (float(conf.mean()) - mu), var + (1 - m) * (float(conf.var()) - var)
    assert float(selector.mu) == pytest.approx(mu, rel=1e-5)
    assert float(selector.var) == pytest.approx(var, rel=1e-5)


def test_mixes_pair_labeled_easy_with_unlabeled_hard_and_the_reverse() -> None:
    """Images are basis vectors, so each mix reveals its anchor, its partner and its lambda."""
    from trustmatch.config import CalibrateMixConfig
    from trustmatch.methods.calibratemix import CalibrateMix
    from trustmatch.methods.step_output import StepOutput
    from trustmatch.methods.weak_to_strong import Batch

    n_lb, n_ulb, k = 6, 10, 3
    reg = CalibrateMix(CalibrateMixConfig(mode="efficient", k=2), 20, 50, k, lambda *a: torch.zeros(()))
    idx_lb, idx_ulb = torch.arange(6) * 3, torch.arange(10) * 5
    reg.aum.margin_sum[idx_lb] = torch.tensor([5.0, -1.0, 3.0, -2.0, 4.0, 0.0])  # easy: 0, 4, 2
    reg.aum.count[idx_lb] = 1
    pseudo = torch.arange(10) % k
    apm = torch.tensor([0.1, 2.0, -1.0, 3.0, -2.0, 1.0, -3.0, 4.0, -4.0, 0.5])  # easy: 7, 3, 1, 5, 9
    reg.apm.apm[idx_ulb, pseudo] = apm
    eye = torch.eye(n_lb + n_ulb)
    batch = Batch(eye[:n_lb], torch.tensor([0, 1, 2, 0, 1, 2]), idx_lb, eye[n_lb:], eye[n_lb:], idx_ulb)
    out = StepOutput(torch.zeros(()), {})
    images, targets, groups = reg.mixes(batch, out, pseudo)
    lb_easy, ulb_easy = {0, 2, 4}, {1, 3, 5, 7, 9}
    assert groups.tolist() == [0, 0, 0, 1, 1, 1]
    for image, target, group in zip(images, targets, groups):
        anchor, partner = int(image[:n_lb].argmax()), int(image[n_lb:].argmax())
        lam = float(image[anchor])
        assert (anchor in lb_easy) == (group == 0) and (partner in ulb_easy) == (group == 1)
        expected = lam * F.one_hot(batch.y_lb[anchor], k) + (1 - lam) * F.one_hot(pseudo[partner], k)
        torch.testing.assert_close(target, expected.float())
        torch.testing.assert_close(image[n_lb + partner], torch.tensor(1 - lam))


# ----------------------------------------------------------------------------- end to end


class CountingModel(torch.nn.Module):
    """Counts forward passes and the images in each."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        self.sizes.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("mode,forwards", [("faithful", 2), ("efficient", 1)])
def test_modes_mix_easy_with_hard_in_the_forwards_they_promise(tmp_path: Path, mode: str, forwards: int) -> None:
    cfg = load_config("digits-fixmatch", [*TINY, *MIXING, f"calibratemix.mode={mode}"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    counting = CountingModel(trainer.train_model)
    trainer.train_model = counting
    regularizer = trainer.task.regularizers[NAME]
    trainer.train_step()  # warm-up (1 step of 6 at 0.3): trackers only
    assert counting.sizes == [8 + 16 + 16] and int(regularizer.aum.count.sum()) == 8
    assert int(regularizer.apm.visits.sum()) == 0  # APM starts after the warm-up
    for step in (1, 2):
        counting.sizes.clear()
        out = trainer.train_step()
        assert len(counting.sizes) == forwards
        trained = mode == "faithful" or step == 2  # efficient: step 1's mixes are trained in step 2
        assert (out.logs[f"{NAME}/loss_mix"] > 0) == trained
    assert int(regularizer.apm.visits.sum()) == 32
    if mode == "faithful":
        assert counting.sizes == [40, 8 + 8 + 16 + 16]
    else:
        assert counting.sizes == [40 + 8] and regularizer.pending[0].shape[0] == 8
    images, targets, groups = regularizer.mixes(trainer.next_batch(), out, out.logits["weak"].argmax(dim=1))
    assert images.shape[0] == 8 and groups.tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(8, device=targets.device))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["faithful", "efficient"])
def test_resume_restores_trackers_and_pending_mixes_exactly(tmp_path: Path, mode: str) -> None:
    overrides = [*TINY, *MIXING, f"calibratemix.mode={mode}"]
    Trainer(load_config("digits-softmatch", overrides), tmp_path / "a", progress=False).fit()
    Trainer(load_config("digits-softmatch", overrides), tmp_path / "b", progress=False).fit(stop_at=4)
    Trainer.resume(tmp_path / "b", progress=False).fit()
    a, b = (load_checkpoint(tmp_path / run / "last.pt") for run in "ab")
    assert {"regularizer.calibratemix"} <= set(a["parts"])
    state = a["parts"]["regularizer.calibratemix"]
    assert int(state["aum.count"].sum()) == 6 * 8 and int(state["apm.visits"].sum()) > 0
    assert (a["rng"][0]["regularizers"][NAME]["pending"] is not None) == (mode == "efficient")
    assert_same_state(a, b)
    assert_same_state(*(json.loads((tmp_path / run / "metrics.json").read_text()) for run in "ab"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["calibratemix.similarity=feature", "calibratemix.loss=ce"],
        ["calibratemix.apm_dtype=float16", "calibratemix.mode=efficient"],
        ["method.name=uda"],
        ["method.name=freematch", "calibratemix.mode=efficient", "train.amp=false"],
    ],
)
def test_options_and_base_methods_train(tmp_path: Path, extra: list[str]) -> None:
    overrides = [*TINY, *MIXING, "calibratemix.mode=faithful", "train.steps=3", *extra]
    metrics = Trainer(load_config("digits-fixmatch", overrides), tmp_path / "run", progress=False).fit()
    assert 0 <= metrics["final"]["accuracy"] <= 1 and math.isfinite(metrics["final"]["nll"])


def test_calibratemix_run_writes_the_data_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digits-calibratemix", [*TINY, *MIXING]), run, progress=False).fit()
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0  # reads what training wrote
    assert "+ TS" in capsys.readouterr().out and (tmp_path / "report" / "report.png").is_file()
    for name in ("datamap.png", "datamap_labeled.csv", "datamap_unlabeled.csv", "reliability_final_calibrated.png"):
        assert (run / name).is_file(), name
    with (run / "datamap_labeled.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and [float(r["aum"]) for r in rows] == sorted(float(r["aum"]) for r in rows)
    assert sum(int(r["visits"]) for r in rows) == 6 * 8
    with (run / "datamap_unlabeled.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1348 and {r["pseudo_label_wrong"] for r in rows} <= {"True", "False"}
    scores = [float(r["apm"]) for r in rows if r["apm"]]
    assert scores == sorted(scores) and all(not r["apm"] for r in rows[len(scores) :])  # unvisited last


def test_bad_calibratemix_input_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for overrides, needle in [
        (["calibratemix.mode=fast"], "calibratemix.mode"),
        (["calibratemix.kk=3"], "did you mean 'calibratemix.k'"),
        (["calibratemix.alpha=0"], "calibratemix.alpha"),
        (["calibratemix.similarity=latent"], "calibratemix.similarity"),
        *((["calibratemix.k=" + k], "calibratemix.k' must be a whole count") for k in ("0", "-0.1", "-3", "1.5")),
    ]:
        assert main(["train", "digits-fixmatch", "calibratemix.mode=faithful", *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="off for method 'supervised'"):
        load_config("digits-supervised", ["calibratemix.mode=efficient"])


# ----------------------------------------------------------------------------- temperature scaling


def test_fit_temperature_finds_the_nll_minimum() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 8.0):
        z = torch.randn(300, 10, generator=g) * scale
        y = torch.randint(0, 10, (300,), generator=g)
        y[:150] = z[:150].argmax(dim=1)
        ref = minimize_scalar(
            lambda t, z=z, y=y: float(F.cross_entropy(z.double() / t, y)), bounds=(1e-3, 1e3), method="bounded",
            options={"xatol": 1e-10},
        )  # fmt: skip
        assert math.isclose(fit_temperature(z, y), ref.x, rel_tol=1e-5)
    separable = torch.randn(50, 10, generator=g)
    assert fit_temperature(separable, separable.argmax(dim=1)) is None  # the NLL falls as T -> 0: no T


@pytest.mark.slow
def test_temperature_is_fitted_on_validation_and_used_by_predict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digits-fixmatch", ["train.steps=60", "train.eval_every=60"]), run, progress=False).fit()
    saved = json.loads((run / "metrics.json").read_text())
    temperature = saved["temperature"]
    assert 0.01 < temperature < 100 and saved["final_calibrated"]["accuracy"] == saved["final"]["accuracy"]
    assert saved["best"]["temperature"] > 0 and saved["final_bins"]["15"]["count"]
    best = load_checkpoint(run / "best.pt")
    assert best["temperature"] == saved["best"]["temperature"]

    from trustmatch.run.loaded_run import checkpoint_path, load_run_model

    loaded = load_run_model(checkpoint_path(run))
    task = loaded.task(loaded.cfg, loaded.precision)
    logits = torch.cat([z for z, _ in task._logits(loaded.model, "val")])
    labels = task.data.val.labels
    assert math.isclose(fit_temperature(logits, labels), best["temperature"], rel_tol=1e-6)  # val ...
    test_logits = torch.cat([z for z, _ in task._logits(loaded.model, "test")])
    assert abs(fit_temperature(test_logits, task.data.test.labels) - best["temperature"]) > 1e-3  # ... not test

    image = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(task.data.test.images[0, 0].numpy()).save(image)
    for flags, scale in (([], best["temperature"]), (["--raw"], 1.0)):
        out = tmp_path / f"p{len(flags)}.csv"
        assert main(["predict", str(run), str(image), "--out", str(out), *flags]) == 0
        confidence = float(next(csv.DictReader(out.open()))["confidence"])
        z = task.views.plain(task.data.test.images[:1]).to(loaded.precision.device)
        with torch.no_grad():
            expected = float((loaded.model(z).logits.float() / scale).softmax(dim=1).max())
        assert math.isclose(confidence, expected, rel_tol=1e-2)
    assert "temperature" in capsys.readouterr().out


def test_no_validation_split_says_temperature_cannot_be_fitted(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digits-fixmatch", [*TINY, "data.val_per_class=0"]), run, progress=False).fit()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["temperature"] is None and saved["final_calibrated"] is None
    assert "cannot be fitted" in saved["temperature_note"]


# ----------------------------------------------------------------------------- UDA


def test_uda_sharpens_above_its_threshold_with_soft_targets() -> None:
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2]])
    sharp = probs.pow(1 / 0.4)
    torch.testing.assert_close(sharpen(probs, 0.4), sharp / sharp.sum(dim=1, keepdim=True))
    selection = UDASelector(0.8, 0.4).select(probs)
    assert selection.weights.tolist() == [1.0, 0.0] and selection.labels.tolist() == [0, 0]
    logits = torch.randn(2, 3)
    expected = -(selection.targets * logits.log_softmax(dim=1)).sum(dim=1) * selection.weights
    torch.testing.assert_close(consistency_loss(logits, selection), expected.mean())
    hard = Selection(torch.tensor([2, 1]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(
        consistency_loss(logits, hard), (F.cross_entropy(logits, hard.labels, reduction="none") * hard.weights).mean()
    )
    assert load_config("digits-uda").method.tau == 0.8  # UDA's own default, not FixMatch's 0.95
    assert load_config("digits-fixmatch", ["method.name=uda", "method.tau=0.7"]).method.tau == 0.7

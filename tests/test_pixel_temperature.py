"""Segmentation's temperature: the fits against independent minimisations of the NLL over valid pixels,
the bounded pixel sample (deterministic, batch-size independent), and tiny digitscenes runs that write the
calibrated metrics, keep T in their checkpoints and apply it in ``predict`` (``--raw`` does not)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import minimize, minimize_scalar
from scipy.special import logsumexp

from test_segmentation_train import SMALL
from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.core.labels import IGNORE
from trustmatch.core.precision import Precision
from trustmatch.evaluation.forward import segment
from trustmatch.evaluation.pixel_pool import PixelPool
from trustmatch.evaluation.temperature import fit_class_temperatures, fit_temperature
from trustmatch.run.checkpoint import load_checkpoint
from trustmatch.run.loaded_run import checkpoint_path, load_run_model
from trustmatch.run.trainer import Trainer
from trustmatch.tasks.semantic_segmentation import SegmentationTask

TINY = [*SMALL, "train.steps=2", "train.eval_every=2", "data.image_size=32", "data.crop_size=32"]  # 32-px scenes: fast


def _nll(z: np.ndarray, y: np.ndarray, temperatures: np.ndarray | float) -> float:
    """Mean NLL of softmax(z / T) in float64 numpy: the reference every fit is compared with."""
    s = z / temperatures
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(y)), y]))


def _pixel_set(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [3, 4, 8, 8] of an over-confident model and masks with ignored rows; the last columns are
    padding (ignored) with large logits that would move T if they counted."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.randn(3, 4, 8, 8, generator=g) * 2
    masks = torch.distributions.Categorical(logits=truth.movedim(1, -1)).sample().to(torch.uint8)
    logits = truth * 3
    masks[:, 0] = IGNORE
    masks[:, :, 6:] = IGNORE
    logits[:, :, :, 6:] = torch.randn(3, 4, 8, 2, generator=g) * 50
    return logits, masks


def test_scalar_fit_on_pooled_pixels_is_the_nll_minimum_over_valid_pixels() -> None:
    logits, masks = _pixel_set()
    pool = PixelPool(4)
    pool.add(logits, masks, [0, 1, 2])
    z, y = pool.pixels()
    valid = masks != IGNORE
    assert len(y) == int(valid.sum())
    ref_z, ref_y = logits.movedim(1, -1)[valid].double().numpy(), masks[valid].long().numpy()
    ref = minimize_scalar(
        lambda t: _nll(ref_z, ref_y, t), bounds=(1e-2, 1e2), method="bounded", options={"xatol": 1e-10}
    )
    fitted = fit_temperature(z, y)
    assert fitted is not None and math.isclose(fitted, ref.x, rel_tol=1e-5) and fitted > 1.5  # over-confident
    everything = fit_temperature(logits.movedim(1, -1).reshape(-1, 4), torch.where(masks == IGNORE, 0, masks).flatten())
    assert everything is not None and abs(everything - fitted) > 0.1  # ignored and padded pixels would count


def test_per_class_fit_is_the_nll_minimum() -> None:
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(4000, 4, generator=g) * 2
    y = torch.distributions.Categorical(logits=truth).sample()
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0])
    z = truth * scales  # class c's logits scaled by s_c: T_c near s_c undoes it
    fitted = fit_class_temperatures(z, y)
    assert fitted is not None and len(fitted) == 4
    zn, yn = z.double().numpy(), y.numpy()
    ref = minimize(
        lambda log_t: _nll(zn, yn, np.exp(log_t)),
        np.zeros(4),
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-10},
    )
    np.testing.assert_allclose(fitted, np.exp(ref.x), rtol=1e-4)
    assert _nll(zn, yn, np.array(fitted)) <= ref.fun + 1e-12
    np.testing.assert_allclose(fitted, scales.numpy(), rtol=0.15)
    one = fit_temperature(z, y)
    assert one is not None and _nll(zn, yn, np.array(fitted)) < _nll(zn, yn, one)  # the scalar is a special case
    assert fit_class_temperatures(z, z.argmax(dim=1)) is None  # separable: no temperature is identified


def _identified_pixels(images: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose first channel is the pixel's global id, masks with a third of the pixels ignored."""
    ids = torch.arange(images * 6 * 7, dtype=torch.float32).view(images, 1, 6, 7)
    logits = torch.cat([ids, torch.zeros(images, 2, 6, 7)], dim=1)
    masks = (torch.arange(images * 6 * 7) % 3).view(images, 6, 7).to(torch.uint8)
    masks[masks == 2] = IGNORE
    return logits, masks


def _pooled(logits: torch.Tensor, masks: torch.Tensor, order: list[int], batch: int, budget: int) -> tuple:
    pool = PixelPool(3, budget=budget)
    for start in range(0, len(order), batch):
        chosen = order[start : start + batch]
        pool.add(logits[chosen], masks[chosen], chosen)
    return pool.pixels()


def test_pixel_sample_is_capped_deterministic_and_independent_of_batches() -> None:
    logits, masks = _identified_pixels()
    valid = int((masks != IGNORE).sum())
    first = _pooled(logits, masks, [0, 1, 2, 3, 4], batch=1, budget=50)
    for order, batch in (([0, 1, 2, 3, 4], 2), ([0, 1, 2, 3, 4], 5), ([4, 2, 0, 3, 1], 3)):
        again = _pooled(logits, masks, order, batch, budget=50)
        assert all(torch.equal(a, b) for a, b in zip(first, again)), (order, batch)
    z, y = first
    ids = z[:, 0].long()
    assert len(ids) == 50 and len(set(ids.tolist())) == 50
    assert bool((masks.flatten()[ids] != IGNORE).all()) and torch.equal(masks.flatten()[ids].long(), y)
    assert len(set((ids // 42).tolist())) > 1  # drawn from several images, not the first ones seen
    assert len(_pooled(logits, masks, [0, 1, 2, 3, 4], batch=2, budget=10_000)[1]) == valid


# ----------------------------------------------------------------------------- digitscenes runs


@pytest.fixture(scope="module")
def scalar_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("scalar") / "run"
    Trainer(load_config("digitscenes-supervised", TINY), run, progress=False).fit()
    return run


def test_run_fits_t_on_validation_pixels_and_reports_calibrated_pixel_metrics(scalar_run: Path) -> None:
    saved = json.loads((scalar_run / "metrics.json").read_text())
    temperature, calibrated = saved["temperature"], saved["final_calibrated"]
    assert isinstance(temperature, float) and 0.01 <= temperature <= 100 and "temperature_note" not in saved
    assert set(calibrated) == set(saved["final"]) and 0.0 <= calibrated["pixel_ece_15"] <= 1.0
    assert calibrated["miou"] == saved["final"]["miou"] and calibrated["pixel_nll"] != saved["final"]["pixel_nll"]
    assert saved["temperature_pixels"] == saved["best"]["val"]["n_pixels"]  # 6 scenes: under the 2^20 cap
    assert saved["best"]["temperature"] == temperature and saved["final_calibrated_bins"]["15"]["count"]
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(scalar_run / name)["temperature"] == temperature
    for name in ("reliability_final.png", "reliability_final_calibrated.png"):
        assert (scalar_run / name).is_file()

    loaded = load_run_model(checkpoint_path(scalar_run))
    task = loaded.task(loaded.cfg, loaded.precision)
    val = task.data.val
    images, masks = zip(*(val.load(i) for i in range(len(val))))
    with torch.no_grad():
        logits = task._logits(loaded.model, torch.stack(images)).float()
    valid = torch.stack(masks) != IGNORE
    z, y = logits.movedim(1, -1)[valid].double().numpy(), torch.stack(masks)[valid].long().numpy()
    ref = minimize_scalar(lambda t: _nll(z, y, t), bounds=(1e-2, 1e2), method="bounded", options={"xatol": 1e-10})
    assert math.isclose(temperature, ref.x, rel_tol=1e-4)  # validation's pixels, ignored ones left out


def _confidence(run: Path, image: Path, out: Path, *flags: str) -> np.ndarray:
    assert main(["predict", str(run), str(image), "--out", str(out), "--confidence-maps", *flags]) == 0
    return np.array(Image.open(out / f"{image.stem}_confidence.png")).astype(int)


def test_predict_applies_per_class_temperatures_and_raw_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    Trainer(
        load_config("digitscenes-supervised", [*TINY, "eval.pixel_temperature=per_class"]), run, progress=False
    ).fit()
    saved = json.loads((run / "metrics.json").read_text())
    temperatures = load_checkpoint(run / "best.pt")["temperature"]
    assert temperatures == saved["temperature"] and len(temperatures) == 11 and saved["final_calibrated"]

    loaded = load_run_model(checkpoint_path(run))
    task = loaded.task(loaded.cfg, loaded.precision)
    image = task.data.val.load(0)[0]
    path = tmp_path / "scene.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    scaled, raw = _confidence(run, path, tmp_path / "scaled"), _confidence(run, path, tmp_path / "raw", "--raw")
    assert "per class" in capsys.readouterr().out
    with torch.no_grad():  # the run's forward, then the temperature and softmax by hand
        x = task.views.plain(image[None].to(loaded.precision.device))
        logits = segment(loaded.model, x, loaded.precision, None)[0].float().cpu()
    t = torch.tensor(temperatures)[:, None, None]
    for got, probs in ((scaled, (logits / t).softmax(dim=0)), (raw, logits.softmax(dim=0))):
        expected = (probs.max(dim=0).values * 255).round().numpy()
        assert np.abs(got - expected).max() <= 1
    assert np.abs(scaled - raw).max() > 10


def test_without_validation_the_missing_temperature_is_explained(tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(load_config("digitscenes-supervised", [*TINY, "data.val_images=0"]), run, progress=False).fit()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["temperature"] is None and saved["final_calibrated"] is None
    assert "cannot be fitted" in saved["temperature_note"] and "data.val_images=0" in saved["temperature_note"]
    assert "temperature" not in load_checkpoint(run / "last.pt")


def test_off_fits_nothing_and_classification_refuses_the_key() -> None:
    cfg = load_config("digitscenes-supervised", [*TINY, "eval.pixel_temperature=off"])
    task = SegmentationTask(cfg, Precision(torch.device("cpu"), amp=False, channels_last=False))
    metrics, temperature = task.validate(task.build_model().eval())
    assert temperature is None and "temperature_pixels" not in metrics and not task.fits_temperature
    with pytest.raises(UserError, match="eval.pixel_temperature.*scalar for classification"):
        load_config("digits-fixmatch", ["eval.pixel_temperature=per_class"])
    with pytest.raises(UserError, match="scalar \\| per_class \\| off, got 'scaler'"):
        load_config("digitscenes-unimatch", ["eval.pixel_temperature=scaler"])

"""USB's usb_cv presets end to end on tiny files in each dataset's published format (CIFAR-100's pickles,
STL-10's binaries, EuroSAT's JPEG class folders, MedMNIST's tissuemnist.npz, Semi-Aves as class folders), with
the network swapped for timm's test ViT at 32 px and 2 steps; and what the presets hold (USB's numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_data_torchvision import _py2_pickle, _write_stl_images
from trustmatch.cli import main
from trustmatch.config import DataConfig, load_config
from trustmatch.config.presets import PRESETS
from trustmatch.core.errors import UserError
from trustmatch.data.usb_sets import load_eurosat, load_tissuemnist
from trustmatch.models import build_model
from trustmatch.run.checkpoint import load_checkpoint

RNG = np.random.default_rng(0)
TINY = [
    "model.name=timm:test_vit",  # 6 blocks, 64 wide: the preset's AdamW, layer decay and warm-up run on it
    "model.weights=none",
    "data.image_size=32",
    "train.steps=2",
    "train.eval_every=2",
    "train.log_every=1",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRUSTMATCH_CACHE", str(tmp_path / "cache"))


def _images(n: int, channels: int, size: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_cifar100(root: Path, per_class: int = 3) -> Path:
    base = root / "cifar-100-python"
    for split, n in (("train", 100 * per_class), ("test", 20)):
        fine = np.arange(n) % 100
        _py2_pickle(
            base / split,
            {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split, "fine_labels": fine.tolist(),
             "coarse_labels": (fine // 5).tolist(), "data": _images(n, 3, 32).reshape(n, 3072)},
        )  # fmt: skip
    names = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    _py2_pickle(base / "meta", names)
    return root


def write_stl10(root: Path, per_class: int = 5) -> Path:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    n_train = 10 * per_class
    for split, n in (("train", n_train), ("test", 10), ("unlabeled", 6)):
        _write_stl_images(base / f"{split}_X.bin", _images(n, 3, 96))
    (base / "train_y.bin").write_bytes((np.arange(n_train) % 10 + 1).astype(np.uint8).tobytes())
    (base / "test_y.bin").write_bytes((np.arange(10) + 1).astype(np.uint8).tobytes())
    (base / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(10)) + "\n")
    return root


def write_eurosat(root: Path, per_class: int = 5) -> Path:
    """torchvision's EuroSAT layout: eurosat/2750/<class>/<class>_<i>.jpg, 64 px RGB."""
    for c in range(10):
        folder = root / "eurosat" / "2750" / f"Class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_images(1, 3, 64)[0].transpose(1, 2, 0)).save(folder / f"Class{c}_{i + 1}.jpg")
    return root


def write_tissuemnist(root: Path, per_class: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    n = 8 * per_class
    arrays = {
        "train_images": _images(n, 1, 28)[:, 0],
        "train_labels": (np.arange(n) % 8).reshape(-1, 1),
        "val_images": _images(8, 1, 28)[:, 0],
        "val_labels": np.arange(8).reshape(-1, 1),
        "test_images": _images(16, 1, 28)[:, 0],
        "test_labels": (np.arange(16) % 8).reshape(-1, 1),
    }
    np.savez_compressed(root / "tissuemnist.npz", **arrays)
    return root


def write_aves(root: Path) -> list[str]:
    """Semi-Aves as class folders: 3 species, 2 labeled images each, 4 unlabeled, 1 test each."""
    for split, count in (("l_train_val", 2), ("test", 1)):
        for c in range(3):
            for i in range(count):
                path = root / split / f"{c:03d}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_images(1, 3, 40)[0].transpose(1, 2, 0)).save(path)
    (root / "u_train_in").mkdir()
    for i in range(4):
        Image.fromarray(_images(1, 3, 40)[0].transpose(1, 2, 0)).save(root / "u_train_in" / f"{i}.jpg")
    return [f"data.root={root / 'l_train_val'}", f"data.unlabeled_dir={root / 'u_train_in'}",
            f"data.test_dir={root / 'test'}"]  # fmt: skip


CASES = {
    "usb-cifar100-fixmatch-200": lambda root: [f"data.root={write_cifar100(root)}"],
    "usb-stl10-softmatch-40": lambda root: [f"data.root={write_stl10(root)}"],
    "usb-eurosat-flexmatch-20": lambda root: [f"data.root={write_eurosat(root)}"],
    "usb-tissuemnist-freematch-80": lambda root: [f"data.root={write_tissuemnist(root)}"],
    "usb-semi_aves-fixmatch-3959": write_aves,
}


@pytest.mark.parametrize("preset", sorted(CASES))
def test_usb_preset_runs_end_to_end(tmp_path: Path, preset: str) -> None:
    data = CASES[preset](tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", preset, "--out", str(out), *TINY, *data]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["final"]["accuracy"] <= 1.0
    saved = (out / "config.yaml").read_text()
    assert "optimizer: adamw" in saved and "interpolation: bicubic" in saved  # test_vit's pretrained config


def test_linear_probe_run_moves_only_the_head(tmp_path: Path) -> None:
    """train.freeze through the trainer: the saved body equals the initial one (built as the trainer builds
    it, from the seed), the head does not."""
    data = write_eurosat(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "usb-eurosat-supervised-20", "--out", str(out), *TINY, f"data.root={data}",
                 "train.freeze=true"]) == 0  # fmt: skip
    trained = load_checkpoint(out / "last.pt")["parts"]["model"]
    torch.manual_seed(0)
    initial = build_model("timm:test_vit", 10, 3, image_size=32).state_dict()
    assert all(torch.equal(trained[k], v) for k, v in initial.items() if k.startswith("body."))
    assert not torch.equal(trained["head.weight"], initial["head.weight"])
    csv = tmp_path / "predictions.csv"  # predict rebuilds the ViT at the run's side, bicubic as it trained
    assert main(["predict", str(out), str(data / "eurosat" / "2750" / "Class0"), "--out", str(csv)]) == 0
    assert len(csv.read_text().splitlines()) == 1 + 5


def test_presets_hold_usbs_settings() -> None:
    cfg = load_config("usb-cifar100-fixmatch-200")
    assert (cfg.model.name, cfg.model.weights, cfg.data.labels_per_class) == ("vit_small_patch2_32", "imagenet", 2)
    t = cfg.train
    assert (t.optimizer, t.lr, t.layer_decay, t.weight_decay, t.batch_size, t.uratio) == (
        "adamw",
        5e-4,
        0.5,
        5e-4,
        8,
        1,
    )
    assert (t.steps, round(t.warmup * t.steps), t.ema, t.eval_every) == (204_800, 5_120, 0.0, 2_048)
    tissue = load_config("usb-tissuemnist-uda-400")
    assert (tissue.model.name, tissue.train.lr, tissue.train.layer_decay) == ("vit_tiny_patch2_32", 5e-5, 0.95)
    assert tissue.data.crop_ratio == 0.95 and tissue.data.labels_per_class == 50
    assert load_config("usb-stl10-fixmatch-100").train.layer_decay == 0.65
    assert load_config("usb-eurosat-fixmatch-40").train.lr == 5e-5
    assert load_config("usb-semi_aves-softmatch-3959").data.labels_per_class == 0
    assert load_config("usb-cifar100-flexmatch-400").train.warmup == 0.0  # USB's FlexMatch files: no warm-up
    assert load_config("usb-stl10-flexmatch-40").train.warmup == 0.025  # ... except STL-10's
    assert {name.split("-")[1] for name in PRESETS if name.startswith("usb-")} == {
        "cifar100", "stl10", "eurosat", "tissuemnist", "semi_aves"
    }  # fmt: skip


def test_eurosat_split_is_usbs_per_class_80_20(tmp_path: Path) -> None:
    write_eurosat(tmp_path, per_class=5)
    source = load_eurosat(DataConfig(root=str(tmp_path), image_size=16))
    assert len(source.train) == 40 and len(source.test) == 10  # int(0.8 * 5) = 4 per class in the pool
    assert source.classes == [f"Class{c}" for c in range(10)] and source.mean == (0.5, 0.5, 0.5)
    assert torch.bincount(source.test.labels).tolist() == [1] * 10


def test_tissuemnist_reads_the_published_arrays(tmp_path: Path) -> None:
    write_tissuemnist(tmp_path)
    with np.load(tmp_path / "tissuemnist.npz") as npz:
        first, labels = npz["train_images"][0], npz["train_labels"].reshape(-1)
    source = load_tissuemnist(DataConfig(root=str(tmp_path)))
    assert source.train.images.shape == (96, 3, 28, 28) and len(source.test) == 16
    assert all(np.array_equal(source.train.images[0, c].numpy(), first) for c in range(3))
    assert source.train.labels.tolist() == labels.tolist() and len(source.classes) == 8


def test_usb_dataset_files_missing_or_wrong(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="tissuemnist: .*tissuemnist.npz not found; pass data.root="):
        load_tissuemnist(DataConfig(root=str(tmp_path)))
    (tmp_path / "tissuemnist.npz").write_bytes(b"not a zip archive")
    with pytest.raises(UserError, match="tissuemnist: cannot read .*replace it with an intact copy"):
        load_tissuemnist(DataConfig(root=str(tmp_path)))
    np.savez(tmp_path / "tissuemnist.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(UserError, match="has no 'train_images' array: is it MedMNIST's tissuemnist.npz"):
        load_tissuemnist(DataConfig(root=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="eurosat: no class folders in"):
        load_eurosat(DataConfig(root=str(tmp_path / "empty")))


def test_decoding_follows_data_interpolation(tmp_path: Path) -> None:
    """A timm ViT's bicubic reaches the decoder: PIL's bicubic resize, not the default bilinear."""
    from trustmatch.data.folders import decode_image

    pixels = _images(1, 3, 40)[0].transpose(1, 2, 0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = np.asarray(Image.fromarray(pixels).resize((24, 24), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.array_equal(decode_image(tmp_path / "a.png", 24, "RGB", "bicubic"), expected)
    assert not np.array_equal(decode_image(tmp_path / "a.png", 24, "RGB"), expected)

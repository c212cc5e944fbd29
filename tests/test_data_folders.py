"""The ``folder`` loader: class subfolders, unlabeled and test folders, and its one-line errors."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data.folders import load_folder
from trustmatch.data.image_sets import DATASETS

RED, BLUE, GRAY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def _save(path: Path, color: tuple[int, int, int] = RED, size: tuple[int, int] = (20, 20), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    (image.convert("L") if mode == "L" else image).save(path)
    return path


def _labeled(root: Path) -> Path:
    _save(root / "cat" / "a.png", RED)
    _save(root / "cat" / "nested" / "b.jpg", RED, size=(64, 48))
    _save(root / "dog" / "c.png", BLUE, size=(40, 20))
    (root / "dog" / "notes.txt").write_text("not an image: ignored")
    _save(root / "dog" / ".hidden.png", GRAY)  # hidden: skipped
    _save(root / ".ipynb_checkpoints" / "x.png", GRAY)  # hidden folder: not a class
    return root


def test_class_layout_labels_paths_and_stats(tmp_path: Path) -> None:
    root = _labeled(tmp_path / "train")
    src = DATASETS.get("folder")(DataConfig(name="folder", root=str(root)))
    assert src.classes == ["cat", "dog"]
    assert src.train.labels.tolist() == [0, 0, 1] and src.train.labels.dtype == torch.int64
    assert src.train.paths == [
        str(root / "cat" / "a.png"),
        str(root / "cat" / "nested" / "b.jpg"),
        str(root / "dog" / "c.png"),
    ]
    assert src.train.images.shape == (3, 3, 32, 32) and src.train.images.dtype == torch.uint8
    assert src.train.images[0, :, 5, 7].tolist() == list(RED) and src.train.images[2, :, 0, 0].tolist() == list(BLUE)
    assert src.test is None and src.extra_unlabeled is None and src.hflip
    assert src.mean[1] == pytest.approx(0.0, abs=0.01) and src.mean[2] == pytest.approx(1 / 3, abs=0.01)
    assert src.std[0] == pytest.approx((2 / 9) ** 0.5, abs=0.01) and src.std[1] == pytest.approx(1 / 255)


def test_image_size_and_grayscale_to_rgb(tmp_path: Path) -> None:
    _save(tmp_path / "a" / "gray.png", GRAY, size=(50, 30), mode="L")
    src = load_folder(DataConfig(root=str(tmp_path), image_size=16))
    assert src.train.images.shape == (1, 3, 16, 16) and src.image_size == 16
    assert src.train.images[0, :, 8, 8].tolist() == [128, 128, 128]


def test_unlabeled_folder_is_recursive(tmp_path: Path) -> None:
    root = _labeled(tmp_path / "train")
    unlabeled = tmp_path / "unlabeled"
    _save(unlabeled / "u1.png")
    _save(unlabeled / "deeper" / "u2.jpeg", BLUE)
    (unlabeled / "readme.md").write_text("ignored")
    src = load_folder(DataConfig(root=str(root), unlabeled_dir=str(unlabeled)))
    assert src.extra_unlabeled.labels.tolist() == [-1, -1]
    assert src.extra_unlabeled.paths == [str(unlabeled / "u1.png"), str(unlabeled / "deeper" / "u2.jpeg")]
    assert src.extra_unlabeled.images.shape == (2, 3, 32, 32)


def test_test_folder_uses_training_classes(tmp_path: Path) -> None:
    root = _labeled(tmp_path / "train")
    test = tmp_path / "test"
    _save(test / "dog" / "t1.png", BLUE)
    _save(test / "cat" / "t2.png", RED)
    src = load_folder(DataConfig(root=str(root), test_dir=str(test)))
    assert src.test.labels.tolist() == [0, 1] and src.test.paths[0].endswith("t2.png")


def test_mismatched_test_classes_are_named(tmp_path: Path) -> None:
    root = _labeled(tmp_path / "train")
    _save(tmp_path / "test" / "cat" / "t.png")
    _save(tmp_path / "test" / "bird" / "t.png")
    with pytest.raises(UserError, match="not in data.root: bird; missing from it: dog"):
        load_folder(DataConfig(root=str(root), test_dir=str(tmp_path / "test")))


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = _labeled(tmp_path / "train")
    (root / "emu").mkdir()
    (root / "emu" / "list.csv").write_text("no images here")
    with pytest.raises(UserError, match=f"class folder {root / 'emu'} holds no images.*add images or remove"):
        load_folder(DataConfig(root=str(root)))


@pytest.mark.parametrize("name", ["garbage.png", "truncated.jpg"])
def test_undecodable_image_is_named(tmp_path: Path, name: str) -> None:
    root = _labeled(tmp_path / "train")
    bad = root / "cat" / name
    if name == "garbage.png":
        bad.write_bytes(b"this is not a png")
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), RED).save(buffer, "JPEG")
        bad.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(UserError, match=f"cannot decode image {bad} .*remove or replace it"):
        load_folder(DataConfig(root=str(root)))


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"")
    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "x.png")
    root = _labeled(tmp_path / "train")
    (tmp_path / "no_images").mkdir()
    cases = [
        (DataConfig(root=None), "needs data.root"),
        (DataConfig(root=str(tmp_path / "missing")), f"data.root={tmp_path / 'missing'}: no such folder"),
        (DataConfig(root=str(tmp_path / "file.png")), "is a file, not a folder"),
        (DataConfig(root=str(tmp_path / "flat")), f"no class folders in {tmp_path / 'flat'}"),
        (DataConfig(root=str(root), unlabeled_dir=str(tmp_path / "gone")), f"data.unlabeled_dir={tmp_path / 'gone'}"),
        (DataConfig(root=str(root), unlabeled_dir=str(tmp_path / "no_images")), "holds no images"),
        (DataConfig(root=str(root), test_dir=str(tmp_path / "gone")), f"data.test_dir={tmp_path / 'gone'}"),
    ]
    for cfg, expected in cases:
        with pytest.raises(UserError, match=expected.replace(".", r"\.")) as info:
            load_folder(cfg)
        assert "\n" not in str(info.value)

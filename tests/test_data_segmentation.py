"""Segmentation data: digitscenes, the standard datasets in their real on-disk layouts with UniMatch
split files, the user's folders, and the one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data import digitscenes, segfiles  # noqa: F401  (register the loaders)
from trustmatch.data.seg_sets import (
    CITYSCAPES_PALETTE,
    IGNORE,
    IMAGENET_MEAN,
    SEGMENTATION_DATASETS,
    FileSegSet,
    TensorSegSet,
    load_segmentation_data,
    voc_palette,
)

# ---------------------------------------------------------------- digitscenes


def _scenes(seed: int = 0, **kw) -> object:
    cfg = DataConfig(name="digitscenes", image_size=32, scenes=60, labeled_images=5, val_images=10, **kw)
    return load_segmentation_data(cfg, seed)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor | None]:
    pairs = [dataset.load(i) for i in range(len(dataset))]
    masks = [m for _, m in pairs]
    return torch.stack([x for x, _ in pairs]), torch.stack(masks) if masks[0] is not None else None


@pytest.mark.all_test_scenes
def test_digitscenes_splits_ranges_and_stats() -> None:
    data = _scenes()
    assert (len(data.labeled), len(data.unlabeled), len(data.val), len(data.test)) == (5, 55, 10, 300)
    assert data.summary() == "5 labeled, 55 unlabeled, 10 val, 300 test images, 11 classes"
    assert data.classes == ["background", *"0123456789"] and data.palette == voc_palette(11)
    assert data.labeled.has_masks and data.val.has_masks and data.test.has_masks and not data.unlabeled.has_masks
    assert data.labeled.fixed_size == (32, 32) and data.unlabeled.load(0)[1] is None
    names = {data.labeled.name(i) for i in range(5)} | {data.unlabeled.name(i) for i in range(55)}
    assert names == {f"scene_{i:05d}" for i in range(60)}  # a partition of the pool
    for split in (data.labeled, data.val, data.test):
        images, masks = _stack(split)
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and masks.dtype == torch.uint8
        values = set(masks.unique().tolist())
        assert values <= set(range(11)) | {IGNORE} and {0, IGNORE} <= values
        assert 0.02 < (masks == IGNORE).float().mean() < 0.3  # the blurred rims (~0.2 at 32 px, ~0.14 at 64)
        assert 0.03 < ((masks > 0) & (masks < IGNORE)).float().mean() < 0.4
    images = _stack(data.labeled)[0].double() / 255
    assert data.mean == pytest.approx(images.mean((0, 2, 3)).tolist())
    assert data.std == pytest.approx(images.std((0, 2, 3)).tolist())


def test_digitscenes_rim_surrounds_the_digits() -> None:
    masks = _stack(_scenes().val)[1]
    digit = (masks > 0) & (masks < IGNORE)
    # every background pixel that touches a digit pixel (4-neighbourhood) must not exist: a rim lies between
    background = masks == 0
    touching = torch.zeros_like(digit)
    touching[:, 1:] |= digit[:, :-1]
    touching[:, :-1] |= digit[:, 1:]
    touching[:, :, 1:] |= digit[:, :, :-1]
    touching[:, :, :-1] |= digit[:, :, 1:]
    assert not (background & touching).any()


def test_digitscenes_deterministic_per_seed_and_all_classes_present() -> None:
    a, b, c = _scenes(0), _scenes(0), _scenes(1)
    for split in ("labeled", "val"):
        assert torch.equal(_stack(getattr(a, split))[0], _stack(getattr(b, split))[0])
        assert torch.equal(_stack(getattr(a, split))[1], _stack(getattr(b, split))[1])
        assert not torch.equal(_stack(getattr(a, split))[0], _stack(getattr(c, split))[0])
    assert [a.labeled.name(i) for i in range(5)] != [c.labeled.name(i) for i in range(5)]
    # the fixed test scenes do not depend on the run's seed
    assert torch.equal(_stack(a.test)[0], _stack(c.test)[0]) and torch.equal(_stack(a.test)[1], _stack(c.test)[1])
    pool = torch.cat([_stack(a.labeled)[1], _stack(a.val)[1]])
    for split in (a.unlabeled, a.test):
        present = set(_stack(split)[0].flatten().unique().tolist())
        assert len(present) > 200  # real colour variety, not a handful of flat colours
    assert set(_stack(a.test)[1].unique().tolist()) == set(range(11)) | {IGNORE}
    assert set(pool.unique().tolist()) >= {0, IGNORE}


def test_digitscenes_train_and_test_digits_come_from_disjoint_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    glyphs, digits = digitscenes._digits()
    tagged = digits.clone()
    tagged[: digitscenes.TRAIN_DIGITS] = 3  # every training-pool digit relabelled 3, every test-pool digit 7
    tagged[digitscenes.TRAIN_DIGITS :] = 7
    monkeypatch.setattr(digitscenes, "_digits", lambda: (glyphs, tagged))
    data = _scenes()
    for split in (data.labeled, data.val):
        assert set(_stack(split)[1].unique().tolist()) == {0, 4, IGNORE}
    assert set(_stack(data.test)[1].unique().tolist()) == {0, 8, IGNORE}
    assert digitscenes.TRAIN_DIGITS < len(digits) == 1797


def test_digitscenes_default_size_and_class_coverage_of_the_pool() -> None:
    data = load_segmentation_data(DataConfig(name="digitscenes", scenes=200, labeled_images=150, val_images=0), 3)
    assert data.val is None and data.labeled.fixed_size == (64, 64)
    assert set(_stack(data.labeled)[1].unique().tolist()) == set(range(11)) | {IGNORE}


def test_voc_palette_matches_the_published_colours() -> None:
    palette = voc_palette(256)
    assert palette[:5] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert palette[15] == (192, 128, 128) and palette[20] == (0, 64, 128) and palette[255] == (224, 224, 192)
    assert len(CITYSCAPES_PALETTE) == 19 and CITYSCAPES_PALETTE[0] == (128, 64, 128)


# ---------------------------------------------------------------- fixture trees in the real layouts


def _image(path: Path, size: tuple[int, int] = (12, 10), colour: tuple[int, int, int] = (200, 30, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _ids(size: tuple[int, int], values: list[int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(values, dtype=np.uint8), size=(size[1], size[0]))


def _mask(path: Path, ids: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(ids, mode="L")
    if palette:  # VOC SegmentationClass: a palette PNG whose indices are the ids
        image = Image.fromarray(ids, mode="P")
        image.putpalette([c for rgb in voc_palette(256) for c in rgb])
    image.save(path)
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _pascal(root: Path) -> dict[str, np.ndarray]:
    masks = {}
    for i, stem in enumerate(["2007_000032", "2007_000039", "2007_000063", "2008_000001"]):
        _image(root / "JPEGImages" / f"{stem}.jpg", size=(12 + i, 10))
        masks[stem] = _ids((12 + i, 10), [0, 1, 15, 20, 255], seed=i)
    _mask(root / "SegmentationClass" / "2007_000032.png", masks["2007_000032"], palette=True)
    _mask(root / "SegmentationClassAug" / "2007_000039.png", masks["2007_000039"])  # SBD-augmented, gray ids
    _mask(root / "SegmentationClass" / "2007_000063.png", masks["2007_000063"], palette=True)
    _lines(
        root / "splits" / "92" / "labeled.txt",
        [
            "JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png",
            "JPEGImages/2007_000039.jpg SegmentationClassAug/2007_000039.png",
        ],
    )
    # unlabeled: an image alone, and a line whose mask does not exist (never read)
    _lines(
        root / "splits" / "92" / "unlabeled.txt",
        ["JPEGImages/2008_000001.jpg", "JPEGImages/2007_000063.jpg SegmentationClassAug/2007_000063.png", ""],
    )
    _lines(root / "splits" / "val.txt", ["JPEGImages/2007_000063.jpg SegmentationClass/2007_000063.png"])
    return masks


def test_pascal_end_to_end(tmp_path: Path) -> None:
    masks = _pascal(tmp_path)
    data = load_segmentation_data(DataConfig(name="pascal", root=str(tmp_path), split="92"), 0)
    assert data.summary() == "2 labeled, 2 unlabeled, 0 val, 1 test images, 21 classes"
    assert data.val is None and data.classes[15] == "person" and data.mean == IMAGENET_MEAN
    assert data.palette == voc_palette(21) and data.labeled.fixed_size is None
    image, mask = data.labeled.load(0)
    assert data.labeled.name(0) == "2007_000032" and image.shape == (3, 10, 12) and image.dtype == torch.uint8
    reference = np.asarray(Image.open(tmp_path / "JPEGImages" / "2007_000032.jpg").convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(image.numpy(), reference)
    assert np.array_equal(mask.numpy(), masks["2007_000032"]) and mask.dtype == torch.uint8
    assert np.array_equal(data.labeled.load(1)[1].numpy(), masks["2007_000039"])
    assert not data.unlabeled.has_masks and data.unlabeled.load(1)[1] is None
    assert data.unlabeled.load(1)[0].shape == (3, 10, 14)
    assert np.array_equal(data.test.load(0)[1].numpy(), masks["2007_000063"])


def test_split_dir_overrides_the_default_location(tmp_path: Path) -> None:
    _pascal(tmp_path / "voc")
    (tmp_path / "voc" / "splits").rename(tmp_path / "unimatch_splits")
    cfg = DataConfig(name="pascal", root=str(tmp_path / "voc"), split_dir=str(tmp_path / "unimatch_splits" / "92"))
    assert len(load_segmentation_data(cfg, 0).test) == 1


def _cityscapes(root: Path, raw_val: bool) -> np.ndarray:
    city = "jena_000001_000019"
    _image(root / "leftImg8bit" / "train" / "jena" / f"{city}_leftImg8bit.png", size=(16, 8))
    train_ids = _ids((16, 8), [0, 5, 13, 18, 255])
    _mask(root / "gtFine" / "train" / "jena" / f"{city}_gtFine_labelTrainIds.png", train_ids)
    _image(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png", size=(16, 8))
    raw = np.array([[0, 7, 8, 26, 33, 1, 3, 24]] * 8, dtype=np.uint8).repeat(2, axis=1)
    suffix = "labelIds" if raw_val else "labelTrainIds"
    _mask(root / "gtFine" / "val" / "lindau" / f"lindau_000000_000019_gtFine_{suffix}.png", raw)
    lines = [f"leftImg8bit/train/jena/{city}_leftImg8bit.png gtFine/train/jena/{city}_gtFine_labelTrainIds.png"]
    _lines(root / "splits" / "1_16" / "labeled.txt", lines)
    _lines(
        root / "splits" / "val.txt",
        [
            "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png "
            f"gtFine/val/lindau/lindau_000000_000019_gtFine_{suffix}.png"
        ],
    )
    return train_ids


def test_cityscapes_train_ids_and_raw_label_ids(tmp_path: Path) -> None:
    train_ids = _cityscapes(tmp_path, raw_val=True)
    data = load_segmentation_data(DataConfig(name="cityscapes", root=str(tmp_path), split="1_16"), 0)
    assert len(data.classes) == 19 and data.classes[13] == "car" and data.palette == CITYSCAPES_PALETTE
    assert data.unlabeled is None and data.val is None
    assert np.array_equal(data.labeled.load(0)[1].numpy(), train_ids)
    assert data.labeled.name(0) == "jena_000001_000019_leftImg8bit"
    # labelIds 0 (unlabeled), 7 road, 8 sidewalk, 26 car, 33 bicycle, 1 ego vehicle, 3 out of roi, 24 person
    expected = np.array([[255, 0, 1, 13, 18, 255, 255, 11]] * 8, dtype=np.uint8).repeat(2, axis=1)
    assert np.array_equal(data.test.load(0)[1].numpy(), expected)


def test_cityscapes_unmapped_label_ids_in_a_train_id_file_are_named(tmp_path: Path) -> None:
    _cityscapes(tmp_path, raw_val=False)  # raw ids (up to 33) saved under the labelTrainIds name
    data = load_segmentation_data(DataConfig(name="cityscapes", root=str(tmp_path), split="1_16"), 0)
    with pytest.raises(UserError, match=r"lindau_000000_000019_gtFine_labelTrainIds\.png holds class id 24"):
        data.test.load(0)


def test_coco_as_unimatch(tmp_path: Path) -> None:
    ids = _ids((9, 7), [0, 1, 80, 255])
    _image(tmp_path / "train2017" / "000000283213.jpg", size=(9, 7))
    _mask(tmp_path / "masks" / "000000283213.png", ids)
    _image(tmp_path / "train2017" / "000000398713.jpg", size=(9, 7))
    _image(tmp_path / "val2017" / "000000000139.jpg", size=(9, 7))
    _mask(tmp_path / "masks" / "000000000139.png", ids)
    _lines(tmp_path / "splits" / "1_512" / "labeled.txt", ["train2017/000000283213.jpg masks/000000283213.png"])
    _lines(tmp_path / "splits" / "1_512" / "unlabeled.txt", ["train2017/000000398713.jpg masks/000000398713.png"])
    _lines(tmp_path / "splits" / "val.txt", ["val2017/000000000139.jpg masks/000000000139.png"])
    data = load_segmentation_data(DataConfig(name="coco", root=str(tmp_path), split="1_512"), 0)
    assert len(data.classes) == 81 and data.classes[:2] == ["background", "person"]
    assert data.classes[80] == "toothbrush" and len(data.palette) == 81
    assert np.array_equal(data.labeled.load(0)[1].numpy(), ids) and len(data.unlabeled) == 1
    assert np.array_equal(data.test.load(0)[1].numpy(), ids)


# ---------------------------------------------------------------- standard datasets: bad input


def _pascal_cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(name="pascal", root=str(root), split="92", **kw)


def test_missing_root_split_and_val_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.root=.*nope: no such folder"):
        load_segmentation_data(_pascal_cfg(tmp_path / "nope"), 0)
    with pytest.raises(UserError, match="needs data.split"):
        load_segmentation_data(DataConfig(name="pascal", root=str(tmp_path)), 0)
    _pascal(tmp_path)
    with pytest.raises(UserError, match=r"no split file .*splits/183/labeled\.txt"):
        load_segmentation_data(DataConfig(name="pascal", root=str(tmp_path), split="183"), 0)
    (tmp_path / "splits" / "val.txt").unlink()
    with pytest.raises(UserError, match=r"no evaluation list .*splits/val\.txt"):
        load_segmentation_data(_pascal_cfg(tmp_path), 0)


def test_split_line_naming_a_missing_file(tmp_path: Path) -> None:
    _pascal(tmp_path)
    labeled = tmp_path / "splits" / "92" / "labeled.txt"
    labeled.write_text(labeled.read_text() + "JPEGImages/2007_000063.jpg SegmentationClass/2009_999999.png\n")
    with pytest.raises(UserError, match=rf"{labeled} line 3 names .*SegmentationClass/2009_999999\.png"):
        load_segmentation_data(_pascal_cfg(tmp_path), 0)
    _lines(labeled, ["JPEGImages/2007_000032.jpg"])  # a labeled line without its mask
    with pytest.raises(UserError, match=rf"{labeled} line 1: expected 'image_path mask_path'"):
        load_segmentation_data(_pascal_cfg(tmp_path), 0)
    _lines(labeled, ["JPEGImages/2007_000032.jpg SegmentationClass/2007_000032.png"])
    unlabeled = tmp_path / "splits" / "92" / "unlabeled.txt"
    _lines(unlabeled, ["JPEGImages/2007_000032.jpg", "JPEGImages/missing.jpg"])
    with pytest.raises(UserError, match=rf"{unlabeled} line 2 names .*JPEGImages/missing\.jpg"):
        load_segmentation_data(_pascal_cfg(tmp_path), 0)


def test_bad_masks_are_named_when_loaded(tmp_path: Path) -> None:
    _pascal(tmp_path)
    data = load_segmentation_data(_pascal_cfg(tmp_path), 0)
    path = tmp_path / "SegmentationClass" / "2007_000032.png"
    _mask(path, np.full((10, 11), 1, dtype=np.uint8))
    with pytest.raises(UserError, match=rf"mask {path} is 11x10 but the image .*2007_000032\.jpg is 12x10"):
        data.labeled.load(0)
    _mask(path, np.full((10, 12), 21, dtype=np.uint8), palette=True)
    with pytest.raises(UserError, match=rf"mask {path} holds class id 21 but pascal .* has 21 classes"):
        data.labeled.load(0)
    Image.new("RGB", (12, 10), (128, 0, 0)).save(path)
    with pytest.raises(UserError, match=rf"mask {path} is a RGB colour image"):
        data.labeled.load(0)
    image = tmp_path / "JPEGImages" / "2007_000032.jpg"
    image.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=rf"cannot decode image {image}"):
        data.labeled.load(0)


def test_file_set_converts_gray_and_16_bit_images(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (5, 4), 77).save(gray)
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(deep)
    ids = tmp_path / "ids16.png"
    Image.fromarray(np.full((4, 5), 2, dtype=np.uint16)).save(ids)
    dataset = FileSegSet([(gray, ids), (deep, ids)], num_classes=3)
    image, mask = dataset.load(0)
    assert image.shape == (3, 4, 5) and image.unique().tolist() == [77] and mask.unique().tolist() == [2]
    assert dataset.load(1)[0].unique().tolist() == [255]


def test_tensor_set_checks_shapes() -> None:
    images = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="masks must be uint8"):
        TensorSegSet(images, torch.zeros(2, 5, 4, dtype=torch.uint8), ["a", "b"])
    assert TensorSegSet(images, None, ["a", "b"]).fixed_size == (4, 5)


# ---------------------------------------------------------------- the user's folders


def _user_folder(root: Path) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    masks = {}
    for stem, size in (("a", (12, 10)), ("nested/b", (8, 6))):
        _image(root / "images" / f"{stem}.jpg", size=size)
        masks[stem] = _ids(size, [0, 1, 2, 255])
        _mask(root / "masks" / f"{stem}.png", masks[stem])
    _image(root / "images" / ".hidden.jpg")  # hidden: skipped
    return masks


def test_user_folder_end_to_end(tmp_path: Path) -> None:
    masks = _user_folder(tmp_path / "data")
    _image(tmp_path / "unl" / "x" / "u1.png")
    _image(tmp_path / "unl" / ".ipynb_checkpoints" / "u2.png")
    (tmp_path / "unl" / "notes.txt").write_text("not an image")
    _user_folder(tmp_path / "val")
    _user_folder(tmp_path / "test")
    cfg = DataConfig(
        name="folder",
        root=str(tmp_path / "data"),
        unlabeled_dir=str(tmp_path / "unl"),
        val_dir=str(tmp_path / "val"),
        test_dir=str(tmp_path / "test"),
    )
    data = SEGMENTATION_DATASETS.get("folder")(cfg, 0)
    assert data.classes == ["background", "cat", "dog"] and data.palette == voc_palette(3)
    assert data.summary() == "2 labeled, 1 unlabeled, 2 val, 2 test images, 3 classes"
    assert [data.labeled.name(i) for i in range(2)] == ["a", "b"]
    assert np.array_equal(data.labeled.load(1)[1].numpy(), masks["nested/b"])
    assert data.labeled.load(1)[0].shape == (3, 6, 8) and data.unlabeled.load(0)[1] is None
    assert data.mean == IMAGENET_MEAN
    only = SEGMENTATION_DATASETS.get("folder")(DataConfig(name="folder", root=str(tmp_path / "data")), 0)
    assert only.unlabeled is None and only.val is None and only.test is None


def test_user_folder_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _user_folder(root)
    load = SEGMENTATION_DATASETS.get("folder")
    cfg = DataConfig(name="folder", root=str(root))

    _image(root / "images" / "c.png")
    with pytest.raises(UserError, match=r"image .*images/c\.png has no mask: add .*masks/c\.png or move the image"):
        load(cfg, 0)
    (root / "images" / "c.png").unlink()

    _mask(root / "masks" / "d.png", np.zeros((10, 12), dtype=np.uint8))
    with pytest.raises(UserError, match=r"mask .*masks/d\.png has no image"):
        load(cfg, 0)
    (root / "masks" / "d.png").unlink()

    _mask(root / "masks" / "a.png", np.zeros((9, 12), dtype=np.uint8))
    with pytest.raises(UserError, match=r"mask .*masks/a\.png is 12x9 but the image .*images/a\.jpg is 12x10"):
        load(cfg, 0)

    _mask(root / "masks" / "a.png", np.full((10, 12), 3, dtype=np.uint8))
    with pytest.raises(UserError, match=r"mask .*masks/a\.png holds class id 3 but .*classes\.txt has 3 classes"):
        load(cfg, 0)
    _mask(root / "masks" / "a.png", np.zeros((10, 12), dtype=np.uint8))

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"data.unlabeled_dir=.*empty holds no images"):
        load(DataConfig(name="folder", root=str(root), unlabeled_dir=str(tmp_path / "empty")), 0)
    with pytest.raises(UserError, match=r"data.val_dir=.*empty has no images/ folder"):
        load(DataConfig(name="folder", root=str(root), val_dir=str(tmp_path / "empty")), 0)

    (root / "classes.txt").write_text("background\n\ndog\n")
    with pytest.raises(UserError, match=r"classes\.txt line 2 is empty"):
        load(cfg, 0)
    (root / "classes.txt").unlink()
    with pytest.raises(UserError, match=r"no .*classes\.txt: write one class name per line"):
        load(cfg, 0)

    bare = tmp_path / "bare"
    (bare / "images").mkdir(parents=True)
    (bare / "masks").mkdir()
    (bare / "classes.txt").write_text("background\n")
    with pytest.raises(UserError, match=r"images holds no images"):
        load(DataConfig(name="folder", root=str(bare)), 0)
    with pytest.raises(UserError, match="needs data.root"):
        load(DataConfig(name="folder"), 0)

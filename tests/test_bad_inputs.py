"""Bad input through the real CLI: one line ``trustmatch: error: ...`` on stderr naming the file or
value and the fix, exit code 2, no traceback, and no run directory left half-made; and images of
any mode (grayscale, palette, RGBA, 16-bit) converted rather than refused. docs/bad_inputs.md lists
every row with the test that backs it."""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trustmatch.cli import main
from trustmatch.core.errors import UserError
from trustmatch.data.folders import decode_image
from trustmatch.data.seg_sets import read_image, read_mask

TINY = ["train.steps=2", "train.eval_every=2", "train.log_every=1", "train.batch_size=4", "train.uratio=1", "--quiet"]
RED, BLUE = (200, 30, 30), (30, 30, 200)


# ---------------------------------------------------------------- helpers


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI; assert exit code 2 and exactly one ``trustmatch: error:`` line on stderr; return it."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("trustmatch: error: ") and "Traceback" not in err
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_no_run(out: Path, before: list[str] | None = None) -> None:
    """``out`` was never made, or (``before``: its listing ahead of the command) is left as it was."""
    if before is None:
        assert not out.exists(), f"{out} was left behind holding {listing(out)}"
    else:
        assert listing(out) == before


def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG of uint16 ``[H, W]`` (gray), ``[H, W, 2]`` (gray + alpha), ``[H, W, 3]`` or ``[H, W, 4]``;
    PIL writes 16-bit grayscale only, so the other colour types are encoded here."""
    data = np.asarray(pixels, dtype=">u2")
    channels = 1 if data.ndim == 2 else data.shape[2]
    height, width = data.shape[:2]
    raw = b"".join(b"\x00" + data[y].tobytes() for y in range(height))  # filter type 0 per row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )
    return path


def save(path: Path, colour: tuple[int, int, int] = RED, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    noise = rng.integers(-20, 20, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(path)
    return path


def damage(path: Path, how: str) -> Path:
    """Break an image file in one of the ways files break."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "garbage":
        path.write_bytes(b"this is not an image at all")
    elif how == "empty":
        path.write_bytes(b"")
    else:  # truncated: the header is intact (the size can be read), the pixel data is cut short
        buffer = io.BytesIO()
        pixels = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, "PNG" if path.suffix == ".png" else "JPEG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def pets(root: Path, per_class: int = 5) -> Path:
    """Class folders cat/ and dog/ of small RGB PNGs."""
    for name, colour in (("cat", RED), ("dog", BLUE)):
        for i in range(per_class):
            save(root / name / f"{i}.png", colour)
    return root


def train_folder(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "digits-fixmatch",
        "--out",
        str(out),
        *TINY,
        "data.name=folder",
        f"data.root={root}",
        "data.image_size=16",
        "data.labels_per_class=2",
        "data.val_per_class=1",
        *extra,
    ]


def seg_folders(root: Path) -> Path:
    """A segmentation folder: train/ and val/ (images/ + masks/, classes.txt), unlabeled/."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            save(root / split / "images" / f"s{i}.png", RED if i % 2 else BLUE, size=(24, 20))
            mask = root / split / "masks" / f"s{i}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 3, (20, 24)).astype(np.uint8)).save(mask)
    (root / "train" / "classes.txt").write_text("background\nred\nblue\n")
    for i in range(3):
        save(root / "unlabeled" / f"u{i}.png", RED, size=(24, 20))
    return root


def train_seg(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "digitscenes-unimatch",
        "--out",
        str(out),
        *TINY,
        "data.name=folder",
        f"data.root={root / 'train'}",
        f"data.unlabeled_dir={root / 'unlabeled'}",
        f"data.val_dir={root / 'val'}",
        "data.crop_size=16",
        "train.batch_size=2",
        "train.eval_batch_size=1",
        *extra,
    ]


# ---------------------------------------------------------------- corrupt and truncated images


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated"])
@pytest.mark.parametrize("where", ["class folder", "unlabeled_dir", "test_dir"])
def test_classification_folder_corrupt_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, where: str
) -> None:
    root = pets(tmp_path / "pets")
    extra = []
    if where == "class folder":
        bad = damage(root / "dog" / "bad.jpg", how)
    elif where == "unlabeled_dir":
        save(tmp_path / "unlabeled" / "ok.png")
        bad = damage(tmp_path / "unlabeled" / "deeper" / "bad.png", how)
        extra = [f"data.unlabeled_dir={tmp_path / 'unlabeled'}"]
    else:
        pets(tmp_path / "test", per_class=1)
        bad = damage(tmp_path / "test" / "cat" / "bad.jpg", how)
        extra = [f"data.test_dir={tmp_path / 'test'}"]
    out = tmp_path / "run"
    line = fails(capsys, *train_folder(root, out, *extra))
    assert f"cannot decode image {bad} (" in line and line.endswith("remove or replace it")
    assert_no_run(out)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
@pytest.mark.parametrize("where", ["train", "val", "unlabeled"])
def test_segmentation_folder_corrupt_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str, where: str
) -> None:
    """Every labeled image of a user's folder is decoded at load: a truncated file whose header is
    intact (its size reads fine) is named before training. An unlabeled one is opened at load and
    decoded when first read (here by the first batch, before any checkpoint: no run is left)."""
    root = seg_folders(tmp_path / "seg")
    bad = root / "unlabeled" / "s1.png" if where == "unlabeled" else root / where / "images" / "s1.png"
    damage(bad, how)
    out = tmp_path / "run"
    line = fails(capsys, *train_seg(root, out))
    assert f"cannot decode image {bad} (" in line and line.endswith("remove or replace it")
    assert_no_run(out)


def test_segmentation_folder_corrupt_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = seg_folders(tmp_path / "seg")
    bad = damage(root / "train" / "masks" / "s2.png", "truncated")
    out = tmp_path / "run"
    line = fails(capsys, *train_seg(root, out))
    assert f"cannot decode mask {bad} (" in line and line.endswith("remove or replace it")
    assert_no_run(out)


@pytest.mark.parametrize("breakage", ["size", "unknown id", "16-bit id 300", "16-bit id 65535", "colour"])
def test_segmentation_folder_bad_mask(tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str) -> None:
    root = seg_folders(tmp_path / "seg")
    mask = root / "train" / "masks" / "s1.png"
    if breakage == "size":
        Image.fromarray(np.zeros((20, 23), np.uint8)).save(mask)
        expected = f"mask {mask} is 23x20 but the image {root / 'train' / 'images' / 's1.png'} is 24x20 (WxH)"
    elif breakage == "unknown id":
        Image.fromarray(np.full((20, 24), 7, np.uint8)).save(mask)
        expected = f"mask {mask} holds class id 7 but {root / 'train' / 'classes.txt'} has 3 classes"
    elif breakage == "colour":
        Image.new("RGB", (24, 20), RED).save(mask)
        expected = f"mask {mask} is a RGB colour image: save class ids as a grayscale or palette PNG"
    else:
        value = int(breakage.split()[-1])
        ids = np.ones((20, 24), np.uint16)
        ids[3, 4] = value
        png16(mask, ids)
        expected = f"mask {mask} (I;16) holds id {value}: class ids must be whole numbers 0..254 (255 = ignore)"
    out = tmp_path / "run"
    assert expected in fails(capsys, *train_seg(root, out))
    assert_no_run(out)


# ---------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("segmenter")
    assert main(train_seg(seg_folders(root / "seg"), root / "run")) == 0
    return root / "run"


@pytest.mark.parametrize("how", ["garbage", "empty", "truncated"])
def test_predict_classification_corrupt_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path, how: str
) -> None:
    save(tmp_path / "photos" / "a.png")
    bad = damage(tmp_path / "photos" / "b.jpg", how)
    out = tmp_path / "preds.csv"
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "photos"), "--out", str(out))
    assert f"cannot decode image {bad} (" in line
    assert not out.exists()


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_predict_segmentation_corrupt_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], segmenter: Path, how: str
) -> None:
    """Every input is decoded before the first mask is written: no half-filled predictions folder."""
    save(tmp_path / "photos" / "a.png", size=(24, 20))
    bad = damage(tmp_path / "photos" / "b.png", how)
    save(tmp_path / "photos" / "c.png", size=(24, 20))
    out = tmp_path / "masks"
    line = fails(capsys, "predict", str(segmenter), str(tmp_path / "photos"), "--out", str(out))
    assert f"cannot decode image {bad} (" in line
    assert_no_run(out)


def test_predict_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path) -> None:
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "nowhere.jpg"))
    assert f"{tmp_path / 'nowhere.jpg'} does not exist" in line
    (tmp_path / "empty").mkdir()
    assert f"folder {tmp_path / 'empty'} holds no images" in fails(
        capsys, "predict", str(classifier), str(tmp_path / "empty")
    )


# ---------------------------------------------------------------- certified precision (predict / evaluate --precision)


@pytest.mark.parametrize(
    ("option", "value"), [("--precision", "1.5"), ("--precision", "0"), ("--delta", "0"), ("--delta", "1")]
)
def test_certify_options_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path, option: str, value: str
) -> None:
    save(tmp_path / "photos" / "a.png")
    out = tmp_path / "p.csv"
    extra = ["--precision", "0.9"] if option == "--delta" else []
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "photos"), "--out", str(out), option, value, *extra)
    assert f"{option} {float(value):g} must lie strictly between 0 and 1" in line and not out.exists()
    assert f"{option} {float(value):g} must lie" in fails(capsys, "evaluate", str(classifier), option, value, *extra)


def test_certify_options_need_precision(tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path) -> None:
    """--delta (predict, evaluate) and evaluate --raw only act on a certificate: without --precision they are
    refused rather than silently ignored."""
    save(tmp_path / "photos" / "a.png")
    out = tmp_path / "p.csv"
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "photos"), "--out", str(out), "--delta", "0.1")
    assert "--delta 0.1 only applies with --precision P" in line and not out.exists()
    assert "--delta 0.1 only applies with --precision P" in fails(capsys, "evaluate", str(classifier), "--delta", "0.1")
    assert "evaluate --raw only applies with --precision P" in fails(capsys, "evaluate", str(classifier), "--raw")


def test_certify_too_few_validation_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path
) -> None:
    """Two validation images cannot certify 0.95: the line says the best precision they can."""
    save(tmp_path / "photos" / "a.png")
    out = tmp_path / "p.csv"
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "photos"), "--out", str(out), "--precision", "0.95")
    assert "precision 0.95 cannot be certified at delta 0.05" in line and "(2 images)" in line
    assert "the best certifiable there is 0." in line and not out.exists()
    assert "cannot be certified" in fails(capsys, "evaluate", str(classifier), "--precision", "0.95")


def test_certify_without_validation_split_or_temperature(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path
) -> None:
    save(tmp_path / "photos" / "a.png")
    no_val = tmp_path / "no_val"
    assert main(train_folder(pets(tmp_path / "pets"), no_val, "data.val_per_class=0")) == 0
    capsys.readouterr()
    line = fails(capsys, "evaluate", str(no_val), "--precision", "0.9", "--raw")
    assert f"run {no_val} has no validation split" in line
    no_temperature = tmp_path / "no_temperature"  # a checkpoint saved between evaluations carries no T
    shutil.copytree(classifier, no_temperature)
    state = torch.load(no_temperature / "last.pt", weights_only=False)
    state.pop("temperature", None)
    torch.save(state, no_temperature / "last.pt")
    line = fails(capsys, "predict", str(no_temperature), str(tmp_path / "photos"), "--precision", "0.9")
    assert f"checkpoint {no_temperature / 'last.pt'} has no saved temperature" in line and "pass --raw" in line


def test_export_labeled_needs_precision_and_an_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], classifier: Path
) -> None:
    save(tmp_path / "photos" / "a.png")
    photos, out, export = str(tmp_path / "photos"), str(tmp_path / "p.csv"), tmp_path / "next"
    assert "--export-labeled needs --precision" in fails(
        capsys, "predict", str(classifier), photos, "--out", out, "--export-labeled", str(export)
    )
    export.mkdir()
    (export / "old.png").write_text("x")
    line = fails(
        capsys, "predict", str(classifier), photos, "--out", out, "--precision", "0.1", "--delta", "0.5",
        "--export-labeled", str(export),
    )  # fmt: skip
    assert f"--export-labeled {export} exists and is not an empty folder" in line
    assert listing(export) == ["old.png"]


# ---------------------------------------------------------------- modes: converted, not refused


def _mode_images(folder: Path) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """One uniform 12x10 image per mode, and the RGB every reader must turn it into."""
    folder.mkdir(parents=True, exist_ok=True)
    size = (12, 10)
    cases: dict[str, tuple[Path, tuple[int, int, int]]] = {}

    def add(name: str, image: Image.Image, rgb: tuple[int, int, int]) -> None:
        path = folder / f"{name}.png"
        image.save(path)
        cases[name] = (path, rgb)

    add("gray", Image.new("L", size, 77), (77, 77, 77))
    add("bilevel", Image.new("1", size, 1), (255, 255, 255))
    palette = Image.new("P", size, 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 200, 40] + [0, 0, 0] * 252)
    add("palette", palette, (10, 200, 40))
    transparent = palette.copy()
    transparent.info["transparency"] = 3  # index 3 is the transparent colour: white, as a viewer shows it
    add("palette_transparent", transparent, (255, 255, 255))
    add("rgba_opaque", Image.new("RGBA", size, (10, 20, 30, 255)), (10, 20, 30))
    add("rgba_transparent", Image.new("RGBA", size, (10, 20, 30, 0)), (255, 255, 255))
    # half transparent over white: 10 * 128/255 + 255 * 127/255 = 132.0 (PIL rounds alpha compositing)
    add("rgba_half", Image.new("RGBA", size, (10, 20, 30, 128)), (132, 137, 142))
    add("gray_alpha", Image.new("LA", size, (77, 255)), (77, 77, 77))
    cases["gray16"] = (png16(folder / "gray16.png", np.full((10, 12), 40000, np.uint16)), (156, 156, 156))
    cases["gray16_white"] = (png16(folder / "gray16_white.png", np.full((10, 12), 65535, np.uint16)), (255,) * 3)
    cases["gray16_dark"] = (png16(folder / "gray16_dark.png", np.full((10, 12), 200, np.uint16)), (1, 1, 1))
    rgb16 = np.stack([np.full((10, 12), v, np.uint16) for v in (40000, 20000, 65535)], axis=2)
    cases["rgb16"] = (png16(folder / "rgb16.png", rgb16), (156, 78, 255))
    rgba16 = np.concatenate([rgb16, np.full((10, 12, 1), 65535, np.uint16)], axis=2)
    cases["rgba16_opaque"] = (png16(folder / "rgba16_opaque.png", rgba16), (156, 78, 255))
    Image.fromarray(np.full((10, 12), 100000, np.int32)).save(folder / "int32.tif")  # above 16 bits: own maximum
    cases["int32"] = (folder / "int32.tif", (255, 255, 255))
    Image.fromarray(np.full((10, 12), 0.5, np.float32)).save(folder / "float.tif")  # floats in [0, 1]
    cases["float"] = (folder / "float.tif", (128, 128, 128))
    Image.new("CMYK", size, (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=100)
    cases["cmyk"] = (folder / "cmyk.jpg", (255, 0, 0))
    return cases


def test_modes_are_converted_alike_for_classification_and_segmentation(tmp_path: Path) -> None:
    """16-bit scaled from its full range (PIL's convert("RGB") would make 40000 white), transparency
    composited over white, grayscale and palette to RGB: ``decode_image`` (classification, predict)
    and ``read_image`` (segmentation, predict) give the same pixels."""
    for name, (path, rgb) in _mode_images(tmp_path).items():
        seg = read_image(path)
        assert seg.shape == (10, 12, 3) and seg.dtype == np.uint8, name
        assert np.abs(seg.astype(int) - rgb).max() <= 1, (name, seg[0, 0].tolist(), rgb)
        cls = decode_image(path, 16)
        assert cls.shape == (3, 16, 16) and np.abs(cls.astype(int) - seg[0, 0, :, None, None]).max() <= 1, name
        gray = decode_image(path, 8, mode="L")
        assert gray.shape == (1, 8, 8), name
    gradient = png16(tmp_path / "gradient.png", np.linspace(0, 65535, 120).reshape(10, 12).astype(np.uint16))
    seg = read_image(gradient)[..., 0].reshape(-1)
    assert seg[0] == 0 and seg[-1] == 255 and (np.diff(seg.astype(int)) >= 0).all()  # scaled, not saturated
    assert (seg < 255).sum() > 100


@pytest.mark.slow
def test_converted_modes_train_and_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Class folders and a segmentation folder of mixed modes (16-bit, RGBA, palette, grayscale;
    16-bit masks with ids up to 254 and 255 = ignore) train and predict with exit code 0."""
    cases = _mode_images(tmp_path / "modes")
    root = tmp_path / "pets"
    for i, (path, _) in enumerate(cases.values()):
        (root / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        (root / ("cat" if i % 2 else "dog") / path.name).write_bytes(path.read_bytes())
    assert main(train_folder(root, tmp_path / "run")) == 0
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "modes"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1 + len(cases)

    seg = seg_folders(tmp_path / "seg")
    png16(seg / "train" / "images" / "s0.png", np.full((20, 24), 40000, np.uint16))
    for i, name in ((1, "rgba_half"), (2, "palette_transparent")):
        with Image.open(cases[name][0]) as source:
            source.resize((24, 20)).save(seg / "train" / "images" / f"s{i}.png")
    ids = np.zeros((20, 24), np.uint16)
    ids[:5], ids[5:10] = 2, 255
    png16(seg / "train" / "masks" / "s0.png", ids)
    (seg / "train" / "classes.txt").write_text("\n".join(f"class{i}" for i in range(254)) + "\n")  # ids 0..253
    wide = ids.copy()
    wide[10:] = 253
    png16(seg / "train" / "masks" / "s1.png", wide)
    assert read_mask(seg / "train" / "masks" / "s1.png", (20, 24), 254).max() == 255
    assert main(train_seg(seg, tmp_path / "segrun")) == 0
    masks = tmp_path / "masks"
    assert main(["predict", str(tmp_path / "segrun"), str(seg / "train" / "images"), "--out", str(masks)]) == 0
    assert sorted(p.name for p in masks.iterdir()) == ["s0.png", "s1.png", "s2.png"]


# ---------------------------------------------------------------- split files (Pascal, Cityscapes, COCO)

LAYOUTS = {
    "pascal": ("pascal-unimatch-92", "92", "JPEGImages/{}.jpg", "SegmentationClass/{}.png"),
    "cityscapes": (
        "cityscapes-unimatch-1_16",
        "1_16",
        "leftImg8bit/train/jena/{}_leftImg8bit.png",
        "gtFine/train/jena/{}_gtFine_labelTrainIds.png",
    ),
    "coco": ("coco-unimatch-1_512", "1_512", "train2017/{}.jpg", "masks/{}.png"),
}


def standard_dataset(root: Path, dataset: str) -> tuple[str, list[str]]:
    """Images a, b, c with masks in ``dataset``'s layout: a labeled, b unlabeled, c in val.txt."""
    config, split, image, mask = LAYOUTS[dataset]
    for stem in "abc":
        save(root / image.format(stem), size=(24, 20))
        (root / mask.format(stem)).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / mask.format(stem))
    lists = root / "splits" / split
    lists.mkdir(parents=True)
    (lists / "labeled.txt").write_text(f"{image.format('a')} {mask.format('a')}\n")
    (lists / "unlabeled.txt").write_text(f"{image.format('b')} {mask.format('b')}\n")
    (root / "splits" / "val.txt").write_text(f"{image.format('c')} {mask.format('c')}\n")
    args = [config, f"data.root={root}", "model.name=segnet_small", "model.weights=none", "data.crop_size=16"]
    return split, args


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
@pytest.mark.parametrize("which", ["labeled.txt image", "labeled.txt mask", "unlabeled.txt image", "val.txt mask"])
def test_split_file_naming_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dataset: str, which: str
) -> None:
    split, args = standard_dataset(tmp_path / dataset, dataset)
    _, _, image, mask = LAYOUTS[dataset]
    listed, part = which.split()
    stem = {"labeled.txt": "a", "unlabeled.txt": "b", "val.txt": "c"}[listed]
    missing = tmp_path / dataset / (image if part == "image" else mask).format(stem)
    missing.unlink()
    path = tmp_path / dataset / "splits" / (listed if listed == "val.txt" else f"{split}/{listed}")
    out = tmp_path / "run"
    line = fails(capsys, "train", *args, "--out", str(out), *TINY)
    assert f"split file {path} line 1 names {missing}, which does not exist: check data.root or remove the line" in line
    assert_no_run(out)


@pytest.mark.parametrize("breakage", ["empty unlabeled.txt", "three fields", "not text", "labeled without mask"])
def test_malformed_split_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str) -> None:
    split, args = standard_dataset(tmp_path / "voc", "pascal")
    lists = tmp_path / "voc" / "splits" / split
    if breakage == "empty unlabeled.txt":
        (lists / "unlabeled.txt").write_text("\n")
        expected = f"split file {lists / 'unlabeled.txt'} lists no samples: add 'image_path' (unlabeled"
    elif breakage == "three fields":
        (lists / "labeled.txt").write_text("JPEGImages/a.jpg SegmentationClass/a.png extra\n")
        expected = f"split file {lists / 'labeled.txt'} line 1: expected 'image_path mask_path' relative to data.root"
    elif breakage == "labeled without mask":
        (lists / "labeled.txt").write_text("JPEGImages/a.jpg\n")
        expected = f"split file {lists / 'labeled.txt'} line 1: expected 'image_path mask_path'"
    else:
        (lists / "labeled.txt").write_bytes(b"\xff\xfe\x00\x00JPEG")
        expected = f"cannot read split file {lists / 'labeled.txt'} (not UTF-8 text)"
    out = tmp_path / "run"
    assert expected in fails(capsys, "train", *args, "--out", str(out), *TINY)
    assert_no_run(out)


def test_corrupt_image_in_a_standard_split_is_named_when_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pascal / Cityscapes / COCO files are read per batch (10,582 Pascal images are not decoded up
    front): a corrupt one stops the run with one line when a batch first reads it."""
    _, args = standard_dataset(tmp_path / "voc", "pascal")
    bad = damage(tmp_path / "voc" / "JPEGImages" / "b.jpg", "truncated")
    out = tmp_path / "run"
    line = fails(capsys, "train", *args, "--out", str(out), *TINY)
    assert f"cannot decode image {bad} (" in line and line.endswith("remove or replace it")
    assert_no_run(out)  # it stopped before its first last.pt: nothing to resume, nothing left


# ---------------------------------------------------------------- empty unlabeled sets


def test_empty_unlabeled_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = pets(tmp_path / "pets")
    (tmp_path / "unlabeled" / "notes").mkdir(parents=True)
    (tmp_path / "unlabeled" / "readme.txt").write_text("no images here")
    out = tmp_path / "run"
    line = fails(capsys, *train_folder(root, out, f"data.unlabeled_dir={tmp_path / 'unlabeled'}"))
    assert f"data.unlabeled_dir={tmp_path / 'unlabeled'} holds no images" in line and "add images or unset it" in line
    assert_no_run(out)
    seg = seg_folders(tmp_path / "seg")
    for file in (seg / "unlabeled").iterdir():
        file.unlink()
    line = fails(capsys, *train_seg(seg, out))
    assert f"data.unlabeled_dir={seg / 'unlabeled'} holds no images" in line
    assert_no_run(out)


def test_labels_take_the_whole_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """5 images per class, 1 held out for test, 3 labeled + 1 validation: nothing left for an SSL method."""
    root = pets(tmp_path / "pets")
    out = tmp_path / "run"
    line = fails(capsys, *train_folder(root, out, "data.labels_per_class=3"))
    assert "no unlabeled images are left after the labeled and validation picks" in line
    assert_no_run(out)


def test_segmentation_ssl_without_unlabeled_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seg = seg_folders(tmp_path / "seg")
    out = tmp_path / "run"
    args = [a for a in train_seg(seg, out) if not a.startswith("data.unlabeled_dir=")]
    line = fails(capsys, *args)
    assert "method 'unimatch' needs unlabeled images and folder has none: give data.unlabeled_dir" in line
    assert_no_run(out)


# ---------------------------------------------------------------- initial weights (model.weights)


def _weights_file(folder: Path, breakage: str) -> Path:
    """A weights file broken in one of the ways model.weights can be wrong (the data has 3 classes)."""
    from trustmatch.models import build_model

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("w.ckpt" if breakage == "suffix" else "w.pth")
    if breakage == "folder":
        return folder
    if breakage == "missing":
        return folder / "gone.pth"
    whole = build_model("segnet_small", 3, 3).state_dict()
    contents = {
        "suffix": whole,
        "truncated": whole,
        "not a state dict": {"epoch": 3, "lr": 0.1},
        "pickled module": build_model("segnet_small", 3, 3),
        "wrong architecture": build_model("cnn", 3, 3).state_dict(),
        "head of another size": build_model("segnet_small", 5, 3).state_dict(),
    }[breakage]
    torch.save(contents, path)
    if breakage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("missing", "gone.pth: the file does not exist; give a .pth/.pt/.safetensors/.bin file"),
        ("folder", "the file is a folder"),
        ("suffix", ".ckpt is not a weights file: use one of"),
        ("truncated", "is unreadable or truncated"),
        ("not a state dict", "holds no state dict (a mapping of names to tensors"),
        ("pickled module", "was refused: it holds objects other than tensors and plain data (a pickled"),
        ("wrong architecture", "does not fit SegNetSmall: none of its"),
        ("head of another size", "has a head of another size (head.classifier.weight: [5, 96, 1, 1] in the file"),
    ],
)
def test_bad_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], breakage: str, expected: str) -> None:
    path = _weights_file(tmp_path / "weights", breakage)
    out = tmp_path / "run"
    line = fails(capsys, *train_seg(seg_folders(tmp_path / "seg"), out, f"model.weights={path}"))
    assert expected in line and str(path) in line, line
    assert_no_run(out)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            ["model.name=deeplabv3plus_r50_deepstem", "model.weights=imagenet"],
            "UniMatch's release file resnet50.pth, which no library downloads: get resnet50.pth from the UniMatch "
            "release (its pretrained/ folder) and pass model.weights=/path/to/resnet50.pth",
        ),
        (
            ["model.name=smp:resnet18", "model.weights=imagenet"],
            "the ImageNet weights of smp encoder 'resnet18' are not in the Hugging Face cache",
        ),
        (["model.weights=imagenet"], "segnet_small has no ImageNet weights; use model.weights=none"),
        (["model.name=smp:resnet19"], "has no encoder 'resnet19'; did you mean smp:resnet18"),
        (["model.pretrained=true"], "config key 'model.pretrained' was replaced by model.weights: imagenet"),
        (["model.weights_prefix=backbone."], "'model.weights_prefix' must be empty unless model.weights is a file"),
    ],
)
def test_imagenet_weights_not_had(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, extra: list[str], expected: str
) -> None:
    """Offline without a cache (the hub's constants pointed at an empty folder: nothing reaches the network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    out = tmp_path / "run"
    line = fails(capsys, *train_seg(seg_folders(tmp_path / "seg"), out, *extra))
    assert expected in line, line
    if "Hugging Face cache" in line:
        assert f"{tmp_path / 'empty-cache'} (offline: HF_HUB_OFFLINE=1)" in line
    assert_no_run(out)


@pytest.mark.slow
def test_a_new_run_starts_from_a_trained_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], segmenter: Path
) -> None:
    """model.weights=RUN/last.pt: the new run's initial model is the old run's evaluated (EMA) model."""
    from trustmatch.models.weights import read_state_dict

    out = tmp_path / "run"
    argv = train_seg(seg_folders(tmp_path / "seg"), out, f"model.weights={segmenter / 'last.pt'}", "train.steps=1")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    tensors = len(read_state_dict(segmenter / "last.pt"))  # the EMA part: every tensor of the model
    assert f"weights: {tensors} tensors from {segmenter / 'last.pt'} into the model" in printed
    assert "weights: missing 0" in printed and "weights: unexpected 0" in printed


def test_a_run_saved_with_pretrained_resumes(tmp_path: Path, segmenter: Path) -> None:
    """A config.yaml from before model.weights (``pretrained: true``) resumes as ``weights: imagenet`` without
    reading any weights: segnet_small would refuse imagenet if the resume tried."""
    import shutil

    import yaml

    run = tmp_path / "old-run"
    shutil.copytree(segmenter, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"] = {**{k: v for k, v in config["model"].items() if not k.startswith("weights")}, "pretrained": True}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--resume", str(run), "train.steps=3", "--quiet"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weights"] == "imagenet"


# ---------------------------------------------------------------- config files and values


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train: [1, 2\n", "is not valid YAML at line 2, column 1: expected ',' or ']'"),
        ("base: digits-fixmatch\ntrain:\n\tsteps: 3\n", "is not valid YAML at line 3, column 1: found character '\\t'"),
        ("base: digits-fixmatch\ndata:\n  root: /a: b\n", "is not valid YAML at line 3, column 11: mapping values"),
        ("- train\n- steps\n", "must hold a mapping of keys (key: value lines), not a list"),
        ("just words\n", "must hold a mapping of keys (key: value lines), not a str"),
        (
            "base: digits-fixmatch\ntrain:\n  steps: 3\n  stpes: 4\n",
            "line 4: unknown config key 'train.stpes'; did you",
        ),
        ("base: digits-fixmatch\nmodle:\n  name: cnn\n", "line 2: unknown config key 'modle.name'; did you mean"),
        ("base: digits-fixmatch\ntrain:\n  steps: 3\n  steps: 4\n", "line 4: key 'train.steps' is given twice"),
        ("base: digits-fixmatch\ntrain: 5\n", "line 2: 'train' is a section: indent its keys under it"),
        ("base: digits-fixmatch\ntrain:\n  steps: ten\n", "line 3: config key 'train.steps' expects int, got 'ten'"),
    ],
)
def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    out = tmp_path / "run"
    line = fails(capsys, "train", str(config), "--out", str(out), *TINY)
    assert f"config file {config}" in line and expected in line, line
    assert_no_run(out)


def test_bad_config_file_in_a_base_chain_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "parent.yaml").write_text("base: digits-fixmatch\nmethod:\n  tua: 0.9\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  steps: 3\n")
    line = fails(capsys, "train", str(tmp_path / "child.yaml"), "--out", str(tmp_path / "run"))
    assert f"config file {tmp_path / 'parent.yaml'} line 3: unknown config key 'method.tua'" in line


def test_unreadable_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01 steps")
    assert f"config file {binary} is not UTF-8 text" in fails(capsys, "train", str(binary))
    assert f"config file {tmp_path / 'gone.yaml'} does not exist" in fails(capsys, "train", str(tmp_path / "gone.yaml"))
    assert f"config file {tmp_path} is a folder" in fails(capsys, "train", str(tmp_path))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method.tau=1.5", "config key 'method.tau' must be in [0, 1], got 1.5"),
        ("train.steps=0", "config key 'train.steps' must be at least 1, got 0"),
        ("train.batch_size=0", "config key 'train.batch_size' must be at least 1, got 0"),
        (
            "data.labels_per_class=-1",
            "config key 'data.labels_per_class' must be at least 1, or 0 (every training image), got -1",
        ),
        ("data.val_per_class=-2", "config key 'data.val_per_class' must be 0 or more, got -2"),
        ("train.lr=0", "config key 'train.lr' must be positive, got 0.0"),
        ("train.lr=.inf", "config key 'train.lr' must be a finite number, got inf"),
        ("method.tau=nan", "config key 'method.tau' must be a finite number, got nan"),
        ("train.steps=ten", "config key 'train.steps' expects int, got 'ten'"),
        ("train.steps=2.5", "config key 'train.steps' expects int, got 2.5"),
        ("method.tau=high", "config key 'method.tau' expects float, got 'high'"),
        ("method.tau=[0.9", "config key 'method.tau' expects float, got '[0.9'"),
        ("train.amp=maybe", "config key 'train.amp' expects bool, got 'maybe'"),
        ("train.step=10", "unknown config key 'train.step'; did you mean 'train.steps'?"),
        ("train.steps", "override 'train.steps' is not key=value"),
    ],
)
def test_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, expected: str) -> None:
    out = tmp_path / "run"
    line = fails(capsys, "train", "digits-fixmatch", override, "--out", str(out), "--quiet")
    assert expected in line, line
    assert_no_run(out)


@pytest.mark.parametrize(
    "preset, overrides, setting",
    [
        ("digits-fixmatch", ["train.device=cpu"], "train.device=cpu"),
        ("digits-fixmatch", ["train.nonfinite=skip"], "train.nonfinite=skip"),
        ("digits-softmatch", ["calibratemix.mode=efficient"], "calibratemix.mode=efficient"),
        ("digitscenes-unimatch", [], "task segmentation"),
    ],
    ids=["cpu", "skip", "calibratemix", "segmentation"],
)
def test_cuda_graphs_that_cannot_capture_the_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], preset: str, overrides: list[str], setting: str
) -> None:
    out = tmp_path / "run"
    line = fails(capsys, "train", preset, "train.cuda_graphs=true", *overrides, "--out", str(out), "--quiet")
    assert f"train.cuda_graphs=true cannot capture the step with {setting} (" in line, line
    assert line.endswith("set train.cuda_graphs=false")
    assert_no_run(out)


# ---------------------------------------------------------------- backbones: timm names, weights, freezing


@pytest.fixture
def offline_empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in offline mode (HF_HOME=<empty dir> HF_HUB_OFFLINE=1 at start-up)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.name=timm:vit_smal_patch16_224"],
            "model.name=timm:vit_smal_patch16_224: timm has no model 'vit_smal_patch16_224'; did you mean "
            "timm:vit_small_patch16_224",
        ),
        (["model.weights=imagenet"], "model.weights=imagenet: cnn has no ImageNet weights"),
        (
            ["model.name=vit_tiny_patch2_32", "model.weights=imagenet"],
            "USB's ImageNet weights for vit_tiny_patch2_32 are its release file",
        ),
        (["train.freeze=true"], "train.freeze=true trains only the head of a pretrained backbone: cnn is trained"),
        (["train.layer_decay=0.5"], "train.layer_decay=0.5 needs a network with layers by depth"),
        (["train.layer_decay=0"], "config key 'train.layer_decay' must be in (0, 1] (1: off), got 0.0"),
        (["train.optimizer=adam"], "config key 'train.optimizer' must be 'sgd' or 'adamw', got 'adam'"),
        (["train.warmup=1.5"], "config key 'train.warmup' must be a fraction of train.steps in [0, 1), got 1.5"),
    ],
)
def test_bad_backbone_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str
) -> None:
    out = tmp_path / "run"
    line = fails(capsys, "train", "digits-fixmatch", *overrides, "--out", str(out), "--quiet")
    assert expected in line, line
    assert_no_run(out)


def test_imagenet_weights_offline_without_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], offline_empty_hub: Path
) -> None:
    """Asked-for weights that cannot be had stop the run (never a random start), naming the cache and the fix."""
    out = tmp_path / "run"
    line = fails(
        capsys, "train", "digits-fixmatch", "model.name=timm:test_vit", "model.weights=imagenet",
        "data.image_size=32", "--out", str(out), *TINY,
    )  # fmt: skip
    assert f"timm:test_vit's weights are not in the cache {offline_empty_hub}" in line, line
    assert "HF_HUB_OFFLINE=1" in line and "or use model.weights=none" in line
    assert_no_run(out)


def test_freeze_with_a_segmentation_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    line = fails(capsys, "train", "digitscenes-unimatch", "train.freeze=true", "--out", str(out), "--quiet")
    assert "config key 'train.freeze' must be false for task 'segmentation'" in line, line
    assert "method 'unimatch' trains a segmentation decoder" in line
    assert_no_run(out)


# ---------------------------------------------------------------- the output directory


def deny_writes(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int = errno.EACCES) -> None:
    """Simulate a read-only ``folder`` for this process, root included (root ignores permission bits):
    ``os.access`` says no, and creating or writing anything below it fails with ``code``."""
    folder = folder.resolve()

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return False
        return Path(os.fsdecode(path)).resolve().is_relative_to(folder)  # type: ignore[arg-type]

    def refuse(path: object) -> OSError:
        return PermissionError(code, os.strerror(code), os.fsdecode(path))  # type: ignore[arg-type]

    real_access, real_mkdir, real_open, real_builtin_open = os.access, os.mkdir, os.open, builtins.open

    def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
        return False if mode & os.W_OK and inside(path) else real_access(path, mode, *args, **kwargs)

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if inside(path):
            raise refuse(path)
        real_mkdir(path, *args, **kwargs)

    def os_open(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            raise refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def open_(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        if any(c in mode for c in "wax+") and inside(file):
            raise refuse(file)
        return real_builtin_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)


def disk_full(monkeypatch: pytest.MonkeyPatch, call: str, only: Callable[[str], bool] = lambda path: True) -> None:
    """ENOSPC from ``os.fsync`` (every write) or from ``os.replace`` onto a path ``only`` accepts."""
    real_replace = os.replace

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if only(os.fsdecode(dst)):  # type: ignore[arg-type]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst, *args, **kwargs)

    if call == "fsync":
        monkeypatch.setattr(os, "fsync", fsync)
    else:
        monkeypatch.setattr(os, "replace", replace)


def test_read_only_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    out = locked / "runs" / "mine"
    line = fails(capsys, "train", "digits-fixmatch", "--out", str(out), *TINY)
    assert str(out) in line and "not writable" in line, line
    assert_no_run(locked, before=[])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_output_folder_by_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        line = fails(capsys, "train", "digits-fixmatch", "--out", str(locked / "run"), *TINY)
        assert str(locked / "run") in line and "not writable" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_disk_full_at_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """ENOSPC on the run's first file (config.yaml): one line, and the directory it made is removed."""
    disk_full(monkeypatch, call)
    out = tmp_path / "runs" / "mine"
    line = fails(capsys, "train", "digits-fixmatch", "--out", str(out), *TINY)
    assert f"cannot write {out / 'config.yaml'} (No space left on device)" in line and "free disk space" in line
    assert_no_run(tmp_path / "runs")


def test_disk_full_at_the_first_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on last.pt after the directory is made: one line naming last.pt, no temporary file left."""
    disk_full(monkeypatch, "replace", only=lambda path: path.endswith("last.pt"))
    out = tmp_path / "run"
    line = fails(capsys, "train", "digits-fixmatch", "--out", str(out), *TINY)
    assert f"cannot write {out / 'last.pt'} (No space left on device)" in line
    assert not [p for p in listing(tmp_path) if p.endswith(".tmp")]
    assert_no_run(out)


def test_out_is_a_file_or_holds_other_things(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    line = fails(capsys, "train", "digits-fixmatch", "--out", str(tmp_path / "notes.txt"), *TINY)
    assert f"--out {tmp_path / 'notes.txt'} is a file" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
    root = pets(tmp_path / "pets")
    damage(root / "cat" / "bad.png", "truncated")
    out = tmp_path / "existing"  # a folder the user made: a failed start leaves it as it was
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "keep.txt").write_text("keep")
    before = listing(out)
    fails(capsys, *train_folder(root, out))
    assert_no_run(out, before)


def test_predict_output_not_writable(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    classifier: Path,
    segmenter: Path,
) -> None:
    save(tmp_path / "photos" / "a.png", size=(24, 20))
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    line = fails(capsys, "predict", str(classifier), str(tmp_path / "photos"), "--out", str(locked / "p.csv"))
    assert f"cannot write {locked / 'p.csv'}" in line
    line = fails(capsys, "predict", str(segmenter), str(tmp_path / "photos"), "--out", str(locked / "masks"))
    assert str(locked / "masks") in line
    assert_no_run(locked, before=[])
    monkeypatch.undo()
    disk_full(monkeypatch, "fsync")
    line = fails(capsys, "predict", str(segmenter), str(tmp_path / "photos"), "--out", str(tmp_path / "masks"))
    assert f"cannot write {tmp_path / 'masks' / 'a.png'} (No space left on device)" in line


def test_unreadable_images_are_one_error_type(tmp_path: Path) -> None:
    """What PIL raises on damaged files of every common format stays inside DECODE_ERRORS (a
    UserError), never a traceback: a seeded sample of truncations and byte flips."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8))
    for fmt, suffix in [("PNG", ".png"), ("JPEG", ".jpg"), ("BMP", ".bmp"), ("GIF", ".gif"), ("WEBP", ".webp")]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        data = buffer.getvalue()
        for trial in range(40):
            broken = bytearray(data[: int(rng.integers(1, len(data)))] if trial % 2 else data)
            if not trial % 2:
                for _ in range(3):
                    broken[int(rng.integers(len(broken)))] = int(rng.integers(256))
            path = tmp_path / f"{trial}{suffix}"
            path.write_bytes(bytes(broken))
            for read in (lambda p: decode_image(p, 8), read_image):
                try:
                    read(path)
                except UserError as e:
                    assert str(path) in str(e) and "\n" not in str(e)

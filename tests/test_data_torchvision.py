"""torchvision-backed loaders, on tiny fixtures written in each dataset's real on-disk format."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.data import torchvision_sets as tvs
from trustmatch.data.image_sets import DATASETS

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRUSTMATCH_CACHE", str(cache))
    return cache


def _images(n: int, channels: int, size: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, channels, size, size), dtype=np.uint8)


# --- CIFAR: Python 2 pickles (byte-string keys and buffers, read back with encoding="latin1") ---


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 byte strings, as the original CIFAR files were written."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<I", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def _py2_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _write_cifar10(root: Path, per_batch: int = 2, balanced: bool = False) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py"
    n = 5 * per_batch
    train, labels = _images(n, 3, 32), np.arange(n) % 10 if balanced else RNG.integers(0, 10, n)
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        batch = {
            "batch_label": f"training batch {b + 1} of 5",
            "labels": labels[part].tolist(),
            "data": train[part].reshape(per_batch, 3072),
            "filenames": [f"img{i}.png" for i in range(per_batch)],
        }
        _py2_pickle(base / f"data_batch_{b + 1}", batch)
    test, test_labels = _images(3, 3, 32), [9, 0, 4]
    _py2_pickle(
        base / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_labels,
            "data": test.reshape(3, 3072),
            "filenames": ["a.png", "b.png", "c.png"],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _py2_pickle(base / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {"train": train, "labels": labels, "test": test, "test_labels": np.array(test_labels)}


def _write_cifar100(root: Path) -> dict[str, np.ndarray]:
    base = root / "cifar-100-python"
    data = {}
    for split, n in (("train", 6), ("test", 2)):
        images, fine = _images(n, 3, 32), RNG.integers(0, 100, n)
        _py2_pickle(
            base / split,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "batch_label": split,
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": images.reshape(n, 3072),
            },
        )
        data[split], data[f"{split}_labels"] = images, fine
    _py2_pickle(
        base / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return data


def test_cifar10_round_trip(tmp_path: Path) -> None:
    data = _write_cifar10(tmp_path)
    src = DATASETS.get("cifar10")(DataConfig(name="cifar10", root=str(tmp_path)))
    assert torch.equal(src.train.images, torch.from_numpy(data["train"]))
    assert src.train.labels.tolist() == data["labels"].tolist() and src.train.labels.dtype == torch.int64
    assert torch.equal(src.test.images, torch.from_numpy(data["test"]))
    assert src.test.labels.tolist() == [9, 0, 4]
    assert src.classes[0] == "airplane" and len(src.classes) == 10
    assert src.mean == (0.4914, 0.4822, 0.4465) and src.hflip and src.extra_unlabeled is None


def test_cifar10_resize(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    src = tvs.load_cifar10(DataConfig(root=str(tmp_path), image_size=16))
    assert src.train.images.shape == (10, 3, 16, 16) and src.train.images.dtype == torch.uint8
    assert src.image_size == 16 and src.test.images.shape == (3, 3, 16, 16)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    data = _write_cifar100(tmp_path)
    src = tvs.load_cifar100(DataConfig(root=str(tmp_path)))
    assert torch.equal(src.train.images, torch.from_numpy(data["train"]))
    assert src.train.labels.tolist() == data["train_labels"].tolist()
    assert src.test.labels.tolist() == data["test_labels"].tolist()
    assert src.classes == [f"fine{i}" for i in range(100)] and src.std == (0.2673, 0.2564, 0.2762)


# --- SVHN: MATLAB files with X [32, 32, 3, N] and y [N, 1], digit 0 labeled 10 ---


def _write_svhn(root: Path, split: str, digits: list[int]) -> np.ndarray:
    import scipy.io

    images = _images(len(digits), 3, 32)
    y = np.array([[10 if d == 0 else d] for d in digits], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": images.transpose(2, 3, 1, 0), "y": y})
    return images


def test_svhn_round_trip_and_label_ten_is_zero(tmp_path: Path) -> None:
    train = _write_svhn(tmp_path, "train", [0, 1, 9, 0])
    _write_svhn(tmp_path, "test", [5, 0])
    src = tvs.load_svhn(DataConfig(root=str(tmp_path)))
    assert torch.equal(src.train.images, torch.from_numpy(train))
    assert src.train.labels.tolist() == [0, 1, 9, 0] and src.test.labels.tolist() == [5, 0]
    assert src.classes == [str(d) for d in range(10)] and not src.hflip
    assert src.info["splits"] == "train"


def test_svhn_extra_joins_training_pool(tmp_path: Path) -> None:
    _write_svhn(tmp_path, "train", [1, 2])
    _write_svhn(tmp_path, "test", [3])
    extra = _write_svhn(tmp_path, "extra", [4, 0, 6])
    src = tvs.load_svhn(DataConfig(root=str(tmp_path)))
    assert src.train.labels.tolist() == [1, 2, 4, 0, 6] and src.info["splits"] == "train+extra"
    assert torch.equal(src.train.images[2:], torch.from_numpy(extra))


# --- STL-10: raw uint8, each image column-major (C, W, H); 1-based uint8 labels ---


def _write_stl_images(path: Path, images: np.ndarray) -> None:
    path.write_bytes(np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes())


def _write_stl10(root: Path) -> dict[str, np.ndarray]:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    data = {"train": _images(3, 3, 96), "test": _images(2, 3, 96), "unlabeled": _images(4, 3, 96)}
    data["train"][0] = 0
    data["train"][0, 0, 1, 5] = 200  # channel 0, row 1, column 5: catches a transposed read
    for split, images in data.items():
        _write_stl_images(base / f"{split}_X.bin", images)
    (base / "train_y.bin").write_bytes(np.array([1, 10, 3], dtype=np.uint8).tobytes())
    (base / "test_y.bin").write_bytes(np.array([2, 1], dtype=np.uint8).tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (base / "class_names.txt").write_text("\n".join(names) + "\n")
    return data


def test_stl10_orientation_labels_and_unlabeled(tmp_path: Path) -> None:
    data = _write_stl10(tmp_path)
    src = tvs.load_stl10(DataConfig(root=str(tmp_path)))
    assert src.train.images[0, 0, 1, 5] == 200 and src.train.images[0, 0, 5, 1] == 0
    assert torch.equal(src.train.images, torch.from_numpy(data["train"]))
    assert src.train.labels.tolist() == [0, 9, 2] and src.test.labels.tolist() == [1, 0]
    assert torch.equal(src.extra_unlabeled.images, torch.from_numpy(data["unlabeled"]))
    assert src.extra_unlabeled.labels.tolist() == [-1] * 4
    assert src.classes[-1] == "truck" and src.hflip


def test_stl10_resize_includes_unlabeled(tmp_path: Path) -> None:
    _write_stl10(tmp_path)
    src = tvs.load_stl10(DataConfig(root=str(tmp_path), image_size=32))
    assert src.train.images.shape == (3, 3, 32, 32) and src.extra_unlabeled.images.shape == (4, 3, 32, 32)


# --- MNIST / Fashion-MNIST: big-endian idx files, plain in <Class>/raw/ or gzipped flat ---


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8), RNG.integers(0, 10, n)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name, payload = f"{prefix}-{kind}-ubyte", _idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        data[prefix], data[f"{prefix}_labels"] = images, labels
    return data


def test_mnist_torchvision_layout(tmp_path: Path) -> None:
    data = _write_idx(tmp_path / "MNIST" / "raw", gz=False)
    src = tvs.load_mnist(DataConfig(root=str(tmp_path)))
    assert torch.equal(src.train.images, torch.from_numpy(data["train"]).unsqueeze(1))
    assert src.train.labels.tolist() == data["train_labels"].tolist()
    assert src.test.labels.tolist() == data["t10k_labels"].tolist()
    assert src.channels == 1 and src.mean == (0.1307,) and not src.hflip
    assert tvs.load_mnist(DataConfig(root=str(tmp_path), image_size=32)).train.images.shape == (5, 1, 32, 32)


def test_fashionmnist_flat_gzip_unpacked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_idx(tmp_path / "flat", gz=True)
    cfg = DataConfig(root=str(tmp_path / "flat"))
    src = tvs.load_fashionmnist(cfg)
    assert torch.equal(src.train.images, torch.from_numpy(data["train"]).unsqueeze(1))
    assert src.test.labels.tolist() == data["t10k_labels"].tolist()
    assert src.classes[0] == "T-shirt/top" and src.hflip and src.std == (0.3530,)
    assert not list((tmp_path / "flat").glob("*-ubyte")), "the source folder is left untouched"

    def no_gzip(*args: object, **kwargs: object) -> None:
        raise AssertionError("decompressed again")

    monkeypatch.setattr(tvs.gzip, "open", no_gzip)
    assert torch.equal(tvs.load_fashionmnist(cfg).train.images, src.train.images)


def test_fashionmnist_cache_refreshed_when_source_changes(tmp_path: Path) -> None:
    _write_idx(tmp_path / "flat", gz=True)
    cfg = DataConfig(root=str(tmp_path / "flat"))
    tvs.load_fashionmnist(cfg)
    new = _write_idx(tmp_path / "flat", gz=True, n_train=4)
    for f in (tmp_path / "flat").iterdir():
        os.utime(f, ns=(0, f.stat().st_mtime_ns + 1_000_000_000))
    assert torch.equal(tvs.load_fashionmnist(cfg).train.images, torch.from_numpy(new["train"]).unsqueeze(1))


def test_fashionmnist_defaults_to_debian_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _write_idx(tmp_path / "debian", gz=True)
    monkeypatch.setattr(tvs, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    src = tvs.load_fashionmnist(DataConfig(name="fashionmnist"))
    assert src.train.labels.tolist() == data["train_labels"].tolist()
    assert src.info["source"] == str(tmp_path / "debian")


def test_real_debian_fashionmnist() -> None:
    if not all(
        (tvs.DEBIAN_FASHION_MNIST / f"{p}-{k}-ubyte.gz").is_file()
        for p in ("train", "t10k")
        for k in ("images-idx3", "labels-idx1")
    ):
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed in {tvs.DEBIAN_FASHION_MNIST}")
    src = tvs.load_fashionmnist(DataConfig(name="fashionmnist"))
    assert src.train.images.shape == (60000, 1, 28, 28) and src.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(src.train.labels).tolist() == [6000] * 10
    assert len(src.classes) == 10


# --- errors: one line naming the dataset, the path and the fix ---


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "stl10", "mnist", "fashionmnist"])
def test_missing_files_name_path_and_fix(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError) as info:
        DATASETS.get(name)(DataConfig(name=name, root=str(tmp_path)))
    message = str(info.value)
    assert name in message and str(tmp_path) in message and "data.download=true" in message
    assert "\n" not in message


def test_missing_fashionmnist_without_root_mentions_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _isolated_cache: Path
) -> None:
    monkeypatch.setattr(tvs, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        tvs.load_fashionmnist(DataConfig(name="fashionmnist"))
    assert str(_isolated_cache / "fashionmnist") in str(info.value)


def test_partial_cifar_names_missing_file(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 not found"):
        tvs.load_cifar10(DataConfig(root=str(tmp_path)))


def test_download_keeps_torchvision_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixture files fail the real md5s, so download=true must try to fetch the archive again."""
    import torchvision.datasets.cifar

    _write_cifar10(tmp_path)
    fetched = []
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", lambda *a, **k: fetched.append(a))
    with pytest.raises(UserError, match=f"cifar10: could not download or read the files in {tmp_path}"):
        tvs.load_cifar10(DataConfig(root=str(tmp_path), download=True))
    assert fetched


@pytest.mark.parametrize(
    ("name", "write", "damaged"),
    [
        ("cifar10", _write_cifar10, "cifar-10-batches-py/data_batch_2"),
        ("stl10", _write_stl10, "stl10_binary/train_X.bin"),
        ("svhn", lambda root: [_write_svhn(root, s, [1]) for s in ("train", "test")], "test_32x32.mat"),
    ],
)
def test_damaged_file_is_user_error(tmp_path: Path, name: str, write, damaged: str) -> None:
    write(tmp_path)
    path = tmp_path / damaged
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{name}: could not read the files in {tmp_path}"):
        DATASETS.get(name)(DataConfig(name=name, root=str(tmp_path)))


def test_unwritable_cache_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx(tmp_path / "flat", gz=True)
    (tmp_path / "blocker").write_text("a file where the cache folder should go")
    monkeypatch.setenv("TRUSTMATCH_CACHE", str(tmp_path / "blocker"))
    with pytest.raises(UserError, match="set TRUSTMATCH_CACHE to a writable folder"):
        tvs.load_fashionmnist(DataConfig(root=str(tmp_path / "flat")))


def test_damaged_gzip_names_file(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot decompress .*train-images-idx3-ubyte.gz"):
        tvs.load_fashionmnist(DataConfig(root=str(tmp_path)))


def test_published_cifar10_40_trains_on_exactly_40_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cifar10-fixmatch-40` as shipped: 40 labeled images, no validation split, `final` reported."""
    from trustmatch.cli import main

    _write_cifar10(tmp_path, per_batch=12, balanced=True)  # 6 images per class
    run = tmp_path / "run"
    tiny = ["train.steps=2", "train.batch_size=4", "train.uratio=1", "train.eval_batch_size=8"]
    assert main(["train", "cifar10-fixmatch-40", f"data.root={tmp_path}", "--out", str(run), "--quiet", *tiny]) == 0
    out = capsys.readouterr().out
    assert "cifar10: 40 labeled, 60 unlabeled, 0 validation, 3 test images" in out  # USB: labeled join the pool
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["split"] == {"labeled": 40, "unlabeled": 60, "val": 0, "test": 3}
    assert saved["best"] is None and saved["final"]["n"] == 3

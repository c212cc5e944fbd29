"""Standard benchmarks read through ``torchvision.datasets``, so their usual on-disk layouts load.

Each loader decodes every split once into an in-memory ``ImageSet`` (see ``base.py``), or with
``data.cache=disk`` (``auto``: a set larger than memory) into the decoded-image cache on disk
(``cache.py``), one file per split keyed by the dataset's files (paths, sizes, mtimes), the image
size and, when resizing, torch's version. The raw arrays torchvision reads (CIFAR's pickles, SVHN's
.mat, MNIST's idx files: at most 1.9 GB with SVHN's extra) still pass through memory once per run,
since the labels come with them; they are resized into the cache a chunk at a time and then freed,
and only the mapped cache stays. STL-10's 100k unlabeled images (2.8 GB) are read from their binary
file through a memory map in disk mode, so they never pass through memory whole.

Checksums: torchvision md5-hashes the extracted CIFAR, SVHN and STL-10 files before every load.
Unless downloading, the subclasses below accept those files by presence instead: hashing STL-10's
2.6 GB on each run is slow, and a truncated or damaged file still fails to parse and is reported as
a ``UserError``. With ``data.download=true`` torchvision's own checks apply unchanged, so files
that fail them are fetched again and downloads are verified.

Without ``data.root`` a dataset lives in the cache (``$TRUSTMATCH_CACHE`` or
``~/.cache/trustmatch``, one folder per dataset), so ``data.download=true`` alone is enough.
Fashion-MNIST first looks in Debian's ``dataset-fashion-mnist`` folder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import zlib
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.transforms.v2 import functional as TF

from trustmatch.config import DataConfig
from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_bytes
from trustmatch.data.cache import MappedImages, cache_dir, cache_name, decoded_dir, open_cache, source_key, use_disk
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
RESIZE_CHUNK = 4096  # images resized per call: bounds the float scratch memory on 100k-image sets

D = TypeVar("D", bound=tvd.VisionDataset)


__all__ = ["cache_dir"]  # re-exported: where downloads, unpacked copies and decoded images go

Raw = torch.Tensor | np.ndarray  # a split's raw uint8 images [N, C, H, W] (a tensor, or a memory map)


def _root(cfg: DataConfig, name: str) -> Path:
    return Path(cfg.root).expanduser() if cfg.root else cache_dir() / name


FILTERS = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}


def _resize(images: torch.Tensor, size: int | None, interpolation: str | None = None) -> torch.Tensor:
    if size is None or images.shape[-2:] == (size, size):
        return images
    return torch.cat([_resize_chunk(chunk, size, interpolation) for chunk in images.split(RESIZE_CHUNK)])


class _Store:
    """A dataset's splits in the decoded-image cache (``data.cache=disk``)."""

    def __init__(self, cfg: DataConfig, name: str, root: Path, files: list[Path]) -> None:
        self.folder, self.name, self.root, self.files = decoded_dir(cfg), name, root.expanduser().resolve(), files
        self.interpolation = cfg.interpolation

    def images(self, role: str, raw: Raw, size: int | None) -> MappedImages:
        """``raw`` resized to ``size`` (None: as is) in the cache, a :data:`RESIZE_CHUNK` at a time."""
        n, channels, height, width = raw.shape
        shape = (n, channels, size or height, size or width)
        resizing = size is not None and (height, width) != (size, size)
        # bilinear keeps the key it had before the filter was a choice (caches built then stay valid)
        filters = () if not resizing or self.interpolation in (None, "bilinear") else (self.interpolation,)
        key = source_key(self.files, self.name, role, shape, raw.shape, torch.__version__ if resizing else "", *filters)
        name = cache_name(self.name, role, f"{shape[-1]}px", str(self.root))

        def fill(out: np.ndarray) -> dict[str, object]:
            for start in range(0, n, RESIZE_CHUNK):
                chunk = raw[start : start + RESIZE_CHUNK]
                if isinstance(chunk, np.ndarray):  # a read-only memory map: a writable copy, same layout
                    chunk = torch.from_numpy(np.array(chunk, order="K"))
                resized = _resize_chunk(chunk, size, self.interpolation) if resizing else chunk
                out[start : start + len(chunk)] = resized.numpy()
            return {}

        array, _ = open_cache(self.folder, name, key, shape, fill, f"{self.name} {role} in {self.root}")
        return MappedImages((array,))


def _resize_chunk(chunk: torch.Tensor, size: int | None, interpolation: str | None = None) -> torch.Tensor:
    """``data.interpolation`` (None: bilinear), antialiased when shrinking, as PIL."""
    if size is None:
        return chunk
    return TF.resize(chunk, [size, size], FILTERS[interpolation or "bilinear"], antialias=True)


def _labels(labels: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)  # SVHN squeezes one label to 0-d


def _image_set(
    images: Raw,
    labels: torch.Tensor | np.ndarray | list[int],
    size: int | None,
    store: _Store | None = None,
    role: str = "",
    interpolation: str | None = None,
) -> ImageSet:
    if store is not None:
        return ImageSet(store.images(role, images, size), _labels(labels))
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return ImageSet(_resize(images, size, interpolation).contiguous(), _labels(labels))


def _decoded_bytes(size: int | None, *splits: Raw | None) -> int:
    """Bytes of the splits once resized to ``size`` (None: as they are)."""
    total = 0
    for raw in splits:
        if raw is not None:
            n, channels, height, width = raw.shape
            total += n * channels * (size * size if size else height * width)
    return total


def _store(cfg: DataConfig, name: str, root: Path, files: list[Path], *splits: Raw | None) -> _Store | None:
    """Where the splits go: the disk cache (a ``_Store``) or memory (None), by ``data.cache``."""
    return _Store(cfg, name, root, files) if use_disk(cfg, _decoded_bytes(cfg.image_size, *splits)) else None


def _nhwc(array: np.ndarray) -> torch.Tensor:
    """NHWC numpy -> NCHW tensor (torchvision's CIFAR ``.data`` is an NHWC view of NCHW memory: no copy)."""
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def _require(cfg: DataConfig, name: str, files: list[Path], root: Path, layout: str, extra_fix: str = "") -> None:
    """Unless downloading, report the first missing file in one line, with the ways to provide it."""
    missing = None if cfg.download else next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise UserError(
            f"{name}: {missing} not found (looked in {root}); pass data.root=<folder holding {layout}>, "
            f"or data.download=true to fetch it{extra_fix}"
        )


def _open(name: str, cls: type[D], root: Path, download: bool, **kwargs: Any) -> D:
    """Construct a torchvision dataset, turning its read or download failure into one line."""
    try:
        return cls(str(root), download=download, **kwargs)
    except ImportError as e:
        raise UserError(f"{name}: reading it needs the {e.name} package: pip install {e.name}") from None
    except MemoryError:
        raise
    except Exception as e:  # torchvision, pickle and scipy raise many types on a damaged file
        action = "download or read" if download else "read"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(
            f"{name}: could not {action} the files in {root} ({reason}); replace them with intact copies"
            + ("" if download else " or pass data.download=true")
        ) from None


class _PresenceChecked:
    """Accepts extracted files by presence instead of md5 unless downloading (see the module docstring)."""

    root: str

    def __init__(self, *args: Any, download: bool = False, **kwargs: Any) -> None:
        self._verify_md5 = download  # set first: torchvision checks inside its __init__
        super().__init__(*args, download=download, **kwargs)

    @classmethod
    def required(cls, root: Path) -> list[Path]:
        raise NotImplementedError

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()  # type: ignore[misc]
        return all(f.is_file() for f in self.required(Path(self.root)))


class _CIFAR10(_PresenceChecked, tvd.CIFAR10):
    meta = {**tvd.CIFAR10.meta, "md5": None}  # hashed by _load_meta, outside _check_integrity

    @classmethod
    def required(cls, root: Path) -> list[Path]:
        base = root / cls.base_folder
        return [base / f for f, _ in cls.train_list + cls.test_list] + [base / cls.meta["filename"]]


class _CIFAR100(_CIFAR10, tvd.CIFAR100):
    meta = {**tvd.CIFAR100.meta, "md5": None}


class _SVHN(_PresenceChecked, tvd.SVHN):
    @classmethod
    def required(cls, root: Path) -> list[Path]:
        return [root / cls.split_list[split][1] for split in ("train", "test")]


class _STL10(_PresenceChecked, tvd.STL10):
    @classmethod
    def required(cls, root: Path) -> list[Path]:
        base = root / cls.base_folder
        return [base / f for f, _ in cls.train_list + cls.test_list] + [base / cls.class_names_file]


def _cifar(
    cfg: DataConfig, name: str, cls: type[_CIFAR10], mean: tuple[float, ...], std: tuple[float, ...]
) -> SourceData:
    root = _root(cfg, name)
    _require(cfg, name, cls.required(root), root, f"{cls.base_folder}/ (torchvision's layout)")
    train, test = (_open(name, cls, root, cfg.download, train=flag) for flag in (True, False))
    raw_train, raw_test = _nhwc(train.data), _nhwc(test.data)
    store = _store(cfg, name, root, cls.required(root), raw_train, raw_test)
    return SourceData(
        train=_image_set(raw_train, train.targets, cfg.image_size, store, "train", cfg.interpolation),
        test=_image_set(raw_test, test.targets, cfg.image_size, store, "test", cfg.interpolation),
        classes=list(train.classes),
        mean=mean,
        std=std,
        hflip=True,
        info={"source": str(root / cls.base_folder)},
    )


@DATASETS.register("cifar10")
def load_cifar10(cfg: DataConfig) -> SourceData:
    return _cifar(cfg, "cifar10", _CIFAR10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


@DATASETS.register("cifar100")
def load_cifar100(cfg: DataConfig) -> SourceData:
    return _cifar(cfg, "cifar100", _CIFAR100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


@DATASETS.register("svhn")
def load_svhn(cfg: DataConfig) -> SourceData:
    """SVHN train and test; ``extra_32x32.mat``, when present, joins the training pool (as in USB)."""
    root = _root(cfg, "svhn")
    _require(cfg, "svhn", _SVHN.required(root), root, "train_32x32.mat and test_32x32.mat (torchvision's layout)")
    splits = ["train", "test"] + (["extra"] if (root / _SVHN.split_list["extra"][1]).is_file() else [])
    sets = {s: _open("svhn", _SVHN, root, cfg.download, split=s) for s in splits}
    pool = [sets["train"]] + ([sets["extra"]] if "extra" in sets else [])
    raw_train, raw_test = torch.from_numpy(np.concatenate([d.data for d in pool])), torch.from_numpy(sets["test"].data)
    files = [root / _SVHN.split_list[s][1] for s in splits]
    store = _store(cfg, "svhn", root, files, raw_train, raw_test)
    return SourceData(
        train=_image_set(
            raw_train, np.concatenate([d.labels for d in pool]), cfg.image_size, store, "train", cfg.interpolation
        ),
        test=_image_set(raw_test, sets["test"].labels, cfg.image_size, store, "test", cfg.interpolation),
        classes=[str(d) for d in range(10)],
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.198, 0.201, 0.197),
        hflip=False,
        info={"source": str(root), "splits": "+".join(s for s in splits if s != "test")},
    )


@DATASETS.register("stl10")
def load_stl10(cfg: DataConfig) -> SourceData:
    """STL-10's 5k labeled train and 8k test images, and its 100k unlabeled ones as ``extra_unlabeled``."""
    root = _root(cfg, "stl10")
    _require(cfg, "stl10", _STL10.required(root), root, f"{_STL10.base_folder}/ (torchvision's layout)")
    train, test = (_open("stl10", _STL10, root, cfg.download, split=s) for s in ("train", "test"))
    raw_file = root / _STL10.base_folder / "unlabeled_X.bin"
    mapped = _stl10_unlabeled(raw_file)  # a view of the file: nothing read yet
    store = _store(cfg, "stl10", root, _STL10.required(root), train.data, test.data, mapped)
    # on disk: copied (and resized) from the mapped file a chunk at a time; in memory: torchvision's reader
    unlabeled_images: Raw = (
        mapped
        if store is not None and mapped is not None
        else _open("stl10", _STL10, root, cfg.download, split="unlabeled").data
    )
    return SourceData(
        train=_image_set(train.data, train.labels, cfg.image_size, store, "train", cfg.interpolation),
        test=_image_set(test.data, test.labels, cfg.image_size, store, "test", cfg.interpolation),
        classes=list(train.classes),
        mean=(0.4467, 0.4398, 0.4066),
        std=(0.2603, 0.2566, 0.2713),
        hflip=True,
        extra_unlabeled=_image_set(
            unlabeled_images, [-1] * len(unlabeled_images), cfg.image_size, store, "unlabeled", cfg.interpolation
        ),
        info={"source": str(root / _STL10.base_folder)},
    )


def _stl10_unlabeled(path: Path) -> np.ndarray | None:
    """STL-10's unlabeled images [N, 3, 96, 96] mapped from their file, laid out as torchvision reads
    them (column-major images: the last two axes swapped); None if the file is missing or not whole."""
    item = 3 * 96 * 96
    if not path.is_file() or path.stat().st_size == 0 or path.stat().st_size % item:
        return None
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    return np.transpose(raw, (0, 1, 3, 2))


def _idx_names(cls: type[tvd.MNIST]) -> list[str]:
    """The four gzip names torchvision knows for this dataset (``train-images-idx3-ubyte.gz`` ...)."""
    return [os.path.basename(url) for url, _ in cls.resources]


def _unpack_flat(source: Path, cls: type[tvd.MNIST], name: str) -> Path:
    """A cache root in torchvision's layout holding the decompressed copies of ``source``'s gzip files.

    Each file is decompressed once and reused while its source's mtime is unchanged.
    """
    key = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:16]
    root = cache_dir() / name / "unpacked" / key
    raw = root / cls.__name__ / "raw"
    for gz_name in _idx_names(cls):
        gz, target = source / gz_name, raw / gz_name.removesuffix(".gz")
        try:
            if not target.is_file() or target.stat().st_mtime_ns != gz.stat().st_mtime_ns:
                _gunzip(gz, target)
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise UserError(f"{name}: cannot decompress {gz} ({e}); replace it with an intact copy") from None
        except OSError as e:
            raise UserError(
                f"{name}: cannot unpack {gz} into {raw} ({e}); set TRUSTMATCH_CACHE to a writable folder"
            ) from None
    return root


def _gunzip(gz: Path, target: Path) -> None:
    """Decompress atomically, so a concurrent run never reads half a file.

    The copy then takes the source's mtime, which is how a later run knows it is current.
    """

    def write(dst: IO[bytes]) -> None:
        with gzip.open(gz, "rb") as src:
            shutil.copyfileobj(src, dst, length=1 << 20)

    atomic_write_bytes(target, write)
    stat = gz.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _idx_root(cfg: DataConfig, name: str, cls: type[tvd.MNIST]) -> tuple[Path, Path]:
    """(folder the files come from, root to hand torchvision).

    A root in torchvision's layout (``<root>/<Class>/raw/``) is used as is; one holding the four
    ``.gz`` files flat (Debian's package, the original download) is unpacked into the cache.
    """
    source = _root(cfg, name)
    if not cfg.root and name == "fashionmnist" and _has_all(DEBIAN_FASHION_MNIST, _idx_names(cls)):
        source = DEBIAN_FASHION_MNIST
    raw = source / cls.__name__ / "raw"
    if not _has_all(raw, [n.removesuffix(".gz") for n in _idx_names(cls)]) and _has_all(source, _idx_names(cls)):
        return source, _unpack_flat(source, cls, name)
    return source, source


def _has_all(folder: Path, names: list[str]) -> bool:
    return all((folder / n).is_file() for n in names)


def _mnist_like(cfg: DataConfig, name: str, cls: type[tvd.MNIST], mean: float, std: float, hflip: bool) -> SourceData:
    source, root = _idx_root(cfg, name, cls)
    raw = root / cls.__name__ / "raw"
    fix = ", or apt-get install dataset-fashion-mnist" if name == "fashionmnist" else ""
    layout = f"{cls.__name__}/raw/ (torchvision's layout) or the four {{train,t10k}}-*-ubyte.gz files"
    _require(cfg, name, [raw / n.removesuffix(".gz") for n in _idx_names(cls)], source, layout, fix)
    train, test = (_open(name, cls, root, cfg.download, train=flag) for flag in (True, False))
    raw_train, raw_test = train.data.unsqueeze(1), test.data.unsqueeze(1)
    files = [raw / n.removesuffix(".gz") for n in _idx_names(cls)]
    store = _store(cfg, name, root, files, raw_train, raw_test)
    return SourceData(
        train=_image_set(raw_train, train.targets, cfg.image_size, store, "train", cfg.interpolation),
        test=_image_set(raw_test, test.targets, cfg.image_size, store, "test", cfg.interpolation),
        classes=list(train.classes),
        mean=(mean,),
        std=(std,),
        hflip=hflip,
        info={"source": str(source)},
    )


@DATASETS.register("mnist")
def load_mnist(cfg: DataConfig) -> SourceData:
    return _mnist_like(cfg, "mnist", tvd.MNIST, 0.1307, 0.3081, hflip=False)


@DATASETS.register("fashionmnist")
def load_fashionmnist(cfg: DataConfig) -> SourceData:
    return _mnist_like(cfg, "fashionmnist", tvd.FashionMNIST, 0.2860, 0.3530, hflip=True)

"""The decoded-image cache on disk (``data.cache=disk``): built once, reused, rebuilt on change, atomic,
one builder among concurrent processes, and read exactly like the in-memory path (same images, labels,
splits and bit-identical training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_data_torchvision import _write_cifar10, _write_idx, _write_stl10
from trustmatch.config import DataConfig, load_config
from trustmatch.core.errors import UserError
from trustmatch.data import cache, folders, load_ssl_data
from trustmatch.data import torchvision_sets as tvs
from trustmatch.data.cache import MappedImages, open_cache
from trustmatch.run.trainer import Trainer

RNG = np.random.default_rng(7)


def _write_folders(root: Path, classes: int = 3, per_class: int = 12, unlabeled: int = 9) -> Path:
    """Class folders of small random PNGs (sizes vary), an unlabeled folder and a test folder."""
    for c in range(classes):
        for i in range(per_class):
            _png(root / "train" / f"class{c}" / f"{i:03d}.png", 20 + i % 5)
            if i < 3:
                _png(root / "test" / f"class{c}" / f"{i}.png", 24)
    for i in range(unlabeled):
        _png(root / "unlabeled" / f"{i}.png", 18 + i)
    return root


def _png(path: Path, side: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (side, side + 3, 3), dtype=np.uint8)).save(path)


def _cfg(root: Path, mode: str, image_size: int = 16) -> DataConfig:
    return DataConfig(
        name="folder",
        root=str(root / "train"),
        unlabeled_dir=str(root / "unlabeled"),
        test_dir=str(root / "test"),
        cache=mode,
        cache_dir=str(root / "cache"),
        labels_per_class=2,
        val_per_class=2,
        image_size=image_size,
    )


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path ``folders.decode_image`` is called on."""
    seen: list[Path] = []
    original = folders.decode_image

    def counting(path: Path, *args: object) -> np.ndarray:  # (size, mode, interpolation) as folders passes them
        seen.append(path)
        return original(path, *args)

    monkeypatch.setattr(folders, "decode_image", counting)
    return seen


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "cache").glob("*.u8"))


def test_disk_path_gives_the_memory_paths_images_labels_splits_and_stats(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    memory, disk = (load_ssl_data(_cfg(root, mode), seed=3) for mode in ("memory", "disk"))
    for split in ("labeled", "unlabeled", "val", "test"):
        a, b = getattr(memory, split), getattr(disk, split)
        assert isinstance(a.images, torch.Tensor) and isinstance(b.images, MappedImages)
        assert b.images.shape == a.images.shape and len(b.images) == len(a.images)
        assert torch.equal(b.images[:], a.images), split
        assert torch.equal(b.labels, a.labels) and b.paths == a.paths
        index = torch.randint(0, len(a.images), (50,))  # random, with repeats
        assert torch.equal(b.images[index], a.images[index])
    assert (memory.mean, memory.std, memory.summary()) == (disk.mean, disk.std, disk.summary())
    assert len(_cache_files(root)) == 3  # labeled, test, unlabeled


def test_split_keeps_an_index_into_the_mapped_file_and_copies_no_pixel(tmp_path: Path) -> None:
    root = _write_folders(tmp_path)
    source = folders.load_folder(_cfg(root, "disk"))
    data = load_ssl_data(_cfg(root, "disk"), seed=0)
    (pool,) = source.train.images.parts
    assert isinstance(pool, np.memmap) and not pool.flags.writeable
    for split in ("labeled", "val", "unlabeled"):
        images = getattr(data, split).images
        assert isinstance(images, MappedImages)
        assert all(isinstance(p, np.memmap) for p in images.parts)
        assert images.files[0] == str(pool.filename)  # the pool's file, indexed: nothing copied
        assert images.index is not None and images.index.nbytes == 8 * len(images)
    assert len(data.unlabeled.images.parts) == 2  # the pool's file + the unlabeled folder's file


def test_cache_is_built_once_and_reused_without_decoding(tmp_path: Path, decodes: list[Path]) -> None:
    root = _write_folders(tmp_path)
    first = folders.load_folder(_cfg(root, "disk"))
    assert len(decodes) == 36 + 9 + 9
    stamps = {p: p.stat().st_mtime_ns for p in _cache_files(root)}
    decodes.clear()
    second = folders.load_folder(_cfg(root, "disk"))
    assert decodes == []  # mapped, not decoded
    assert {p: p.stat().st_mtime_ns for p in _cache_files(root)} == stamps
    assert torch.equal(first.train.images[:], second.train.images[:])
    assert (first.mean, first.std) == (second.mean, second.std)  # from the header's histogram


def test_cache_is_rebuilt_when_a_file_changes_or_is_added(tmp_path: Path, decodes: list[Path]) -> None:
    root = _write_folders(tmp_path)
    folders.load_folder(_cfg(root, "disk"))
    changed = root / "train" / "class1" / "004.png"
    Image.new("RGB", (30, 30), (9, 99, 199)).save(changed)
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))  # a new mtime even on a coarse clock
    decodes.clear()
    src = folders.load_folder(_cfg(root, "disk"))
    assert len(decodes) == 36  # the labeled folder only: test and unlabeled files are unchanged
    i = src.train.paths.index(str(changed))
    assert src.train.images[i, :, 8, 8].tolist() == [9, 99, 199]
    _png(root / "unlabeled" / "new.png", 20)
    decodes.clear()
    src = folders.load_folder(_cfg(root, "disk"))
    assert len(decodes) == 10 and len(src.extra_unlabeled.images) == 10
    assert len(_cache_files(root)) == 3  # rebuilt in place, not beside the stale one
    decodes.clear()
    folders.load_folder(_cfg(root, "disk", image_size=20))  # another size: its own files
    assert len(decodes) == 36 + 9 + 10 and len(_cache_files(root)) == 6


CRASH = """
import os, sys
from trustmatch.data import folders
from tests_helper import cfg
calls = []
original = folders.decode_image
def dying(path, *args):
    calls.append(path)
    if len(calls) == 20:
        os._exit(9)  # a kill mid-build: no cleanup runs
    return original(path, *args)
folders.decode_image = dying
folders.load_folder(cfg)
"""


@pytest.mark.slow
def test_crash_mid_build_leaves_no_trusted_cache(tmp_path: Path, decodes: list[Path]) -> None:
    root = _write_folders(tmp_path)
    helper = tmp_path / "tests_helper.py"
    helper.write_text(f"from trustmatch.config import DataConfig\ncfg = DataConfig(**{_cfg_dict(root)!r})\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", CRASH], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr
    assert _cache_files(root) == []  # nothing a later run would trust
    leftovers = list((root / "cache").glob(".*.tmp"))
    assert len(leftovers) == 1
    src = folders.load_folder(_cfg(root, "disk"))  # rebuilds, and clears the dead build's temp file
    assert len(decodes) == 54 and not list((root / "cache").glob(".*.tmp"))
    assert torch.equal(src.train.images[:], folders.load_folder(_cfg(root, "memory")).train.images)


def _cfg_dict(root: Path) -> dict[str, object]:
    cfg = _cfg(root, "disk")
    keys = ("name", "root", "unlabeled_dir", "test_dir", "cache", "cache_dir", "image_size")
    return {k: getattr(cfg, k) for k in keys}


def test_an_exception_mid_build_or_a_damaged_file_is_never_trusted(tmp_path: Path) -> None:
    folder = tmp_path / "cache"

    def failing(out: np.ndarray) -> dict[str, object]:
        out[:2] = 1
        raise RuntimeError("decoder failed")

    with pytest.raises(RuntimeError):
        open_cache(folder, "x", "key", (4, 1, 2, 2), failing)
    assert list(folder.glob("x.u8*")) == [] and not list(folder.glob(".*.tmp"))

    def fill(out: np.ndarray) -> dict[str, object]:
        out[:] = np.arange(16, dtype=np.uint8).reshape(out.shape)
        return {"n": 4}

    array, info = open_cache(folder, "x", "key", (4, 1, 2, 2), fill)
    assert info == {"n": 4} and array.ravel().tolist() == list(range(16))
    path = folder / "x.u8"
    with open(path, "r+b") as f:  # truncated: the size no longer matches the header
        f.truncate(path.stat().st_size - 1)
    array, _ = open_cache(folder, "x", "key", (4, 1, 2, 2), lambda out: {**fill(out), "rebuilt": True})
    assert array.ravel().tolist() == list(range(16))
    assert open_cache(folder, "x", "key", (4, 1, 2, 2), lambda out: pytest.fail("reused"))[1]["rebuilt"]
    # another key (the source changed) or another shape: rebuilt
    assert open_cache(folder, "x", "other", (4, 1, 2, 2), lambda out: {**fill(out), "k": 2})[1]["k"] == 2
    path.write_bytes(b"garbage")
    assert open_cache(folder, "x", "other", (4, 1, 2, 2), lambda out: {**fill(out), "k": 3})[1]["k"] == 3


def test_one_builder_among_concurrent_loaders(tmp_path: Path) -> None:
    """Threads contend for the flock like processes (each opens the lock file itself)."""
    builds, results = [], []

    def fill(out: np.ndarray) -> dict[str, object]:
        builds.append(1)
        time.sleep(0.3)
        out[:] = 7
        return {}

    def load() -> None:
        array, _ = open_cache(tmp_path, "shared", "key", (8, 3, 4, 4), fill)
        results.append(int(array.sum()))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1] and results == [8 * 3 * 4 * 4 * 7] * 4


def test_mapped_images_index_like_a_tensor(tmp_path: Path) -> None:
    a = torch.from_numpy(RNG.integers(0, 256, (10, 3, 4, 5), dtype=np.uint8))
    b = torch.from_numpy(RNG.integers(0, 256, (6, 3, 4, 5), dtype=np.uint8))
    path = tmp_path / "a.u8"
    a.numpy().tofile(path)
    mapped = MappedImages((np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(a.shape)),))
    assert mapped.shape == a.shape and mapped.dtype == torch.uint8 and len(mapped) == 10
    for key in [torch.tensor([3, 1, 1, 9, 0]), torch.tensor([], dtype=torch.long), [2, -1], slice(2, 9, 3), 4, -2]:
        assert torch.equal(mapped[key], a[key]), key
    mask = torch.arange(10) % 3 == 0
    assert torch.equal(mapped[mask], a[mask])
    assert torch.equal(mapped[2, 1, 3, 4], a[2, 1, 3, 4]) and torch.equal(mapped[:, 0], a[:, 0])
    with pytest.raises(IndexError):
        mapped[torch.tensor([10])]
    both = mapped.subset(torch.tensor([9, 0, 4])).cat(MappedImages((b.numpy(),)).subset(torch.tensor([5, 1])))
    reference = torch.cat([a[[9, 0, 4]], b[[5, 1]]])
    assert torch.equal(both[:], reference)
    index = torch.tensor([4, 0, 3, 3, 1])
    assert torch.equal(both.subset(index)[:], reference[index])
    again = both.cat(mapped.subset(torch.tensor([7])))  # the same array again: one part, not two
    assert len(again.parts) == 2 and torch.equal(again[:], torch.cat([reference, a[[7]]]))


def test_auto_goes_to_disk_above_half_the_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_folders(tmp_path)
    decoded = (36 + 9 + 9) * 3 * 16 * 16
    monkeypatch.setattr(cache, "available_memory", lambda: 2 * decoded + 2)
    assert isinstance(folders.load_folder(_cfg(root, "auto")).train.images, torch.Tensor)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine would hold two copies
    assert isinstance(folders.load_folder(_cfg(root, "auto")).train.images, MappedImages)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(cache, "available_memory", lambda: 2 * decoded - 2)
    assert isinstance(folders.load_folder(_cfg(root, "auto")).train.images, MappedImages)
    monkeypatch.undo()
    assert cache.available_memory() > 0  # the real one: /proc/meminfo and the cgroup limit here


@pytest.mark.parametrize("size", [None, 20])
def test_torchvision_sets_on_disk_equal_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    monkeypatch.setenv("TRUSTMATCH_CACHE", str(tmp_path / "cache"))
    _write_cifar10(tmp_path / "cifar")
    _write_stl10(tmp_path / "stl")
    _write_idx(tmp_path / "mnist", gz=True)
    for name, folder in (("cifar10", "cifar"), ("stl10", "stl"), ("fashionmnist", "mnist")):
        memory, disk = (
            tvs.DATASETS.get(name)(DataConfig(name=name, root=str(tmp_path / folder), image_size=size, cache=m))
            for m in ("memory", "disk")
        )
        for split in ("train", "test", "extra_unlabeled"):
            a, b = getattr(memory, split), getattr(disk, split)
            if a is None:
                assert b is None
                continue
            assert isinstance(b.images, MappedImages), (name, split)
            assert torch.equal(b.images[:], a.images) and torch.equal(b.labels, a.labels), (name, split)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.u8"))) == 7  # stl10: train, test, unlabeled


def test_config_keys_are_checked() -> None:
    with pytest.raises(UserError, match="data.cache"):
        load_config("digits-fixmatch", ["data.cache=ram"])
    with pytest.raises(UserError, match="digits is embedded"):
        load_config("digits-fixmatch", ["data.cache=disk"])
    assert load_config("digits-fixmatch", ["data.cache=memory"]).data.cache == "memory"


TINY = ["train.steps=4", "train.eval_every=2", "train.log_every=2", "train.batch_size=6", "train.uratio=2"]
TIME_KEYS = {"elapsed", "elapsed_s", "wall_time_s"}


def _without_time(value: object) -> object:
    if isinstance(value, dict):
        return {k: _without_time(v) for k, v in value.items() if k not in TIME_KEYS and k != "config"}
    if isinstance(value, list):
        return [_without_time(v) for v in value]
    return value


@pytest.mark.parametrize("calibratemix", ["off", "efficient"])
@pytest.mark.slow
def test_training_on_disk_is_bit_identical_to_memory(tmp_path: Path, calibratemix: str) -> None:
    root = _write_folders(tmp_path)
    data = [
        "data.name=folder",
        f"data.root={root / 'train'}",
        f"data.unlabeled_dir={root / 'unlabeled'}",
        f"data.cache_dir={root / 'cache'}",
        "data.image_size=16",
        "data.labels_per_class=2",
        "data.val_per_class=2",
    ] + ([f"calibratemix.mode={calibratemix}", "calibratemix.warmup=0"] if calibratemix != "off" else [])
    metrics = {}
    for mode in ("memory", "disk"):
        cfg = load_config("digits-fixmatch", [*TINY, *data, f"data.cache={mode}", "train.threads=1"])
        Trainer(cfg, tmp_path / mode, progress=False).fit()
        metrics[mode] = json.loads((tmp_path / mode / "metrics.json").read_text())
    assert metrics["disk"]["final"]["accuracy"] >= 0
    assert _without_time(metrics["disk"]) == _without_time(metrics["memory"])
    if calibratemix != "off":
        for name in ("datamap_labeled.csv", "datamap_unlabeled.csv"):
            assert (tmp_path / "disk" / name).read_text() == (tmp_path / "memory" / name).read_text()


def test_an_unwritable_cache_folder_is_one_line(tmp_path: Path) -> None:
    root = _write_folders(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should go")
    cfg = _cfg(root, "disk")
    cfg.cache_dir = str(blocker / "decoded")
    with pytest.raises(UserError, match=r"cannot write the decoded-image cache in .*blocker.*data.cache=memory"):
        folders.load_folder(cfg)


def test_a_rebuild_removes_the_outdated_cache_first(tmp_path: Path) -> None:
    """A rebuild needs the cache's size once, not twice: the outdated file goes before the new one is written."""
    seen = []

    def fill(array: np.ndarray) -> dict:
        seen.append(sorted(p.name for p in tmp_path.glob("*.u8")))
        array[:] = 7
        return {}

    open_cache(tmp_path, "x", "key-1", (2, 3), fill)
    open_cache(tmp_path, "x", "key-2", (2, 3), fill)
    assert seen == [[], []]

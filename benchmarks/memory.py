"""Data larger than memory: the same short training from memory and from the decoded-image cache on disk.

    python benchmarks/memory.py       # ~12 min on 2 CPU cores (3 of them writing 222k JPEGs); /tmp, removed after
    python benchmarks/memory.py --unlabeled 4000 --steps 20 --seg-images 40 200 --tag smoke

Writes a class-folder dataset of JPEGs (four copies of one scikit-learn digit class per image,
upscaled, placed at random, coloured, with noise: learnable by the small CNN in a few hundred steps)
whose decoded size is several times what a disk-cache run holds in anonymous memory, then trains
FixMatch on it in separate processes:

- ``memory``: ``data.cache=memory``, every image decoded into RAM (the split copies the subsets);
- ``disk``: ``data.cache=disk``, a fresh cache: decoded once into the memory-mapped file, then trained;
- ``reuse``: the cache again in a new process, its pages dropped from the page cache first
  (``posix_fadvise(DONTNEED)``): no decoding, and the gather cost when the rows come from the disk.

Memory is **peak RssAnon**: the parent reads ``/proc/<pid>/status`` of the child every 10 ms (spikes
shorter than that can be missed). RssAnon counts the private, anonymous pages (heap, tensors, numpy
arrays): what a run must own. The mapped cache shows as RssFile instead: page cache, shared by every
process on the machine and evicted under pressure. VmHWM (the peak of RssAnon + RssFile + RssShmem)
is reported too, but it counts the mapped file, so it is not the figure to compare.

Times (median of ``--repeats``): ``gather`` is ``images[idx]`` alone for one unlabeled batch (random
indices), ``batch`` is the trainer's ``next_batch`` (gather + weak and strong views), ``step`` a whole
training step. Both training runs use the same data, indices and seeds on the CPU, so their
``metrics.json`` numbers must be bit-identical: the benchmark checks it.

Segmentation (``--seg-images``): a folder dataset of 320 x 240 JPEG images and PNG masks, trained a
few UniMatch steps with ``data.workers=2`` at two sizes of the unlabeled folder; images are decoded
per batch, so the peak anonymous memory should not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TIME_KEYS = {"elapsed", "elapsed_s", "wall_time_s"}
CLASSES = 10


# ------------------------------------------------------------------------------------------------ data


def _glyphs() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target


def _render(args: tuple[list[tuple[str, int, int]], int]) -> int:
    """Write each (path, class, seed) as a JPEG of side ``size``: copies of one digit, coloured, placed, noisy."""
    from PIL import Image

    jobs, size = args
    glyphs, targets = _glyphs()
    test_pool = np.arange(len(targets)) % 5 == 0  # test images draw from other handwriting samples
    for path, label, seed in jobs:
        rng = np.random.default_rng(seed)
        pool = np.flatnonzero((targets == label) & (test_pool == path.startswith("test:")))
        alpha = np.zeros((size, size), np.float32)
        for _ in range(4):  # a few copies of the class's digit: local features the small CNN learns quickly
            glyph = glyphs[rng.choice(pool)]
            side = int(rng.integers(size * 3 // 16, size * 9 // 32))  # within its receptive field (18 px)
            mask = np.asarray(Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
            top, left = rng.integers(0, size - side + 1, 2)
            region = alpha[top : top + side, left : left + side]
            np.maximum(region, mask / 255.0, out=region)
        bg, fg = rng.integers(0, 100, 3), rng.integers(150, 256, 3)  # a light digit on a dark ground
        pixels = bg + alpha[..., None] * (fg - bg) + rng.normal(0, 8, (size, size, 3))
        out = Path(path.removeprefix("test:"))
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, quality=90)
    return len(jobs)


def write_classification(root: Path, size: int, per_class: int, test_per_class: int, unlabeled: int) -> int:
    """``root/{train,test}/<class>/*.jpg`` and ``root/unlabeled/<nnn>/*.jpg``; returns the number of files."""
    jobs: list[tuple[str, int, int]] = []
    for c in range(CLASSES):
        jobs += [
            (str(root / "train" / f"digit{c}" / f"{i:05d}.jpg"), c, 1_000_000 + c * 10_000 + i)
            for i in range(per_class)
        ]
        jobs += [
            (f"test:{root / 'test' / f'digit{c}' / f'{i:05d}.jpg'}", c, 2_000_000 + c * 10_000 + i)
            for i in range(test_per_class)
        ]
    jobs += [(str(root / "unlabeled" / f"{i // 1000:03d}" / f"{i:06d}.jpg"), i % CLASSES, i) for i in range(unlabeled)]
    chunks = [(jobs[i : i + 2000], size) for i in range(0, len(jobs), 2000)]
    with multiprocessing.Pool(os.cpu_count() or 1) as pool:
        return sum(pool.map(_render, chunks))


def write_segmentation(root: Path, images: int, seed: int = 0) -> None:
    """``root/images``, ``root/masks`` (PNG ids: background and a few class-coloured rectangles), ``classes.txt``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\nred\ngreen\nblue\n")
    colours = np.array([[90, 90, 90], [220, 40, 40], [40, 200, 40], [40, 40, 220]])
    for i in range(images):
        mask = np.zeros((240, 320), np.uint8)
        for _ in range(3):
            c, (h, w) = int(rng.integers(1, 4)), rng.integers(30, 110, 2)
            top, left = rng.integers(0, 240 - h), rng.integers(0, 320 - w)
            mask[top : top + h, left : left + w] = c
        pixels = colours[mask] + rng.normal(0, 20, (240, 320, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:05d}.jpg", quality=90)
        Image.fromarray(mask).save(root / "masks" / f"{i:05d}.png")


# ---------------------------------------------------------------------------------------------- child


def _status() -> dict[str, int]:
    """RssAnon, RssFile, VmHWM of this process in bytes."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _median_ms(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def _evict(files: list[str]) -> None:
    """Drop the files' clean pages from the page cache (only pages no process maps are dropped)."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trustmatch.config import load_config
    from trustmatch.data.cache import MappedImages
    from trustmatch.run.trainer import Trainer

    if spec["kind"] == "interleaved":
        return interleaved(spec)
    result: dict[str, Any] = {}
    start = time.perf_counter()
    trainer = Trainer(load_config(spec["base"], spec["overrides"]), Path(spec["out"]), progress=False)
    result["load_s"] = round(time.perf_counter() - start, 2)
    repeats, task = spec["repeats"], trainer.task
    if spec["kind"] == "classification":
        images = task.data.unlabeled.images
        result["images_type"] = type(images).__name__
        g = torch.Generator().manual_seed(0)
        batch = trainer.cfg.train.batch_size * trainer.cfg.train.uratio

        def gather() -> None:
            images[torch.randint(0, len(images), (batch,), generator=g)]

        if spec.get("evict") and isinstance(images, MappedImages):
            _evict(images.files)
            result["gather_evicted_ms"] = _median_ms(gather, repeats)
        if spec.get("fit"):
            start = time.perf_counter()
            metrics = trainer.fit()
            result["fit_s"] = round(time.perf_counter() - start, 2)
            result["metrics"] = metrics
        result["gather_ms"] = _median_ms(gather, repeats)
        result["batch_ms"] = _median_ms(trainer.next_batch, repeats)
    else:
        start = time.perf_counter()
        result["metrics"] = trainer.fit()
        result["fit_s"] = round(time.perf_counter() - start, 2)
    result["step_ms"] = _median_ms(trainer.train_step, repeats)
    result.update({f"end_{k}": v for k, v in _status().items()})
    return result


def interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """The disk cache against the same images in memory, in one process, timed in alternation.

    Two trainers of one config on the cache; the second's splits are then copied into memory
    tensors (``images[:]``), so both draw the same batches. Each round times each once (gather,
    next_batch, train_step), so machine noise hits both alike; ratios are medians of per-round ones.
    """
    import torch

    from trustmatch.config import load_config
    from trustmatch.run.trainer import Trainer

    cfg = load_config(spec["base"], spec["overrides"])
    disk, memory = (Trainer(cfg, Path(spec["out"]) / name, progress=False) for name in ("disk", "memory"))
    for split in ("labeled", "unlabeled", "val", "test"):
        data = getattr(memory.task.data, split)
        data.images = data.images[:]
    batch = cfg.train.batch_size * cfg.train.uratio
    times: dict[str, dict[str, list[float]]] = {n: {"gather": [], "batch": [], "step": []} for n in ("disk", "memory")}
    g = torch.Generator().manual_seed(0)
    for round_ in range(spec["warmup"] + spec["repeats"]):
        index = torch.randint(0, len(disk.task.data.unlabeled), (batch,), generator=g)
        for name, trainer in (("disk", disk), ("memory", memory)):
            images = trainer.task.data.unlabeled.images
            row = {
                "gather": _median_ms(lambda: [images[index] for _ in range(10)], 1) / 10,  # noqa: B023
                "batch": _median_ms(trainer.next_batch, 1),
                "step": _median_ms(trainer.train_step, 1),
            }
            if round_ >= spec["warmup"]:
                for key, value in row.items():
                    times[name][key].append(value)
    result: dict[str, Any] = {"images_type": type(disk.task.data.unlabeled.images).__name__}
    for key in ("gather", "batch", "step"):
        for name in ("disk", "memory"):
            result[f"{name}_{key}_ms"] = round(statistics.median(times[name][key]), 2)
        ratios = [d / m for d, m in zip(times["disk"][key], times["memory"][key])]
        result[f"{key}_disk_over_memory"] = round(statistics.median(ratios), 3)
    result.update({f"end_{k}": v for k, v in _status().items()})
    return result


def run_child(spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run ``spec`` in a fresh process, sampling its RssAnon every 10 ms; the child's result + the peaks."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)], stdout=out, stderr=out, env=env
        )
        peak = {"RssAnon": 0, "RssFile": 0}
        status = Path(f"/proc/{proc.pid}/status")

        def sample() -> None:
            while proc.poll() is None:
                try:
                    for line in status.read_text().splitlines():
                        key, _, rest = line.partition(":")
                        if key in peak:
                            peak[key] = max(peak[key], int(rest.split()[0]) * 1024)
                except (OSError, ValueError, IndexError):
                    pass
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        sampler.join()
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"child {spec['name']} failed (exit {proc.returncode}); its log {log}:\n{text[-3000:]}")
    result = json.loads(text.rsplit("RESULT ", 1)[1])
    result["peak_rss_anon"], result["peak_rss_file"] = peak["RssAnon"], peak["RssFile"]
    return result


def _without_time(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_time(v) for k, v in value.items() if k not in TIME_KEYS}
    if isinstance(value, list):
        return [_without_time(v) for v in value]
    return value


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=Path("/tmp/trustmatch-memory-bench"), help="data, cache, runs")
    p.add_argument("--size", type=int, default=64, help="image side, on disk and in training")
    p.add_argument("--unlabeled", type=int, default=220_000, help="images in the unlabeled folder (the bulk)")
    p.add_argument("--labels", type=int, default=100, help="data.labels_per_class")
    p.add_argument("--batch", type=int, default=16, help="train.batch_size")
    p.add_argument("--uratio", type=int, default=1, help="train.uratio")
    p.add_argument("--per-class", type=int, default=150, help="labeled pool per class")
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (median)")
    p.add_argument("--threads", type=int, default=2, help="train.threads")
    p.add_argument("--seg-images", type=int, nargs=2, default=[100, 1500], help="unlabeled folder sizes (segmentation)")
    p.add_argument("--seg-steps", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the generated data and the cache")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if args.child:
        result = child(json.loads(args.child))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    import torch

    from step_time import machine, write_json

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True)
    try:
        return _run(args, work, machine(torch.device("cpu")), write_json)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, host: dict[str, object], write_json: Any) -> int:
    data = work / "data"
    start = time.perf_counter()
    files = write_classification(data, args.size, args.per_class, args.test_per_class, args.unlabeled)
    generate_s = round(time.perf_counter() - start, 1)
    decoded = files * 3 * args.size**2
    print(f"wrote {files:,} JPEGs in {generate_s} s; decoded at {args.size} px: {_gb(decoded)}", flush=True)

    overrides = [
        "data.name=folder",
        f"data.root={data / 'train'}",
        f"data.test_dir={data / 'test'}",
        f"data.unlabeled_dir={data / 'unlabeled'}",
        f"data.image_size={args.size}",
        f"data.cache_dir={work / 'cache'}",
        f"data.labels_per_class={args.labels}",
        "data.val_per_class=5",
        "model.name=cnn",
        f"train.steps={args.steps}",
        f"train.eval_every={max(1, args.steps // 2)}",
        f"train.log_every={max(1, args.steps // 10)}",
        f"train.batch_size={args.batch}",
        f"train.uratio={args.uratio}",
        "train.lr=0.1",
        "train.eval_batch_size=256",
        f"train.threads={args.threads}",
        "seed=0",
    ]
    runs: dict[str, dict[str, Any]] = {}
    plan = [
        ("memory", "memory", {"fit": True}),
        ("disk", "disk", {"fit": True}),
        ("reuse", "disk", {"fit": False, "evict": True}),
    ]
    for name, mode, extra in plan:
        spec = {
            "name": name,
            "kind": "classification",
            "base": "digits-fixmatch",
            "overrides": [*overrides, f"data.cache={mode}"],
            "out": str(work / "runs" / name),
            "repeats": args.repeats,
            **extra,
        }
        print(f"run {name} (data.cache={mode}) ...", flush=True)
        runs[name] = r = run_child(spec, work / "logs" / f"{name}.log")
        print(
            f"  load {r['load_s']} s, peak RssAnon {_gb(r['peak_rss_anon'])} (RssFile {_gb(r['peak_rss_file'])}), "
            f"gather {r['gather_ms']} ms, batch {r['batch_ms']} ms, step {r['step_ms']} ms"
            + (f", gather after eviction {r['gather_evicted_ms']} ms" if "gather_evicted_ms" in r else "")
            + (f", final accuracy {r['metrics']['final']['accuracy']:.4f}" if "metrics" in r else ""),
            flush=True,
        )
    print("run interleaved timing (disk cache vs the same images copied into memory) ...", flush=True)
    timing = run_child(
        {
            "name": "interleaved",
            "kind": "interleaved",
            "base": "digits-fixmatch",
            "overrides": [*overrides, "data.cache=disk"],
            "out": str(work / "runs" / "interleaved"),
            "repeats": args.repeats,
            "warmup": 3,
        },
        work / "logs" / "interleaved.log",
    )
    print(
        "  disk / memory (median of per-round ratios): "
        + ", ".join(f"{k} {timing[f'{k}_disk_over_memory']}x" for k in ("gather", "batch", "step")),
        flush=True,
    )
    memory, disk = runs["memory"], runs["disk"]
    identical = _without_time(memory["metrics"]) == _without_time(disk["metrics"])
    print(f"metrics.json identical between memory and disk (time keys aside): {identical}", flush=True)

    seg = []
    for count in args.seg_images:
        root = work / f"seg{count}"
        start = time.perf_counter()
        write_segmentation(root / "labeled", 40, seed=1)
        write_segmentation(root / "test", 10, seed=2)
        write_segmentation(root / "unlabeled", count, seed=3)
        shutil.rmtree(root / "unlabeled" / "masks")
        seg_generate = round(time.perf_counter() - start, 1)
        spec = {
            "name": f"seg{count}",
            "kind": "segmentation",
            "base": "digitscenes-unimatch",
            "overrides": [
                "data.name=folder",
                f"data.root={root / 'labeled'}",
                f"data.unlabeled_dir={root / 'unlabeled' / 'images'}",
                f"data.test_dir={root / 'test'}",
                "data.crop_size=64",
                "data.workers=2",
                f"train.steps={args.seg_steps}",
                f"train.eval_every={args.seg_steps}",
                f"train.log_every={args.seg_steps}",
                "train.eval_batch_size=4",
                f"train.threads={args.threads}",
            ],
            "out": str(work / "runs" / f"seg{count}"),
            "repeats": max(5, args.repeats // 2),
        }
        print(f"run segmentation with {count} unlabeled images ...", flush=True)
        r = run_child(spec, work / "logs" / f"seg{count}.log")
        r["decoded_bytes"] = (40 + 10 + count) * 240 * 320 * 3 + (40 + 10) * 240 * 320
        r["generate_s"] = seg_generate
        r["unlabeled_images"] = count
        r.pop("metrics", None)
        seg.append(r)
        print(
            f"  peak RssAnon {_gb(r['peak_rss_anon'])} for {_gb(r['decoded_bytes'])} of decoded images, "
            f"step {r['step_ms']} ms",
            flush=True,
        )

    def row(r: dict[str, Any]) -> dict[str, Any]:
        keep = ("load_s", "fit_s", "gather_ms", "gather_evicted_ms", "batch_ms", "step_ms", "images_type")
        out = {k: r[k] for k in keep if k in r}
        out.update(
            peak_rss_anon_gib=round(r["peak_rss_anon"] / 2**30, 3),
            peak_rss_file_gib=round(r["peak_rss_file"] / 2**30, 3),
            end_vm_hwm_gib=round(r["end_VmHWM"] / 2**30, 3),
        )
        if "metrics" in r:
            out["final"] = {k: r["metrics"]["final"][k] for k in ("accuracy", "ece_15", "nll")}
            out["wall_time_s"] = r["metrics"]["wall_time_s"]
        return out

    summary = {
        "decoded_gib": round(decoded / 2**30, 3),
        "decoded_over_disk_peak_anon": round(decoded / disk["peak_rss_anon"], 2),
        "memory_over_disk_peak_anon": round(memory["peak_rss_anon"] / disk["peak_rss_anon"], 2),
        "cache_build_s": disk["load_s"],
        "decode_into_memory_s": memory["load_s"],
        "reuse_load_s": runs["reuse"]["load_s"],
        **{f"{k}_disk_over_memory": timing[f"{k}_disk_over_memory"] for k in ("gather", "batch", "step")},
        "metrics_identical": identical,
    }
    payload = {
        "benchmark": "memory",
        "command": "python " + " ".join(sys.argv),
        **host,
        "files": files,
        "image_size": args.size,
        "generate_s": generate_s,
        "config": overrides,
        "memory_figure": "peak RssAnon of the child, sampled every 10 ms from /proc/<pid>/status",
        "summary": summary,
        "runs": {name: row(r) for name, r in runs.items()},
        "interleaved": {k: v for k, v in timing.items() if not k.startswith("end_")},
        "segmentation": [
            {
                "unlabeled_images": r["unlabeled_images"],
                "decoded_gib": round(r["decoded_bytes"] / 2**30, 3),
                **{k: v for k, v in row(r).items() if k != "images_type"},
            }
            for r in seg
        ],
    }
    print(json.dumps(summary, indent=2))
    write_json(args.out, "memory", args.tag, payload)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

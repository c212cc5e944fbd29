"""Speed benchmark: one training step per method, WRN-28-2 at the standard CIFAR shape.

    python benchmarks/step_time.py                # CPU (or CUDA if visible), all methods
    python benchmarks/step_time.py --device cuda --repeats 20

Shape: 64 labeled + 7 x 64 unlabeled images, 32 px, weak and strong views (960 images through
the network per step). "with data" times the whole step: gathering indices from the in-memory
uint8 set, building the views on the device, forward, backward, update, EMA. "model only" times
the same step on a batch prepared in advance. Reports medians and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trustmatch.config import Config, DataConfig, MethodConfig, ModelConfig, TrainConfig
from trustmatch.data.base import DATASETS, ImageSet, SourceData
from trustmatch.trainer import Trainer

METHODS = ["supervised", "fixmatch", "flexmatch", "freematch", "softmatch"]


@DATASETS.register("synthetic-cifar")
def _synthetic(cfg: DataConfig) -> SourceData:
    """Random uint8 images of CIFAR-10's shape: speed does not depend on pixel values."""
    g = torch.Generator().manual_seed(0)
    n = 5000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return SourceData(
        ImageSet(images, labels),
        ImageSet(images[:500], labels[:500]),
        [str(c) for c in range(10)],
        (0.5,) * 3,
        (0.25,) * 3,
        hflip=True,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_method(method: str, args: argparse.Namespace, root: Path) -> dict:
    cfg = Config(
        seed=0,
        data=DataConfig(name="synthetic-cifar", labels_per_class=4, val_per_class=0),
        model=ModelConfig(name=args.model),
        method=MethodConfig(name=method),
        train=TrainConfig(
            steps=10**6,
            batch_size=64,
            uratio=7,
            device=args.device,
            compile=args.compile,
            amp=not args.no_amp,
            channels_last=not args.no_channels_last,
        ),
    )
    trainer = Trainer(cfg, root / method, progress=False)
    batch = trainer.next_batch()
    with_data = _median_ms(trainer.train_step, trainer.device, args.repeats, args.warmup)
    model_only = _median_ms(lambda: trainer.optimize(batch), trainer.device, args.repeats, args.warmup)
    views_only = _median_ms(trainer.next_batch, trainer.device, args.repeats, args.warmup)
    return {
        "method": method,
        "with_data_ms": round(with_data, 1),
        "model_only_ms": round(model_only, 1),
        "batch_and_views_ms": round(views_only, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--model", default="wrn_28_2")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            row = time_method(method, args, Path(tmp))
            rows.append(row)
            print(
                f"{method:<11} with data {row['with_data_ms']:9.1f} ms | model only {row['model_only_ms']:9.1f} ms"
                f" | batch + views {row['batch_and_views_ms']:7.1f} ms",
                flush=True,
            )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    payload = {
        "benchmark": "step_time",
        "model": args.model,
        "shape": "64 labeled + 448 unlabeled x 2 views, 32 px",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "compile": args.compile,
        "amp": not args.no_amp,
        "channels_last": not args.no_channels_last,
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"step_time-{'cuda' if device.startswith('cuda') else device}.json"
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

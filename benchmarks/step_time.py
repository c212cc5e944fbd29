"""Speed benchmark: one training step per method and precision, WRN-28-2 at the standard CIFAR shape.

    python benchmarks/step_time.py --methods fixmatch --repeats 5 --warmup 3 --out benchmarks/results
    python benchmarks/step_time.py --device cuda --repeats 20 --compile
    python benchmarks/step_time.py --methods fixmatch softmatch --precisions bf16 \
        --calibratemix off faithful efficient --tag calibratemix
    python benchmarks/step_time.py --methods fixmatch --precisions bf16 --peer usb --tag peer-usb
    python benchmarks/step_time.py --methods fixmatch --precisions bf16 --prefetch 4 --tag prefetch

Shape: 64 labeled + 7 x 64 unlabeled images, 32 px, weak and strong views (960 images through the
network per step). "with data" times the whole step: gathering indices from the in-memory uint8 set,
building the views on the device, forward, backward, update, EMA. "model only" times the same step on
a batch prepared in advance; "batch + views" times the batch alone. After ``--warmup`` untimed rounds,
every round times every (method, precision) once, interleaved, so that machine noise hits all of
them alike; min and median are reported, and the bf16/fp32 speed-up as the median of per-round ratios.
With ``--calibratemix``, each method also runs with CalibrateMix in the modes named (mixing from the
first step), and the cost of each mode is the median of per-round ratios to its base method's step.
With ``--peer usb`` (``usb-amp``: USB's own ``--amp``, fp16 + GradScaler, CUDA only), USB 0.3.2's FixMatch
step (``../shared/peers/usb/fixmatch_step.py``: its WRN-28-2, SGD, scheduler and EMA update, the batch
already on the device) runs in this process too, one step per round after the project's (``peers.py``),
and each project row gets the per-round ratio USB step / project step.
With ``--prefetch N``, each (method, precision) also runs as a second trainer with ``train.prefetch=on`` (the
first gets ``off``), and every round times N consecutive steps of each, as ``fit`` runs them (with prefetch,
batch k+1 is built in the producer thread during step k; the first batch of the N is built in turn, so the
gain is at most (N - 1) / N of the batch's time), per step; the prefetch gain is the median of per-round
ratios off / on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from peers import InterleavedPeer, peer_args, peer_summaries
from trustmatch.config import CalibrateMixConfig, Config, DataConfig, ModelConfig, TrainConfig, parse_overrides
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData
from trustmatch.methods import METHODS, method_config
from trustmatch.run.trainer import Trainer

PRECISIONS = {"bf16": True, "fp32": False}  # name -> train.amp
CLASSIFIERS = METHODS.for_task("classification")


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


def _build(
    method: str, precision: str, mode: str, args: argparse.Namespace, root: Path, prefetch: str = "auto"
) -> Trainer:
    cfg = Config(
        calibratemix=CalibrateMixConfig(mode=mode, warmup=0.0),
        seed=0,
        data=DataConfig(name="synthetic-cifar", labels_per_class=4, val_per_class=0, strong_ops=args.strong_ops),
        model=ModelConfig(name=args.model),
        method=method_config(method),
        train=TrainConfig(
            steps=10**6,
            batch_size=64,
            uratio=7,
            device=args.device,
            compile=args.compile,
            amp=PRECISIONS[precision],
            channels_last=not args.no_channels_last,
            prefetch=prefetch,
        ),
    )
    extra = parse_overrides([f"train.{item}" for item in args.train]).get("train", {})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **extra))
    return Trainer(cfg, root / f"{method}-{precision}-{mode}-{prefetch}", progress=False)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine(device: torch.device) -> dict[str, object]:
    """Where a benchmark ran, for its JSON: the device's name, the CPU's, torch, intra-op threads and cores."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": name,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def side_by_side(peer: list[float], ours: list[float]) -> dict[str, float]:
    """Peer over project from steps timed in the same rounds: median of per-round ratios, and min over min."""
    return {
        "median_of_ratios": round(statistics.median(a / b for a, b in zip(peer, ours)), 2),
        "min_over_min": round(min(peer) / min(ours), 2),
    }


def print_peers(peers: dict[str, list[float]], rows: list[dict[str, object]], versus: tuple[str, ...]) -> None:
    """The readable table: each peer's step, then its ratio to each of the project's rows."""
    for name, t in peers.items():
        print(f"peer {name:<14} step {statistics.median(t):9.1f} ms (min {min(t):.1f})", flush=True)
    for row in rows:
        for entry in row["peers"]:  # type: ignore[attr-defined]
            parts = [f"{entry[k]['median_of_ratios']}x {k.replace('_ms', '')}" for k in versus]  # type: ignore[index]
            print(f"{entry['peer']} step / {row['name']}: " + ", ".join(parts) + " (median of per-round ratios)")


def write_json(out_dir: Path, stem: str, tag: str, payload: dict[str, object]) -> Path:
    """``<out_dir>/<stem>[-<tag>].json``, and say where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stem}{'-' + tag if tag else ''}.json"
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return out


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000


def consecutive_ms(trainer: Trainer, steps: int, device: torch.device) -> float:
    """Per step, ``steps`` consecutive updates as ``fit`` runs them: with ``train.prefetch`` each builds the
    next batch ahead, in the producer thread, but the last (nothing is left building after the timing)."""

    def run() -> None:
        for i in range(steps):
            trainer.train_step(more=i + 1 < steps)

    return time_ms(run, device) / steps


def prefetch_gain(off: list[float], on: list[float]) -> dict[str, float]:
    """Steps without the producer over steps with it, timed in the same rounds: median of per-round
    ratios and min over min (above 1: prefetch is faster)."""
    return {
        "off_over_on": round(statistics.median(a / b for a, b in zip(off, on)), 3),
        "off_over_on_min": round(min(off) / min(on), 3),
    }


def add_prefetch(row: dict[str, object], times: dict[str, list[float]], steps: int) -> str:
    """The ``--prefetch`` columns of a result row (per-step medians and mins, the gain), and its line."""
    for name in ("loop", "loop_prefetch"):
        row[f"{name}_ms"], row[f"{name}_min_ms"] = round(statistics.median(times[name]), 1), round(min(times[name]), 1)
    row["prefetch_gain"] = gain = prefetch_gain(times["loop"], times["loop_prefetch"])
    return (
        f"{steps} steps in a row, per step: prefetch off {row['loop_ms']:9.1f} ms (min {row['loop_min_ms']:.1f}) "
        f"| on {row['loop_prefetch_ms']:9.1f} ms (min {row['loop_prefetch_min_ms']:.1f}) "
        f"| off / on {gain['off_over_on']}x (median of per-round ratios)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=CLASSIFIERS, choices=CLASSIFIERS)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--model", default="wrn_28_2")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (allocator, kernels, caches)")
    p.add_argument("--strong-ops", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--calibratemix", nargs="+", default=["off"], choices=["off", "faithful", "efficient"])
    p.add_argument("--train", nargs="+", default=[], metavar="KEY=VALUE", help="more train.* settings")
    p.add_argument("--peer", nargs="+", default=[], choices=["usb", "usb-amp"], help="time USB's step beside")
    p.add_argument("--peers-dir", type=Path, default=None, help="the peer bundles (default: ../shared/peers)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N", help="time N consecutive steps, prefetch off/on")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (step_time-<device>[-<tag>].json)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in args.train:
        if item.split("=", 1)[0] not in known:
            p.error(f"--train {item}: train has no key {item.split('=', 1)[0]!r} (one of {', '.join(sorted(known))})")

    with tempfile.TemporaryDirectory() as tmp:
        keys = [(m, pr, c) for m in args.methods for pr in args.precisions for c in args.calibratemix]
        base = "off" if args.prefetch else "auto"
        trainers = {key: _build(*key, args, Path(tmp), base) for key in keys}
        prefetching = {key: _build(*key, args, Path(tmp), "on") for key in keys} if args.prefetch else {}
        batches = {key: trainer.next_batch() for key, trainer in trainers.items()}
        device = next(iter(trainers.values())).device
        times: dict[tuple[str, str, str], dict[str, list[float]]] = {
            k: {"with_data": [], "model_only": [], "views": [], "loop": [], "loop_prefetch": []} for k in keys
        }
        threads = torch.get_num_threads()
        peers = {
            n: InterleavedPeer(n, peer_args(n, device, threads), args.warmup, args.repeats, args.peers_dir)
            for n in args.peer
        }
        for peer in peers.values():
            peer.start()
        peer_times: dict[str, list[float]] = {n: [] for n in peers}
        for round_ in range(args.warmup + args.repeats):
            for key, trainer in trainers.items():
                t = {
                    "with_data": time_ms(trainer.train_step, device),
                    "model_only": time_ms(lambda: trainer.optimize(batches[key]), device),  # noqa: B023
                    "views": time_ms(trainer.next_batch, device),
                }
                if args.prefetch:
                    t["loop"] = consecutive_ms(trainer, args.prefetch, device)
                    t["loop_prefetch"] = consecutive_ms(prefetching[key], args.prefetch, device)
                if round_ >= args.warmup:
                    for name, value in t.items():
                        times[key][name].append(value)
            for n, peer in peers.items():
                ms = peer.turn()
                if round_ >= args.warmup:
                    peer_times[n].append(ms)
            print(
                f"round {round_ + 1}/{args.warmup + args.repeats}" + (" (warm-up)" if round_ < args.warmup else ""),
                flush=True,
            )
        precisions = {key: trainer.precision.describe() for key, trainer in trainers.items()}
        peer_json = {n: peer.finish() for n, peer in peers.items()}

    rows = []
    for (method, precision, mode), t in times.items():
        row: dict[str, object] = {"method": method, "precision": precision, "calibratemix": mode}
        row["resolved"] = precisions[(method, precision, mode)]
        for name, label in (
            ("with_data", "with_data_ms"),
            ("model_only", "model_only_ms"),
            ("views", "batch_and_views_ms"),
        ):
            row[label] = round(statistics.median(t[name]), 1)
            row[label.replace("_ms", "_min_ms")] = round(min(t[name]), 1)
        if args.prefetch:
            print(f"{method:<11} {precision} {mode:<9}  {add_prefetch(row, t, args.prefetch)}", flush=True)
        rows.append(row)
        print(
            f"{method:<11} {precision} {mode:<9}  with data {row['with_data_ms']:9.1f} ms"
            f" (min {row['with_data_min_ms']:.1f})"
            f" | model only {row['model_only_ms']:9.1f} ms (min {row['model_only_min_ms']:.1f})"
            f" | batch + views {row['batch_and_views_ms']:7.1f} ms",
            flush=True,
        )
        row["name"] = f"{method} {precision}" + ("" if mode == "off" else f" calibratemix {mode}")
        row["peers"] = [
            {"peer": n, **{k: side_by_side(pt, t[k]) for k in ("with_data", "model_only")}}
            for n, pt in peer_times.items()
        ]
    print_peers(peer_times, rows, ("with_data", "model_only"))
    speedups = []
    if {"bf16", "fp32"} <= set(args.precisions) and "off" in args.calibratemix:
        for method in args.methods:
            fp32, bf16 = times[(method, "fp32", "off")], times[(method, "bf16", "off")]
            ratios = {name: [a / b for a, b in zip(fp32[name], bf16[name])] for name in ("with_data", "model_only")}
            entry = {
                "method": method,
                **{f"{n}_fp32_over_bf16": round(statistics.median(r), 2) for n, r in ratios.items()},
            }
            entry.update({f"{n}_fp32_over_bf16_min": round(min(r), 2) for n, r in ratios.items()})
            speedups.append(entry)
            whole, model = entry["with_data_fp32_over_bf16"], entry["model_only_fp32_over_bf16"]
            print(f"{method:<11} bf16 speed-up (median of per-round fp32/bf16): step {whole}x, model only {model}x")
    costs = []
    for method, precision, mode in times:
        if mode != "off" and (method, precision, "off") in times:
            base, mixed = times[(method, precision, "off")], times[(method, precision, mode)]
            ratios = {name: [b / a for a, b in zip(base[name], mixed[name])] for name in ("with_data", "model_only")}
            entry = {"method": method, "precision": precision, "calibratemix": mode}
            entry.update({f"{n}_over_base": round(statistics.median(r), 3) for n, r in ratios.items()})
            entry.update({f"{n}_over_base_min": round(min(r), 3) for n, r in ratios.items()})
            costs.append(entry)
            print(
                f"{method:<11} {precision} CalibrateMix {mode}: step {entry['with_data_over_base']}x its base "
                f"(model only {entry['model_only_over_base']}x; median of per-round ratios)"
            )
    payload = {
        "benchmark": "step_time",
        "model": args.model,
        "shape": "64 labeled + 448 unlabeled x 2 views, 32 px",
        **machine(device),
        "compile": args.compile,
        "train_settings": args.train,
        "prefetch_steps": args.prefetch,
        "channels_last": not args.no_channels_last,
        "strong_ops": args.strong_ops,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "order": "interleaved: each round times every (method, precision): whole step, model only, batch + views "
        "(and with --prefetch, N steps in a row without then with train.prefetch=on)",
        "results": rows,
        "speedups": speedups,
        "calibratemix_cost": costs,
        "peers": peer_summaries(peer_times, peer_json),
        "peer_ratio": "peer step / project step, per round (both timed in the same round, same process); "
        "the peer's step has its batch on the device already: compare with model_only, with_data is conservative",
    }
    write_json(args.out, f"step_time-{device.type}", args.tag, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed benchmark of one segmentation training step, data pipeline included, and the pipeline's share.

    python benchmarks/seg_step_time.py --shape digitscenes --repeats 10 --warmup 3
    python benchmarks/seg_step_time.py --shape pascal --device cuda --workers 8 --repeats 20   # on a GPU
    python benchmarks/seg_step_time.py --shape pascal --methods unimatch --crop 97 --batch 2 \
        --models deeplabv3plus_r101 deeplabv3plus_r101_deepstem          # smp's R101 beside UniMatch's network
    python benchmarks/seg_step_time.py --shape pascal --methods unimatch --crop 97 --batch 2 \
        --peer unimatch unimatch-bf16 --tag peer-unimatch                  # the release's step beside
    python benchmarks/seg_step_time.py --shape digitscenes --methods unimatch --prefetch 4 --tag prefetch

Shapes: ``digitscenes`` (the shipped digitscenes-<method> config: segnet_small, 8 + 8 at 64 px) and
``pascal`` (UniMatch's Pascal step: DeepLabV3+ R101, 8 labeled + 8 unlabeled at crop 321, read from
JPEG/PNG files of VOC's typical 500x375 size that the script writes, decoded and cropped in
``--workers`` threads every step, strong views and CutMix on the device). "step" times the whole
step (batch from files + views + forward + backward + update + EMA); "model only" the same on a batch
prepared in advance; "batch" the data pipeline alone. After ``--warmup`` untimed rounds every round
times every method once, interleaved; min and median are reported, and the pipeline's share as the
median of per-round batch / step ratios. ``--models`` times each method on each network (default: the
preset's); ``--crop`` and ``--batch`` shrink the Pascal shape for a CPU. ``peak_rss_mib`` is the process's
peak resident memory, so compare networks' memory from runs with one ``--models`` each.
``--peer unimatch`` (fp32, as the release trains; ``unimatch-bf16``: the peer script's bf16 autocast)
runs the UniMatch release's Pascal iteration (``../shared/peers/unimatch/unimatch_step.py``: its
DeepLabV3+ R101, its losses and SGD, synthetic batch on the device: model only) at the same crop and
batch in this process, one step per round after the project's (``peers.py``); each row gets the
per-round ratio release step / project step. ``--prefetch N`` also times N consecutive steps per round without
and with ``train.prefetch=on`` (a second trainer per method), as ``step_time.py --prefetch`` does.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from peers import InterleavedPeer, peer_args, peer_summaries
from step_time import add_prefetch, consecutive_ms, machine, print_peers, side_by_side, time_ms, write_json
from trustmatch.config import load_config
from trustmatch.run.trainer import Trainer


def _write_pascal_like_folder(root: Path, images: int = 64) -> None:
    """A segmentation folder of random JPEGs + PNG masks (21 classes) at VOC's typical 500x375."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
    (root / "unlabeled").mkdir()
    for i in range(images):
        h, w = (375, 500) if i % 3 else (500, 375)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 21, (h, w), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "unlabeled" / f"u{i}.jpg", quality=90)
        if i < 16:
            Image.fromarray(pixels).save(root / "train" / "images" / f"l{i}.jpg", quality=90)
            Image.fromarray(mask).save(root / "train" / "masks" / f"l{i}.png")
        if i < 2:
            Image.fromarray(pixels).save(root / "val" / "images" / f"v{i}.jpg", quality=90)
            Image.fromarray(mask).save(root / "val" / "masks" / f"v{i}.png")
    (root / "train" / "classes.txt").write_text("".join(f"c{k}\n" for k in range(21)))


def build_trainer(
    method: str, model: str | None, args: argparse.Namespace, tmp: Path, prefetch: str = "auto"
) -> Trainer:
    if args.shape == "digitscenes":
        config, extra = f"digitscenes-{method}", []
    else:
        config = f"pascal-{method}-1464"
        if not (tmp / "data").exists():
            _write_pascal_like_folder(tmp / "data")
        extra = _folder_args(tmp / "data")
    overrides = [*extra, f"train.device={args.device}", f"data.workers={args.workers}", f"train.compile={args.compile}"]
    overrides += [f"model.name={model}"] if model else []
    overrides += [f"data.crop_size={args.crop}"] if args.crop else []
    overrides += [f"train.batch_size={args.batch}"] if args.batch else []
    overrides += [*args.set, f"train.prefetch={prefetch}"]
    return Trainer(load_config(config, overrides), tmp / f"run-{method}-{model}-{prefetch}", progress=False)


def _folder_args(root: Path) -> list[str]:
    return [
        "data.name=folder",
        f"data.root={root / 'train'}",
        f"data.unlabeled_dir={root / 'unlabeled'}",
        f"data.val_dir={root / 'val'}",
        "model.weights=none",
    ]


def _name(method: str, model: str | None) -> str:
    return method if model is None else f"{method} {model}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["digitscenes", "pascal"], default="digitscenes")
    p.add_argument("--methods", nargs="+", default=["supervised", "unimatch"])
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0, help="decode/crop threads (data.workers)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--models", nargs="+", default=[None], help="model.name for each method (default: the preset's)")
    p.add_argument("--crop", type=int, default=0, help="data.crop_size (0: the preset's)")
    p.add_argument("--batch", type=int, default=0, help="train.batch_size, labeled = unlabeled (0: the preset's)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--peer", nargs="+", default=[], choices=["unimatch", "unimatch-bf16"], help="Pascal shape only")
    p.add_argument("--peers-dir", type=Path, default=None, help="the peer bundles (default: ../shared/peers)")
    p.add_argument("--prefetch", type=int, default=0, metavar="N", help="time N consecutive steps, prefetch off/on")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if args.peer and args.shape != "pascal":
        p.error("--peer times the UniMatch release's Pascal step: add --shape pascal")

    with tempfile.TemporaryDirectory() as tmp:
        runs = [(method, model) for method in args.methods for model in args.models]
        base = "off" if args.prefetch else "auto"
        trainers = {_name(m, net): build_trainer(m, net, args, Path(tmp), base) for m, net in runs}
        prefetching = (
            {_name(m, net): build_trainer(m, net, args, Path(tmp), "on") for m, net in runs} if args.prefetch else {}
        )
        device = next(iter(trainers.values())).device
        batches = {m: t.next_batch() for m, t in trainers.items()}
        times = {m: {"step": [], "model_only": [], "batch": [], "loop": [], "loop_prefetch": []} for m in trainers}
        first = next(iter(trainers.values()))
        shape = ["--crop", str(first.cfg.data.crop_size), "--batch", str(first.cfg.train.batch_size)]
        peers = {
            n: InterleavedPeer(
                n, [*peer_args(n, device, torch.get_num_threads()), *shape], args.warmup, args.repeats, args.peers_dir
            )
            for n in args.peer
        }
        for peer in peers.values():
            peer.start()
        peer_times: dict[str, list[float]] = {n: [] for n in peers}
        for round_ in range(args.warmup + args.repeats):
            for method, trainer in trainers.items():
                t = {
                    "step": time_ms(trainer.train_step, device),
                    "model_only": time_ms(lambda: trainer.optimize(batches[method]), device),  # noqa: B023
                    "batch": time_ms(trainer.next_batch, device),
                }
                if args.prefetch:
                    t["loop"] = consecutive_ms(trainer, args.prefetch, device)
                    t["loop_prefetch"] = consecutive_ms(prefetching[method], args.prefetch, device)
                if round_ >= args.warmup:
                    for name, value in t.items():
                        times[method][name].append(value)
            for n, peer in peers.items():
                ms = peer.turn()
                if round_ >= args.warmup:
                    peer_times[n].append(ms)
            print(f"round {round_ + 1}/{args.warmup + args.repeats}", flush=True)
        precision = first.precision.describe()
        peer_json = {n: peer.finish() for n, peer in peers.items()}

    rows = []
    for method, t in times.items():
        row: dict[str, object] = {"method": method}
        for name in ("step", "model_only", "batch"):
            row[f"{name}_ms"] = round(statistics.median(t[name]), 1)
            row[f"{name}_min_ms"] = round(min(t[name]), 1)
        row["batch_share_of_step"] = round(statistics.median(b / s for b, s in zip(t["batch"], t["step"])), 3)
        if args.prefetch:
            print(f"{method:<40} {add_prefetch(row, t, args.prefetch)}", flush=True)
        rows.append(row)
        print(
            f"{method:<40} step {row['step_ms']:9.1f} ms (min {row['step_min_ms']:.1f}) | model only "
            f"{row['model_only_ms']:9.1f} ms | batch {row['batch_ms']:8.1f} ms = {row['batch_share_of_step']:.1%} "
            "of the step (median of per-round ratios)",
            flush=True,
        )
        row["name"] = method
        row["peers"] = [
            {"peer": n, **{k: side_by_side(pt, t[k]) for k in ("step", "model_only")}} for n, pt in peer_times.items()
        ]
    print_peers(peer_times, rows, ("model_only", "step"))
    payload = {
        "benchmark": "seg_step_time",
        "shape": args.shape,
        **machine(device),
        "precision": precision,
        "workers": args.workers,
        "compile": args.compile,
        "overrides": args.set,
        "prefetch_steps": args.prefetch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "crop": args.crop or None,
        "batch": args.batch or None,
        "order": "interleaved: each round times every method: whole step, model only, batch alone",
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "results": rows,
        "peers": peer_summaries(peer_times, peer_json),
        "peer_ratio": "peer step / project step, per round (same process, same crop and batch); the release's "
        "step is model only (synthetic batch on the device): model_only is the like-for-like ratio",
    }
    write_json(args.out, f"seg_step_time-{args.shape}-{device.type}", args.tag, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

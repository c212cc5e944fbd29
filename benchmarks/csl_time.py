"""Speed of CSL selection: the batched closed form against the per-image SVD reference, and its share
of a whole CSL segmentation step.

    python benchmarks/csl_time.py                                  # 16 x 21 x 321 x 321 on the CPU
    python benchmarks/csl_time.py --device cuda --repeats 50      # the same on a GPU
    python benchmarks/csl_time.py --step-shape pascal --step-repeats 2   # share of a Pascal-sized step

Selection: probabilities ``[batch, classes, size, size]`` (softmax of random logits with a per-pixel
sharpness, so confidences span 1/K to ~1; a quarter of the images have their last rows padded, as
crops of smaller images are), timed after ``--warmup`` rounds, interleaved per round: the batched
``csl_select``, the per-image SVD reference (``tests/csl_reference.py``, which loops over images as the
release does) and, for scale, UniMatch's fixed threshold. The batched selection reads the
probabilities from memory once: on the CPU it takes them in row blocks that stay in cache (max, the
entries below the max, their sum and sum of squares), then works on the [B, H, W] features only.

Share: the step of the shipped ``digitscenes-csl`` (or the Pascal-shaped step of
``benchmarks/seg_step_time.py``), with the selector's calls inside the step timed; the share is the
median of per-step ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from csl_reference import reference_csl  # noqa: E402
from seg_step_time import build_trainer  # noqa: E402
from step_time import machine, time_ms, write_json  # noqa: E402
from trustmatch.core.precision import resolve_device  # noqa: E402
from trustmatch.methods import csl_select, fixed_threshold  # noqa: E402


def _inputs(batch: int, classes: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, size, size, generator=g)
    sharp = torch.rand(batch, 1, size, size, generator=g) * 8
    probs = (logits * sharp).softmax(dim=1)
    valid = torch.ones(batch, size, size, dtype=torch.bool)
    valid[: batch // 4, size * 3 // 4 :] = False
    return probs.to(device), valid.to(device)


def _selection_times(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    probs, valid = _inputs(args.batch, args.classes, args.size, device)
    runs = {
        "csl_batched": lambda: csl_select(probs, valid),
        "csl_per_image_svd": lambda: reference_csl(probs, valid),
        "fixed_threshold": lambda: fixed_threshold(probs, 0.95, valid),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.warmup + args.repeats):
        for name, fn in runs.items():
            value = time_ms(fn, device)
            if round_ >= args.warmup:
                times[name].append(value)
    return times


def _step_share(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Time a whole CSL step with its selector calls timed inside it."""
    step_args = argparse.Namespace(shape=args.step_shape, device=args.device, workers=args.workers, compile=False)
    trainer = build_trainer("csl", step_args, tmp)
    device, selector = trainer.device, trainer.task.selector
    spent: list[float] = []
    select = selector.select

    def timed_select(*a: object, **k: object) -> object:
        out: list[object] = []
        spent.append(time_ms(lambda: out.append(select(*a, **k)), device))  # synchronised on CUDA
        return out[0]

    selector.select = timed_select  # type: ignore[method-assign]
    steps, shares, selections, calls = [], [], [], 0
    for round_ in range(args.step_warmup + args.step_repeats):
        spent.clear()
        step = time_ms(trainer.train_step, device)
        if round_ >= args.step_warmup:
            steps.append(step)
            selections.append(sum(spent))
            shares.append(sum(spent) / step)
            calls = len(spent)
    return {
        "step_ms": round(statistics.median(steps), 2),
        "step_min_ms": round(min(steps), 2),
        "selection_in_step_ms": round(statistics.median(selections), 3),
        "selection_share_of_step": round(statistics.median(shares), 4),
        "selector_calls_per_step": calls,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--size", type=int, default=321)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--step-shape", choices=["digitscenes", "pascal", "none"], default="digitscenes")
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--step-warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    device = resolve_device(args.device)

    times = _selection_times(args, device)
    rows = {
        name: {"median_ms": round(statistics.median(t), 2), "min_ms": round(min(t), 2)} for name, t in times.items()
    }
    ref, ours = times["csl_per_image_svd"], times["csl_batched"]
    speedup = {
        "median_of_ratios": round(statistics.median(r / o for r, o in zip(ref, ours)), 2),
        "min_over_min": round(min(ref) / min(ours), 2),
    }
    for name, row in rows.items():
        print(f"{name:<18} median {row['median_ms']:9.2f} ms  min {row['min_ms']:9.2f} ms", flush=True)
    print(f"batched CSL vs per-image SVD: {speedup['median_of_ratios']}x (median of per-round ratios)", flush=True)
    share = None
    if args.step_shape != "none":
        with tempfile.TemporaryDirectory() as tmp:
            share = _step_share(args, Path(tmp))
        print(
            f"{args.step_shape} CSL step {share['step_ms']} ms, selection inside it {share['selection_in_step_ms']} ms "
            f"= {share['selection_share_of_step']:.2%} of the step",
            flush=True,
        )
    payload = {
        "benchmark": "csl_time",
        **machine(device),
        "shape": [args.batch, args.classes, args.size, args.size],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "order": "interleaved: each round times every selection once",
        "selection": rows,
        "speedup_vs_per_image_svd": speedup,
        "step": None if share is None else {"shape": args.step_shape, **share},
    }
    write_json(args.out, f"csl_time-{device.type}", args.tag, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

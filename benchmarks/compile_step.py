"""Eager against compiled (``train.compile=true``) training updates on one device, interleaved.

Two trainers per case, built alike but for ``train.compile``, update on the same pre-made batches
(forward, selection, losses, backward, optimizer, EMA: ``Trainer.optimize``; the input pipeline is
timed by ``step_time.py``). After warm-up (the compiled step compiles twice: once with the step
number fixed, once symbolic) every round times eager then compiled, or compiled then eager, so a
shared machine's load falls on both. Cases: the small CNN on digits, and WRN-28-2 on CIFAR-10-shaped
synthetic images, FixMatch, under the device's precision (bf16 autocast where native).

    PYTHONPATH=src python benchmarks/compile_step.py --device cpu --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from step_time import machine, time_ms, write_json  # registers the synthetic-cifar data set
from trustmatch.config import load_config
from trustmatch.run.trainer import Trainer

CASES = {  # name -> (preset, overrides): a small batch, the shapes of the published step
    "cnn-digits": ("digits-fixmatch", ["train.batch_size=32", "train.uratio=7"]),
    "wrn_28_2-cifar": (
        "digits-fixmatch",
        ["data.name=synthetic-cifar", "model.name=wrn_28_2", "train.batch_size=4", "train.uratio=7"],
    ),
}


def _trainer(preset: str, overrides: list[str], compiled: bool, args: argparse.Namespace, root: Path) -> Trainer:
    keys = [*overrides, f"train.compile={str(compiled).lower()}", f"train.device={args.device}"]
    keys += ["train.steps=100000", "train.eval_every=100000", f"train.threads={args.threads}", "data.val_per_class=0"]
    return Trainer(load_config(preset, keys), root / f"{preset}-{compiled}", progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed updates of each trainer first")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument("--steps", type=int, default=3, help="updates per trainer per round")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="cpu")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            preset, overrides = CASES[case]
            trainers = {
                mode: _trainer(preset, overrides, mode == "compiled", args, Path(tmp)) for mode in ("eager", "compiled")
            }
            batches = [trainers["eager"].next_batch() for _ in range(args.steps)]
            device = trainers["eager"].device
            compile_s = {}
            for mode, trainer in trainers.items():
                warm = [time_ms(lambda t=trainer, b=batches[0]: t.optimize(b), device) for _ in range(args.warmup)]
                compile_s[mode] = round(sum(warm) / 1000, 1)
            times: dict[str, list[float]] = {mode: [] for mode in trainers}
            for r in range(args.repeats):
                for mode in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                    trainer = trainers[mode]
                    ms = time_ms(lambda t=trainer, bs=batches: [t.optimize(b) for b in bs], device)
                    times[mode].append(ms / len(batches))
            row = {"case": case, "precision": trainers["eager"].precision.describe(), "warmup_s": compile_s}
            for mode, ms in times.items():
                row[f"{mode}_ms_min"], row[f"{mode}_ms_median"] = round(min(ms), 2), round(statistics.median(ms), 2)
            ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
            row["speedup_median"] = round(statistics.median(ratios), 3)
            rows.append(row)
            print(
                f"{case} ({row['precision']}): eager {row['eager_ms_median']} ms, "
                f"compiled {row['compiled_ms_median']} ms per update (medians; min {row['eager_ms_min']} / "
                f"{row['compiled_ms_min']}); compiled is {row['speedup_median']}x (median of per-round ratios); "
                f"warm-up {compile_s['compiled']} s compiled"
            )
    payload = {
        "benchmark": "compile_step",
        **machine(device),
        "load_average_at_end": [round(x, 1) for x in os.getloadavg()],  # a shared machine's other work
        "warmup": args.warmup,
        "repeats": args.repeats,
        "steps_per_round": args.steps,
        "order": "interleaved: eager and compiled alternate first each round, on the same batches",
        "results": rows,
    }
    write_json(args.out, "compile_step", args.tag, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

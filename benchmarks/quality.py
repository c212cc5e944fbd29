"""Quality benchmark: methods x CalibrateMix modes x precisions x seeds; accuracy, ECE-15, NLL, time.

    python benchmarks/quality.py --suite digits --seeds 0 1 2
    python benchmarks/quality.py --suite fashionmnist --seeds 0 1 2 --precisions bf16 fp32
    python benchmarks/quality.py --suite fashionmnist --methods fixmatch softmatch \
        --calibratemix off faithful efficient --tag calibratemix train.threads=1

``--calibratemix`` runs each method without CalibrateMix (``off``) and with it in the modes named.
Runs with a validation split also report the metrics after temperature scaling fitted on it.

``--precisions`` runs each configuration with bfloat16 autocast (``train.amp=true``, where the CPU
has native bf16) and in float32, and says for each method whether the bf16 means of accuracy and
ECE-15 lie within one standard deviation (over seeds) of the float32 ones.

Each run is an ordinary ``trustmatch train`` run (its directory is kept under --runs); the script
writes every run's final metrics and the mean ± std table to JSON and prints the table as
Markdown, ready for the README. Finished runs are reused, so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from trustmatch.cli import run_name
from trustmatch.config import load_config
from trustmatch.methods import METHODS as METHOD_REGISTRY
from trustmatch.run.trainer import Trainer

SUITES = {
    "digits": "digits-{method}",
    "fashionmnist": "fashionmnist-{method}-40",
    "fashionmnist-250": "fashionmnist-{method}-250",
}
METHODS = METHOD_REGISTRY.for_task("classification")
PRECISIONS = {"bf16": "train.amp=true", "fp32": "train.amp=false"}
MODES = ("off", "faithful", "efficient")
COLUMNS = [
    ("accuracy", "accuracy"),
    ("ece_15", "ECE-15"),
    ("nll", "NLL"),
    ("ts_ece_15", "ECE-15 (TS)"),
    ("ts_nll", "NLL (TS)"),
    ("release_accuracy", "accuracy (release protocol)"),
    ("release_ece_10", "ECE-10 (release protocol)"),
    ("wall_time_s", "wall time (s)"),
]


def run_one(config: str, precision: str, seed: int, runs: Path, overrides: list[str], existing: bool) -> dict | None:
    """One training run, its directory named after everything that sets it apart (resumed if cut off);
    with ``existing``, only a finished run's metrics (None if it has not finished)."""
    run_dir = runs / run_name(config, [precision, *overrides], seed)
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("final"):
            return done
    if existing:
        return None
    cfg = load_config(config, [f"seed={seed}", PRECISIONS[precision], *overrides])
    if (run_dir / "last.pt").exists():
        return Trainer.resume(run_dir, progress=False).fit()
    trainer = Trainer(cfg, run_dir, progress=False)
    return trainer.fit()


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def flatten(metrics: dict) -> dict[str, float]:
    """The final test metrics, the temperature-scaled ones (``ts_``) where fitted, the wall time, and
    the release's protocol (``release_``): the evaluation with the best *test* accuracy and its ECE-10.
    The release picks its checkpoint on test; that row is recorded for comparison, never to choose."""
    final = {**metrics["final"], "wall_time_s": metrics["wall_time_s"]}
    for key, value in (metrics.get("final_calibrated") or {}).items():
        final[f"ts_{key}"] = value
    evaluations = [h["test"] for h in metrics["history"] if "ece_10" in h.get("test", {})]
    if evaluations:
        best_on_test = max(evaluations, key=lambda t: t["accuracy"])
        final["release_accuracy"], final["release_ece_10"] = best_on_test["accuracy"], best_on_test["ece_10"]
    return final


def table(rows: dict[tuple[str, str, str], dict], seeds: int) -> str:
    head = "| method | CalibrateMix | precision | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for (method, mode, precision), stats in rows.items():
        n = stats["seeds"]
        label = precision if n == seeds else f"{precision} ({n} seed{'s' * (n > 1)})"  # fewer seeds than asked
        cells = []
        for key, _ in COLUMNS:
            if key not in stats:
                cells.append("–")
                continue
            m, s = stats[key]["mean"], stats[key]["std"]
            cells.append(f"{m:.0f} ± {s:.0f}" if key == "wall_time_s" else f"{m:.4f} ± {s:.4f}")
        lines.append(f"| {method} | {mode} | {label} | " + " | ".join(cells) + " |")
    note = (
        "final EMA model on the test split; TS: temperature fitted on the validation split; release protocol: "
        "the evaluation with the best test accuracy, as the CalibrateMix release reports (chosen on test: "
        "for comparison only)"
    )
    return "\n".join(lines) + f"\n\n(mean ± std over {seeds} seeds; {note})"


def within_one_std(rows: dict[tuple[str, str, str], dict]) -> dict[str, dict[str, bool]]:
    """Per method and mode: is the bf16 mean of accuracy / ECE-15 within one float32 standard deviation?"""
    out = {}
    for method, mode in sorted({(m, c) for m, c, _ in rows}):
        bf16, fp32 = rows.get((method, mode, "bf16")), rows.get((method, mode, "fp32"))
        if bf16 and fp32:
            keys = ("accuracy", "ece_15")
            out[f"{method}/{mode}"] = {k: abs(bf16[k]["mean"] - fp32[k]["mean"]) <= fp32[k]["std"] for k in keys}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    p.add_argument("--calibratemix", nargs="+", default=["off"], choices=MODES, help="CalibrateMix modes to run")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (quality-<suite>[-<tag>].json)")
    p.add_argument("--existing", action="store_true", help="summarise the finished runs only; train nothing")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_args()

    results, rows = [], {}
    for method in args.methods:
        config = SUITES[args.suite].format(method=method)
        variants = [(mode, precision) for mode in args.calibratemix for precision in args.precisions]
        finals: dict[tuple[str, str], list[dict]] = {v: [] for v in variants}
        for seed in args.seeds:
            for mode, precision in variants:  # interleaved: machine load hits every variant alike
                start = time.perf_counter()
                extra = [] if mode == "off" else [f"calibratemix.mode={mode}"]
                metrics = run_one(config, precision, seed, args.runs, [*extra, *args.overrides], args.existing)
                if metrics is None:
                    print(f"{config} {mode} {precision} seed {seed}: not finished, left out", flush=True)
                    continue
                final = flatten(metrics)
                finals[(mode, precision)].append(final)
                results.append(
                    {
                        "config": config,
                        "calibratemix": mode,
                        "precision": precision,
                        "resolved_precision": metrics.get("precision"),
                        "seed": seed,
                        "final": metrics["final"],
                        "final_calibrated": metrics.get("final_calibrated"),
                        "temperature": metrics.get("temperature"),
                        "best": metrics["best"],
                        "wall_time_s": metrics["wall_time_s"],
                    }
                )
                print(
                    f"{config} {mode} {precision} seed {seed}: acc {final['accuracy']:.4f} "
                    f"ece15 {final['ece_15']:.4f} nll {final['nll']:.4f} "
                    f"ts-ece15 {final.get('ts_ece_15', float('nan')):.4f} ({time.perf_counter() - start:.0f}s)",
                    flush=True,
                )
        for (mode, precision), runs in finals.items():
            if runs:
                keys = [key for key, _ in COLUMNS if all(key in f for f in runs)]
                rows[(method, mode, precision)] = {key: summarise([f[key] for f in runs]) for key in keys}
                rows[(method, mode, precision)]["seeds"] = len(runs)

    md = table(rows, len(args.seeds))
    agreement = within_one_std(rows)
    print(md)
    for variant, ok in agreement.items():
        print(f"{variant}: bf16 within one float32 std: accuracy {ok['accuracy']}, ECE-15 {ok['ece_15']}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"quality-{args.suite}{'-' + args.tag if args.tag else ''}.json"
    payload = {
        "suite": args.suite,
        "seeds": args.seeds,
        "overrides": args.overrides,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "precisions": {p: PRECISIONS[p] for p in args.precisions},
        "calibratemix": args.calibratemix,
        "summary": {"/".join(key): stats for key, stats in rows.items()},
        "bf16_within_one_fp32_std": agreement,
        "runs": results,
        "markdown": md,
    }
    out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

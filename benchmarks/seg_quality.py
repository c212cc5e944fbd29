"""Segmentation quality on digitscenes: methods x labeled scenes x seeds; mIoU, pixel ECE-15, time.

    python benchmarks/seg_quality.py --methods supervised unimatch softmatch --labeled 20 80 --seeds 0 1 2
    python benchmarks/seg_quality.py --methods supervised unimatch csl-notmp csl --labeled 80 320 train.threads=1

Each run is an ordinary ``trustmatch train digitscenes-<method> data.labeled_images=<n>`` run (its
directory kept under --runs, reused when finished, resumed when cut off); the final EMA model is
scored on the fixed test scenes (digits from writers the training scenes never show). Writes
every run's final metrics and the mean ± std table to JSON and prints the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from quality import run_one, summarise
from trustmatch.methods import METHODS

# digitscenes-<variant>: every segmentation method, and CSL without TMP (CSL's selection in UniMatch's step)
VARIANTS = METHODS.for_task("segmentation") + ["csl-notmp"]
COLUMNS = [
    ("miou", "mIoU"),
    ("pixel_ece_15", "pixel ECE-15"),
    ("pixel_nll", "pixel NLL"),
    ("pixel_accuracy", "pixel accuracy"),
    ("wall_time_s", "wall time (s)"),
]


def table(rows: dict[tuple[int, str], dict], seeds: int) -> str:
    lines = ["| labeled scenes | method | " + " | ".join(label for _, label in COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for (labeled, method), stats in rows.items():
        cells = []
        for key, _ in COLUMNS:
            m, s = stats[key]["mean"], stats[key]["std"]
            cells.append(f"{m:.0f} ± {s:.0f}" if key == "wall_time_s" else f"{m:.4f} ± {s:.4f}")
        shown = method if stats["seeds"] == seeds else f"{method} ({stats['seeds']} seeds)"
        lines.append(f"| {labeled} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(mean ± std over {seeds} seeds; final EMA model on the 300 test scenes)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["supervised", "unimatch", "softmatch"], choices=VARIANTS)
    p.add_argument("--labeled", type=int, nargs="+", default=[20, 80], help="labeled scenes (of data.scenes)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="", help="suffix of the JSON file name (seg_quality-digitscenes[-<tag>].json)")
    p.add_argument("--existing", action="store_true", help="summarise the finished runs only; train nothing")
    p.add_argument("--runs", type=Path, default=Path("runs/benchmark"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = p.parse_args()

    results, rows = [], {}
    for labeled in args.labeled:
        finals: dict[str, list[dict]] = {m: [] for m in args.methods}
        for seed in args.seeds:
            for method in args.methods:  # interleaved: machine load hits every method alike
                config, extra = f"digitscenes-{method}", [f"data.labeled_images={labeled}", *args.overrides]
                start = time.perf_counter()
                metrics = run_one(config, "bf16", seed, args.runs, extra, args.existing)
                if metrics is None:
                    print(f"{config} {labeled} labeled seed {seed}: not finished, left out", flush=True)
                    continue
                final = {**metrics["final"], "wall_time_s": metrics["wall_time_s"]}
                finals[method].append(final)
                results.append({"method": method, "labeled": labeled, "seed": seed, "final": final})
                took = time.perf_counter() - start
                print(f"{config} {labeled} labeled seed {seed}: miou {final['miou']:.4f} ({took:.0f}s)", flush=True)
        for method, runs in finals.items():
            if runs:
                stats = {key: summarise([r[key] for r in runs]) for key, _ in COLUMNS}
                rows[(labeled, method)] = {**stats, "seeds": len(runs)}
    markdown = table(rows, len(args.seeds))
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"seg_quality-digitscenes{'-' + args.tag if args.tag else ''}.json"
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cpu_count": os.cpu_count(),
        "runs": results,
        "table": {f"{labeled}/{method}": stats for (labeled, method), stats in rows.items()},
        "markdown": markdown,
    }
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

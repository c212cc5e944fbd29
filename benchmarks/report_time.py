"""Wall time of ``trustmatch report RUN --html``, the whole command in a fresh process, as a user runs it.

Two variants of the same finished run, interleaved round by round after one untimed warm-up each (which
also fills the OS's file cache): ``saved``, the run as training leaves it, whose ``findings.pt`` the page
reads; and ``from-last.pt``, a copy without that file, so the page makes its own pass of ``last.pt`` (the
task, the data, torchvision: what every report did before training wrote the file). Without ``--run`` a
digits CalibrateMix run (data map and thumbnails, the largest digits page) is trained first.

    PYTHONPATH=src python benchmarks/report_time.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from step_time import machine, write_json


def _train(root: Path, preset: str, steps: int) -> Path:
    run = root / preset
    command = [sys.executable, "-m", "trustmatch.cli", "train", preset, "--out", str(run)]
    subprocess.run([*command, f"train.steps={steps}", "train.threads=1"], check=True, capture_output=True)
    return run


def _report_s(run: Path, out: Path) -> float:
    start = time.perf_counter()
    command = [sys.executable, "-m", "trustmatch.cli", "report", str(run), "--html", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished run directory (default: train a digits run first)")
    p.add_argument("--preset", default="digits-calibratemix")
    p.add_argument("--steps", type=int, default=300, help="training steps of the run trained without --run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--tag", default="cpu-digits")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        saved = args.run or _train(root, args.preset, args.steps)
        if not (saved / "findings.pt").is_file():
            raise SystemExit(f"{saved} has no findings.pt: train it with this trustmatch, or pass another --run")
        bare = root / "from-last-pt"
        shutil.copytree(saved, bare, ignore=shutil.ignore_patterns("findings.pt", "tensorboard"))
        variants = {"saved": saved, "from-last.pt": bare}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, run in variants.items():
            _report_s(run, root / f"page-{name}")  # warm-up
        for round_ in range(args.rounds):
            order = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in order:
                times[name].append(_report_s(variants[name], root / f"page-{name}"))
        sizes = {name: (root / f"page-{name}" / "report.html").stat().st_size / 1e6 for name in variants}
        rows = {
            name: {"min_s": min(t), "median_s": statistics.median(t), "times_s": t, "page_mb": sizes[name]}
            for name, t in times.items()
        }
    for name, row in rows.items():
        print(f"{name:>13}: min {row['min_s']:.2f} s, median {row['median_s']:.2f} s, page {row['page_mb']:.2f} MB")
    payload = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(torch.device("cpu")),
        "load_average": os.getloadavg(),
        "run": str(args.run) if args.run else f"{args.preset}, train.steps={args.steps}",
        "variants": rows,
    }
    write_json(args.out, "report_time", args.tag, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

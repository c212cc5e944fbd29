"""What a certified threshold keeps, beside the uncertified rule "confidence > 0.95", on finished runs.

    python benchmarks/certified_precision.py RUN [RUN ...] --precision 0.95 0.9 0.8 0.7 [--delta 0.05]

Per run (the checkpoint ``trustmatch predict --precision`` certifies: ``last.pt`` unless ``--checkpoint
best``, at its temperature, as ``trustmatch predict`` applies it): the score and loss of every validation,
test and, where their truth is known, unlabeled training unit, computed once; then per target precision
the threshold ``trustmatch evaluate --precision`` certifies on validation (or its one-line refusal and the
best certifiable precision), its precision and coverage on test and on the unlabeled training pool, and
the same for the uncertified rule on the same score (the raw one the certificate uses: a classifier's raw
top-class probability, an image's mean raw pixel confidence). The README's "after T" column of that rule
was measured when classification certified temperature-scaled confidences.
Writes ``certified_precision.json`` beside the runs' common parent (or ``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from trustmatch.evaluation.certify import NotCertifiable, certify
from trustmatch.run.certified_threshold import checkpoint_for
from trustmatch.run.loaded_run import load_run_model

NAIVE = 0.95  # "keep everything the model is 95 % sure of"


def _kept(scores: np.ndarray, losses: np.ndarray, threshold: float) -> dict[str, Any]:
    accepted = scores > threshold
    precision = float(1 - losses[accepted].mean()) if accepted.any() else None
    return {"precision": precision, "coverage": float(accepted.mean()), "accepted": int(accepted.sum())}


def measure(run_dir: Path, targets: list[float], delta: float, checkpoint: str = "auto") -> dict[str, Any]:
    path = checkpoint_for(run_dir, checkpoint, targets[0])
    run = load_run_model(path)
    task = run.task(run.cfg, run.precision)
    temperature = run.meta.get("temperature")
    units = {}
    for split in ("val", "test", "unlabeled"):
        scores, losses = task.selective_units(run.model, split, temperature)
        if len(scores):
            units[split] = (scores.numpy(), losses.numpy())
    val = units["val"]
    rows = []
    for target in targets:
        row: dict[str, Any] = {"target": target}
        try:
            c = certify(*val, target, delta, task.certify_bound)
        except NotCertifiable as e:
            row["refused"] = {"best_certifiable": e.best}
        else:
            row["certified"] = {"threshold": c.threshold, "bound": c.certified_precision, "val_coverage": c.coverage}
            row["certified"].update({split: _kept(*units[split], c.threshold) for split in units if split != "val"})
        rows.append(row)
    naive = {split: _kept(*data, NAIVE) for split, data in units.items()}
    return {
        "run": run_dir.name,
        "checkpoint": path.name,
        "seed": run.cfg.seed,
        "step": int(run.meta["step"]),
        "temperature": temperature,
        "units": {split: len(data[0]) for split, data in units.items()},
        "certified": rows,
        f"confidence>{NAIVE}": naive,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| run | seed | target | certified threshold | val cov. | test precision / cov. | unlabeled precision / cov. "
        f"| raw conf > {NAIVE}: test precision / cov. | unlabeled prec. / cov. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        naive = r[f"confidence>{NAIVE}"]
        pool = naive.get("unlabeled", {})
        for row in r["certified"]:
            if "refused" in row:
                cells = [f"refused (best {row['refused']['best_certifiable']:.3f})", "-", "-", "-"]
            else:
                c = row["certified"]
                unl = c.get("unlabeled", {})
                cells = [
                    f"{c['threshold']:.4f}",
                    _pct(c["val_coverage"]),
                    f"{_pct(c['test']['precision'])} / {_pct(c['test']['coverage'])}",
                    f"{_pct(unl.get('precision'))} / {_pct(unl.get('coverage'))}",
                ]
            naive_cells = [
                f"{_pct(naive['test']['precision'])} / {_pct(naive['test']['coverage'])}",
                f"{_pct(pool.get('precision'))} / {_pct(pool.get('coverage'))}",
            ]
            lines.append(
                "| " + " | ".join([r["run"], str(r["seed"]), f"{row['target']:g}", *cells, *naive_cells]) + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--precision", nargs="+", type=float, default=[0.95, 0.9, 0.8, 0.7])
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help="auto: last.pt")
    parser.add_argument("--out", type=Path, help="JSON file (default: certified_precision.json beside the runs)")
    args = parser.parse_args()
    results = [measure(run, args.precision, args.delta, args.checkpoint) for run in args.runs]
    out = args.out or args.runs[0].parent / "certified_precision.json"
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results), end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

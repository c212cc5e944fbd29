"""Step cost and memory of fine-tuning a pretrained-size ViT beside the WRN-28-2 step, one FixMatch step each.

    python benchmarks/backbone_step.py --repeats 5 --warmup 2 --out benchmarks/results

Cases (each in its own process, so its peak memory is its own; random weights: speed and memory do not
depend on their values):

* ``vit_small_patch2_32``: USB's usb_cv CIFAR-100 step, USB's ViT-S/2 at 32 px (257 tokens), batch 8 + 8
  unlabeled (24 images through the network: labeled, weak, strong), AdamW with layer decay 0.5;
* ``timm:vit_small_patch16_224``: USB's Semi-Aves step, ViT-S/16 at 224 px (197 tokens), the same batch,
  layer decay 0.65;
* ``wrn_28_2`` at the same 8 + 8 batch (SGD), and at its own published batch 64 + 7 x 64 (960 images).

A step is ``Trainer.train_step`` (batch and views, forward, backward, update, EMA where the preset has one).
Memory: the process's peak resident set (``ru_maxrss``) after the steps, and its rise over the process just
before the trainer was built (data set included: 5,000 images at the case's side).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import machine, time_ms, write_json  # noqa: E402
from trustmatch.config import Config, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from trustmatch.data.image_sets import DATASETS, ImageSet, SourceData  # noqa: E402
from trustmatch.methods import method_config  # noqa: E402
from trustmatch.run.trainer import Trainer  # noqa: E402

CASES = {  # name -> (model, side, labeled batch, uratio, optimizer, lr, layer decay)
    "vit_small_patch2_32": ("vit_small_patch2_32", 32, 8, 1, "adamw", 5e-4, 0.5),
    "vit_small_patch16_224": ("timm:vit_small_patch16_224", 224, 8, 1, "adamw", 1e-3, 0.65),
    "wrn_28_2-8+8": ("wrn_28_2", 32, 8, 1, "sgd", 0.03, 1.0),
    "wrn_28_2-64+448": ("wrn_28_2", 32, 64, 7, "sgd", 0.03, 1.0),
}


@DATASETS.register("synthetic-sized")
def _synthetic(cfg: DataConfig) -> SourceData:
    g = torch.Generator().manual_seed(0)
    side, n = cfg.image_size or 32, 5000
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 100
    return SourceData(
        ImageSet(images, labels), ImageSet(images[:100], labels[:100]), [str(c) for c in range(100)],
        (0.5,) * 3, (0.25,) * 3, hflip=True,
    )  # fmt: skip


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name: str, precision: str, warmup: int, repeats: int) -> dict[str, object]:
    model, side, batch, uratio, optimizer, lr, layer_decay = CASES[name]
    cfg = Config(
        seed=0,
        data=DataConfig(name="synthetic-sized", labels_per_class=4, val_per_class=0, image_size=side, strong_ops=3),
        model=ModelConfig(name=model),
        method=method_config("fixmatch"),
        train=TrainConfig(
            steps=10**6, batch_size=batch, uratio=uratio, optimizer=optimizer, lr=lr, layer_decay=layer_decay,
            amp=precision == "bf16", device="cpu",
        ),
    )  # fmt: skip
    before = _peak_mib()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        times = [time_ms(trainer.train_step, trainer.device) for _ in range(warmup + repeats)][warmup:]
        resolved = trainer.precision.describe()
        params = sum(p.numel() for p in trainer.model.parameters())
    return {
        "case": name,
        "model": model,
        "side": side,
        "batch": f"{batch} labeled + {batch * uratio} unlabeled (x2 views)",
        "images_per_step": batch * (1 + 2 * uratio),
        "parameters": params,
        "precision": precision,
        "resolved": resolved,
        "step_ms": round(statistics.median(times), 1),
        "step_min_ms": round(min(times), 1),
        "peak_rss_mib": round(_peak_mib(), 1),
        "peak_rss_rise_mib": round(_peak_mib() - before, 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--one", nargs=2, metavar=("CASE", "PRECISION"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one[0], args.one[1], args.warmup, args.repeats)))
        return 0
    rows, load_before = [], os.getloadavg()
    for case in args.cases:
        for precision in args.precisions:
            command = [sys.executable, __file__, "--one", case, precision]
            command += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{case:<22} {precision}  step {row['step_ms']:9.1f} ms (min {row['step_min_ms']:.1f})"
                f"  peak RSS {row['peak_rss_mib']:.0f} MiB (+{row['peak_rss_rise_mib']:.0f})",
                flush=True,
            )
    payload = {
        "benchmark": "backbone_step",
        "method": "fixmatch",
        "steps": "Trainer.train_step after warm-up steps, median and min; each case in its own process",
        **machine(torch.device("cpu")),
        "load_average_1_5_15min": {
            "before": [round(x, 2) for x in load_before],
            "after": [round(x, 2) for x in os.getloadavg()],
        },  # other work on the cores
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": rows,
    }
    write_json(args.out, "backbone_step-cpu", args.tag, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

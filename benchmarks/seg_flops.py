"""Compute of segmentation networks, counted rather than timed: FLOPs of one training forward + backward and
parameter counts, which a shared CPU cannot blur (wall times on 2 busy cores vary 2x between rounds).

    python benchmarks/seg_flops.py --models deeplabv3plus_r101 deeplabv3plus_r101_deepstem --crop 97 --batch 4

The batch is what one network forward of a UniMatch step sees per image group (2 labeled + 2 unlabeled
crops at ``--batch 4``); ``perturb`` doubles the decoder's share as the step's clean + perturbed pass does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from step_time import machine, write_json
from trustmatch.models import build_model


def count(name: str, crop: int, batch: int, classes: int, perturb: bool) -> dict[str, object]:
    torch.manual_seed(0)
    model = build_model(name, classes, 3, bn_momentum=0.1, output_stride=16).train()
    x = torch.randn(batch, 3, crop, crop)
    with FlopCounterMode(display=False) as counter:
        out = model(x, perturb=perturb)
        out.logits.float().mean().backward()
    encoder = sum(p.numel() for p in model.encoder.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    return {
        "model": name,
        "gflops_forward_backward": round(counter.get_total_flops() / 1e9, 2),
        "params_encoder_m": round(encoder / 1e6, 2),
        "params_head_m": round(head / 1e6, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["deeplabv3plus_r101", "deeplabv3plus_r101_deepstem"])
    p.add_argument("--crop", type=int, default=97)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--perturb", action="store_true", help="decode clean + perturbed features, as UniMatch's step")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    rows = [count(m, args.crop, args.batch, args.classes, args.perturb) for m in args.models]
    for row in rows:
        print(row, flush=True)
    payload = {
        "benchmark": "seg_flops",
        **machine(torch.device("cpu")),
        "crop": args.crop,
        "batch": args.batch,
        "classes": args.classes,
        "perturb": args.perturb,
        "output_stride": 16,
        "counted": "torch.utils.flop_counter: one training-mode forward and backward (matmul/conv FLOPs)",
        "results": rows,
    }
    write_json(args.out, f"seg_flops-crop{args.crop}-batch{args.batch}", args.tag, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

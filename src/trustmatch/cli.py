"""``trustmatch train | evaluate | predict | list``.

Bad input ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trustmatch.errors import UserError

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trustmatch", description="SSL with trustworthy pseudo-labels.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a shipped config name or a YAML file")
    t.add_argument("config", nargs="?", help="shipped config name (see `trustmatch list`) or path to a YAML file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=2000 method.tau=0.9")
    t.add_argument("--out", type=Path, help="run directory (default: runs/<config>-seed<N>)")
    t.add_argument("--seed", type=int, help="seed for the split, the initialisation and the data order")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR where it stopped")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("evaluate", help="re-evaluate a run's checkpoint on its test (or validation) split")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.add_argument("--split", default="test", choices=["test", "val"])

    pr = sub.add_parser("predict", help="predict classes for images or folders and write a CSV")
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    pr.add_argument("--out", type=Path, default=Path("predictions.csv"))
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])

    ls = sub.add_parser("list", help="list the shipped configs")
    ls.add_argument("--keys", action="store_true", help="list every config key instead")
    return p


def _train(args: argparse.Namespace) -> int:
    from trustmatch.config import load_config

    if args.resume is not None:
        if args.config or args.overrides or args.seed is not None:
            raise UserError("--resume takes its config from the run directory: drop CONFIG, overrides and --seed")
        from trustmatch.engine.trainer import Trainer

        trainer = Trainer.resume(args.resume, progress=not args.quiet)
    else:
        if not args.config:
            raise UserError("train needs CONFIG (a name from `trustmatch list` or a YAML file) or --resume RUN_DIR")
        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        cfg = load_config(args.config, overrides)  # fails fast, before torch and the data load
        from trustmatch.engine.trainer import Trainer

        out = args.out or Path("runs") / f"{Path(args.config).stem}-seed{cfg.seed}"
        trainer = Trainer(cfg, out, progress=not args.quiet)
    metrics = trainer.fit()
    from trustmatch import distributed

    if not distributed.is_main():  # under torchrun, one report
        return 0
    final, best = metrics["final"], metrics["best"]
    print(
        f"done in {metrics['wall_time_s']:.0f}s: final test acc {final['accuracy']:.4f}, ECE-15 {final['ece_15']:.4f}; "
        f"best (step {best['step']}, chosen on validation) test acc {best['accuracy']:.4f}, ECE-15 {best['ece_15']:.4f}"
    )
    print(f"run directory: {trainer.run_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from trustmatch.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.checkpoint, args.split)
    print(json.dumps(result, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from trustmatch.predict import predict_to_csv

    n = predict_to_csv(args.run_dir, args.inputs, args.out, args.checkpoint)
    print(f"wrote {n} predictions to {args.out}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from trustmatch.config import describe_keys, read_yaml, shipped_configs

    if args.keys:
        rows = describe_keys()
        key_width, default_width = (max(len(r[i]) for r in rows) for i in (0, 1))
        for key, default, help in rows:
            print(f"{key:<{key_width}}  {default:<{default_width}}  {help}")
        return 0
    configs = shipped_configs()
    width = max(map(len, configs))
    for name in sorted(configs):
        print(f"{name:<{width}}  {read_yaml(configs[name]).get('description', '')}")
    return 0


COMMANDS = {"train": _train, "evaluate": _evaluate, "predict": _predict, "list": _list}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # overrides may follow options: `train CFG --out DIR k=v`
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if x not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"trustmatch: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("trustmatch: interrupted; the last checkpoint is intact (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

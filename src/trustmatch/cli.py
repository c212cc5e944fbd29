"""``trustmatch train | tune | evaluate | predict | report | list``.

Bad input ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

from trustmatch.core.errors import UserError
from trustmatch.core.fileio import atomic_write_text

EXIT_USER_ERROR = 2
CHECKPOINT_HELP = (
    "auto: best, else last; with --precision, last (best was chosen on the validation split that certifies, "
    "so with best the guarantee is approximate)"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trustmatch", description="SSL with trustworthy pseudo-labels.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model from a shipped config name or a YAML file")
    t.add_argument("config", nargs="?", help="shipped config name (see `trustmatch list`) or path to a YAML file")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=2000 method.tau=0.9")
    t.add_argument("--out", type=Path, help="run directory (default: runs/<config>[-<overrides>]-seed<N>)")
    t.add_argument("--seed", type=int, help="seed for the split, the initialisation and the data order")
    t.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR where it stopped (overrides: only train.steps, eval_every, log_every)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    tu = sub.add_parser("tune", help="choose settings on validation: an Optuna study whose trials are runs")
    tu.add_argument("config", help="shipped config name or YAML file, as for train")
    tu.add_argument("overrides", nargs="*", help="key=value overrides every trial shares")
    tu.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="SPACE",
        help="a shipped space (`trustmatch list --spaces`), a YAML file, or key=spec "
        "(log:0.003:0.3, 0.25:4, int:1:5, choice:bce,ce); repeat to combine",
    )
    tu.add_argument("--trials", type=int, required=True, help="trials the study holds when done (a rerun resumes)")
    tu.add_argument("--objective", default="metric", help="metric (validation accuracy / mIoU) or metric-ece")
    tu.add_argument(
        "--storage",
        metavar="URL",
        help="SQLAlchemy URL shared by several workers (default: study.db in the tune dir); or set TRUSTMATCH_STORAGE, "
        "which keeps a password out of shell history and the process list (--storage wins when both are given)",
    )
    tu.add_argument("--study", help="study name (default: <config>-<space>-<hash of config, space, objective>)")
    tu.add_argument("--out", type=Path, help="tune directory (default: tunes/<study>)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler (plus each trial's number)")
    tu.add_argument("--quiet", action="store_true", help="no progress bar in the trials")

    e = sub.add_parser("evaluate", help="re-evaluate a run's checkpoint on its test (or validation) split")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)
    e.add_argument("--split", default="test", choices=["test", "val"])
    _certify_options(
        e,
        "also certify a confidence threshold on validation and report the split's precision and "
        "coverage at it (and at the uncertified rule confidence > P)",
    )
    e.add_argument("--raw", action="store_true", help="with --precision: certify on the raw, unscaled confidences")

    pr = sub.add_parser(
        "predict", help="predict images or folders: a CSV of classes, or a directory of PNG masks (segmentation)"
    )
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    pr.add_argument(
        "--out", type=Path, help="classification: the CSV (predictions.csv); segmentation: a directory (predictions/)"
    )
    pr.add_argument("--confidence-maps", action="store_true", help="segmentation: also <stem>_confidence.png per image")
    pr.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"], help=CHECKPOINT_HELP)
    pr.add_argument(
        "--raw",
        action="store_true",
        help="uncalibrated confidences (default: the run's temperature, where fitted; segmentation: per-class "
        "temperatures can change a pixel's class, so --raw gives the unscaled masks too)",
    )
    _certify_options(
        pr,
        "accept only predictions above a threshold certified on the run's validation split "
        "(CSV column accepted; abstained masks are 255); writes <out>.certified.json",
    )
    pr.add_argument(
        "--export-labeled",
        type=Path,
        metavar="DIR",
        help="with --precision: write the accepted images as a labeled folder (class folders; segmentation: "
        "images/, masks/, classes.txt) to train on next",
    )

    rp = sub.add_parser(
        "report", help="compare the calibration of finished runs (--html: one page, classification and segmentation)"
    )
    rp.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    rp.add_argument(
        "--out", type=Path, default=Path("report"), help="directory for report.md and report.png (--html: report.html)"
    )
    rp.add_argument("--labels", nargs="+", metavar="NAME", help="one name per RUN_DIR (default: directory names)")
    rp.add_argument(
        "--html",
        action="store_true",
        help="write one self-contained page instead: metrics, reliability, risk-coverage, pseudo-labels over "
        "training, per-class values (from one pass of each run's last.pt over its report split), data map, overlays",
    )

    ls = sub.add_parser("list", help="list the shipped configs, or print one resolved")
    ls.add_argument("name", nargs="?", help="a shipped config (or YAML file): print its resolved config as YAML")
    ls.add_argument("--keys", action="store_true", help="list every config key instead")
    ls.add_argument("--spaces", action="store_true", help="list the shipped search spaces (with NAME: print one)")
    return p


def _certify_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--precision", type=float, metavar="P", help=f"target precision in (0, 1): {what}")
    parser.add_argument(
        "--delta",
        type=float,
        metavar="D",
        help="with --precision: the guarantee fails with probability at most D over the validation draw (default 0.05)",
    )


def run_name(config: str, overrides: list[str], seed: int) -> str:
    """``<config>[-<overrides>]-seed<N>``: a run with other overrides gets its own directory.

    Overrides are kept in the order given; characters unsafe in a file name become ``_``, and a name
    longer than 80 characters keeps its first 60 and a hash of the whole.
    """
    import hashlib
    import re

    name = Path(config).stem
    overrides = [o for o in overrides if not o.startswith("seed=")]  # the seed ends the name anyway
    if overrides:
        slug = re.sub(r"[^A-Za-z0-9._=+,-]", "_", ",".join(overrides))
        if len(slug) > 80:
            slug = f"{slug[:60]}-{hashlib.sha1(slug.encode()).hexdigest()[:8]}"
        name = f"{name}-{slug}"
    return f"{name}-seed{seed}"


def _train(args: argparse.Namespace) -> int:
    from trustmatch.config import load_config

    if args.resume is not None:
        if args.config and "=" in args.config:  # `--resume RUN train.steps=N`: no CONFIG, only overrides
            args.config, args.overrides = None, [args.config, *args.overrides]
        if args.config or args.seed is not None or args.out is not None:
            raise UserError("--resume takes its config and directory from RUN_DIR: drop CONFIG, --seed and --out")
        from trustmatch.run.trainer import Trainer

        trainer = Trainer.resume(args.resume, args.overrides, progress=not args.quiet)
    else:
        if not args.config:
            raise UserError("train needs CONFIG (a name from `trustmatch list` or a YAML file) or --resume RUN_DIR")
        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        cfg = load_config(args.config, overrides)  # fails fast, before torch and the data load
        from trustmatch.run.trainer import Trainer

        out = args.out or Path("runs") / run_name(args.config, list(args.overrides), cfg.seed)
        trainer = Trainer(cfg, out, progress=not args.quiet)
    metrics = trainer.fit()
    from trustmatch.core import distributed
    from trustmatch.evaluation.temperature import describe_temperature

    main_process = distributed.is_main()
    distributed.shutdown()
    if trainer.stop_signal is not None:  # SIGINT / SIGTERM: last.pt is saved at the step reached
        if main_process:
            print(
                f"trustmatch: stopped at step {trainer.step} of {trainer.cfg.train.steps}; continue with "
                f"trustmatch train --resume {trainer.run_dir}",
                file=sys.stderr,
            )
        return 128 + trainer.stop_signal  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    if not main_process:  # under torchrun, one report
        return 0
    describe = trainer.task.describe
    final, best, split = metrics["final"], metrics["best"], trainer.report_split
    line = f"done in {metrics['wall_time_s']:.0f}s: final {split} {describe(final)}; "
    if best is None:
        line += "no validation split, so no best checkpoint: the final model is the result"
    else:
        line += f"best (step {best['step']}, chosen on validation) {split} {describe(best)}"
    if metrics["final_calibrated"] is not None:
        scaled = f"T {describe_temperature(metrics['temperature'], 2)}, fitted on validation"
        line += f"; final after temperature scaling ({scaled}) {describe(metrics['final_calibrated'])}"
    print(line)
    print(f"run directory: {trainer.run_dir}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from trustmatch.tune import TuneRequest, load_space, tune
    from trustmatch.tune.storage import storage_url
    from trustmatch.tune.study import Stopped

    storage, source = storage_url(args.storage)
    request = TuneRequest(
        args.config, args.overrides, load_space(args.space), args.trials, args.objective, storage, source, args.study,
        args.out, args.seed, progress=not args.quiet,
    )  # fmt: skip
    try:
        markdown, out = tune(request)
    except Stopped as e:
        print("trustmatch: tune stopped; rerun the same command to resume the study", file=sys.stderr)
        return 128 + e.signum
    print(markdown, end="")
    print(f"tune directory: {out} (report.md, trials.csv, history.png)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from trustmatch.run.checkpoint_evaluation import evaluate_run

    result = evaluate_run(args.run_dir, args.checkpoint, args.split, args.precision, args.delta, args.raw)
    print(json.dumps(result, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from trustmatch.config import read_yaml
    from trustmatch.evaluation.temperature import describe_temperature
    from trustmatch.run import certified_threshold as certified
    from trustmatch.run.loaded_run import load_run_model
    from trustmatch.tasks import TASKS

    delta = certified.check_request(args.precision, args.delta)
    if args.export_labeled is not None and args.precision is None:
        raise UserError("--export-labeled needs --precision P: only predictions certified at a precision are exported")
    path = certified.checkpoint_for(args.run_dir, args.checkpoint, args.precision)  # --precision: last.pt
    config = args.run_dir / "config.yaml"
    segmentation = config.is_file() and read_yaml(config).get("task") == "segmentation"  # checked before loading
    options = {}
    if segmentation:
        args.out = args.out or Path("predictions")
        options["confidence_maps"] = args.confidence_maps
    else:
        args.out = args.out or Path("predictions.csv")
        if args.confidence_maps:
            raise UserError("--confidence-maps is for segmentation runs: the classification CSV has the confidence")
        if args.out.is_dir():
            raise UserError(
                f"--out {args.out} is a directory: name the CSV file to write, e.g. {args.out / 'preds.csv'}"
            )
    run = load_run_model(path)
    temperature = None if args.raw else run.meta.get("temperature")
    predict = TASKS.metadata(run.cfg.task).get("predict")
    if predict is None:
        raise UserError(f"task {run.cfg.task!r} has no predictor: register one with TASKS.register(..., predict=...)")
    certificate = None
    if args.precision is not None:
        certified.certification_temperature(run, args.raw, str(path))  # refuses a checkpoint without T
        task = run.task(run.cfg, run.precision)
        certificate = certified.certify_run(run, task, args.precision, delta, temperature, str(args.run_dir))
        print(certified.summary_line(certificate, path, temperature))
        options.update(threshold=certificate.threshold, export=args.export_labeled)
    n, accepted = predict(run.model, run.meta, args.inputs, args.out, run.precision, temperature, **options)
    how = (
        "raw confidences"
        if temperature is None
        else f"confidences at temperature {describe_temperature(temperature)} (fitted on validation)"
    )
    print(f"wrote {n} predictions to {args.out} ({how})")
    if certificate is not None:
        record = {
            **certified.describe(certificate, temperature, task, path),
            "predicted": n,
            "accepted": accepted,
            "coverage": accepted / n,
            **({"export_labeled": str(args.export_labeled)} if args.export_labeled is not None else {}),
        }
        where = args.out / "certified.json" if segmentation else args.out.with_name(f"{args.out.stem}.certified.json")
        atomic_write_text(where, json.dumps(record, indent=2))
        exported = f"; exported to {args.export_labeled}" if args.export_labeled is not None else ""
        print(f"accepted {accepted} of {n} ({accepted / n:.3f}), abstained on the rest{exported}; wrote {where}")
    return 0


def _report(args: argparse.Namespace) -> int:
    if args.html:
        import time

        from trustmatch.run.html_report import write_html_report

        start = time.perf_counter()
        page = write_html_report(args.run_dirs, args.out, args.labels)
        size = page.stat().st_size / 1e6
        print(f"wrote {page} ({size:.2f} MB, {time.perf_counter() - start:.1f} s)")
        return 0
    from trustmatch.reporting.run_comparison import load_runs, markdown_report, write_report

    runs = load_runs(args.run_dirs, args.labels)
    markdown, png = write_report(runs, args.out)
    print(markdown_report(runs), end="")
    print(f"wrote {markdown} and {png}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from trustmatch.config import describe_keys, load_config, shipped_configs

    if args.spaces:
        from trustmatch.tune import shipped_spaces, space_text

        if args.name is not None:
            print(space_text(args.name), end="")
            return 0
        spaces = shipped_spaces()
        width = max(map(len, spaces))
        for name, description in spaces.items():
            print(f"{name:<{width}}  {description}")
        return 0
    if args.name is not None:
        if args.keys:
            raise UserError("trustmatch list takes NAME or --keys, not both")
        import yaml

        print(yaml.safe_dump(load_config(args.name).to_dict(), sort_keys=False), end="")
        return 0
    if args.keys:
        rows = describe_keys()
        key_width, default_width = (max(len(r[i]) for r in rows) for i in (0, 1))
        for key, default, help in rows:
            print(f"{key:<{key_width}}  {default:<{default_width}}  {help}")
        return 0
    configs = shipped_configs()
    width = max(map(len, configs))
    for name in sorted(configs):
        print(f"{name:<{width}}  {configs[name]['description']}")
    return 0


COMMANDS = {
    "train": _train,
    "tune": _tune,
    "evaluate": _evaluate,
    "predict": _predict,
    "report": _report,
    "list": _list,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("train", "tune"):  # overrides may follow options: `train CFG --out DIR k=v`
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if x not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        from trustmatch.core import distributed

        if not (e.everywhere and not distributed.is_main()):  # under torchrun, a shared error once
            print(f"trustmatch: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `trustmatch list | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it
        print("trustmatch: interrupted; the last checkpoint is intact (resume with --resume RUN_DIR)", file=sys.stderr)
        return 130


def console_main() -> None:
    """The ``trustmatch`` command: :func:`main`, then an exit that skips the interpreter's last collection.

    That collection walks every object torch and matplotlib created (half a second of each command's wall
    time, measured). Frozen, they are left to the OS; files are closed and flushed by then (written
    atomically, the TensorBoard log closed). Not in :func:`main`, which tests call in one long process."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()

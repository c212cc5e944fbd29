"""Training runs end to end on the embedded digits: run directory, resume, evaluate, predict, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trustmatch.cli import main
from trustmatch.config import load_config
from trustmatch.engine.checkpoint import load_checkpoint
from trustmatch.engine.trainer import Trainer, cosine_factor
from trustmatch.errors import UserError

TINY = ["train.steps=6", "train.eval_every=3", "train.log_every=2", "train.batch_size=8", "train.uratio=2"]
METRIC_KEYS = {"accuracy", "ece_15", "ece_10", "mce_15", "nll", "brier"}


def _trainer(method: str, out: Path, *extra: str) -> Trainer:
    return Trainer(load_config(f"digits-{method}", [*TINY, *extra]), out, progress=False)


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "flexmatch", "freematch", "softmatch"])
def test_every_method_writes_a_complete_run_directory(tmp_path: Path, method: str) -> None:
    metrics = _trainer(method, tmp_path / "run").fit()
    run = tmp_path / "run"
    for name in [
        "config.yaml",
        "metrics.json",
        "last.pt",
        "best.pt",
        "reliability_best.png",
        "reliability_final.png",
        "curves.png",
    ]:
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved["final"]) and METRIC_KEYS <= set(saved["best"])
    assert [h["step"] for h in saved["history"]] == [3, 6]
    assert all(0.0 <= saved["final"][k] <= 1.0 for k in ["accuracy", "ece_15", "ece_10", "mce_15"])
    assert saved["best"]["step"] in (3, 6) and saved["best"]["val"]["accuracy"] >= 0
    assert metrics["final"] == saved["final"]
    state = load_checkpoint(run / "last.pt")  # weights_only=True
    assert state["step"] == 6 and state["classes"][0] == "0"
    assert not list(run.glob(".*.tmp"))


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    straight = _trainer("softmatch", tmp_path / "a")
    straight.fit()
    interrupted = _trainer("softmatch", tmp_path / "b")
    interrupted.fit(stop_at=4)
    assert interrupted.step == 4
    resumed = Trainer.resume(tmp_path / "b", progress=False)
    assert resumed.step == 4
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight.selector.mu, resumed.selector.mu)


def test_flexmatch_state_is_checkpointed(tmp_path: Path) -> None:
    trainer = _trainer("flexmatch", tmp_path / "run")
    trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(state["selector"]["stored"], trainer.selector.stored)


def test_existing_run_directory_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _trainer("supervised", tmp_path / "run").fit()
    assert main(["train", "digits-supervised", "--out", str(tmp_path / "run"), *TINY, "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cosine_schedule() -> None:
    assert cosine_factor(0, 100) == 1.0
    assert cosine_factor(100, 100) == pytest.approx(np.cos(7 * np.pi / 16))


def test_cli_train_evaluate_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", "digits-fixmatch", "--out", str(run), "--seed", "1", "--quiet", *TINY]) == 0
    assert "best (step" in capsys.readouterr().out
    assert main(["evaluate", str(run)]) == 0
    result = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "metrics.json").read_text())
    assert result["accuracy"] == pytest.approx(saved["best"]["accuracy"])
    assert (run / "evaluation-best-test.png").is_file()

    images = tmp_path / "images"
    images.mkdir()
    from sklearn.datasets import load_digits

    for i, digit in enumerate(load_digits().images[:3]):
        Image.fromarray((digit * 255 / 16).astype(np.uint8)).save(images / f"d{i}.png")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(images), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("path,class,confidence,top1_class,top1_confidence,top2_class")
    assert len(rows) == 4 and rows[1].split(",")[1] in [str(d) for d in range(10)]


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pets"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(folder / "cat" / f"{i}.png")
    (folder / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    cases = [
        (["data.name=folder", f"data.root={folder}"], "broken.jpg"),
        (["data.name=cifar10", f"data.root={tmp_path / 'missing'}"], "missing"),
        (["data.labels_per_class=500"], "data.labels_per_class=500"),
        (["data.nmae=digits"], "did you mean 'data.name'"),
    ]
    for overrides, fragment in cases:
        assert main(["train", "digits-fixmatch", "--out", str(tmp_path / "x"), "--quiet", *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
    (folder / "dog" / "broken.jpg").unlink()
    assert (
        main(
            [
                "train",
                "digits-fixmatch",
                "--out",
                str(tmp_path / "x"),
                "data.name=folder",
                f"data.root={folder}",
                "--quiet",
            ]
        )
        == 2
    )
    assert "dog" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), str(folder)]) == 2
    assert main(["train", "--resume", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_fixmatch_far_above_supervised_on_digits(tmp_path: Path) -> None:
    """The headline claim: with 4 labels per class, FixMatch beats the supervised baseline by far."""
    supervised = Trainer(load_config("digits-supervised"), tmp_path / "sup", progress=False).fit()
    fixmatch = Trainer(load_config("digits-fixmatch"), tmp_path / "fix", progress=False).fit()
    assert fixmatch["final"]["accuracy"] > 0.9
    assert fixmatch["final"]["accuracy"] > supervised["final"]["accuracy"] + 0.05


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    """Two gloo processes train one run: one run directory, selector state reduced over both."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "trustmatch",
        "train",
        "digits-flexmatch",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        *TINY,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("run directory:") == 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["final"]["n"] == saved["split"]["test"]  # sharded evaluation gathered every sample
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["step"] == 6
    # each process took its own share of every global batch: 6 steps x 8 labeled x 2 processes
    assert state["lb_stream"]["position"] == 6 * 8 * 2 and state["ulb_stream"]["position"] == 6 * 16 * 2


DDP_RESUME_SCRIPT = """
import sys
from pathlib import Path

import torch

from trustmatch.config import load_config
from trustmatch import distributed as dist
from trustmatch.engine.trainer import Trainer

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config("digits-softmatch", overrides)
straight = Trainer(cfg, out / "straight", progress=False)
straight.fit()
Trainer(cfg, out / "stopped", progress=False).fit(stop_at=4)
dist.barrier()
resumed = Trainer.resume(out / "stopped", progress=False)
resumed.fit()
pairs = zip(straight.model.state_dict().values(), resumed.model.state_dict().values())
(out / f"rank{dist.rank()}").write_text(str(all(torch.equal(a, b) for a, b in pairs)))
"""


@pytest.mark.slow
def test_torchrun_resume_is_bit_exact(tmp_path: Path) -> None:
    """Stopped and resumed under torchrun, each process gets its own RNG streams back."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_resume.py"
    script.write_text(DDP_RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(tmp_path), *TINY]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "rank0").read_text() == "True" and (tmp_path / "rank1").read_text() == "True"
    state = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["aug"], state["rng"][1]["aug"])
    with pytest.raises(UserError, match="written by 2 process"):
        Trainer.resume(tmp_path / "stopped", progress=False)


def test_folder_dataset_trains_and_predicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's own-images path: class folders, an unlabeled folder, RGB, then predict."""
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for split, count in (("labeled", 8), ("test", 3)):
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (10, 14, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "unlabeled" / "batch1").mkdir(parents=True)
    for i in range(6):
        Image.new("RGB", (9, 9), colours["red" if i % 2 else "blue"]).save(
            tmp_path / "unlabeled" / "batch1" / f"{i}.jpg"
        )
    config = tmp_path / "mine.yaml"
    config.write_text(
        f"base: digits-fixmatch\ndata:\n  name: folder\n  root: {tmp_path / 'labeled'}\n"
        f"  unlabeled_dir: {tmp_path / 'unlabeled'}\n  test_dir: {tmp_path / 'test'}\n  image_size: 12\n"
        "  labels_per_class: 2\n  val_per_class: 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--quiet", *TINY]) == 0
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["split"] == {"labeled": 4, "unlabeled": 16, "val": 2, "test": 6}  # 10 left in the pool + 6 unlabeled
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(tmp_path / "unlabeled"), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 6 and {row.split(",")[1] for row in rows} <= {"blue", "red"}

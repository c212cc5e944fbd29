"""The training step never makes the host wait for the device, for every method.

On the CPU, each method's step (forward, selection, losses, its regularizer) compiles with
``torch.compile(fullgraph=True)``: a ``.item()``, a ``bool(tensor)``, a Python branch on a value or a
shape taken from one would be a graph break, and ``fullgraph`` turns a break into an error. The
"eager" backend runs what dynamo captured without generating code: the test checks capture (graph
breaks), not code generation, in seconds. Whole updates (forward to EMA, which dynamo does not see)
run under a dispatch mode that records every operator that would wait for a GPU. On CUDA, whole
updates run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call (marked ``cuda``:
``pytest -m cuda`` on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.run.compiled_step import uncapturable
from trustmatch.run.trainer import Trainer

CLASSIFICATION = ["train.batch_size=8", "train.uratio=2", "train.eval_every=1000"]
SEGMENTATION = ["data.scenes=40", "data.labeled_images=8", "data.val_images=6", "train.batch_size=4"]
# (preset, overrides): every method's step, and CalibrateMix's two modes past their warm-up
STEPS = {
    "fixmatch": ("digits-fixmatch", CLASSIFICATION),
    "flexmatch": ("digits-flexmatch", CLASSIFICATION),
    "freematch": ("digits-freematch", CLASSIFICATION),
    "softmatch": ("digits-softmatch", CLASSIFICATION),
    "uda": ("digits-uda", CLASSIFICATION),
    "csl": ("digits-csl", CLASSIFICATION),
    "supervised": ("digits-supervised", CLASSIFICATION),
    "calibratemix-faithful": (
        "digits-calibratemix",
        [*CLASSIFICATION, "calibratemix.mode=faithful", "calibratemix.warmup=0"],
    ),
    "calibratemix-efficient": (
        "digits-calibratemix",
        [*CLASSIFICATION, "calibratemix.mode=efficient", "calibratemix.warmup=0"],
    ),
    "unimatch": ("digitscenes-unimatch", SEGMENTATION),
    "csl-tmp": ("digitscenes-csl", SEGMENTATION),
    "seg-supervised": ("digitscenes-supervised", SEGMENTATION),
}


def _trainer(tmp_path: Path, name: str, device: str) -> Trainer:
    preset, overrides = STEPS[name]
    # 1000 steps: no CSL selection snapshot (the recorder's host copies) among the first few
    cfg = load_config(preset, [*overrides, "train.steps=1000", "train.threads=1", f"train.device={device}"])
    return Trainer(cfg, tmp_path / "run", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STEPS))
def test_every_step_compiles_to_one_graph(tmp_path: Path, name: str) -> None:
    trainer = _trainer(tmp_path, name, "cpu")
    task = trainer.task
    torch._dynamo.reset()
    compiled = torch.compile(task.step_with_regularizers, fullgraph=True, backend="eager")
    trainer.train_model.train()
    for step in (1, 2):  # two step numbers: the second compiles with the step symbolic, still one graph
        batch = trainer.next_batch()
        with trainer.precision.autocast():
            out = compiled(trainer.train_model, batch, step, trainer.cfg.train.steps)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.logs
        if name == "calibratemix-efficient":  # its mixes join the next forward: that forward compiles too
            assert "calibratemix" in out.logits or step == 1


class HostReads(TorchDispatchMode):
    """Records every operator that would make the host wait for a GPU: a value read (``.item()``,
    ``bool``, ``float``, ``int`` all reach ``_local_scalar_dense``) or a shape taken from values."""

    WAITING = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "repeat_interleave", "_unique2"}
    WAITING |= {"unique_dim", "unique_consecutive", "unique_dim_consecutive", "masked_scatter"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") else []
        if name in self.WAITING or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_host_reads_are_seen() -> None:
    """What FlexMatch's and the APM tracker's updates and the trainer's checks did before."""
    t = torch.tensor([1, -1, 2])
    with HostReads() as reads:
        torch.bincount(t[t >= 0]), float(t.sum()), bool(t.any()), torch.unique(t)
        t[torch.tensor([0, 2])]  # an index tensor of integers waits for nothing
    assert reads.seen == ["index", "bincount", "_local_scalar_dense", "_local_scalar_dense", "_unique2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STEPS))
def test_updates_read_nothing_on_the_host(tmp_path: Path, name: str) -> None:
    """The CPU's view of the CUDA test below: forward to EMA and the logged sums, on the CPU, call no
    operator that would wait for a GPU (the batches are made before)."""
    trainer = _trainer(tmp_path, name, "cpu")
    trainer.optimize(trainer.next_batch())  # CalibrateMix's efficient mixes join from the second step
    batches = [trainer.next_batch() for _ in range(2)]
    sums: dict[str, torch.Tensor] = {}
    with HostReads() as reads:
        for batch in batches:
            for k, v in trainer.optimize(batch).logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
    assert reads.seen == []
    assert trainer.step == 3 and sums


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(STEPS))
def test_updates_never_wait_for_the_gpu(tmp_path: Path, name: str) -> None:
    """Forward, selection, losses, backward, optimizer, schedule, EMA and the logged sums of three
    steps; the batches (item 3 of issue 23: the input pipeline) are made before."""
    trainer = _trainer(tmp_path, name, "cuda")
    trainer.optimize(trainer.next_batch())  # first-step set-up (optimizer state, cuDNN plans)
    batches = [trainer.next_batch() for _ in range(3)]
    torch.cuda.synchronize()
    sums: dict[str, torch.Tensor] = {}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            for k, v in trainer.optimize(batch).logs.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.step == 4 and all(torch.isfinite(v) for v in sums.values())
    trainer.nonfinite.check(None)  # the read a log interval makes: nothing was not finite


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["fixmatch", "flexmatch", "softmatch", "csl"])
def test_cuda_graphs_replay_the_step(tmp_path: Path, name: str) -> None:
    """train.cuda_graphs=true: the compiled step is captured (inductor counts each graph it could not
    capture in ``cudagraph_skips``) and the run trains to the end."""
    from torch._dynamo.utils import counters

    preset, overrides = STEPS[name]
    cfg = load_config(preset, [*overrides, "train.steps=8", "train.eval_every=8", "train.cuda_graphs=true"])
    torch._dynamo.reset()
    counters.clear()
    metrics = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert metrics["steps"] == 8


@pytest.mark.parametrize(
    "overrides, setting",
    [
        ([], None),
        (["train.nonfinite=skip"], "train.nonfinite=skip"),
        (["calibratemix.mode=efficient"], "calibratemix.mode=efficient"),
        (["calibratemix.mode=faithful"], "calibratemix.mode=faithful"),
    ],
)
def test_what_cuda_graphs_cannot_capture_is_named(overrides: list[str], setting: str | None) -> None:
    cfg = load_config("digits-softmatch", overrides)
    reason = uncapturable(cfg, torch.device("cuda"))
    assert (reason and reason[0]) == setting
    assert uncapturable(cfg, torch.device("cpu"))[0] == (setting or "train.device=cpu")
    assert uncapturable(load_config("digitscenes-unimatch"), torch.device("cuda"))[0] == "task segmentation"


def test_cuda_graphs_on_the_cpu_is_refused_before_a_run_exists(tmp_path: Path) -> None:
    cfg = load_config("digits-fixmatch", ["train.cuda_graphs=true", "train.device=cpu"])
    with pytest.raises(UserError, match=r"^train.cuda_graphs=true cannot capture the step with train.device=cpu"):
        Trainer(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()

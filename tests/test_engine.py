"""Engine building blocks: precision choice, optimizer groups and schedules."""

import math
from copy import deepcopy

import pytest
import torch

from trustmatch.config import TrainConfig
from trustmatch.core.errors import UserError
from trustmatch.core.lr_schedules import SCHEDULES
from trustmatch.core.precision import Precision, native_bf16, resolve_device
from trustmatch.models import build_model
from trustmatch.run.optim import build_optimizer, build_scheduler, param_groups


def test_precision_follows_the_config_and_the_hardware() -> None:
    cpu = torch.device("cpu")
    fp32 = Precision.resolve(cpu, amp=False, channels_last=True)
    assert not fp32.amp and not fp32.channels_last and fp32.describe() == "float32"
    asked = Precision.resolve(cpu, amp=True, channels_last=True)
    assert asked.amp == native_bf16(cpu) and asked.channels_last == native_bf16(cpu)
    assert not Precision.resolve(torch.device("mps"), amp=True, channels_last=True).amp


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="this CPU has no native bfloat16")
def test_bf16_autocast_on_this_cpu_keeps_the_loss_float32() -> None:
    precision = Precision.resolve(torch.device("cpu"), amp=True, channels_last=True)
    model = precision.prepare(build_model("cnn", 10, 1))
    x = precision.layout(torch.randn(4, 1, 16, 16))
    with precision.autocast():
        out = model(x)
    assert out.features.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    assert precision.describe() == "bfloat16 autocast, channels-last"


def test_param_groups_split_head_and_decay() -> None:
    model = build_model("cnn", 10, 1)
    cfg = TrainConfig(lr=0.1, weight_decay=1e-3, head_lr_scale=10.0)
    groups = param_groups(model, cfg)
    head_ids = {id(p) for p in model.head.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        is_head = {id(p) in head_ids for p in g["params"]}
        assert len(is_head) == 1
        assert g["lr"] == pytest.approx(1.0 if is_head.pop() else 0.1)
        assert g["weight_decay"] == (1e-3 if all(p.ndim > 1 for p in g["params"]) else 0.0)


def test_schedules_and_scheduler_keep_head_scale() -> None:
    assert SCHEDULES.get("cosine")(100, 100) == pytest.approx(math.cos(7 * math.pi / 16))
    assert SCHEDULES.get("poly")(50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert SCHEDULES.get("poly")(100, 100) == 0.0
    model = build_model("cnn", 10, 1)
    cfg = TrainConfig(lr=0.1, steps=10, schedule="poly", head_lr_scale=10.0)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = sorted({round(g["lr"], 12) for g in optimizer.param_groups})
    assert lrs == pytest.approx([0.1 * 0.5**0.9, 1.0 * 0.5**0.9])
    with pytest.raises(UserError, match="did you mean 'poly'"):
        SCHEDULES.get("polly")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_fused_optimizer_state_resumes_on_the_cpu(optimizer: str) -> None:
    """A CUDA run's state (fused kernels, float32 step counts) loads on the CPU with the CPU's foreach
    kernels and steps exactly as the optimizer that never left it."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1)
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])

    def step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x).logits, y).backward()
        opt.step()

    original = build_optimizer(model, cfg)
    step(model, original)
    copy = build_model("cnn", 10, 1)
    copy.load_state_dict(model.state_dict())
    saved = deepcopy(original.state_dict())
    for group in saved["param_groups"]:  # as a CUDA run writes it
        group.update(fused=True, foreach=None)
    for state in saved["state"].values():
        if "step" in state:
            state["step"] = state["step"].to(torch.float32)
    resumed = build_optimizer(copy, cfg)
    resumed.load_state_dict(saved)
    assert all(g["fused"] is None and g["foreach"] is True for g in resumed.param_groups)
    step(model, original)
    step(copy, resumed)
    for a, b in zip(model.parameters(), copy.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_more_torchrun_processes_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """2 processes on a node with one GPU: every rank (rank 0 too, which would otherwise wait for the
    other in the process group) refuses naming the count and the fix, not a CUDA ordinal error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device(name) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", rank)
        with pytest.raises(
            UserError, match=r"started 2 processes on this node but only 1 CUDA device\(s\).*--nproc_per_node=1"
        ):
            resolve_device(name)

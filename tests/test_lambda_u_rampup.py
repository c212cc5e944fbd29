"""``method.lambda_u_rampup``: the unlabeled weight ramps over a fraction of training, and off (the
default) leaves every step as it was."""

import math

import pytest
import torch
from torch import nn

from trustmatch.config import load_config
from trustmatch.core.errors import UserError
from trustmatch.methods import build_method, method_config
from trustmatch.methods.weak_to_strong import Batch, weak_to_strong_step
from trustmatch.models.output import Output


@pytest.mark.parametrize(
    ("shape", "step", "expected"),
    [
        ("sigmoid", 0, 2.0 * math.exp(-5.0)),  # 100 steps, ramp 0.5: 50 steps long
        ("sigmoid", 25, 2.0 * math.exp(-5.0 * 0.5**2)),
        ("sigmoid", 40, 2.0 * math.exp(-5.0 * 0.2**2)),
        ("sigmoid", 50, 2.0),
        ("sigmoid", 99, 2.0),
        ("linear", 0, 0.0),
        ("linear", 10, 2.0 * 0.2),
        ("linear", 49, 2.0 * 0.98),
        ("linear", 50, 2.0),
    ],
)
def test_weight_matches_a_hand_computation(shape: str, step: int, expected: float) -> None:
    cfg = method_config("fixmatch", lambda_u=2.0, lambda_u_rampup=0.5, lambda_u_rampup_shape=shape)
    assert cfg.lambda_u_at(step, 100) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_off_is_exactly_lambda_u_at_every_step() -> None:
    cfg = method_config("softmatch", lambda_u=0.7)
    assert all(cfg.lambda_u_at(step, 10) == 0.7 for step in range(10))


class Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(self.fc(x), x)


def _batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g)
    return Batch(x[:4], torch.tensor([0, 1, 2, 0]), torch.arange(4), x[4:12], x[12:], torch.arange(8))


@pytest.mark.parametrize("name", ["fixmatch", "softmatch"])
def test_rampup_off_leaves_the_step_bit_identical(name: str) -> None:
    """The method's step with the ramp off equals the step called with the plain lambda_u (before the ramp)."""
    cfg = method_config(name, lambda_u=1.5)
    method = build_method(cfg)
    losses = []
    for use_method in (True, False):
        torch.manual_seed(0)
        model, selector = Linear(), method.selector(3, 8)
        if use_method:
            out = method.classification_step(model, _batch(), selector, 3, 10)
        else:
            out = weak_to_strong_step(model, _batch(), selector, 1.5, 3, 10)
        out.loss.backward()
        losses.append((out.loss.detach(), model.fc.weight.grad.clone()))
    assert torch.equal(losses[0][0], losses[1][0]) and torch.equal(losses[0][1], losses[1][1])


def test_ramp_scales_the_unlabeled_term_of_the_step() -> None:
    cfg = method_config("fixmatch", lambda_u=1.0, tau=0.0, lambda_u_rampup=1.0, lambda_u_rampup_shape="linear")
    method = build_method(cfg)
    torch.manual_seed(0)
    model, selector = Linear(), method.selector(3, 8)
    out = method.classification_step(model, _batch(), selector, 5, 20)  # weight 0.25
    sup, unsup = out.logs["loss_sup"], out.logs["loss_unsup"]
    assert torch.allclose(out.loss, sup + 0.25 * unsup)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.lambda_u_rampup=1.5", "'method.lambda_u_rampup' must be in [0, 1]"),
        ("method.lambda_u_rampup_shape=cosine", "'method.lambda_u_rampup_shape' must be sigmoid or linear"),
    ],
)
def test_bad_ramp_is_refused(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("digits-fixmatch", [override])


def test_presets_keep_the_ramp_off() -> None:
    assert load_config("digits-fixmatch").method.lambda_u_rampup == 0.0

"""The weak-to-strong step shared by the FixMatch family, and the supervised-only step.

One forward over cat(x_lb, u_w, u_s) (BatchNorm sees all three, as in FixMatch); the selector
turns the detached weak-view probabilities into pseudo-labels and weights; the unlabeled loss is
the weighted cross-entropy of the strong view, averaged over the whole unlabeled batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.selection import Selector


@dataclass
class Batch:
    """One training batch, already augmented and on the device; indices key per-sample state."""

    x_lb: Tensor
    y_lb: Tensor
    idx_lb: Tensor
    u_weak: Tensor | None = None
    u_strong: Tensor | None = None
    idx_ulb: Tensor | None = None
    y_ulb: Tensor | None = None  # true labels where known: diagnostics only, never in a loss


@dataclass
class StepResult:
    loss: Tensor
    logs: dict[str, Tensor]


def supervised_step(model: nn.Module, batch: Batch) -> StepResult:
    loss = F.cross_entropy(model(batch.x_lb).float(), batch.y_lb)
    return StepResult(loss, {"loss_sup": loss.detach()})


def weak_to_strong_step(model: nn.Module, batch: Batch, selector: Selector, lambda_u: float) -> StepResult:
    """L = CE(lb) + lambda_u * mean_i w_i CE(strong_i, yhat_i) (+ the selector's extra term)."""
    assert batch.u_weak is not None and batch.u_strong is not None
    n_lb, n_u = len(batch.x_lb), len(batch.u_weak)
    logits = model(torch.cat([batch.x_lb, batch.u_weak, batch.u_strong])).float()
    logits_lb, logits_weak, logits_strong = logits.split([n_lb, n_u, n_u])
    loss_sup = F.cross_entropy(logits_lb, batch.y_lb)
    with torch.no_grad():
        selection = selector.select(logits_weak.detach().softmax(dim=1), batch.idx_ulb)
    per_sample = F.cross_entropy(logits_strong, selection.labels, reduction="none")
    loss_unsup = (per_sample * selection.weights).mean()
    loss = loss_sup + lambda_u * loss_unsup
    logs = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), "mask": selection.weights.mean()}
    extra = selector.auxiliary_loss(logits_strong, selection)
    if extra is not None:
        loss = loss + extra
        logs["loss_aux"] = extra.detach()
    if batch.y_ulb is not None:
        known = batch.y_ulb >= 0
        if bool(known.any()):
            correct = (selection.labels[known] == batch.y_ulb[known]).float()
            logs["pl_acc"] = correct.mean()
            used = selection.weights[known]
            logs["pl_acc_selected"] = (correct * used).sum() / used.sum().clamp_min(1e-12)
    return StepResult(loss, logs)

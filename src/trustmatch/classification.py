"""The weak-to-strong step shared by the FixMatch family, and the supervised-only step.

One forward over cat(x_lb, u_w, u_s) (BatchNorm sees all three, as in FixMatch); the selector
turns the detached weak-view probabilities into pseudo-labels and weights; the unlabeled loss is
the weighted cross-entropy of the strong view, averaged over the whole unlabeled batch. Each step
returns the logits and features of every view and the selection, for regularizers to build on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.selection import Selector
from trustmatch.step import StepOutput


@dataclass
class Batch:
    """One training batch, already augmented and on the device; indices key per-sample state."""

    x_lb: Tensor
    y_lb: Tensor
    idx_lb: Tensor
    u_weak: Tensor | None = None
    u_strong: Tensor | None = None
    idx_ulb: Tensor | None = None
    y_ulb: Tensor | None = None  # true labels (-1: unknown), diagnostics only, never in a loss; None: none known


def supervised_step(model: nn.Module, batch: Batch, step: int, total_steps: int) -> StepOutput:
    out = model(batch.x_lb)
    loss = F.cross_entropy(out.logits, batch.y_lb)
    views = {"lb": out.logits}, {"lb": out.features}
    return StepOutput(loss, {"loss_sup": loss.detach()}, *views, step=step, total_steps=total_steps)


def weak_to_strong_step(
    model: nn.Module, batch: Batch, selector: Selector, lambda_u: float, step: int, total_steps: int
) -> StepOutput:
    """L = CE(lb) + lambda_u * mean_i w_i CE(strong_i, yhat_i) (+ the selector's extra term)."""
    assert batch.u_weak is not None and batch.u_strong is not None
    sizes = [len(batch.x_lb), len(batch.u_weak), len(batch.u_strong)]
    out = model(torch.cat([batch.x_lb, batch.u_weak, batch.u_strong]))
    logits = dict(zip(("lb", "weak", "strong"), out.logits.split(sizes)))
    features = dict(zip(("lb", "weak", "strong"), out.features.split(sizes)))
    loss_sup = F.cross_entropy(logits["lb"], batch.y_lb)
    with torch.no_grad():
        selection = selector.select(logits["weak"].detach().softmax(dim=1), batch.idx_ulb)
    per_sample = F.cross_entropy(logits["strong"], selection.labels, reduction="none")
    loss_unsup = (per_sample * selection.weights).mean()
    loss = loss_sup + lambda_u * loss_unsup
    logs = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), "mask": selection.weights.mean()}
    extra = selector.auxiliary_loss(logits["strong"], selection)
    if extra is not None:
        loss = loss + extra
        logs["loss_aux"] = extra.detach()
    if batch.y_ulb is not None:  # masks, not boolean indexing: no host sync in the step
        known = (batch.y_ulb >= 0).float()
        correct = (selection.labels == batch.y_ulb).float() * known
        logs["pl_acc"] = correct.sum() / known.sum().clamp_min(1.0)
        used = selection.weights * known
        logs["pl_acc_selected"] = (correct * used).sum() / used.sum().clamp_min(1e-12)
    return StepOutput(loss, logs, logits, features, selection, step, total_steps)

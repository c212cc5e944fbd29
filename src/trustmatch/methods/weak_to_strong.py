"""The weak-to-strong step shared by the FixMatch family, and the supervised-only step.

One forward over cat(x_lb, u_w, u_s) (BatchNorm sees all three, as in FixMatch); the selector
turns the detached weak-view probabilities into pseudo-labels and weights; the unlabeled loss is
the weighted cross-entropy of the strong view, averaged over the whole unlabeled batch. Each step
returns the logits and features of every view and the selection, for regularizers to build on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.methods.selector import Selection, Selector
from trustmatch.methods.step_output import StepOutput


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
    extra: dict[str, Tensor] = field(default_factory=dict)  # a regularizer's images, joined to the forward


def supervised_step(model: nn.Module, batch: Batch, step: int, total_steps: int) -> StepOutput:
    out = model(batch.x_lb)
    loss = F.cross_entropy(out.logits, batch.y_lb)
    views = {"lb": out.logits}, {"lb": out.features}
    return StepOutput(loss, {"loss_sup": loss.detach()}, *views, step=step, total_steps=total_steps)


def consistency_loss(strong_logits: Tensor, selection: Selection) -> Tensor:
    """mean_i w_i CE(strong_i, target_i) over the whole unlabeled batch; the target is the hard
    pseudo-label, or the soft one where the selector gives it (UDA: same gradient as its KL)."""
    target = selection.labels if selection.targets is None else selection.targets.float()
    return (F.cross_entropy(strong_logits.float(), target, reduction="none") * selection.weights).mean()


def joint_forward(model: nn.Module, views: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One forward over the views concatenated (BatchNorm sees them all): logits and features per view."""
    sizes = [len(x) for x in views.values()]
    out = model(torch.cat(list(views.values())))
    return dict(zip(views, out.logits.split(sizes))), dict(zip(views, out.features.split(sizes)))


def weak_to_strong_step(
    model: nn.Module, batch: Batch, selector: Selector, lambda_u: float, step: int, total_steps: int
) -> StepOutput:
    """L = CE(lb) + lambda_u * mean_i w_i CE(strong_i, yhat_i) (+ the selector's extra term).

    A regularizer's images in ``batch.extra`` join the same forward; their logits come back under
    the regularizer's name."""
    assert batch.u_weak is not None and batch.u_strong is not None
    views = {"lb": batch.x_lb, "weak": batch.u_weak, "strong": batch.u_strong, **batch.extra}
    logits, features = joint_forward(model, views)
    loss_sup = F.cross_entropy(logits["lb"], batch.y_lb)
    with torch.no_grad():
        selection = selector.select(logits["weak"].detach().softmax(dim=1), batch.idx_ulb)
    loss_unsup = consistency_loss(logits["strong"], selection)
    loss = loss_sup + lambda_u * loss_unsup
    logs = {"loss_sup": loss_sup.detach(), "loss_unsup": loss_unsup.detach(), "mask": selection.weights.mean()}
    aux = selector.auxiliary_loss(logits["strong"], selection)
    if aux is not None:
        loss = loss + aux
        logs["loss_aux"] = aux.detach()
    if batch.y_ulb is not None:  # masks, not boolean indexing: no host sync in the step
        known = (batch.y_ulb >= 0).float()
        correct = (selection.labels == batch.y_ulb).float() * known
        logs["pl_acc"] = correct.sum() / known.sum().clamp_min(1.0)
        used = selection.weights * known
        logs["pl_acc_selected"] = (correct * used).sum() / used.sum().clamp_min(1e-12)
    return StepOutput(loss, logs, logits, features, selection, step, total_steps)

"""UniMatch's step for semi-supervised segmentation, with any per-pixel selector, and the supervised step.

UniMatch (Yang et al., CVPR 2023): a weak view u_w, two strong views u_s1, u_s2 with CutMix boxes
pasted from a partner batch, and feature perturbation (Dropout2d(0.5) on the encoder features of
u_w, decoded by the same head). The partner batch is predicted without gradient and without moving
the BatchNorm running statistics (UniMatch: in eval mode; CSL: in training mode, see
``partner_selection``), and its pseudo-labels are read from the selector with ``update=False``.
Pixels outside the image (crop padding, 255) are invalid: weight 0, in no statistic, and out of the
normaliser. Loss (UniMatch, per pixel, over valid pixels):

    L = (L_x + lambda_u * (0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp)) / 2

L_x is cross-entropy over the valid labeled pixels, or OHEM's share of them (``labeled_loss``: the
Cityscapes releases).

The method's selector (``unimatch``: fixed threshold 0.95; SoftMatch, FreeMatch, UDA ...) decides
pseudo-labels and weights; the step is the same for all of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.core.labels import IGNORE
from trustmatch.methods.selector import Selection, Selector
from trustmatch.methods.step_output import StepOutput


@dataclass
class SegBatch:
    """One training batch on the device: normalised images, int64 masks (255 = ignore)."""

    x_lb: Tensor
    y_lb: Tensor
    u_weak: Tensor | None = None
    u_strong: tuple[Tensor, ...] | None = None  # already CutMixed with the partner's strong views
    valid_u: Tensor | None = None  # bool [B, H, W]: pixels of the image, not padding
    mix_weak: Tensor | None = None  # the CutMix partner batch, weak view
    valid_mix: Tensor | None = None
    boxes: tuple[Tensor, ...] | None = None  # bool [B, H, W]: where each strong view shows the partner
    u_tmp: Tensor | None = None  # CSL's Trusted Mask Perturbation view of u (not CutMixed)
    cover: Tensor | None = None  # bool [B, H, W]: the TMP view's cover grid
    truth_u: Tensor | None = None  # int64 true masks of u where known (255 = unknown): diagnostics only


#: OHEM of the labeled loss: (probability threshold, pixels kept at least per labeled image)
Ohem = tuple[float, int]


def ohem_keep(logits: Tensor, target: Tensor, thresh: float, min_kept: int) -> Tensor:
    """The labeled pixels OHEM trains on, as UniMatch's and CSL's Cityscapes releases pick them: those whose
    true-class probability is at most max(thresh, the min_kept-th smallest such probability), so at least
    min_kept of them (every valid pixel when there are fewer). With min_kept 0 every valid pixel: the
    release applies the threshold only when min_kept > 0. No host sync: the count enters a mask."""
    valid = target != IGNORE
    if min_kept == 0:
        return valid
    prob = logits.detach().float().softmax(dim=1).gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
    prob = torch.where(valid, prob, 1.0)  # ignored pixels sort last, as the releases fill them with 1
    threshold = prob.new_full((), thresh)  # filled on the device: no copy from the host
    if min_kept > 0:
        kth = prob.flatten().sort().values[min(min_kept, prob.numel()) - 1]  # sort: on every device (kthvalue: not MPS)
        threshold = torch.maximum(threshold, kth)
    return valid & ((prob <= threshold) | (valid.sum() < min_kept))


def labeled_loss(logits: Tensor, target: Tensor, ohem: Ohem | None = None) -> Tensor:
    """Cross-entropy over the valid labeled pixels, or over those OHEM keeps (``ohem``: its threshold and the
    pixels kept per image, so the share kept does not depend on how many images a process holds)."""
    if ohem is not None:
        thresh, per_image = ohem
        target = torch.where(ohem_keep(logits, target, thresh, per_image * len(target)), target, IGNORE)
    return F.cross_entropy(logits, target, ignore_index=IGNORE)


def supervised_pixel_step(
    model: nn.Module, batch: SegBatch, step: int, total_steps: int, ohem: Ohem | None = None
) -> StepOutput:
    out = model(batch.x_lb)
    loss = labeled_loss(out.logits, batch.y_lb, ohem)
    return StepOutput(
        loss, {"loss_sup": loss.detach()}, {"lb": out.logits}, {"lb": out.features}, None, step, total_steps
    )


def pixel_loss(logits: Tensor, selection: Selection, valid: Tensor) -> Tensor:
    """sum_p w_p CE(logits_p, target_p) / #valid pixels (UniMatch's normaliser; 0 with none valid)."""
    target = selection.labels if selection.targets is None else selection.targets.float()
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    return (ce * selection.weights).sum() / valid.sum().clamp_min(1)


def paste(inside: Selection, outside: Selection, box: Tensor) -> Selection:
    """The selection of a CutMixed image: ``inside`` within the box, ``outside`` elsewhere."""
    targets = None
    if inside.targets is not None and outside.targets is not None:
        targets = torch.where(box[:, None], inside.targets, outside.targets)
    return Selection(
        torch.where(box, inside.labels, outside.labels), torch.where(box, inside.weights, outside.weights), targets
    )


@contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Forwards inside still normalise by their own batch's BatchNorm statistics (training mode), but
    leave the running statistics and counters as they were: ``track_running_stats`` is off meanwhile,
    so BatchNorm (and SyncBatchNorm) in training mode is given no running buffers to update. Exact, and
    nothing is copied; outputs and gradients are those of a training-mode forward."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


def partner_selection(model: nn.Module, batch: SegBatch, selector: Selector, own_statistics: bool = False) -> Selection:
    """The CutMix partner's pseudo-labels: predicted without gradient and without moving the BatchNorm
    running statistics, and read from the selector without updating it. UniMatch predicts it in eval
    mode (normalised by the running statistics); ``own_statistics`` (CSL's release) in training mode,
    normalised by the partner batch's own statistics."""
    assert batch.mix_weak is not None and batch.valid_mix is not None
    with torch.no_grad():
        if own_statistics:
            with running_statistics_kept(model):
                logits = model(batch.mix_weak).logits
        else:
            model.eval()
            logits = model(batch.mix_weak).logits
            model.train()
        return selector.select(logits.float().softmax(dim=1), valid=batch.valid_mix, update=False)


def weak_forward(model: nn.Module, batch: SegBatch) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over cat(x, u_w) with feature perturbation: labeled, weak and perturbed-weak logits."""
    assert batch.u_weak is not None
    n_lb = len(batch.x_lb)
    out = model(torch.cat([batch.x_lb, batch.u_weak]), perturb=True)
    clean, perturbed = out.logits.chunk(2)
    logits_lb, logits_w = clean.split([n_lb, len(batch.u_weak)])
    return logits_lb, logits_w, perturbed[n_lb:]


def selection_logs(
    selection: Selection, valid: Tensor, truth: Tensor | None, logits: Tensor | None = None
) -> dict[str, Tensor]:
    """The share of valid pixels' weight used, and, where true masks are known, what the selection is
    worth: pseudo-label accuracy over all valid pixels and weighted by the selection; the same and the
    mean weight (``weight_*``) and share of weight exactly 1 (``trusted_*``) on the true background
    (class 0) and on the true foreground apart; the share of predicted foreground against the true one;
    and with ``logits`` (a branch trained on this selection), the share of its weighted loss that wrong
    pseudo-labels carry. Masks, not indexing: no host sync."""
    logs = {"mask": selection.weights.sum() / valid.sum().clamp_min(1)}
    if truth is None:
        return logs
    known = valid & (truth != IGNORE)
    correct = (selection.labels == truth).float() * known
    logs["pl_acc"] = correct.sum() / known.sum().clamp_min(1.0)
    used = selection.weights * known
    logs["pl_acc_selected"] = (correct * used).sum() / used.sum().clamp_min(1e-12)
    trusted = (selection.weights == 1).float()
    for part, members in (("bg", known & (truth == 0)), ("fg", known & (truth > 0))):
        share = members.float()
        count = share.sum().clamp_min(1.0)
        logs[f"pl_acc_{part}"] = (correct * share).sum() / count
        logs[f"weight_{part}"] = (selection.weights * share).sum() / count
        logs[f"trusted_{part}"] = (trusted * share).sum() / count
    logs["fg_pseudo"] = ((selection.labels > 0) & known).sum() / known.sum().clamp_min(1)
    logs["fg_true"] = (known & (truth > 0)).sum() / known.sum().clamp_min(1)
    if logits is not None:
        with torch.no_grad():
            ce = F.cross_entropy(logits.detach().float(), selection.labels, reduction="none") * used
            logs["wrong_loss_share"] = (ce * (1 - correct)).sum() / ce.sum().clamp_min(1e-12)
    return logs


def unimatch_step(
    model: nn.Module,
    batch: SegBatch,
    selector: Selector,
    lambda_u: float,
    step: int,
    total_steps: int,
    ohem: Ohem | None = None,
) -> StepOutput:
    assert batch.u_strong is not None and batch.boxes is not None
    assert batch.valid_u is not None and batch.valid_mix is not None
    mix = partner_selection(model, batch, selector)
    logits_lb, logits_w, logits_fp = weak_forward(model, batch)
    strong = model(torch.cat(batch.u_strong)).logits
    logits_s1, logits_s2 = strong.chunk(2)

    with torch.no_grad():
        weak = selector.select(logits_w.detach().float().softmax(dim=1), valid=batch.valid_u)
    box1, box2 = batch.boxes
    sel1, sel2 = paste(mix, weak, box1), paste(mix, weak, box2)
    valid1 = torch.where(box1, batch.valid_mix, batch.valid_u)
    valid2 = torch.where(box2, batch.valid_mix, batch.valid_u)

    loss_sup = labeled_loss(logits_lb, batch.y_lb, ohem)
    loss_s1, loss_s2 = pixel_loss(logits_s1, sel1, valid1), pixel_loss(logits_s2, sel2, valid2)
    loss_fp = pixel_loss(logits_fp, weak, batch.valid_u)
    loss_unsup = 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp
    loss = (loss_sup + lambda_u * loss_unsup) / 2
    logs = {
        "loss_sup": loss_sup.detach(),
        "loss_unsup": ((loss_s1 + loss_s2) / 2).detach(),
        "loss_fp": loss_fp.detach(),
        **selection_logs(weak, batch.valid_u, batch.truth_u, logits_fp),
    }
    aux = selector.auxiliary_loss(logits_s1, sel1)
    if aux is not None:
        loss = loss + aux
        logs["loss_aux"] = aux.detach()
    logits = {"lb": logits_lb, "weak": logits_w, "strong": logits_s1, "strong2": logits_s2, "fp": logits_fp}
    return StepOutput(loss, logs, logits, {}, weak, step, total_steps)

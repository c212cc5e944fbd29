"""CSL (Liu & Liu, "When Confidence Fails", ICCV 2025) as a method: its selector in both tasks, and in
segmentation UniMatch's step with the second strong view replaced by Trusted Mask Perturbation.

The weak view's CSL selection (``csl_selection``: per-image boundary, soft weights) gives pseudo-labels
and weights for every unlabeled term. The TMP view is a mild (or, half the time, strong) colour view of
u whose covered pixels are set to 0 where CSL trusts them, so the network must predict trusted regions
from their context; its target is the weak view's full pseudo-label with the CSL weights, hidden pixels
included. Loss (per pixel, over valid pixels):

    L = (L_x + lambda_u * (0.25 L_s + 0.25 L_m + 0.5 L_fp)) / 2

L_s: the CutMix strong view against the pasted partner/weak selection; L_m: the TMP view; L_fp: the
feature-perturbed weak view. BatchNorm as CSL's release: the partner batch is predicted in training mode
(its own batch statistics) and only the labeled + weak forward moves the running statistics; the
partner's and the strong/TMP forward leave them as they were. CSL without TMP (``method.tmp=false``)
is UniMatch's step (UniMatch's BatchNorm handling too) with the CSL selector. In classification, one
boundary per unlabeled batch (CoVar) in FixMatch's step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trustmatch.core.options import opt
from trustmatch.methods.csl_selection import (
    DISPERSIONS,
    RELIABLE_RULES,
    RENAMED_DISPERSIONS,
    CSLSelection,
    csl_select,
    renamed_hint,
)
from trustmatch.methods.method import METHODS, Check, SSLConfig, SSLMethod
from trustmatch.methods.selector import Selector
from trustmatch.methods.step_output import StepOutput
from trustmatch.methods.unimatch_step import (
    Ohem,
    SegBatch,
    labeled_loss,
    partner_selection,
    paste,
    pixel_loss,
    running_statistics_kept,
    selection_logs,
    weak_forward,
)


@dataclass
class CSLConfig(SSLConfig):
    csl_alpha: float = opt(8.0, "CSL: width alpha of the weight exp(-z^2 / alpha) (release 8; CoVar 2)")
    csl_dispersion: str = opt(
        "csl",
        "CSL residual dispersion: 'csl' (CSL's release and CoVar's segmentation code: all K slots, the zeroed "
        "max included) or 'simple_covar' (SimPLE+CoVar's: the K-1 non-max classes)",
    )
    csl_scaled: bool = opt(False, "CSL: CoVar's confidence-scaled dispersion 0.5 (K-1)^2 v / (2 (1 - c))")
    csl_reliable: str = opt(
        "confidence", "CSL reliable cluster: higher mean 'confidence', or 'covar' (mu_c - 0.25 mu_v)"
    )
    tmp: bool = opt(True, "CSL segmentation: Trusted Mask Perturbation replaces the second strong view")
    tmp_cover: float = opt(0.7, "TMP: probability that a grid cell hides its reliable pixels")
    tmp_cell: int = opt(32, "TMP: grid cell size in pixels (round(crop / cell)^2 cells)")
    task_only = {**SSLConfig.task_only, "tmp": "segmentation", "tmp_cover": "segmentation", "tmp_cell": "segmentation"}
    renamed = {"csl_dispersion": RENAMED_DISPERSIONS}

    def checks(self) -> list[Check]:
        return [
            *super().checks(),
            (self.csl_alpha > 0, "method.csl_alpha", "positive"),
            (
                self.csl_dispersion in DISPERSIONS,
                "method.csl_dispersion",
                " or ".join(map(repr, DISPERSIONS)) + renamed_hint(self.csl_dispersion),
            ),
            (self.csl_reliable in RELIABLE_RULES, "method.csl_reliable", " or ".join(RELIABLE_RULES)),
            (0.0 <= self.tmp_cover <= 1.0, "method.tmp_cover", "in [0, 1]"),
            (self.tmp_cell >= 1, "method.tmp_cell", "at least 1 pixel"),
        ]


class CSLSelector(Selector):
    """CSL: per-image (segmentation) or per-batch (classification) boundaries; stateless, so it runs
    no collective and ``update`` changes nothing."""

    def __init__(self, alpha: float, dispersion: str, scaled: bool, reliable_rule: str) -> None:
        super().__init__()
        self.alpha, self.dispersion, self.scaled, self.reliable_rule = alpha, dispersion, scaled, reliable_rule

    def select(
        self, probs: Tensor, indices: Tensor | None = None, valid: Tensor | None = None, update: bool = True
    ) -> CSLSelection:
        return csl_select(probs, valid, self.alpha, self.dispersion, self.scaled, self.reliable_rule)


def hide_trusted(image: Tensor, cover: Tensor, reliable: Tensor) -> Tensor:
    """Zero (the mean colour, after normalisation) the pixels both covered and trusted."""
    return image.masked_fill((cover & reliable).unsqueeze(1), 0.0)


def csl_step(
    model: nn.Module,
    batch: SegBatch,
    selector: Selector,
    lambda_u: float,
    step: int,
    total_steps: int,
    ohem: Ohem | None = None,
) -> StepOutput:
    assert batch.u_strong is not None and batch.boxes is not None and batch.u_tmp is not None
    assert batch.valid_u is not None and batch.valid_mix is not None and batch.cover is not None
    mix = partner_selection(model, batch, selector, own_statistics=True)
    logits_lb, logits_w, logits_fp = weak_forward(model, batch)
    with torch.no_grad():
        weak = selector.select(logits_w.detach().float().softmax(dim=1), valid=batch.valid_u)
    assert isinstance(weak, CSLSelection) and weak.reliable is not None, "TMP needs the CSL selector"
    (u_strong,), (box,) = batch.u_strong, batch.boxes
    masked = hide_trusted(batch.u_tmp, batch.cover, weak.reliable)
    with running_statistics_kept(model):
        logits_s, logits_m = model(torch.cat([u_strong, masked])).logits.chunk(2)

    loss_sup = labeled_loss(logits_lb, batch.y_lb, ohem)
    loss_s = pixel_loss(logits_s, paste(mix, weak, box), torch.where(box, batch.valid_mix, batch.valid_u))
    loss_m = pixel_loss(logits_m, weak, batch.valid_u)
    loss_fp = pixel_loss(logits_fp, weak, batch.valid_u)
    loss = (loss_sup + lambda_u * (0.25 * loss_s + 0.25 * loss_m + 0.5 * loss_fp)) / 2
    hidden = (batch.cover & weak.reliable).sum() / batch.valid_u.sum().clamp_min(1)
    logs = {
        "loss_sup": loss_sup.detach(),
        "loss_unsup": loss_s.detach(),
        "loss_tmp": loss_m.detach(),
        "loss_fp": loss_fp.detach(),
        "reliable": (weak.reliable.sum() / batch.valid_u.sum().clamp_min(1)),
        "hidden": hidden,
        **selection_logs(weak, batch.valid_u, batch.truth_u, logits_fp),
    }
    logits = {"lb": logits_lb, "weak": logits_w, "strong": logits_s, "tmp": logits_m, "fp": logits_fp}
    return StepOutput(loss, logs, logits, {}, weak, step, total_steps)


@METHODS.register(
    "csl",
    description="CSL (confidence/dispersion boundary per image, per batch in classification; soft weights; "
    "Trusted Mask Perturbation in segmentation)",
    tasks=("classification", "segmentation"),
)
class CSL(SSLMethod):
    Config = CSLConfig
    cfg: CSLConfig
    records_selection = True
    published_backbone = ("deeplabv3plus_r101_deepstem", 8, "CSL's backbone: DeepLabV3+ R101 at stride 8")

    def selector(self, num_classes: int, num_unlabeled: int) -> Selector:
        cfg = self.cfg
        return CSLSelector(cfg.csl_alpha, cfg.csl_dispersion, cfg.csl_scaled, cfg.csl_reliable)

    def trusted_mask_view(self) -> tuple[int, float] | None:
        return (self.cfg.tmp_cell, self.cfg.tmp_cover) if self.cfg.tmp else None

    def segmentation_step(
        self, model: nn.Module, batch: SegBatch, selector: Selector | None, step: int, total_steps: int
    ) -> StepOutput:
        if not self.cfg.tmp:
            return super().segmentation_step(model, batch, selector, step, total_steps)
        assert selector is not None
        return csl_step(
            model, batch, selector, self.cfg.lambda_u_at(step, total_steps), step, total_steps, self.cfg.ohem()
        )

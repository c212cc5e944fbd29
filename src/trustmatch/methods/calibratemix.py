"""CalibrateMix (Rahman et al., AAAI 2026): guided mixup of easy and hard samples, on any base method.

Training dynamics split each batch at its median: labeled samples by AUM, unlabeled ones by
APM[i, yhat_i]. Each labeled-easy anchor is mixed with an unlabeled-hard partner and each
labeled-hard anchor with an unlabeled-easy one, the partner drawn among the anchor's k least
cosine-similar candidates, with one lambda ~ Beta(alpha, alpha) per group:

    x = lambda x_lb + (1 - lambda) u_weak,    target = lambda onehot(y) + (1 - lambda) onehot(yhat)
    L_mix = BCE-with-logits(mix logits, target), mean over samples x classes (release), or soft CE

``faithful`` is the release: a second forward over cat(x_lb, mixes, u_weak, u_strong) adding
L_mix1 + L_mix2 + L_sup2 + L_unsup2. Its pass-2 selection updates the base method's statistics again,
as the release's SoftMatch hooks do on every call (``second_pass_stats``; false: read them only).
``efficient`` keeps one forward and one backward per step: the mixes built from step t's outputs
join step t+1's forward (``prepare``) and are trained there, one step late: B more images on a
forward of B (1 + 2 uratio), 1/15 more for uratio 7, instead of a whole second pass. The pending mixes are part of the
checkpointed state, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmatch.core.options import opt
from trustmatch.methods.data_map import SPLITS, write_data_map
from trustmatch.methods.method import Check, Method
from trustmatch.methods.step_output import Regularizer, StepOutput
from trustmatch.methods.training_dynamics import APM_DTYPES, APMTracker, AUMTracker
from trustmatch.methods.weak_to_strong import Batch, joint_forward

NAME = "calibratemix"
MODES = ("off", "faithful", "efficient")
TASKS = ("classification",)  # it mixes whole images with one-hot targets


@dataclass
class CalibrateMixConfig:
    mode: str = opt(
        "off",
        "off | faithful (as released: a second forward pass over the mixes) | efficient (one forward and "
        "backward per step: the mixes built in step t join step t+1's forward)",
    )
    similarity: str = opt(
        "pixel", "pairing by cosine similarity of weak-view 'pixel's (release) or penultimate 'feature's"
    )
    loss: str = opt("bce", "mix loss: 'bce' sigmoid cross-entropy over classes (release) or softmax 'ce'")
    k: float = opt(
        15,
        "each anchor's partner is drawn from its k least similar candidates: a count (release: 15 of its 224), "
        "or a fraction in (0, 1) of the candidates (15/224 = 0.067 keeps the release's share at any batch size)",
    )
    warmup: float = opt(150_000 / 2**20, "fraction of train.steps before mixing starts (release: 150,000 of 2^20)")
    alpha: float = opt(0.4, "mixing weight lambda ~ Beta(alpha, alpha), one per group")
    apm_delta: float = opt(0.997, "APM update a = delta / (1 + visits)")
    apm_dtype: str = opt("float32", "storage of the per-class APM: float32, or float16 (half the memory)")
    second_pass_stats: bool = opt(
        True,
        "faithful: the second pass updates the base method's statistics too (release: SoftMatch's hooks update "
        "on every call, so its EMAs move twice a step); false: once a step, from the first pass",
    )

    def checks(self, task: str, method: type[Method], batch_size: int) -> list[Check]:
        """The range of each key, and what CalibrateMix needs of the task, the method and the batch."""
        return [
            (
                self.mode == "off" or task in TASKS,
                "calibratemix.mode",
                "off for segmentation (CalibrateMix is a classification method)",
            ),
            (self.mode in MODES, "calibratemix.mode", " | ".join(MODES)),
            (
                self.mode == "off" or method.semi_supervised,
                "calibratemix.mode",
                f"off for method {method.name!r} (CalibrateMix mixes labeled with unlabeled images)",
            ),
            (
                self.mode == "off" or batch_size >= 2,
                "train.batch_size",
                "at least 2 with CalibrateMix (each batch is split into an easy and a hard half)",
            ),
            (self.similarity in ("pixel", "feature"), "calibratemix.similarity", "'pixel' or 'feature'"),
            (self.loss in ("bce", "ce"), "calibratemix.loss", "'bce' or 'ce'"),
            (
                0 < self.k < 1 or (self.k >= 1 and float(self.k).is_integer()),
                "calibratemix.k",
                "a whole count of at least 1 or a fraction in (0, 1)",
            ),
            (0.0 <= self.warmup < 1.0, "calibratemix.warmup", "a fraction in [0, 1)"),
            (self.alpha > 0, "calibratemix.alpha", "positive"),
            (0.0 < self.apm_delta <= 1.0, "calibratemix.apm_delta", "in (0, 1]"),
            (self.apm_dtype in APM_DTYPES, "calibratemix.apm_dtype", "'float32' or 'float16'"),
        ]


#: (pass-2 weak logits, pass-2 strong logits, unlabeled indices, step, total steps, update the
#: selector's statistics) -> the base method's weighted unlabeled loss (its lambda_u at that step)
UnlabeledLoss = Callable[[Tensor, Tensor, Tensor, int, int, bool], Tensor]


def split_halves(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the easy (upper) and hard (lower) half of a batch by score, split at the median."""
    order = scores.argsort(descending=True, stable=True)
    return order[: len(order) // 2], order[len(order) // 2 :]


def pool_size(k: float, candidates: int) -> int:
    """How many least-similar candidates an anchor draws from: k itself (at most all), or the fraction k
    of them (at least 1), so a batch of another size than the release's keeps its share (15 of 224)."""
    return min(int(k), candidates) if k >= 1 else max(1, round(k * candidates))


def least_similar_partners(anchors: Tensor, candidates: Tensor, k: float) -> Tensor:
    """For each anchor row, a candidate row drawn uniformly among its ``pool_size(k)`` least cosine-similar ones."""
    similarity = F.normalize(anchors.flatten(1).float(), dim=1) @ F.normalize(candidates.flatten(1).float(), dim=1).T
    k = pool_size(k, len(candidates))
    pool = similarity.topk(k, dim=1, largest=False).indices
    pick = torch.randint(k, (len(anchors), 1), device=pool.device)
    return pool.gather(1, pick).squeeze(1)


def mix_loss(logits: Tensor, targets: Tensor, groups: Tensor, kind: str) -> Tensor:
    """Sum over mix groups of the group's mean loss: BCE-with-logits over classes, or soft-target CE."""
    if kind == "bce":
        per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(dim=1)
    else:
        per_sample = -(targets * logits.float().log_softmax(dim=1)).sum(dim=1)
    total = logits.new_zeros((), dtype=torch.float32)
    for g in range(2):  # two fixed groups: no data-dependent Python control flow
        member = (groups == g).float()
        total = total + (per_sample * member).sum() / member.sum().clamp_min(1.0)
    return total


class CalibrateMix(Regularizer):
    """The AUM/APM trackers and the guided mix loss, added on top of a weak-to-strong step."""

    views = ("lb", "weak", "strong")
    min_share = 2  # labeled images per process: each batch is split into an easy and a hard half

    def __init__(
        self,
        cfg: CalibrateMixConfig,
        num_labeled: int,
        num_unlabeled: int,
        num_classes: int,
        unlabeled_loss: UnlabeledLoss,
    ) -> None:
        super().__init__()
        self.cfg, self.num_classes, self.unlabeled_loss = cfg, num_classes, unlabeled_loss
        self.aum = AUMTracker(num_labeled)
        self.apm = APMTracker(num_unlabeled, num_classes, cfg.apm_delta, cfg.apm_dtype)
        self.pending: tuple[Tensor, Tensor, Tensor] | None = None  # efficient: (images, targets, groups)
        # the mixing weight's law, drawn from torch's CPU generator; checked here once, not at each draw
        self.beta = torch.distributions.Beta(cfg.alpha, cfg.alpha, validate_args=False)

    def warm(self, step: int, total_steps: int) -> bool:
        return step < int(self.cfg.warmup * total_steps)

    def prepare(self, batch: Batch, step: int, total_steps: int) -> None:
        if self.pending is not None:  # built from the previous batch's views: their device and layout
            batch.extra[NAME] = self.pending[0].to(batch.x_lb.device)
        else:
            batch.extra.pop(NAME, None)

    def forward(self, model: nn.Module, batch: Batch, out: StepOutput) -> tuple[Tensor, dict[str, Tensor]]:
        assert batch.u_weak is not None and batch.u_strong is not None and batch.idx_ulb is not None
        self.aum.update(out.logits["lb"], batch.y_lb, batch.idx_lb)  # every step, warm-up included
        loss = out.loss.new_zeros(())
        if NAME in out.logits:  # efficient: the mixes of the previous step, trained in this forward
            _, targets, groups = self.pending
            loss = mix_loss(out.logits[NAME], targets.to(loss.device), groups.to(loss.device), self.cfg.loss)
        self.pending = None
        if self.warm(out.step, out.total_steps):
            return loss, {"loss_mix": loss.detach()}
        weak = out.logits["weak"].detach()
        pseudo = weak.argmax(dim=1)
        self.apm.update(weak, batch.idx_ulb)
        images, targets, groups = self.mixes(batch, out, pseudo)
        if self.cfg.mode == "efficient":
            self.pending = (images.detach(), targets, groups)
            return loss, {"loss_mix": loss.detach()}
        views = {"lb": batch.x_lb, NAME: images, "weak": batch.u_weak, "strong": batch.u_strong}
        logits, _ = joint_forward(model, views)
        loss_mix = mix_loss(logits[NAME], targets, groups, self.cfg.loss)
        loss_sup = F.cross_entropy(logits["lb"], batch.y_lb)
        loss_unsup = self.unlabeled_loss(
            logits["weak"], logits["strong"], batch.idx_ulb, out.step, out.total_steps, self.cfg.second_pass_stats
        )
        logs = {"loss_mix": loss_mix.detach(), "loss_sup2": loss_sup.detach(), "loss_unsup2": loss_unsup.detach()}
        return loss_mix + loss_sup + loss_unsup, logs

    @torch.no_grad()
    def mixes(self, batch: Batch, out: StepOutput, pseudo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images, soft targets and group ids (0: labeled-easy x unlabeled-hard, 1: the reverse).
        Float32 even under the step's autocast: near-equal similarities must not tie in bf16."""
        with torch.autocast(pseudo.device.type, enabled=False):
            return self._mixes(batch, out, pseudo)

    def _mixes(self, batch: Batch, out: StepOutput, pseudo: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert batch.u_weak is not None and batch.idx_ulb is not None
        lb_easy, lb_hard = split_halves(self.aum.scores(batch.idx_lb))
        ulb_easy, ulb_hard = split_halves(self.apm.scores(batch.idx_ulb, pseudo))
        if self.cfg.similarity == "pixel":
            lb_keys, ulb_keys = batch.x_lb, batch.u_weak
        else:
            lb_keys, ulb_keys = out.features["lb"].detach(), out.features["weak"].detach()
        eye = torch.eye(self.num_classes, device=pseudo.device)
        images, targets, groups = [], [], []
        for group, (anchors, candidates) in enumerate(((lb_easy, ulb_hard), (lb_hard, ulb_easy))):
            partners = candidates[least_similar_partners(lb_keys[anchors], ulb_keys[candidates], self.cfg.k)]
            lam = self.beta.sample()  # a CPU scalar tensor: read by no one, so the step never waits
            images.append(lam * batch.x_lb[anchors] + (1 - lam) * batch.u_weak[partners])
            targets.append(lam * eye[batch.y_lb[anchors]] + (1 - lam) * eye[pseudo[partners]])
            groups.append(torch.full((len(anchors),), group, device=pseudo.device))
        return torch.cat(images), torch.cat(targets), torch.cat(groups)

    def write_artefacts(self, run_dir: Path, predictions: Callable[[str], tuple[Tensor, Tensor]], data: Any) -> None:
        """The data map: every labeled and unlabeled sample's dynamics beside the final model (CSV + scatter)."""
        write_data_map(self.aum, self.apm, data, {split: predictions(split) for split in SPLITS}, run_dir)

    def rank_state(self) -> dict[str, Any]:
        """The pending mixes (efficient mode), built from this process's batch: a resumed run trains
        them as the straight run does."""
        return {"pending": None if self.pending is None else [t.cpu() for t in self.pending]}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        pending = state["pending"]
        self.pending = None if pending is None else tuple(pending)

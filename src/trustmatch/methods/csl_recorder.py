"""Where CSL's boundary falls during training: snapshots of a few training batches' selections, one plot.

The per-image boundary moves as the model learns, and whether the trusted cluster holds wrong
pseudo-labels is the question CSL stands on. A ``SelectionRecorder`` keeps the (confidence, dispersion)
points, weights and boundary of one image (or, for classification, the batch) at 10 %, 50 % and 100 %
of training, and ``write`` draws them side by side with ``reporting.plots.csl_selection_scatter``.

Only a few hundred kilobytes per snapshot travel with the checkpoint (``state_dict``: tensors, ints and
strings, so ``torch.load(weights_only=True)`` reads it), so a resumed run still plots the snapshots
taken before it was interrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trustmatch.core.labels import IGNORE  # a true label that is unknown (as are negative ones)
from trustmatch.methods.csl_selection import CSLSelection
from trustmatch.methods.selector import Selection
from trustmatch.reporting.plots import SelectionSnapshot, csl_selection_scatter

FRACTIONS = (0.1, 0.5, 1.0)  # of training: early, middle, end
MAX_POINTS = 3000  # per snapshot: enough to see the clusters, small in a checkpoint and a PNG
CSL_PLOT_TITLE = "CSL selection during training: max confidence vs residual dispersion"
PART, FILE = "csl_snapshots", "csl_selection.png"  # its name among the run's state parts; its plot

_ARRAYS = ("confidence", "dispersion", "weight", "reliable", "directions", "singular", "mean")


def snapshot_steps(total_steps: int) -> list[int]:
    """The 0-based steps whose selection is kept: ``round(f * (total_steps - 1))`` for f in FRACTIONS."""
    return sorted({round(f * (total_steps - 1)) for f in FRACTIONS})


class SelectionRecorder:
    """Keeps the CSL selections of the steps in ``snapshot_steps``; a task calls ``observe`` every step.

    Points: the valid pixels of image 0 (``[B, K, H, W]`` probabilities, group 0 of the boundary), or
    the valid elements of the whole batch (``[N, K]``, one group), subsampled to ``max_points`` with a
    generator seeded by ``seed`` and the step, so the same run keeps the same points, resumed or not.
    ``correct`` (when ``truth`` is given): int8, 1 where the pseudo-label equals the true label, 0 where
    it does not, -1 where the true label is unknown (negative or 255); None when no kept point has a
    known true label.
    """

    def __init__(self, max_points: int = MAX_POINTS, seed: int = 0) -> None:
        self.max_points, self.seed = max_points, seed
        self.snapshots: list[SelectionSnapshot] = []

    def observe(
        self,
        step: int,
        total_steps: int,
        selection: Selection,
        truth: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> None:
        """Keep ``selection`` if ``step`` (0-based) is a snapshot step not yet kept; other steps cost nothing.

        ``valid``: bool, ``selection.labels``' shape (None: every element), the mask the selection was
        made with. A weight of 0 does not mark an invalid pixel: far from the reliable cluster's means
        exp(-(conf_z^2 + res_z^2) / alpha) underflows to 0 for valid pixels too. Selections other than
        CSL's are ignored, so every method may call this.
        """
        if step not in snapshot_steps(total_steps) or any(s.step == step for s in self.snapshots):
            return
        if not isinstance(selection, CSLSelection) or selection.confidence is None or selection.boundary is None:
            return
        segmentation = selection.labels.ndim > 1  # [B, H, W]: image 0; [N]: the batch is group 0

        def first(t: Tensor) -> Tensor:
            return (t[0] if segmentation else t).detach().flatten().cpu()

        keep = torch.ones(first(selection.labels).shape, dtype=torch.bool) if valid is None else first(valid).bool()
        index = keep.nonzero().squeeze(1)
        if len(index) > self.max_points:
            generator = torch.Generator().manual_seed(self.seed + step)
            index = index[torch.randperm(len(index), generator=generator)[: self.max_points].sort().values]
        labels = first(selection.labels)[index]
        correct = None
        if truth is not None:
            true = first(truth)[index]
            known = (true >= 0) & (true != IGNORE) if segmentation else true >= 0  # 255 is a class in [N]
            if bool(known.any()):
                correct = torch.where(known, (labels == true).to(torch.int8), -1).to(torch.int8).numpy()
        b = selection.boundary
        self.snapshots.append(
            SelectionSnapshot(
                step=step,
                confidence=first(selection.confidence)[index].float().numpy(),
                dispersion=first(selection.dispersion)[index].float().numpy(),
                weight=first(selection.weights)[index].float().numpy(),
                reliable=first(selection.reliable)[index].bool().numpy(),
                correct=correct,
                directions=b.directions[0].detach().double().cpu().numpy(),
                singular=b.singular[0].detach().double().cpu().numpy(),
                mean=b.mean[0].detach().double().cpu().numpy(),
                reliable_cluster=int(b.reliable[0]),
                label=f"step {step + 1} of {total_steps}, " + ("image 0" if segmentation else "batch"),
            )
        )
        self.snapshots.sort(key=lambda s: s.step)

    def write_artefacts(self, run_dir: Path) -> Path | None:
        """``csl_selection.png`` in ``run_dir`` (nothing where no selection was kept)."""
        return self.write(run_dir / FILE, CSL_PLOT_TITLE)

    def write(self, path: Path, title: str) -> Path | None:
        """The snapshots as one PNG at ``path``; None (and no file) when there is none (not a CSL run)."""
        return csl_selection_scatter(self.snapshots, path, title) if self.snapshots else None

    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints and strings only: checkpoints stay loadable with ``weights_only=True``."""
        snapshots = []
        for s in self.snapshots:
            entry: dict[str, Any] = {name: torch.from_numpy(np.array(getattr(s, name))) for name in _ARRAYS}
            entry.update(step=s.step, reliable_cluster=s.reliable_cluster, label=s.label)
            if s.correct is not None:
                entry["correct"] = torch.from_numpy(np.array(s.correct))
            snapshots.append(entry)
        return {"snapshots": snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = [
            SelectionSnapshot(
                **{name: entry[name].cpu().numpy() for name in _ARRAYS},
                correct=entry["correct"].cpu().numpy() if "correct" in entry else None,
                step=int(entry["step"]),
                reliable_cluster=int(entry["reliable_cluster"]),
                label=str(entry["label"]),
            )
            for entry in state["snapshots"]
        ]

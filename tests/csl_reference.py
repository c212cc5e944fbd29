"""A straightforward CSL reference: one image at a time, as the release's loop runs it. The valid
pixels are gathered by boolean indexing; the boundary is the SVD of the 2 x N matrix X^T in the input's
dtype, and each pixel goes to the larger |right singular vector| entry (argmax, ties to the first),
with no tolerance: a single pixel has one singular vector and so lands in cluster 0, and every other
image is split, however small s2 is. The clusters' statistics come from ``Tensor.mean`` /
``Tensor.var``, with the release's special cases (empty: mean 0, variance 0; one member: variance 0;
no valid pixel: mean (1, 0), variance (1, 1)); the reliable cluster is the argmax of the score (ties
to the first). Written from the spec (``csl.md``) and the release's arithmetic, independently of
``trustmatch.methods.csl_selection.csl_select``, which the tests compare with it and
``benchmarks/csl_time.py`` times against it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ReferenceCSL:
    labels: Tensor
    weights: Tensor
    reliable: Tensor
    mean: Tensor  # [G, 2 clusters, (c, v)]
    var: Tensor
    chosen: Tensor  # [G] reliable cluster


def reference_csl(
    probs: Tensor,
    valid: Tensor | None = None,
    alpha: float = 8.0,
    dispersion: str = "csl",
    scaled: bool = False,
    reliable_rule: str = "confidence",
    eps: float = 1e-8,
) -> ReferenceCSL:
    k = probs.shape[1]
    labels = probs.argmax(dim=1)
    if valid is None:
        valid = torch.ones_like(labels, dtype=torch.bool)
    groups = (
        [(probs, valid)] if probs.ndim == 2 else [(p.reshape(k, -1).T, ok.reshape(-1)) for p, ok in zip(probs, valid)]
    )
    weights, means, variances, chosen = [], [], [], []
    for p, ok in groups:
        w_full = torch.zeros(len(p), dtype=probs.dtype, device=probs.device)
        x = p[ok]
        c, top = x.max(dim=1)
        r = x.clone()
        rows = torch.arange(len(x), device=probs.device)
        r[rows, top] = 0.0
        m = r.sum(dim=1) / (k - 1)
        dev = (r - m[:, None]).square()
        if dispersion == "simple_covar":
            dev[rows, top] = 0.0
        v = dev.sum(dim=1) / (k - 1)
        if scaled:
            v = 0.5 * (k - 1) ** 2 / (2 * (1 - c + 1e-8)) * v
        if len(x) == 0:
            mean = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=probs.dtype, device=probs.device)
            var = torch.ones(2, 2, dtype=probs.dtype, device=probs.device)
            pick = 0
        else:
            feats = torch.stack([c, v], dim=1)
            _, _, vt = torch.linalg.svd(feats.T, full_matrices=False)  # rows of vt: x . u_j / s_j
            assign = vt.T.abs().argmax(dim=1)  # one pixel: one column, cluster 0
            mean = torch.zeros(2, 2, dtype=probs.dtype, device=probs.device)
            var = torch.zeros(2, 2, dtype=probs.dtype, device=probs.device)
            for j in range(2):
                members = feats[assign == j]
                if len(members):
                    mean[j] = members.mean(dim=0)
                if len(members) > 1:
                    var[j] = members.var(dim=0)
            score = mean[:, 0] if reliable_rule == "confidence" else mean[:, 0] - 0.25 * mean[:, 1]
            pick = int(score.argmax())
            conf_z = (c - mean[pick, 0]) / torch.sqrt(var[pick, 0] + eps)
            res_z = (mean[pick, 1] - v) / torch.sqrt(var[pick, 1] + eps)
            w = torch.exp(-(conf_z**2) / alpha) * torch.exp(-(res_z**2) / alpha)
            w[(conf_z > 0) | (res_z > 0)] = 1.0
            w_full[ok] = w
        weights.append(w_full)
        means.append(mean)
        variances.append(var)
        chosen.append(pick)
    w = torch.stack(weights).reshape(labels.shape)
    chosen_t = torch.tensor(chosen, device=probs.device)
    return ReferenceCSL(labels, w, valid & (w == 1), torch.stack(means), torch.stack(variances), chosen_t)

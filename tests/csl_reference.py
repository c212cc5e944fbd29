"""A straightforward CSL reference: one image at a time, the valid pixels gathered by boolean
indexing, the boundary from a full SVD of the N x 2 feature matrix, the clusters' statistics from
``Tensor.mean`` / ``Tensor.var``. Written from the spec (``csl.md``) independently of
``trustmatch.methods.csl_selection.csl_select``, which the tests compare with it and ``benchmarks/csl_time.py``
times against it (the release loops over images the same way)."""

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
    rank_tol: float = 1e-12,
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
            u, s, _ = torch.linalg.svd(feats, full_matrices=False)  # |x . v_j| / s_j = |u_j|
            if len(s) < 2 or s[1] <= rank_tol**0.5 * s[0]:  # one line (one pixel, or equal pixels)
                assign = torch.zeros(len(x), dtype=torch.long, device=probs.device)
            else:
                assign = (u[:, 0].abs() < u[:, 1].abs()).long()
            mean = torch.zeros(2, 2, dtype=probs.dtype, device=probs.device)
            var = torch.zeros(2, 2, dtype=probs.dtype, device=probs.device)
            for j in range(2):
                members = feats[assign == j]
                if len(members):
                    mean[j] = members.mean(dim=0)
                if len(members) > 1:
                    var[j] = members.var(dim=0)
            score = mean[:, 0] if reliable_rule == "confidence" else mean[:, 0] - 0.25 * mean[:, 1]
            pick = int(score[1] > score[0])
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

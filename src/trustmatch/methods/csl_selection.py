"""CSL's selection (Liu & Liu, ICCV 2025): a boundary in the (max confidence, residual dispersion) plane
per image (per batch in classification, as CoVar), soft weights for the pixels outside the trusted cluster.

Pure functions, all groups at once; ``csl.CSLSelector`` wraps ``csl_select`` for the training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from trustmatch.methods.selector import Selection

# method.csl_dispersion, named by the code each comes from: CSL's release (also CoVar's segmentation
# code, CSL+CoVar), or SimPLE+CoVar's (CoVar's classification code); see ``csl_features``
DISPERSIONS = ("csl", "simple_covar")
RENAMED_DISPERSIONS = {"release": "csl", "nonmax": "simple_covar"}  # names before: a saved run's migrated
RELIABLE_RULES = ("confidence", "covar")  # method.csl_reliable
CACHE_BLOCK = 2**21  # bytes of probabilities per block on the CPU: a few temporaries of it stay in L2


@dataclass
class CSLBoundary:
    """Each group's boundary in the (confidence, dispersion) plane (G groups: images, or one batch).

    ``directions[g]`` holds u1, u2 (rows), the eigenvectors of ``X^T X`` (the right singular vectors
    of the group's uncentred X, whose rows are the valid pixels' (c, v)) and ``singular[g]`` s1 >= s2:
    a pixel x is in cluster 0 iff ``|x.u1| / s1 >= |x.u2| / s2`` — two lines through the origin. A group
    that is not split (``s2 == 0``: one valid pixel, identical pixels, or none) has all of them in cluster 0.
    ``mean`` / ``var`` are [G, cluster, (c, v)]; ``reliable`` is the index of the trusted cluster.
    Everything but the indices and counts is float64 (float32 on MPS): a few numbers per group.
    """

    directions: Tensor  # [G, 2, 2]
    singular: Tensor  # [G, 2]
    mean: Tensor  # [G, 2, 2]
    var: Tensor  # [G, 2, 2]
    reliable: Tensor  # [G] int64
    counts: Tensor  # [G, 2] members of each cluster


@dataclass
class CSLSelection(Selection):
    """A CSL selection: besides labels and weights, what TMP and the selection plot read."""

    reliable: Tensor | None = None  # bool: weight exactly 1 (TMP may hide these pixels)
    confidence: Tensor | None = None  # c = max_k p_k, float32
    dispersion: Tensor | None = None  # v (or the CoVar-scaled v'), float32
    boundary: CSLBoundary | None = None


def renamed_hint(dispersion: str) -> str:
    """A did-you-mean for a dispersion's published old name ('' for any other)."""
    new = RENAMED_DISPERSIONS.get(dispersion)
    return f" (did you mean {new!r}, its new name?)" if new else ""


def csl_features(probs: Tensor, dispersion: str = "csl", scaled: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Max confidence c, pseudo-label argmax and residual dispersion v, class dim 1 removed.

    r = p with the top entry zeroed, m = sum(r) / (K-1); ``csl`` (CSL's release, and CoVar's
    segmentation code): v = sum over all K entries of (r_k - m)^2 / (K-1), the zeroed slot included;
    ``simple_covar`` (SimPLE+CoVar): the K-1 non-max entries only, i.e. ``csl`` minus m^2 / (K-1)
    (that code also clusters on log c, which this option does not). ``scaled``: CoVar's
    v' = 0.5 (K-1)^2 v / (2 (1 - c + 1e-8)).

    v comes from sum r and sum r^2 over the entries below the max (copies of the max beyond the first
    added back), not from sum p^2 - c^2, which cancels in float32 for confident pixels. On the CPU
    the probabilities go through in row blocks that stay in cache: one read from memory instead of one
    per operation.
    """
    if dispersion not in DISPERSIONS:
        raise ValueError(f"dispersion must be one of {DISPERSIONS}, got {dispersion!r}{renamed_hint(dispersion)}")
    k = probs.shape[1]
    if k < 2:
        raise ValueError(f"CSL needs at least 2 classes, got {k}")
    if probs.numel() == 0:
        empty = probs.sum(dim=1)
        return empty, empty.long(), empty
    dim = 0 if probs.ndim == 2 else 2
    per_slice = probs[0].numel() if dim == 0 else probs.shape[0] * probs.shape[1] * math.prod(probs.shape[3:])
    rows = probs.shape[dim] if probs.device.type != "cpu" else max(1, CACHE_BLOCK // (per_slice * probs.element_size()))
    parts = [_residual_moments(block) for block in probs.split(rows, dim=dim)]
    conf, labels, r_sum, r_sq = (torch.cat(t, dim=dim - 1 if dim else 0) for t in zip(*parts))
    m = r_sum / (k - 1)
    # sum over the K slots of (r_k - m)^2 = sum r^2 - 2 m sum r + K m^2, with sum r = (K-1) m
    spread = r_sq - (k - 2 if dispersion == "csl" else k - 1) * m.square()
    v = spread.clamp_min(0.0) / (k - 1)
    if scaled:
        v = 0.5 * (k - 1) ** 2 * v / (2.0 * (1.0 - conf + 1e-8))
    return conf, labels, v


def _residual_moments(p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c, argmax, sum r and sum r^2 of one block of probabilities (class dim 1)."""
    conf, labels = p.max(dim=1, keepdim=True)
    below = torch.where(p < conf, p, 0.0)
    conf, labels = conf.squeeze(1), labels.squeeze(1)
    below_sum, below_sq = below.sum(dim=1), below.square_().sum(dim=1)
    extra = ((p.sum(dim=1) - below_sum) / conf).round_() - 1  # ties with the max, which r keeps
    return conf, labels, below_sum + extra * conf, below_sq + extra * conf.square()


def _eigen_2x2(a: Tensor, b: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Unit eigenvectors (rows u1, u2) [G, 2, 2] and eigenvalues l1 >= l2 >= 0 [G, 2] of [[a, b], [b, d]].

    u1 from whichever row of (A - l1 I) u = 0 is better conditioned; l2 = det / l1, which keeps the
    small eigenvalue accurate where (a + d)/2 - sqrt(...) would cancel. A zero matrix gets the axes.
    """
    half = (a - d) / 2
    l1 = (a + d) / 2 + torch.hypot(half, b)
    l2 = torch.where(l1 > 0, (a * d - b * b).clamp_min(0.0) / l1.clamp_min(1e-300), 0.0)
    x = torch.where(half >= 0, l1 - d, b)
    y = torch.where(half >= 0, b, l1 - a)
    norm = torch.hypot(x, y)
    degenerate = norm == 0
    x, y = (
        torch.where(degenerate, 1.0, x / norm.clamp_min(1e-300)),
        torch.where(degenerate, 0.0, y / norm.clamp_min(1e-300)),
    )
    u = torch.stack([torch.stack([x, y], -1), torch.stack([-y, x], -1)], dim=1)
    return u, torch.stack([l1, l2], dim=-1)


def csl_boundary(
    conf: Tensor, disp: Tensor, valid: Tensor, reliable_rule: str = "confidence"
) -> tuple[Tensor, CSLBoundary]:
    """Split each group's valid (c, v) points [G, P] into two clusters and describe them.

    Returns the cluster of every point ([G, P] int64, 0 or 1) and the boundary. As the release (an SVD of
    X^T, each pixel to the larger of |x.u_j| / s_j, ties to cluster 0), every group with s2 > 0 is split,
    however small s2 / s1: an image whose every pixel is confident has v tiny beside c, so l2 / l1 reaches
    1e-19 there, and the release still splits it. Only where its arithmetic offers no second direction
    (a single valid pixel, identical pixels, l2 = 0) are all points in cluster 0, s2 set to 0; any split
    of identical points gives the release's weights (both clusters' mean is the point, variance 0). A
    cluster with one member has variance 0 and an empty one mean 0 and variance 0 (as released); a group
    with no valid point gets mean (1, 0) and variance (1, 1) for both clusters. The points are taken in
    float64 (float32 on MPS, which has none), with two-pass variances; every reduction over pixels is one
    batched matmul, and no value reaches the host.
    """
    if reliable_rule not in RELIABLE_RULES:
        raise ValueError(f"reliable_rule must be one of {RELIABLE_RULES}, got {reliable_rule!r}")
    dtype = torch.float32 if conf.device.type == "mps" else torch.float64
    x = torch.where(valid.unsqueeze(-1), torch.stack([conf, disp], dim=-1).to(dtype), 0.0)  # [G, P, 2]; NaN out
    gram = x.transpose(1, 2) @ x
    directions, eig = _eigen_2x2(gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1])
    split = eig[:, 1] > 0
    if x.shape[1]:  # and two distinct points at least (a shape, not a value: no branch on the data)
        lowest = torch.where(valid.unsqueeze(-1), x, torch.inf).amin(dim=1)
        highest = torch.where(valid.unsqueeze(-1), x, -torch.inf).amax(dim=1)
        split &= (lowest < highest).any(dim=-1)
    singular = torch.stack([eig[:, 0].sqrt(), torch.where(split, eig[:, 1].sqrt(), 0.0)], dim=-1)
    proj = (x @ directions.transpose(1, 2)).abs_()  # |x.u1|, |x.u2|
    second = split.unsqueeze(1) & (proj[..., 0] * singular[:, 1:] < proj[..., 1] * singular[:, :1]) & valid
    member = torch.stack([valid & ~second, second], dim=1).to(dtype)  # [G, 2, P]
    counts = member.sum(dim=-1)
    mean = (member @ x) / counts.clamp_min(1.0).unsqueeze(-1)  # [G, 2 clusters, (c, v)]
    own_mean = torch.where(second.unsqueeze(-1), mean[:, 1:], mean[:, :1])  # each point's cluster mean
    var = (member @ (x - own_mean).square()) / (counts - 1).clamp_min(1.0).unsqueeze(-1)
    none = (counts.sum(-1) == 0).view(-1, 1)
    mean = torch.stack([torch.where(none, 1.0, mean[..., 0]), torch.where(none, 0.0, mean[..., 1])], dim=-1)
    var = torch.where(none.unsqueeze(-1), 1.0, var)
    score = mean[..., 0] if reliable_rule == "confidence" else mean[..., 0] - 0.25 * mean[..., 1]
    reliable = (score[:, 1] > score[:, 0]).long()
    boundary = CSLBoundary(directions, singular, mean, var, reliable, counts.long())
    return second.long(), boundary


def csl_select(
    probs: Tensor,
    valid: Tensor | None = None,
    alpha: float = 8.0,
    dispersion: str = "csl",
    scaled: bool = False,
    reliable_rule: str = "confidence",
    eps: float = 1e-8,
) -> CSLSelection:
    """CSL's pseudo-labels, weights and reliable mask for probabilities ``[B, K, H, W]`` (one boundary
    per image) or ``[N, K]`` (one boundary for the batch, CoVar), all groups at once.

    conf_z = (c - mu_c) / sqrt(var_c + eps), res_z = (mu_v - v) / sqrt(var_v + eps) with the reliable
    cluster's statistics; w = exp(-conf_z^2 / alpha) exp(-res_z^2 / alpha), 1 where conf_z > 0 or
    res_z > 0, 0 where not ``valid``; reliable = (w == 1). CSL's release: alpha 8, the ``csl``
    dispersion, the higher-confidence cluster; CoVar's options: alpha 2, ``scaled``, ``covar``, and
    SimPLE+CoVar's ``simple_covar`` dispersion.
    """
    conf, labels, disp = csl_features(probs, dispersion, scaled)
    shape = conf.shape
    groups = 1 if probs.ndim == 2 else shape[0]
    ok = torch.ones_like(conf, dtype=torch.bool) if valid is None else valid.bool()
    _, boundary = csl_boundary(
        conf.reshape(groups, -1), disp.reshape(groups, -1), ok.reshape(groups, -1), reliable_rule
    )
    pick = boundary.reliable.view(-1, 1, 1).expand(-1, 1, 2)
    mu = boundary.mean.gather(1, pick).squeeze(1).to(conf.dtype)  # [G, 2]
    inv_sd = (boundary.var.gather(1, pick).squeeze(1) + eps).rsqrt().to(conf.dtype)
    per = (groups,) + (1,) * (conf.ndim - 1)
    # in place where possible: these are the only passes over [B, H, W] after the features
    conf_z = (conf - mu[:, 0].view(per)).mul_(inv_sd[:, 0].view(per))
    res_z = (mu[:, 1].view(per) - disp).mul_(inv_sd[:, 1].view(per))
    favourable = (conf_z > 0).logical_or_(res_z > 0)
    weights = conf_z.square_().addcmul_(res_z, res_z).mul_(-1.0 / alpha).exp_()
    weights.masked_fill_(favourable, 1.0).masked_fill_(~ok, 0.0)
    return CSLSelection(labels, weights, None, ok & (weights == 1), conf, disp, boundary)

"""Post-hoc temperature scaling (Guo et al., 2017): one scalar T fitted on held-out labeled data.

Dividing the logits by T changes no prediction (accuracy is unchanged) and only rescales confidence.
T is fitted on the labeled validation split, never on test; the NLL of softmax(z / T) is convex in
1 / T, so Newton's method on beta = 1 / T, in float64, converges to the global minimum in a few steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

BETA_RANGE = (0.01, 100.0)  # beta = 1 / T


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100, tol: float = 1e-10) -> float | None:
    """The T > 0 minimising the mean NLL of softmax(logits / T) on (``logits``, ``labels``); None when
    every sample is classified correctly: the NLL then falls as T -> 0, so no T is identified (a
    small validation split of an accurate model, e.g. 50 digits), and sharpening would be unbounded.

    Newton on beta = 1/T with the exact derivatives: d NLL/d beta = E_p[z] - z_y, d2 NLL/d beta2 = Var_p[z]
    (mean over samples), damped so that every step lowers the NLL. T is kept in [0.01, 100]: beyond,
    nearly separable data or a model worse than uniform (T -> infinity) would get a temperature that
    only rounding separates from one that changes the argmax.
    """
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"temperature scaling needs logits [N, K] and N labels, got {tuple(logits.shape)}")
    z = logits.detach().double().cpu()
    y = labels.cpu().long()
    zy = z.gather(1, y[:, None]).squeeze(1)
    if bool((z.argmax(dim=1) == y).all()):
        return None

    def nll(beta: float) -> float:
        return float(torch.nn.functional.cross_entropy(beta * z, y))

    beta, current = 1.0, nll(1.0)
    for _ in range(max_iter):
        p = (beta * z).softmax(dim=1)
        mean = (p * z).sum(dim=1)
        grad = float((mean - zy).mean())
        hess = float(((p * z.square()).sum(dim=1) - mean.square()).mean())
        if hess <= 0:  # every softmax one-hot: the NLL no longer depends on beta
            break
        step = grad / hess
        while True:  # damped: halve a step that fails to lower the NLL
            new = min(max(beta - step, BETA_RANGE[0]), BETA_RANGE[1])
            if (value := nll(new)) <= current:
                break
            step /= 2
            if abs(step) <= tol * beta:
                return 1.0 / beta
        if abs(new - beta) <= tol * beta:
            return 1.0 / new
        beta, current = new, value
    return 1.0 / beta

"""Post-hoc temperature scaling (Guo et al., 2017): T fitted on held-out labeled data.

One scalar T changes no prediction (accuracy is unchanged) and only rescales confidence; one T_c per
class (segmentation's ``eval.pixel_temperature=per_class``) divides class c's logits by T_c, which can
change the predicted class of a sample. T is fitted on the labeled validation split, never on test.
The NLL of softmax(z / T) is convex in beta = 1 / T (per class too: a log-sum-exp of functions linear
in beta, minus a linear term), so one damped Newton method on beta, in float64, serves both fits and
converges to the global minimum in a few steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trustmatch.evaluation.metrics import float64_device

BETA_RANGE = (0.01, 100.0)  # beta = 1 / T
RIDGE = 1e-10  # relative to the Hessian's largest diagonal entry: a class no sample moves stays solvable

#: one T for every class, or T_c for class c
Temperature = float | list[float]


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 100, tol: float = 1e-10) -> float | None:
    """The T > 0 minimising the mean NLL of softmax(logits / T) on (``logits``, ``labels``); None when
    every sample is classified correctly: the NLL then falls as T -> 0, so no T is identified (a
    small validation split of an accurate model, e.g. 50 digits), and sharpening would be unbounded.

    T is kept in [0.01, 100]: beyond, nearly separable data or a model worse than uniform (T -> infinity)
    would get a temperature that only rounding separates from one that changes the argmax.
    """
    beta = _fit_beta(logits, labels, per_class=False, max_iter=max_iter, tol=tol)
    return None if beta is None else 1.0 / float(beta[0])


def fit_class_temperatures(
    logits: Tensor, labels: Tensor, max_iter: int = 100, tol: float = 1e-10
) -> list[float] | None:
    """One T_c per class (logits of class c divided by T_c) minimising the mean NLL; None when every
    sample is classified correctly (as :func:`fit_temperature`). Each T_c is kept in [0.01, 100]."""
    beta = _fit_beta(logits, labels, per_class=True, max_iter=max_iter, tol=tol)
    return None if beta is None else (1.0 / beta).tolist()


def _fit_beta(logits: Tensor, labels: Tensor, per_class: bool, max_iter: int, tol: float) -> Tensor | None:
    """Newton on theta, where the class scales are beta = A theta (A: a column of ones for one T, the
    identity per class). With s = z * beta, p = softmax(s) and u = p * z, the exact derivatives are
    grad = E[u A - z_y A_y] and Hessian = A^T diag(E[p z^2]) A - E[(u A)^T (u A)]; each step is damped
    (halved until it lowers the NLL) and kept in the box BETA_RANGE, so the fit can only improve."""
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"temperature scaling needs logits [N, K] and N labels, got {tuple(logits.shape)}")
    z = logits.detach().to(device=float64_device(logits.device), dtype=torch.float64)
    y = labels.to(z.device).long()
    if bool((z.argmax(dim=1) == y).all()):
        return None
    n, k = z.shape
    a = torch.eye(k, dtype=z.dtype, device=z.device) if per_class else z.new_ones(k, 1)
    target = (z.gather(1, y[:, None]) * a[y]).mean(dim=0)
    ridge = RIDGE * torch.eye(a.shape[1], dtype=z.dtype, device=z.device)

    def nll(theta: Tensor) -> float:
        return float(F.cross_entropy(z * (a @ theta), y))

    theta = z.new_ones(a.shape[1])
    current = nll(theta)
    for _ in range(max_iter):
        u = (z * (a @ theta)).softmax(dim=1) * z
        ua = u @ a
        grad = ua.mean(dim=0) - target
        hess = a.T @ ((u * z).mean(dim=0)[:, None] * a) - ua.T @ ua / n
        scale = float(hess.diagonal().max())
        if scale <= 0:  # every softmax one-hot: the NLL no longer depends on beta
            break
        step = torch.linalg.solve(hess + scale * ridge, grad)
        while True:  # damped: halve a step that fails to lower the NLL
            new = (theta - step).clamp(*BETA_RANGE)
            if (value := nll(new)) <= current:
                break
            step = step / 2
            if float(step.abs().max()) <= tol * float(theta.max()):
                return theta
        if float((new - theta).abs().max()) <= tol * float(theta.max()):
            return new
        theta, current = new, value
    return theta


def scale_logits(logits: Tensor, temperature: Temperature) -> Tensor:
    """``logits`` [N, K, ...] divided by T, or class c's (dim 1) by T_c, in float32."""
    if isinstance(temperature, (int, float)):
        return logits.float() / temperature
    t = torch.tensor(temperature, dtype=torch.float32, device=logits.device)
    return logits.float() / t.view(-1, *[1] * (logits.ndim - 2))


def describe_temperature(temperature: Temperature, digits: int = 3) -> str:
    """``1.234``, or ``per class 0.812-1.407`` (the range of the T_c), for log lines and plot titles."""
    if isinstance(temperature, (int, float)):
        return f"{temperature:.{digits}f}"
    return f"per class {min(temperature):.{digits}f}-{max(temperature):.{digits}f}"

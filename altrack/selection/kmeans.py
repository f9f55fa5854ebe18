"""k-means with sklearn's objective (k-means++ init, Lloyd iterations) on BLAS distance blocks.

Greedy k-means++ as in sklearn (2 + ln k candidate draws per centre), then Lloyd until the
centre shift is below ``tol`` times the mean feature variance, then a last assignment step so
labels, centres and inertia agree. Empty clusters take the points farthest from their centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from altrack.selection.geometry import as_tensor, nearest, sq_dists


@dataclass(frozen=True)
class KMeansResult:
    centres: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    n_trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [first]
    closest = sq_dists(x, x[first : first + 1], x_sq)[:, 0].double()
    potential = closest.sum()
    for _ in range(1, k):
        if potential <= 0:  # every point coincides with a centre: take unused points in order
            unused = np.setdiff1d(np.arange(n), centres)[0]
            centres.append(int(unused))
            continue
        u = torch.rand(n_trials, generator=generator, dtype=torch.float64) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), u).clamp_(max=n - 1)
        d = sq_dists(x, x[candidates], x_sq).double()  # (n, trials)
        trial = torch.minimum(closest.unsqueeze(1), d)
        sums = trial.sum(0)
        best = int(sums.argmin())
        centres.append(int(candidates[best]))
        closest, potential = trial[:, best], sums[best]
    return x[centres].clone()


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> KMeansResult:
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={len(x)}")
    xt = as_tensor(x)
    generator = torch.Generator().manual_seed(seed)
    centres = kmeans_plusplus(xt, k, generator)
    tol_abs = tol * float(xt.var(0).mean()) if len(x) > 1 else 0.0
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        labels, dists = nearest(xt, centres)
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, xt)
        new = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = torch.argsort(dists, descending=True, stable=True)[: len(empty)]
            new[empty] = xt[far]
        shift = float((new - centres).pow(2).sum())
        centres = new
        if shift <= tol_abs:
            break
    labels, dists = nearest(xt, centres)
    return KMeansResult(centres.numpy(), labels.numpy(), float(dists.double().sum()), n_iter)

"""k-means with sklearn's objective (k-means++ init, Lloyd iterations) on BLAS distance blocks.

Greedy k-means++ as in sklearn (2 + ln k candidate draws per centre), then Lloyd until the
centre shift is below ``tol`` times the mean feature variance, then a last assignment step so
labels, centres and inertia agree. Empty clusters take the points farthest from their centre.
Both stages first run on a subsample, which costs a fraction of a full pass; the full-data
Lloyd that follows starts near convergence (benchmarks/bench_kmeans.py measures the inertia).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from altrack.selection.geometry import as_tensor, nearest, padded_steps, repeat_steps, sq_dists

WARM_START_PER_CLUSTER = 32
MIN_WARM_START = 10_000
INERTIA_TOL = 3e-4


@dataclass(frozen=True)
class KMeansResult:
    centres: np.ndarray
    labels: np.ndarray
    inertia: float
    n_iter: int


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (sklearn's: ``2 + ln k`` candidates per centre), the (k, d) centres.

    ``generator`` is a CPU generator: a GPU draws the same numbers, so it picks the same centres
    up to float rounding. There the loop never waits for the device (``_plusplus_on_device``)."""
    if x.device.type != "cpu":
        return _plusplus_on_device(x, k, generator)
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
        u = torch.rand(n_trials, generator=generator, dtype=torch.float64).to(x.device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), u).clamp_(max=n - 1)
        d = sq_dists(x, x[candidates], x_sq).double()  # (n, trials)
        trial = torch.minimum(closest.unsqueeze(1), d)
        sums = trial.sum(0)
        best = int(sums.argmin())
        centres.append(int(candidates[best]))
        closest, potential = trial[:, best], sums[best]
    return x[centres].clone()


def _plusplus_on_device(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``kmeans_plusplus`` with no host round trip per centre: on a GPU each ``int()`` waits for
    every kernel queued before it, and k of them cost more than the arithmetic; on CUDA the
    centres are picked by captured graphs (``repeat_steps``). The uniforms are drawn up front
    from the same CPU generator, in the same order; where every point coincides with a centre
    the first unused point is taken, as on the CPU (a draw is then skipped there and not here:
    the one case where the two can differ). Runs on any device; tests use a CPU."""
    n, device = x.shape[0], x.device
    n_trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator))
    steps = padded_steps(k - 1)
    table = torch.zeros(max(steps, 1), n_trials, dtype=torch.float64)
    for row in range(k - 1):
        table[row] = torch.rand(n_trials, generator=generator, dtype=torch.float64)
    table = table.to(device)
    chosen = torch.full((steps + 1,), first, dtype=torch.int64, device=device)
    used = torch.zeros(n, dtype=torch.bool, device=device)
    used[first] = True
    closest = sq_dists(x, x[first : first + 1], x_sq)[:, 0].double()
    potential = closest.sum()
    step = torch.zeros(1, dtype=torch.int64, device=device)

    def pick() -> None:
        u = table.index_select(0, step).squeeze(0) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), u).clamp_(max=n - 1)
        trial = torch.minimum(closest.unsqueeze(1), sq_dists(x, x.index_select(0, candidates), x_sq).double())
        sums = trial.sum(0)
        best = sums.argmin().view(1)
        degenerate = potential <= 0
        pick = torch.where(degenerate, torch.argmin(used.to(torch.uint8)), candidates.index_select(0, best).squeeze(0))
        step.add_(1)
        chosen.index_copy_(0, step, pick.view(1))
        used.index_fill_(0, pick.view(1), True)
        closest.copy_(torch.where(degenerate, closest, trial.index_select(1, best).squeeze(1)))
        potential.copy_(torch.where(degenerate, potential, sums.index_select(0, best).squeeze(0)))

    repeat_steps(pick, k - 1, device)
    return x.index_select(0, chosen[:k]).clone()


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(k, d) sum of the points of each cluster. On a GPU ``index_add_`` adds with atomics, in an
    order that changes from run to run; a product with the one-hot label matrix, in fixed blocks
    of points, gives the same bits every time and is one GEMM per block (a float64 prefix sum,
    the earlier way, took most of a Lloyd iteration on an H100). On a CPU ``index_add_`` is
    already ordered, and it is what CPU results were made with."""
    if x.device.type == "cpu":
        return torch.zeros(len(counts), x.shape[1], dtype=x.dtype).index_add_(0, labels, x)
    return _sums_by_matmul(x, labels, len(counts))


ONE_HOT_ELEMENTS = 1 << 25  # one block's (k, rows) one-hot matrix: 128 MB of float32


def _sums_by_matmul(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """``cluster_sums`` as one-hot (k, rows) @ x (rows, d), summed over blocks of rows in order.
    Runs on any device; tests compare it with ``index_add_`` on a CPU."""
    rows = max(1, ONE_HOT_ELEMENTS // max(k, 1))
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    clusters = torch.arange(k, device=x.device).unsqueeze(1)
    for start in range(0, x.shape[0], rows):
        block = labels[start : start + rows]
        sums.addmm_((clusters == block.unsqueeze(0)).to(x.dtype), x[start : start + rows])
    return sums


def lloyd(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float, inertia_tol: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations until the total squared centre shift is <= tol * mean feature variance
    (sklearn's rule), or until an iteration lowers the inertia by less than ``inertia_tol``
    (relative): Lloyd's long tail moves centres a little and the objective hardly at all."""
    k = centres.shape[0]
    tol_abs = tol * float(x.var(0).mean()) if x.shape[0] > 1 else 0.0
    n_iter = 0
    previous = float("inf")
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        labels, dists = nearest(x, centres)
        counts = torch.bincount(labels, minlength=k)
        sums = cluster_sums(x, labels, counts)
        new = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        shift_t = (new - centres).pow(2).sum()
        # one host round trip per iteration (a GPU idles during each): the inertia of the current
        # centres, the empty clusters and the shift, read together; the update is dropped on a stop
        inertia, n_empty, shift = torch.stack([dists.double().sum(), (counts == 0).sum().double(),
                                               shift_t.double()]).tolist()  # fmt: skip
        if previous - inertia <= inertia_tol * inertia:
            break
        previous = inertia
        if n_empty:
            empty = torch.nonzero(counts == 0).flatten()
            far = torch.argsort(dists, descending=True, stable=True)[: len(empty)]
            new[empty] = x[far]
            shift = float((new - centres).pow(2).sum())
        centres = new
        if shift <= tol_abs:
            break
    return centres, n_iter


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int,
    max_iter: int = 300,
    tol: float = 1e-4,
    warm_start_per_cluster: int | None = WARM_START_PER_CLUSTER,
    inertia_tol: float = INERTIA_TOL,
    device: torch.device | str = "cpu",
) -> KMeansResult:
    """sklearn's objective, faster: k-means++ and Lloyd first run on a random subsample of
    ``warm_start_per_cluster * k`` points, then Lloyd finishes on all points from those centres.

    ``warm_start_per_cluster=None, inertia_tol=0`` runs both on all points with sklearn's
    stopping rule alone, as sklearn does.

    ``x``: (n, d) points. Returns centres (k, d) float32, labels (n,) int64, the inertia and the
    Lloyd iterations run; the arithmetic runs on ``device``. Raises ``ValueError`` unless 1 <= k <= n.
    """
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={len(x)}")
    xt = as_tensor(x, device)
    generator = torch.Generator().manual_seed(seed)
    n_sub = len(x) if warm_start_per_cluster is None else max(MIN_WARM_START, warm_start_per_cluster * k)
    n_iter = 0
    if n_sub < len(x):
        sub = xt[torch.randperm(len(x), generator=generator)[:n_sub].to(xt.device)]
        seeds = kmeans_plusplus(sub[: max(k, n_sub // 4)], k, generator)  # sub is already shuffled
        centres, n_iter = lloyd(sub, seeds, max_iter, tol, inertia_tol)
    else:
        centres = kmeans_plusplus(xt, k, generator)
    centres, full_iter = lloyd(xt, centres, max_iter, tol, inertia_tol)
    labels, dists = nearest(xt, centres)
    return KMeansResult(centres.cpu().numpy(), labels.cpu().numpy(), float(dists.double().sum()), n_iter + full_iter)

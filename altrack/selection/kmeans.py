"""k-means with sklearn's objective (k-means++ init, Lloyd iterations) on BLAS distance blocks.

Greedy k-means++ as in sklearn (2 + ln k candidate draws per centre), then Lloyd until the
centre shift is below ``tol`` times the mean feature variance, then a last assignment step so
labels, centres and inertia agree. Empty clusters take the points farthest from their centre.
Both stages first run on a subsample, which costs a fraction of a full pass; the full-data
Lloyd that follows starts near convergence (benchmarks/bench_kmeans.py measures the inertia).

Lloyd also stops once an iteration lowers the inertia by less than ``INERTIA_TOL`` (relative).
Its tail is long: at 3e-4 a full MNIST pool took 14-17 full-data iterations after the warm
start; at 7e-4, 9-12, for 21-29% less time and an inertia 0.2% higher (MNIST pool embeddings,
k'' = 200 and 1000, three seeds: 1.0061-1.0087 of sklearn's, against 1.0042-1.0064). Algorithm 1
needs a good clustering, not the last 0.2% of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from altrack.selection.geometry import StepLoop, as_tensor, nearest, padded_steps, sq_dists, workspace

WARM_START_PER_CLUSTER = 32
MIN_WARM_START = 10_000
INERTIA_TOL = 7e-4


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
    centres are picked by a captured graph, kept with its buffers for the next run of this shape
    (``StepLoop``, ``workspace``). The uniforms are drawn up front from the same CPU generator,
    in the same order; where every point coincides with a centre the first unused point is
    taken, as on the CPU (a draw is then skipped there and not here: the one case where the two
    can differ). Runs on any device; tests use a CPU."""
    n_trials = 2 + int(math.log(k))
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    table = torch.zeros(max(padded_steps(k - 1), 1), n_trials, dtype=torch.float64)
    for row in range(k - 1):
        table[row] = torch.rand(n_trials, generator=generator, dtype=torch.float64)
    ws = workspace(("kmeans++", tuple(x.shape), x.dtype, k, str(x.device)), lambda: _PlusPlusLoop(x, k))
    ws.x.copy_(x)
    ws.x_sq.copy_((x * x).sum(1))
    ws.table.copy_(table)
    ws.chosen.fill_(first)
    ws.used.zero_()
    ws.used[first] = True
    ws.closest.copy_(sq_dists(x, x[first : first + 1], ws.x_sq)[:, 0].double())
    ws.potential.copy_(ws.closest.sum())
    ws.step.zero_()
    ws.loop.run(k - 1)
    return x.index_select(0, ws.chosen[:k]).clone()


class _PlusPlusLoop:
    """``_plusplus_on_device``'s buffers (for points shaped like ``x`` and k centres) and its pick."""

    def __init__(self, x: torch.Tensor, k: int) -> None:
        n, device = x.shape[0], x.device
        steps = padded_steps(k - 1)
        self.x = torch.empty_like(x)
        self.x_sq = torch.empty(n, dtype=x.dtype, device=device)
        self.table = torch.empty(max(steps, 1), 2 + int(math.log(k)), dtype=torch.float64, device=device)
        self.chosen = torch.empty(steps + 1, dtype=torch.int64, device=device)
        self.used = torch.empty(n, dtype=torch.bool, device=device)
        self.closest = torch.empty(n, dtype=torch.float64, device=device)
        self.potential = torch.empty((), dtype=torch.float64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.loop = StepLoop(self.pick, device)

    def pick(self) -> None:
        x, x_sq, closest, potential, n = self.x, self.x_sq, self.closest, self.potential, self.x.shape[0]
        u = self.table.index_select(0, self.step).squeeze(0) * potential
        candidates = torch.searchsorted(torch.cumsum(closest, 0), u).clamp_(max=n - 1)
        trial = torch.minimum(closest.unsqueeze(1), sq_dists(x, x.index_select(0, candidates), x_sq).double())
        sums = trial.sum(0)
        best = sums.argmin().view(1)
        degenerate = potential <= 0
        pick = torch.where(degenerate, torch.argmin(self.used.to(torch.uint8)),
                           candidates.index_select(0, best).squeeze(0))  # fmt: skip
        self.step.add_(1)
        self.chosen.index_copy_(0, self.step, pick.view(1))
        self.used.index_fill_(0, pick.view(1), True)
        closest.copy_(torch.where(degenerate, closest, trial.index_select(1, best).squeeze(1)))
        potential.copy_(torch.where(degenerate, potential, sums.index_select(0, best).squeeze(0)))


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, d) sum of the points of each cluster and (k,) the clusters' sizes. On a GPU
    ``index_add_`` adds with atomics, in an order that changes from run to run; a product with
    the one-hot label matrix, in fixed blocks of points, gives the same bits every time and is one
    GEMM per block (a float64 prefix sum, the earlier way, took most of a Lloyd iteration on an
    H100), and the sizes come from the same blocks (``bincount`` reads its size on the host, which
    a captured graph cannot). On a CPU ``index_add_`` is already ordered, and it is what CPU
    results were made with."""
    if x.device.type == "cpu":
        counts = torch.bincount(labels, minlength=k)
        return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x), counts
    return _sums_by_matmul(x, labels, k)


ONE_HOT_ELEMENTS = 1 << 25  # one block's (k, rows) one-hot matrix: 128 MB of float32


def _sums_by_matmul(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_sums`` as one-hot (k, rows) @ x (rows, d), summed over blocks of rows in order,
    and the sizes, exact integers, from the same one-hot blocks. Runs on any device; tests
    compare it with ``index_add_`` and ``bincount`` on a CPU."""
    rows = max(1, ONE_HOT_ELEMENTS // max(k, 1))
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    clusters = torch.arange(k, device=x.device).unsqueeze(1)
    for start in range(0, x.shape[0], rows):
        one_hot = clusters == labels[start : start + rows].unsqueeze(0)
        sums.addmm_(one_hot.to(x.dtype), x[start : start + rows])
        counts.add_(one_hot.sum(1))
    return sums, counts


Assignment = tuple[torch.Tensor, torch.Tensor]  # each point's nearest centre (n,), its squared distance (n,)


def lloyd(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float, inertia_tol: float = 0.0
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations until the total squared centre shift is <= tol * mean feature variance
    (sklearn's rule), or until an iteration lowers the inertia by less than ``inertia_tol``
    (relative): Lloyd's long tail moves centres a little and the objective hardly at all.
    On CUDA the iterations run as captured graphs (``_lloyd_on_device``), with the same result."""
    centres, n_iter, _ = _lloyd(x, centres, max_iter, tol, inertia_tol)
    return centres, n_iter


def _lloyd(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol: float, inertia_tol: float
) -> tuple[torch.Tensor, int, Assignment | None]:
    """``lloyd``, and the points' assignment to the centres it returns where it has one: on a
    host, an iteration dropped by the inertia rule assigned the points to exactly those centres,
    and a pass of the distances costs as much as an iteration."""
    tol_abs = tol * float(x.var(0).mean()) if x.shape[0] > 1 else 0.0
    if x.device.type == "cuda":
        return (*_lloyd_on_device(x, centres, max_iter, tol_abs, inertia_tol), None)
    return _lloyd_on_host(x, centres, max_iter, tol_abs, inertia_tol)


def _lloyd_on_host(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol_abs: float, inertia_tol: float
) -> tuple[torch.Tensor, int, Assignment | None]:
    """``_lloyd`` with a host check after every iteration (``_iteration``): a CPU's way, and the
    reference the device loop is tested against."""
    n_iter = 0
    previous = float("inf")
    assignment = None
    for n_iter in range(1, max_iter + 1):  # noqa: B007 - n_iter is reported
        centres, previous, stop, assignment = _iteration(x, centres, previous, inertia_tol, tol_abs)
        if stop:
            break
    return centres, n_iter, assignment


def _update(
    x: torch.Tensor, centres: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's assignment and update from ``centres``: (each point's nearest centre (n,) and
    squared distance to it (n,), the clusters' sizes (k,), the clusters' means (k, d), an empty
    cluster's mean 0); no host round trip off a CPU."""
    labels, dists = nearest(x, centres)
    sums, counts = cluster_sums(x, labels, centres.shape[0])
    return labels, dists, counts, sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)


def _iteration(
    x: torch.Tensor, centres: torch.Tensor, previous: float, inertia_tol: float, tol_abs: float
) -> tuple[torch.Tensor, float, bool, Assignment | None]:
    """One Lloyd iteration from ``centres``: (the centres it leaves, the inertia to compare the
    next with, whether to stop, the points' assignment to the centres it leaves if it knows it).
    An iteration that lowers the inertia too little is dropped, and then it knows: the points
    were assigned to the centres it keeps."""
    labels, dists, counts, new = _update(x, centres)
    shift_t = (new - centres).pow(2).sum()
    # one host round trip per iteration (a GPU idles during each): the inertia of the current
    # centres, the empty clusters and the shift, read together; the update is dropped on a stop
    inertia, n_empty, shift = torch.stack([dists.double().sum(), (counts == 0).sum().double(),
                                           shift_t.double()]).tolist()  # fmt: skip
    if previous - inertia <= inertia_tol * inertia:
        return centres, previous, True, (labels, dists)
    if n_empty:
        empty = torch.nonzero(counts == 0).flatten()
        far = torch.argsort(dists, descending=True, stable=True)[: len(empty)]
        new[empty] = x[far]
        shift = float((new - centres).pow(2).sum())
    return new, inertia, shift <= tol_abs, None


LLOYD_ROUND = 8  # iterations per graph replay on CUDA: one host check per round instead of per iteration


def _lloyd_on_device(
    x: torch.Tensor, centres: torch.Tensor, max_iter: int, tol_abs: float, inertia_tol: float
) -> tuple[torch.Tensor, int]:
    """``lloyd`` with one host round trip per ``LLOYD_ROUND`` iterations: the stopping rules run
    on the device, and an iteration past a stop leaves the state as it is (``_LloydLoop``). An
    iteration that would empty a cluster is handed back to the host, which runs it as ``lloyd``
    does (``_iteration``) and goes on. On CUDA the rounds are a captured graph, kept for the next
    run of this shape. The same arithmetic as ``lloyd``, so the same centres and count. Runs on
    any device; tests use a CPU."""
    if max_iter < 1:  # the loop below counts an iteration before it checks the limit
        return centres, 0
    key = ("lloyd", tuple(x.shape), x.dtype, centres.shape[0], max_iter, inertia_tol, str(x.device))
    ws = workspace(key, lambda: _LloydLoop(x, centres.shape[0], max_iter, inertia_tol))
    ws.x.copy_(x)
    ws.centres.copy_(centres)
    ws.tol_abs.fill_(tol_abs)
    ws.previous.fill_(float("inf"))
    ws.n_iter.zero_()
    ws.done.zero_()
    ws.pending.zero_()
    while True:
        ws.loop.run_rounds(1)
        n_iter, done, pending = torch.stack([ws.n_iter, ws.done.long(), ws.pending.long()]).tolist()
        if pending:  # the iteration after n_iter empties a cluster: the host runs it
            n_iter += 1
            centres, previous, stop, _ = _iteration(x, ws.centres.clone(), float(ws.previous), inertia_tol, tol_abs)
            if stop or n_iter >= max_iter:
                return centres, n_iter
            ws.centres.copy_(centres)
            ws.previous.fill_(previous)
            ws.n_iter.fill_(n_iter)
            ws.done.zero_()
            ws.pending.zero_()
        elif done:
            return ws.centres.clone(), n_iter


class _LloydLoop:
    """``_lloyd_on_device``'s state and one iteration of it with no host round trip."""

    def __init__(self, x: torch.Tensor, k: int, max_iter: int, inertia_tol: float) -> None:
        device = x.device
        self.x = torch.empty_like(x)
        self.centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=device)
        self.tol_abs = torch.zeros((), dtype=torch.float64, device=device)
        self.previous = torch.zeros((), dtype=torch.float64, device=device)
        self.n_iter = torch.zeros((), dtype=torch.int64, device=device)
        self.done = torch.zeros((), dtype=torch.bool, device=device)
        self.pending = torch.zeros((), dtype=torch.bool, device=device)
        self.max_iter, self.inertia_tol = max_iter, inertia_tol
        self.loop = StepLoop(self.step, device, LLOYD_ROUND)

    def step(self) -> None:
        centres = self.centres
        _, dists, counts, new = _update(self.x, centres)
        shift = (new - centres).pow(2).sum().double()
        inertia = dists.double().sum()
        active = ~self.done
        stop = active & (self.previous - inertia <= self.inertia_tol * inertia)
        to_host = active & ~stop & (counts == 0).any()  # an empty cluster: ``_iteration`` on the host
        advance = active & ~stop & ~to_host
        self.n_iter.add_((active & ~to_host).long())
        self.previous.copy_(torch.where(advance, inertia, self.previous))
        centres.copy_(torch.where(advance, new, centres))
        self.pending.logical_or_(to_host)
        self.done.logical_or_(stop | to_host | (advance & (shift <= self.tol_abs)) | (self.n_iter >= self.max_iter))


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
    centres, full_iter, assignment = _lloyd(xt, centres, max_iter, tol, inertia_tol)
    labels, dists = nearest(xt, centres) if assignment is None else assignment
    return KMeansResult(centres.cpu().numpy(), labels.cpu().numpy(), float(dists.double().sum()), n_iter + full_iter)

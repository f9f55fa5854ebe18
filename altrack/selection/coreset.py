"""The paper's Algorithm 1 (clustering-based sensitivity sampling), as its experiments use it.

1. k-means with k'' clusters on M's pool embeddings (or, with ``coreset_space=loss``, on M's 1-D
   losses, the reading of the original experiment's README; that reading needs every pool
   point's true label, which a real labelling budget would not give, so it is for comparison).
   In the embedding space both variants (loss, gradient) cluster the same points: a stage
   clusters once, with a seed of its own, and both read the result (``Clustering``).
2. Each centre is replaced by its nearest free pool point (the *snap*); those k'' centre points
   are selected and their labels bought.
3. Every other pool point e is scored against its nearest centre point c_e (after the snap, so
   c_e means one thing for the estimate and for lam): l~(e) = l(c_e) + lam_e * ||e - c_e||^2.
4. The other s = k - k' - k'' points are drawn with probability proportional to l~, *without*
   replacement (Gumbel top-k keys). Algorithm 1 draws i.i.d. with replacement, but the budget is
   k distinct labelled points: a repeat would waste a label. Each sampled point records its
   single-draw probability p and its inclusion probability q = 1 - exp(-exp(log l~ - kappa))
   given the threshold kappa, the (s+1)-th largest key (Kool et al. 2019; Duffield et al.'s
   priority sampling): 1/q is an unbiased Horvitz-Thompson weight, which ``--weighted`` uses.

lam, the Holder constant, is only ever estimated from labels M never trained on: the k'' centre
points. M fitted its seed points, so their losses (mean CE 0.05 against 0.5 on the pool, MNIST)
say little about the pool.

- ``auto``: the median over centre points of |l(c) - l(c')| / ||c - c'||^2, c' the nearest other
  centre point. One global constant, the typical rate of change between neighbouring labelled
  points.
- ``lemma8``: per cluster, as in the paper's Lemma 8, the largest such ratio over the centre
  point's 10 nearest other centre points, times log n (n the pool size). No extra labels are
  bought: the centres' nearest labelled neighbours stand in for Lemma 8's extra queries.
- ``auto*F``, ``lemma8*F``: the estimate times F (the ablation's 10 x auto).
- a number: that constant.

Distances are exact float64 differences, and a pair counts only when its distance is above
1e-12 of the points' squared norms, far above rounding and far below any real gap.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.geometry import as_tensor, nearest, nearest_distinct
from altrack.selection.kmeans import kmeans
from altrack.selection.registry import register
from altrack.settings import LamMode, parse_lam_mode
from altrack.threads import one_thread

LEMMA8_NEIGHBOURS = 10
RELATIVE_TIE = 1e-12


def centre_ratios(points: np.ndarray, loss: np.ndarray, neighbours: int) -> np.ndarray:
    """(m, neighbours) ratios |l(c) - l(c')| / ||c - c'||^2 of each of ``m`` labelled points against
    its nearest other ones, NaN where a pair is closer than float64 can tell apart (or missing).

    ``points``: (m, d); ``loss``: (m,). Exact float64 differences; the ranking of neighbours
    uses the BLAS expansion, which is only used to choose them.
    """
    m = len(points)
    neighbours = min(neighbours, m - 1)
    if neighbours < 1:
        return np.full((m, 0), np.nan)
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    sq = (x * x).sum(1)
    ratios = np.full((m, neighbours), np.nan)
    loss = np.asarray(loss, dtype=np.float64)
    for start in range(0, m, 1024):
        block = x[start : start + 1024]
        with one_thread(x.device):  # float64 GEMMs took other bits at other thread counts (altrack.threads)
            d = torch.addmm(sq.unsqueeze(0), block, x.T, alpha=-2.0).add_(sq[start : start + 1024].unsqueeze(1))
        d[torch.arange(len(block)), torch.arange(start, start + len(block))] = math.inf
        nbr = torch.topk(d, neighbours, dim=1, largest=False).indices.numpy()  # (b, neighbours)
        rows = np.arange(start, start + len(block))
        exact = ((points[rows, None, :].astype(np.float64) - points[nbr].astype(np.float64)) ** 2).sum(-1)
        scale = sq.numpy()[rows, None] + sq.numpy()[nbr]
        valid = exact > RELATIVE_TIE * np.maximum(scale, 1e-300)
        gap = np.abs(loss[rows, None] - loss[nbr])
        ratios[rows] = np.where(valid, gap / np.where(valid, exact, 1.0), np.nan)
    return ratios


def estimate_lambda(mode: LamMode, points: np.ndarray, loss: np.ndarray, n_pool: int) -> np.ndarray:
    """lam for each of the ``m`` labelled centre points (m,), from those points alone (see the
    module docstring). Finite and >= 0 always; 0 when no pair can be measured."""
    m = len(points)
    if mode.estimator is None:
        return np.full(m, mode.value)
    if mode.estimator == "auto":
        ratios = centre_ratios(points, loss, 1)[:, 0] if m > 1 else np.array([])
        valid = ratios[np.isfinite(ratios)]
        lam = float(np.median(valid)) if len(valid) else 0.0
        return np.full(m, lam * mode.scale)
    ratios = centre_ratios(points, loss, LEMMA8_NEIGHBOURS)
    measured = np.isfinite(ratios)
    per_centre = np.where(measured.any(1), np.where(measured, ratios, -1.0).max(1, initial=-1.0), np.nan)
    valid = per_centre[np.isfinite(per_centre)]
    fill = float(np.median(valid)) if len(valid) else 0.0  # a centre with no measurable neighbour
    per_centre = np.where(np.isfinite(per_centre), per_centre, fill)
    return per_centre * math.log(max(n_pool, 2)) * mode.scale


def sample_without_replacement(
    weights: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Successive sampling proportional to ``weights`` via Gumbel-top-k keys.

    Returns (positions drawn, single-draw probabilities of all points, inclusion probabilities
    of all points given the threshold). Zero weights are floored at a tiny positive value, so
    the draw is defined even when fewer than ``size`` weights are positive (and uniform when all
    are zero). When every point is drawn, every inclusion probability is 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    floor = 1e-12 * max(float(weights.max(initial=0.0)), 1.0)
    weights = np.maximum(weights, floor)
    probs = weights / weights.sum()
    log_w = np.log(weights)
    keys = log_w + rng.gumbel(size=len(weights))
    order = np.argsort(-keys, kind="stable")
    if size >= len(weights):
        return order[:size], probs, np.ones(len(weights))
    kappa = keys[order[size]]  # the (s+1)-th largest key
    inclusion = -np.expm1(-np.exp(log_w - kappa))
    return order[:size], probs, np.maximum(inclusion, np.finfo(np.float64).tiny)


def _estimate(
    centre_loss: np.ndarray, lam: np.ndarray, nearest_centre: np.ndarray, sq: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """l~ = l(c_e) + lam_e * ||e - c_e||^2 of each point e against its nearest centre point c_e:
    (estimate, distance term, nearest), each (n,). ``centre_loss``, ``lam``: (m,), per centre point;
    ``nearest_centre``, ``sq``: (n,), from ``assign``."""
    distance = lam[nearest_centre] * sq
    return centre_loss[nearest_centre] + distance, distance, nearest_centre


def assign(
    points: np.ndarray | torch.Tensor, centres: np.ndarray, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Each point's nearest centre (n,) and its exact float64 squared distance to it (n,).

    ``points`` (n, d), an array or a float32 tensor already on ``device``; ``centres`` (m, d)."""
    xt = points if isinstance(points, torch.Tensor) else as_tensor(points, device)
    ct = as_tensor(centres, device)
    nearest_centre, _ = nearest(xt, ct)
    c = nearest_centre.cpu().numpy()
    if xt.device.type != "cuda":  # (MPS has no float64)
        host = xt.cpu().numpy() if isinstance(points, torch.Tensor) else points
        offset = host.astype(np.float64) - centres[c].astype(np.float64)
        return c, np.einsum("ij,ij->i", offset, offset)
    return c, _sq_offsets_on_device(xt, ct, nearest_centre)  # a float64 pass on the host took longer


def _sq_offsets_on_device(points: torch.Tensor, centres: torch.Tensor, nearest_centre: torch.Tensor) -> np.ndarray:
    """``assign``'s exact float64 squared distances, computed where the points are: (n,).
    Runs on any device; tests compare it with the CPU's numpy on a CPU."""
    offset = points.double() - centres.double().index_select(0, nearest_centre)
    return (offset * offset).sum(1).cpu().numpy()


def _inertia(points: np.ndarray, on_device: torch.Tensor, centres: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances to the assigned centres, float32 squares summed in float64. On
    CUDA from ``on_device`` (the same points there): on the host it is a pass over the pool
    (about 15 ms on MNIST). A seed model whose embeddings left float32's range (a huge --lr) gives
    inf, as CUDA does, without numpy's overflow warning on the user's terminal."""
    if on_device.device.type != "cuda":
        with np.errstate(over="ignore"):
            return float(((points - centres[labels]) ** 2).sum(dtype=np.float64))
    c = as_tensor(centres, on_device.device).index_select(0, torch.from_numpy(labels).to(on_device.device))
    return float((on_device - c).pow(2).double().sum())


def _kmeans(points: np.ndarray, k: int, seed: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    result = kmeans(points, k, seed=seed, device=device)
    return result.centres, result.labels


@dataclass(frozen=True)
class Clustering:
    """Algorithm 1's steps 1 and 2 and the geometry of step 3: what depends on the space the pool
    is clustered in and on k'', not on the loss. In the embedding space both variants of the
    algorithm (loss and gradient) cluster the same points, so a stage computes it once, with the
    stage's shared seed, and both read it (``SelectionContext.shared``): the variants differ in
    their loss alone, a paired comparison, and the k-means, most of a coreset's time, runs once
    instead of twice. A variant run alone computes the same clustering."""

    centres: np.ndarray  # (k'', d) the k-means centres
    cluster_of: np.ndarray  # (n_pool,) each pool point's k-means cluster
    centre_pos: np.ndarray  # (k'',) pool positions of the snapped centre points
    centre_space: np.ndarray  # (k'', d) those points
    rest: np.ndarray  # (n_pool - k'',) the other pool positions, sorted
    nearest_centre: np.ndarray  # (n_pool - k'',) each one's nearest centre point (a row of centre_pos)
    sq: np.ndarray  # (n_pool - k'',) float64 squared distance to it
    inertia: float  # of the k-means centres and labels
    seconds: float  # it took to compute


class _SensitivitySampling(Selector):
    """Shared Algorithm 1; subclasses choose the per-point loss l.

    ``cluster(points, k, seed, device) -> (centres, labels)`` is the k-means; the benchmarks swap
    in sklearn's to compare.
    """

    loss_name: ClassVar[str]
    cluster = staticmethod(_kmeans)

    def loss(self, ctx: SelectionContext) -> np.ndarray:
        return ctx.ce_loss if self.loss_name == "ce" else ctx.grad_loss

    def clustering(self, ctx: SelectionContext, n_clusters: int) -> tuple[Clustering, bool]:
        """The stage's ``Clustering`` of its pool into ``n_clusters``, and whether it was read
        (computed by another method of the stage) rather than computed here."""
        embedding = ctx.settings.coreset_space == "embedding"
        pool = zlib.crc32(np.ascontiguousarray(ctx.pool_indices, dtype=np.int64).tobytes())
        key = ("coreset clustering", "embedding" if embedding else self.loss_name, n_clusters, self.cluster,
               ctx.device, ctx.shared_seed, len(ctx.pool_indices), pool)  # fmt: skip
        found = ctx.shared.get(key)
        if found is not None:
            return found, True
        space = ctx.embeddings if embedding else self.loss(ctx)[:, None]
        seed = int(np.random.default_rng(ctx.shared_seed).integers(2**31))  # sklearn's range, for the benchmarks
        pool_space = np.ascontiguousarray(space[ctx.pool_indices], dtype=np.float32)
        found = ctx.shared[key] = _cluster_pool(pool_space, n_clusters, seed, ctx.device, self.cluster)
        return found, False

    def select(self, ctx: SelectionContext) -> SelectionResult:
        settings = ctx.settings
        pool = ctx.pool_indices
        loss = self.loss(ctx)  # read at centre points only: the labels this method buys
        n_clusters = settings.n_clusters(ctx.budget, ctx.n_select)
        n_sample = ctx.n_select - n_clusters
        found, read = self.clustering(ctx, n_clusters)
        centre_loss = np.asarray(loss[pool[found.centre_pos]], dtype=np.float64)

        mode = parse_lam_mode(settings.lam)
        lam = estimate_lambda(mode, found.centre_space, centre_loss, len(pool))
        estimate, distance, nearest_centre = _estimate(centre_loss, lam, found.nearest_centre, found.sq)
        drawn, probs, inclusion = sample_without_replacement(estimate, n_sample, ctx.rng)

        roles = np.array(["centre"] * n_clusters + ["sampled"] * n_sample, dtype=object)
        probabilities = np.concatenate([np.full(n_clusters, np.nan), probs[drawn]])
        weights = np.concatenate([np.ones(n_clusters), 1.0 / inclusion[drawn]])
        indices = np.concatenate([pool[found.centre_pos], pool[found.rest[drawn]]]).astype(np.int64)
        total = float(estimate.sum())
        info = {
            "n_clusters": n_clusters,
            "n_sampled": n_sample,
            "lam": float(np.median(lam)) if len(lam) else 0.0,
            "lam_mode": str(settings.lam),
            "distance_share": float(distance.sum()) / total if total > 0 else 0.0,
            "snap_moved": int((nearest_centre != found.cluster_of[found.rest]).sum()),
            "kmeans_inertia": found.inertia,
            "probability_sum": float(probs.sum()),
        }
        # a clustering read from another method of the stage still counts in this run's time, as the
        # seed model's training does in every run of its seed: a method's time does not depend on its company
        return SelectionResult(indices, roles, probabilities, weights, info, found.seconds if read else 0.0)


def _cluster_pool(
    pool_space: np.ndarray, n_clusters: int, seed: int, device: str, cluster: Callable
) -> Clustering:
    """k-means of the (n_pool, d) pool points, the snap of its centres to distinct pool points,
    and every other pool point's nearest centre point."""
    started = time.perf_counter()
    centres, cluster_of = cluster(pool_space, n_clusters, seed, device)
    pool_t = as_tensor(pool_space, device)  # uploaded once for the snap, the distances and the inertia
    centre_pos = nearest_distinct(pool_t, as_tensor(centres, device))
    free = np.ones(len(pool_space), dtype=bool)
    free[centre_pos] = False
    rest = np.flatnonzero(free)  # sorted pool positions
    rest_t = pool_t.index_select(0, torch.from_numpy(rest).to(pool_t.device))
    centre_space = pool_space[centre_pos]
    nearest_centre, sq = assign(rest_t, centre_space, device)
    inertia = _inertia(pool_space, pool_t, centres, cluster_of)
    seconds = time.perf_counter() - started
    return Clustering(centres, cluster_of, centre_pos, centre_space, rest, nearest_centre, sq, inertia, seconds)


@register
class CoresetSelector(_SensitivitySampling):
    """Algorithm 1 with l = cross-entropy of M on the true label (the paper's loss-based variant)."""

    name = "coreset"
    loss_name = "ce"


@register
class CoresetGradSelector(_SensitivitySampling):
    """Algorithm 1 with l = ||grad CE wrt the last linear layer||^2 (the gradient-based variant)."""

    name = "coreset-grad"
    loss_name = "grad"

"""The paper's Algorithm 1 (clustering-based sensitivity sampling), as its experiments use it.

1. k-means with k'' clusters on M's pool embeddings (or, with ``coreset_space=loss``, on M's 1-D
   losses, the reading of the original experiment's README; that reading needs every pool
   point's true label, which a real labelling budget would not give, so it is for comparison).
2. Each centre is replaced by its nearest free pool point; those k'' points are selected.
3. Every other pool point e in cluster i gets the loss estimate l~(e) = l(c_i) + lam * ||e - c_i||^2.
4. The other s = k - k' - k'' points are drawn with probability proportional to l~,
   *without* replacement. Algorithm 1 draws i.i.d. with replacement, but the budget is k distinct
   labelled points: a repeat would waste a label. Each point's single-draw probability p and
   importance weight 1/(s p) are recorded for the optional weighted retraining.

``lam = None`` (auto) estimates the Holder constant as in the paper's Lemma 8, from points whose
labels are already bought: the median over seed points x of |l(x) - l(c_x)| / ||x - c_x||^2 with
c_x the nearest centre point.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.geometry import as_tensor, nearest, nearest_distinct
from altrack.selection.kmeans import kmeans
from altrack.selection.registry import register


def estimate_lambda(
    seed_space: np.ndarray, seed_loss: np.ndarray, centre_space: np.ndarray, centre_loss: np.ndarray
) -> float:
    """Median of |l(x) - l(c_x)| / ||x - c_x||^2 over seed points not on a centre; 0 if none."""
    labels, dists = nearest(as_tensor(seed_space), as_tensor(centre_space))
    dists = dists.numpy().astype(np.float64)
    gaps = np.abs(seed_loss.astype(np.float64) - centre_loss[labels.numpy()])
    valid = dists > 1e-12
    return float(np.median(gaps[valid] / dists[valid])) if valid.any() else 0.0


def sample_without_replacement(
    weights: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Successive sampling proportional to ``weights`` via Gumbel-top-k keys.

    Returns (positions, single-draw probabilities of all points). Zero weights are floored at a
    tiny positive value, so the draw is defined even when fewer than ``size`` weights are positive
    (and uniform when all are zero).
    """
    weights = np.asarray(weights, dtype=np.float64)
    floor = 1e-12 * max(float(weights.max(initial=0.0)), 1.0)
    weights = np.maximum(weights, floor)
    probs = weights / weights.sum()
    keys = np.log(weights) + rng.gumbel(size=len(weights))
    return np.argsort(-keys, kind="stable")[:size], probs


def _kmeans(points: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    result = kmeans(points, k, seed=seed)
    return result.centres, result.labels


class _SensitivitySampling(Selector):
    """Shared Algorithm 1; subclasses choose the per-point loss l.

    ``cluster(points, k, seed) -> (centres, labels)`` is the k-means; the benchmarks swap in
    sklearn's to compare.
    """

    loss_name: ClassVar[str]
    cluster = staticmethod(_kmeans)

    def loss(self, ctx: SelectionContext) -> np.ndarray:
        return ctx.ce_loss if self.loss_name == "ce" else ctx.grad_loss

    def select(self, ctx: SelectionContext) -> SelectionResult:
        settings = ctx.settings
        pool = ctx.pool_indices
        loss = self.loss(ctx).astype(np.float64)
        space = ctx.embeddings if settings.coreset_space == "embedding" else loss[:, None]
        pool_space = np.ascontiguousarray(space[pool], dtype=np.float32)

        n_clusters = settings.n_clusters(ctx.budget, ctx.n_select)
        n_sample = ctx.n_select - n_clusters
        centres, cluster_of = self.cluster(pool_space, n_clusters, int(ctx.rng.integers(2**31)))
        centre_pos = nearest_distinct(as_tensor(pool_space), as_tensor(centres))
        centre_space = pool_space[centre_pos]
        centre_loss = loss[pool[centre_pos]]

        lam = settings.lam
        if lam is None:
            lam = estimate_lambda(space[ctx.seed_indices], loss[ctx.seed_indices], centre_space, centre_loss)

        rest = np.setdiff1d(np.arange(len(pool)), centre_pos)  # sorted pool positions
        cluster = cluster_of[rest]
        offset = pool_space[rest].astype(np.float64) - centre_space[cluster]
        estimate = centre_loss[cluster] + lam * np.einsum("ij,ij->i", offset, offset)
        drawn, probs = sample_without_replacement(estimate, n_sample, ctx.rng)

        roles = np.array(["centre"] * n_clusters + ["sampled"] * n_sample, dtype=object)
        probabilities = np.concatenate([np.full(n_clusters, np.nan), probs[drawn]])
        weights = np.concatenate([np.ones(n_clusters), 1.0 / (max(n_sample, 1) * probs[drawn])])
        indices = np.concatenate([pool[centre_pos], pool[rest[drawn]]]).astype(np.int64)
        info = {
            "n_clusters": n_clusters,
            "n_sampled": n_sample,
            "lam": float(lam),
            "lam_mode": "auto" if settings.lam is None else "fixed",
            "kmeans_inertia": float(((pool_space - centres[cluster_of]) ** 2).sum(dtype=np.float64)),
            "probability_sum": float(probs.sum()),
        }
        return SelectionResult(indices, roles, probabilities, weights, info)


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

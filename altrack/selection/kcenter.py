from __future__ import annotations

import numpy as np
import torch

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.geometry import StepLoop, as_tensor, nearest, padded_steps, workspace
from altrack.selection.registry import register

EPS = torch.finfo(torch.float32).eps
# float32 rounding of ||x||^2 - 2 x.c + ||c||^2 over d dimensions is at worst about 4 d eps times the
# largest squared norm; the pruning margin covers that twice over, so a point the measured distance
# would move is measured. The bound's own rounding has a margin of its own (``kcenter_greedy``).
ROUNDING_PER_DIM = 8 * EPS
# the lower bound's dimensions: distances in the top principal directions of the points. 12 of 128
# leave about 130 of MNIST's 59,600 points to measure per pick; 8 leave 390, 16 leave 90 for a
# GEMV a third longer (bench_selection: 12 was the fastest at k = 2000 and 5000)
PROJECTION_DIMS = 12
COVARIANCE_STRIDE = 4  # the directions from a quarter of the points: as good a bound, 8 ms less on MNIST
PROJECTION_SHRINK = np.float32(1.0 - 1e-4)  # float32 bases are orthonormal to ~1e-7, not exactly
# the loop's gathers skip numpy's bounds check (its indices are rows it made, all in range, so
# 'wrap' never wraps): a 60k-point gather takes 0.2 ms with the default mode='raise', 31 us with
# 'clip' and 23 us with 'wrap', numpy's cheapest path (numpy 2.4, the 2-core Xeon)
TAKE = "wrap"
# what stands in for infinity in the bound table: a taken row's slack (never measured again) and,
# with no centres yet, every row's (all measured). Finite, so that the GEMV never meets an inf: one
# is harmless only while no kernel multiplies it by a zero (0 * inf is NaN, and a NaN slack would
# compare false: a row never measured again)
FAR = np.float32(np.finfo(np.float32).max / 8)


def kcenter_greedy(points: torch.Tensor, centres: torch.Tensor, n: int) -> list[int]:
    """Sener & Savarese's greedy: repeatedly take the point farthest from every centre so far.

    Ties go to the lower row; rows already taken are never taken again, even when duplicates make
    every distance zero. ``points`` (n_points, d) and ``centres`` (m, d) on one device.

    Exact, with a lower bound doing most of the work on a CPU. A point x whose nearest centre lies
    at distance r cannot have a new centre j nearer unless ||P(x - j)|| < r, P the projection on
    the points' top principal directions (never more than the true distance). That bound for
    every point is one GEMV per pick over a (q + 1, n_points) table: the projections, and a last
    row holding each point's slack, ||Px||^2 - r^2 with its margins, so the GEMV's output compared
    with -||Pj||^2 is the whole test. Only the few points it leaves (about 130 of 59,600 per pick
    on MNIST) are measured, each by ``row_dots``, which rounds a row as it would alone, whatever
    the batch and the thread count: so the picks are exactly those of the plain greedy measuring
    every point that way (tests/test_selection.py), and a run's picks do not depend on
    ``--workers``. Real embeddings are full of near ties (on a Fashion-MNIST pool, several exact
    ties between the two farthest points per run, and gaps of one ulp), so another rounding of
    the same products, a GEMV's (a6cf675's greedy, and the GPU's loop below), takes other points
    from the first such tie on, each a farthest point up to rounding (tested). The loop's
    bookkeeping runs in numpy (a pass over 60k points costs a few microseconds of overhead there,
    tens in torch), its GEMV in torch, on the threads altrack plans; the test keeps a margin for
    its own rounding and the measured distance's. A triangle-inequality filter on the nearest
    centres, which ran first until 2026-12-07, left the same ~90 points at 16 dimensions, in
    twice the time.

    Raises ``ValueError`` if n exceeds the number of points (a taken row cannot be taken again).
    """
    if n > points.shape[0]:
        raise ValueError(f"{n} picks but only {points.shape[0]} points")
    if points.device.type != "cpu":
        return _kcenter_on_device(points, centres, n)
    n_points, dim = points.shape
    if n == 0:
        return []
    pts = points.contiguous().numpy()
    x_sq = (points * points).sum(1).numpy()
    top = float(x_sq.max())
    if len(centres):
        min_d = nearest(points, centres)[1].numpy()
        top = max(top, float((centres * centres).sum(1).max()))
    else:
        min_d = np.full(n_points, np.inf, dtype=pts.dtype)
    tau2 = np.float32(ROUNDING_PER_DIM * dim * top)
    two = pts.dtype.type(2.0)
    proj, proj_sq = _principal_projection(points)
    q = proj.shape[1]
    # a point is measured while ||P(x - j)||^2 * SHRINK < r^2 + margin, r^2 its min_d: with the
    # slack s = ||Px||^2 - (r^2 + margin) / SHRINK, while -2 Px.Pj + s < -||Pj||^2. The margin is
    # the measured distance's rounding (tau2) and the test's own: q + 1 products summed, the
    # slack's two roundings, each within eps / 2 of the terms' sizes (centred projections' squared
    # norms, up to 4 top, and squared distances, up to 4 top), taken twice. That one does not shrink
    # with d as tau2 does: in one dimension tau2 alone let a point the greedy moves go unmeasured
    margin = tau2 + np.float32((q + 4) * EPS * (4.0 * float(proj_sq.max()) + 4.0 * top))
    table_t = torch.empty(q + 1, n_points, dtype=points.dtype)  # the GEMV's operand, as torch's (n, q + 1) view
    table = table_t.numpy()  # and the same memory for numpy's updates
    table[:q] = proj.T

    def slack(sq: np.ndarray, r2: np.ndarray) -> np.ndarray:  # points' ||Px||^2 and min_d -> the table's last row
        return sq - (r2 + margin) / PROJECTION_SHRINK

    table[q] = slack(proj_sq, min_d) if len(centres) else -FAR
    vector_t = torch.ones(q + 1, dtype=points.dtype)
    vector = vector_t.numpy()
    score_t = torch.empty(n_points, dtype=points.dtype)
    score, near = score_t.numpy(), np.empty(n_points, dtype=bool)  # reused each pick
    rows_t = table_t.t()
    chosen: list[int] = []
    for _ in range(n):
        j = int(np.argmax(min_d))
        chosen.append(j)
        x_j = x_sq[j]
        np.multiply(proj[j], -two, out=vector[:q])
        # torch's GEMV, on the threads altrack plans for this process: numpy's OpenBLAS ran it on a
        # thread per core of its own, spinning between calls, which took the core a second worker
        # process needed (two processes' k-center runs: 0.87-1.0 s each, against 0.38 s now)
        torch.mv(rows_t, vector_t, out=score_t)
        candidates = np.flatnonzero(np.less(score, -proj_sq[j], out=near))
        dot = row_dots(torch.from_numpy(pts.take(candidates, axis=0, mode=TAKE)), points[j]).numpy()
        # the plain greedy's float32 arithmetic, (||x||^2 - 2 x.p) + ||p||^2 clamped at 0, in numpy
        d = np.maximum(x_sq.take(candidates, mode=TAKE) - two * dot + x_j, 0.0, dtype=pts.dtype)
        nearer = d < min_d.take(candidates, mode=TAKE)
        moved, d_moved = candidates[nearer], d[nearer]
        min_d[moved] = d_moved
        table[q, moved] = slack(proj_sq.take(moved, mode=TAKE), d_moved)
        min_d[j] = -1.0  # taken rows stay at -1: every distance is >= 0, so they never move again
        table[q, j] = FAR  # and are never measured again
    return chosen


def row_dots(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Each row's dot product with ``p``, (r, d) x (d,) -> (r,), rounded as that row alone would
    be: an elementwise product summed along the row, one row's arithmetic whatever the batch
    holds and however many threads run it (for rows narrower than torch's parallel grain, 32,768
    elements, past which a lone row's sum is split among threads; embeddings here are 128 or
    256 wide). Not BLAS's GEMV: MKL picks its kernel by the row count and the thread count, so
    on an Intel Xeon (AVX-512) a row of a 90-row batch rounded an ulp away from the same row of
    the full product, and a 500-row batch differently at one thread and at two. The pruned loop
    measures other batches at other thread counts (its bounds are GEMVs too), so a near tie then
    went another way, and a run's k-center picks, and its accuracy, depended on ``--workers``
    (Fashion-MNIST, k = 3000, seed 0: 0.7993 with one worker, 0.8029 with two)."""
    return (rows * p).sum(1)


def _principal_projection(points: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The centred points in their top ``PROJECTION_DIMS`` principal directions, (n, q), and their
    squared norms (n,): ||P(x - y)|| <= ||x - y|| for any orthonormal P, the best such P keeps
    most of the spread. Used only to rule points out, so its accuracy affects speed, not picks:
    the directions come from every ``COVARIANCE_STRIDE``-th point, a quarter of the product."""
    dim = points.shape[1]
    q = min(PROJECTION_DIMS, dim)
    centred = points - points.mean(0)
    sample = centred[::COVARIANCE_STRIDE]
    _, vectors = torch.linalg.eigh((sample.T @ sample).double())  # ascending eigenvalues
    proj = (centred @ vectors[:, dim - q :].to(points.dtype)).contiguous()
    return proj.numpy(), (proj * proj).sum(1).numpy()


def _kcenter_on_device(points: torch.Tensor, centres: torch.Tensor, n: int) -> list[int]:
    """The plain greedy with no host round trip per pick: on a GPU a product with every point
    costs microseconds, while pruning needs the candidates' count on the host each time. On CUDA
    the picks run as a captured graph, kept with its buffers for the next pool of this shape
    (``StepLoop``, ``workspace``). Runs on any device; tests use a CPU."""
    key = ("kcenter", tuple(points.shape), points.dtype, n, str(points.device))
    ws = workspace(key, lambda: _KCenterLoop(points, n))
    ws.points.copy_(points)
    ws.x_sq.copy_((points * points).sum(1))
    if len(centres):
        ws.min_d.copy_(nearest(points, centres)[1])
    else:
        ws.min_d.fill_(float("inf"))
    ws.chosen.zero_()
    ws.step.zero_()
    ws.loop.run(n)
    return ws.chosen[:n].tolist()


class _KCenterLoop:
    """``_kcenter_on_device``'s buffers (shaped like ``points``, for n picks) and its pick."""

    def __init__(self, points: torch.Tensor, n: int) -> None:
        device = points.device
        self.points = torch.empty_like(points)
        self.x_sq = torch.empty(points.shape[0], dtype=points.dtype, device=device)
        self.min_d = torch.empty_like(self.x_sq)
        self.chosen = torch.zeros(padded_steps(n), dtype=torch.int64, device=device)
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.loop = StepLoop(self.pick, device)

    def pick(self) -> None:
        points, x_sq, min_d = self.points, self.x_sq, self.min_d
        j = torch.argmax(min_d).view(1)
        self.chosen.index_copy_(0, self.step, j)
        self.step.add_(1)
        d = torch.addmv(x_sq, points, points.index_select(0, j).squeeze(0), alpha=-2.0)
        d.add_(x_sq.index_select(0, j)).clamp_(min=0.0)
        torch.minimum(min_d, d, out=min_d)
        min_d.index_fill_(0, j, -1.0)


@register
class KCenterSelector(Selector):
    """k-center greedy on M's embeddings, seeded with the seed set: the paper's "coreset [SS18]"."""

    name = "kcenter"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        pool = as_tensor(ctx.embeddings[ctx.pool_indices], ctx.device)
        seeds = as_tensor(ctx.embeddings[ctx.seed_indices], ctx.device)
        return SelectionResult.picked(ctx.pool_indices[kcenter_greedy(pool, seeds, ctx.n_select)])

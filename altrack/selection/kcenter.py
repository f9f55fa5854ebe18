from __future__ import annotations

import torch

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.geometry import as_tensor, nearest, padded_steps, repeat_steps
from altrack.selection.registry import register

# float32 rounding of ||x||^2 - 2 x.c + ||c||^2 is a few eps times the squared norms; the pruning
# margin stays well above it, so a pruned point is one the full pass would not have moved either.
ROUNDING = 64 * torch.finfo(torch.float32).eps


def kcenter_greedy(points: torch.Tensor, centres: torch.Tensor, n: int) -> list[int]:
    """Sener & Savarese's greedy: repeatedly take the point farthest from every centre so far.

    Ties go to the lower row; rows already taken are never taken again, even when duplicates make
    every distance zero. ``points`` (n_points, d) and ``centres`` (m, d) on one device.

    Exact, with the triangle inequality doing most of the work: a point x whose nearest centre c
    lies at distance r, and a new centre j with ||j - c|| >= 2r (plus a rounding margin), cannot
    have j nearer than c, so only the other points are measured. Each pick costs one pass over
    the points' nearest-centre ids and the distances of the few points near the new centre,
    instead of a product with every point.
    """
    if points.device.type != "cpu":
        return _kcenter_on_device(points, centres, n)
    x_sq = (points * points).sum(1)
    device, n_points = points.device, points.shape[0]
    centre_rows = torch.empty(len(centres) + n, points.shape[1], dtype=points.dtype, device=device)
    centre_rows[: len(centres)] = centres
    if len(centres):
        assign, min_d = nearest(points, centres)
    else:
        assign = torch.zeros(n_points, dtype=torch.int64, device=device)
        min_d = torch.full_like(x_sq, float("inf"))
    tau = (ROUNDING * float(x_sq.max())) ** 0.5 if n_points else 0.0
    # a point is measured only while ||j - c||^2 < reach = (2 r + tau)^2, r its distance to c
    reach = (2.0 * min_d.clamp(min=0.0).sqrt() + tau).square_()
    chosen: list[int] = []
    for step in range(n):
        j = int(torch.argmax(min_d))
        chosen.append(j)
        m = len(centres) + step
        p = points[j]
        centre_rows[m] = p
        if m == 0:
            candidates = torch.arange(n_points, device=device)
        else:
            cc = (centre_rows[:m] - p).pow_(2).sum(1)  # the new centre to every earlier one
            candidates = torch.nonzero(cc.index_select(0, assign) < reach).flatten()
        # index_select, not advanced indexing: on a CPU it is several times faster for row gathers
        dot = points.index_select(0, candidates) @ p
        d = (x_sq.index_select(0, candidates) - 2.0 * dot + x_sq[j]).clamp_(min=0.0)
        nearer = torch.nonzero(d < min_d.index_select(0, candidates)).flatten()
        moved = candidates.index_select(0, nearer)
        d_moved = d.index_select(0, nearer)
        min_d.index_copy_(0, moved, d_moved)
        assign.index_fill_(0, moved, m)
        reach.index_copy_(0, moved, (2.0 * d_moved.sqrt() + tau).square_())
        min_d[j] = -1.0  # taken rows stay at -1: every distance is >= 0
        reach[j] = -1.0  # and are never measured again
    return chosen


def _kcenter_on_device(points: torch.Tensor, centres: torch.Tensor, n: int) -> list[int]:
    """The plain greedy with no host round trip per pick: on a GPU a product with every point
    costs microseconds, while pruning needs the candidates' count on the host each time. On CUDA
    the picks run as captured graphs (``repeat_steps``). Runs on any device; tests use a CPU."""
    x_sq = (points * points).sum(1)
    _, min_d = nearest(points, centres) if len(centres) else (None, torch.full_like(x_sq, float("inf")))
    chosen = torch.zeros(padded_steps(n), dtype=torch.int64, device=points.device)
    step = torch.zeros(1, dtype=torch.int64, device=points.device)

    def pick() -> None:
        j = torch.argmax(min_d).view(1)
        chosen.index_copy_(0, step, j)
        step.add_(1)
        d = torch.addmv(x_sq, points, points.index_select(0, j).squeeze(0), alpha=-2.0)
        d.add_(x_sq.index_select(0, j)).clamp_(min=0.0)
        torch.minimum(min_d, d, out=min_d)
        min_d.index_fill_(0, j, -1.0)

    repeat_steps(pick, n, points.device)
    return chosen[:n].tolist()


@register
class KCenterSelector(Selector):
    """k-center greedy on M's embeddings, seeded with the seed set: the paper's "coreset [SS18]"."""

    name = "kcenter"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        pool = as_tensor(ctx.embeddings[ctx.pool_indices], ctx.device)
        seeds = as_tensor(ctx.embeddings[ctx.seed_indices], ctx.device)
        return SelectionResult.picked(ctx.pool_indices[kcenter_greedy(pool, seeds, ctx.n_select)])

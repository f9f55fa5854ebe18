from __future__ import annotations

import torch

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.geometry import as_tensor, nearest
from altrack.selection.registry import register


def kcenter_greedy(points: torch.Tensor, centres: torch.Tensor, n: int) -> list[int]:
    """Sener & Savarese's greedy: repeatedly take the point farthest from every centre so far.

    One matrix-vector product per pick; ties go to the lower row. Rows already taken are never
    taken again, even when duplicates make every distance zero.
    """
    x_sq = (points * points).sum(1)
    _, min_d = nearest(points, centres) if len(centres) else (None, torch.full_like(x_sq, float("inf")))
    chosen: list[int] = []
    for _ in range(n):
        j = int(torch.argmax(min_d))
        chosen.append(j)
        d = (x_sq - 2.0 * (points @ points[j]) + x_sq[j]).clamp_(min=0.0)
        torch.minimum(min_d, d, out=min_d)
        min_d[chosen] = -1.0
    return chosen


@register
class KCenterSelector(Selector):
    """k-center greedy on M's embeddings, seeded with the seed set: the paper's "coreset [SS18]"."""

    name = "kcenter"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        pool = as_tensor(ctx.embeddings[ctx.pool_indices])
        seeds = as_tensor(ctx.embeddings[ctx.seed_indices])
        return SelectionResult.picked(ctx.pool_indices[kcenter_greedy(pool, seeds, ctx.n_select)])

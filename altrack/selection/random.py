from __future__ import annotations

from altrack.selection.base import SelectionContext, SelectionResult, Selector
from altrack.selection.registry import register


@register
class RandomSelector(Selector):
    """Uniform without replacement: the paper's "uniform" baseline."""

    name = "random"

    def select(self, ctx: SelectionContext) -> SelectionResult:
        return SelectionResult.picked(ctx.rng.choice(ctx.pool_indices, size=ctx.n_select, replace=False))

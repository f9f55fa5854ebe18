"""What every selection method sees and returns.

A method sees the pool (train indices not in the seed set) and the seed model M's outputs on the
whole train split; it returns ``n_select`` distinct pool indices. Ties break by the lower index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from altrack.settings import Settings

ROLES = ("seed", "centre", "sampled", "picked")


@dataclass(frozen=True)
class SelectionContext:
    """Seed-model outputs on the whole train split (row i is train index i) plus the split itself."""

    seed_indices: np.ndarray  # int64 train indices already labelled
    pool_indices: np.ndarray  # int64 train indices available, sorted ascending
    budget: int
    probs: np.ndarray  # (n_train, C) softmax of M
    embeddings: np.ndarray  # (n_train, d) input of M's last linear layer
    labels: np.ndarray  # (n_train,) true labels, only read for labelled (selected) points
    ce_loss: np.ndarray  # (n_train,) CE of M on the true label
    grad_loss: np.ndarray  # (n_train,) ||grad of CE wrt last layer||^2
    settings: Settings
    rng: np.random.Generator  # the method's own stream
    shared_seed: int  # seeds the random work a stage's methods share (the coreset's k-means), the same for each
    device: str = "cpu"  # where the distance kernels run (the dataset's device)
    # what a stage's methods share, filled in by the first that needs it (``coreset.Clustering``):
    # the same dict for every method of the stage, a fresh one for a method run alone
    shared: dict = field(default_factory=dict)

    @property
    def n_select(self) -> int:
        return self.budget - len(self.seed_indices)


@dataclass(frozen=True)
class SelectionResult:
    """Selected pool indices with per-point role, probability and importance weight (NaN: n/a)."""

    indices: np.ndarray
    roles: np.ndarray
    probabilities: np.ndarray
    weights: np.ndarray
    info: dict = field(default_factory=dict)
    # time of work this selection read from another method of its stage rather than computed
    # (the coreset's clustering): counted in its selection time, which then does not depend on company
    shared_seconds: float = 0.0

    @classmethod
    def picked(cls, indices: np.ndarray, info: dict | None = None) -> SelectionResult:
        indices = np.asarray(indices, dtype=np.int64)
        nan = np.full(len(indices), np.nan)
        return cls(indices, np.full(len(indices), "picked", dtype=object), nan, nan.copy(), info or {})


class Selector(ABC):
    """One acquisition heuristic. Subclasses set ``name`` and implement ``select``."""

    name: ClassVar[str]

    @abstractmethod
    def select(self, ctx: SelectionContext) -> SelectionResult: ...


class ScoreSelector(Selector):
    """Ranks the pool by a per-point score with an explicit direction.

    ``ascending = True`` means the *smallest* scores are the most informative.
    """

    ascending: ClassVar[bool]

    @abstractmethod
    def score(self, probs: np.ndarray) -> np.ndarray: ...

    def select(self, ctx: SelectionContext) -> SelectionResult:
        scores = self.score(ctx.probs[ctx.pool_indices].astype(np.float64))
        return SelectionResult.picked(ctx.pool_indices[top_n(scores, ctx.n_select, self.ascending)])


def top_n(scores: np.ndarray, n: int, ascending: bool) -> np.ndarray:
    """Positions of the n best scores; equal scores keep position order (the lower index wins)."""
    key = scores if ascending else -scores
    return np.argsort(key, kind="stable")[:n]

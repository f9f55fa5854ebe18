"""Uncertainty sampling under the seed model. Each class states its ranking direction."""

from __future__ import annotations

import numpy as np
from scipy.special import entr

from altrack.selection.base import ScoreSelector
from altrack.selection.registry import register


@register
class MarginSelector(ScoreSelector):
    """p(top1) - p(top2); a small margin means M can barely tell two classes apart."""

    name = "margin"
    ascending = True

    def score(self, probs: np.ndarray) -> np.ndarray:
        top2 = np.partition(probs, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]


@register
class EntropySelector(ScoreSelector):
    """-sum p log p; a large entropy means M spreads its belief."""

    name = "entropy"
    ascending = False

    def score(self, probs: np.ndarray) -> np.ndarray:
        return entr(probs).sum(axis=1)


@register
class LeastConfidenceSelector(ScoreSelector):
    """max p; a small top probability means M is unsure of its own prediction."""

    name = "least-confidence"
    ascending = True

    def score(self, probs: np.ndarray) -> np.ndarray:
        return probs.max(axis=1)

"""The knobs of one protocol run, and the one table of constraints every entry point checks.

A leaf module: ``selection`` and ``config`` import it, it imports neither. ``Settings`` is built
the same way from click options, a sweep spec and logged MLflow params (``Settings.from_params``),
and every value passes through ``RULES``, so a message is worded identically wherever the bad
value came from.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from altrack.errors import ConfigError

AUTO = "auto"
CORESET_SPACES = ("embedding", "loss")
DEVICES = ("auto", "cpu", "cuda", "mps")

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is(kind: type, value: object) -> bool:
    """Strict type test: bools are not numbers, ints are numbers."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


@dataclass(frozen=True)
class Rule:
    """One field's constraint: its type, then a choice list or a predicate, and how to say it.

    ``label`` names the field in messages (``batch size``); choices are a callable so that a
    registry filled on import (the selection methods) is read when checking, not when defining.
    ``unknown=True`` words a bad choice as ``unknown method 'x'; choose from ...``.
    """

    kind: type
    test: Callable[[Any], bool] | None = None
    must: str = ""
    choices: Callable[[], Sequence[str]] | None = None
    unknown: bool = False
    label: str | None = None
    optional: bool = False

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it passes (ints widened to float for float fields), else ``ConfigError``."""
        label = self.label or name
        if value is None and self.optional:
            return value
        if not _is(self.kind, value):
            raise ConfigError(f"{label} must be {_TYPE_WORDS[self.kind]}, got {value!r}")
        if self.kind is float:
            value = float(value)
        if self.choices is not None:
            choices = tuple(self.choices())
            if value not in choices:
                if self.unknown:
                    raise ConfigError(f"unknown {label} {value!r}; choose from {', '.join(choices)}")
                raise ConfigError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
        if self.test is not None and not self.test(value):
            raise ConfigError(f"{label} must {self.must}, got {value}")
        return value


def at_least(low: int) -> Rule:
    return Rule(int, lambda v: v >= low, f"be >= {low}")


def open_interval(low: float, high: float) -> Rule:
    return Rule(float, lambda v: low < v < high, f"be in ({low:g}, {high:g})")


def _lam_ok(value: float | str) -> bool:
    return value == AUTO or (isinstance(value, float) and math.isfinite(value) and value >= 0)


SETTINGS_RULES: dict[str, Rule] = {
    "epochs": at_least(1),
    "batch_size": Rule(int, lambda v: v >= 1, "be >= 1", label="batch size"),
    "lr": Rule(float, lambda v: 0 < v < math.inf, "be a finite number > 0"),
    "seed_ratio": open_interval(0, 1),
    "cluster_ratio": open_interval(0, 1),
    "lam": Rule(float, lambda v: math.isfinite(v) and v >= 0, "be 'auto' or a finite float >= 0", optional=True),
    "coreset_space": Rule(str, choices=lambda: CORESET_SPACES),
    "weighted": Rule(bool),
}


def parse_lam(value: str | float | None) -> float | None:
    """'auto' (or None) -> None, else a float; the one place the string form is read."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lam must be 'auto' or a number, got {value!r}") from None


def _from_text(kind: type, text: str) -> object:
    """A logged MLflow param (always a string) back to its field's type."""
    if kind is bool:
        return text == "True"
    return kind(text)


@dataclass(frozen=True)
class Settings:
    """The knobs of one protocol run besides dataset, method, budget and seed (paper defaults).

    Raises ``ConfigError`` (one line) for any value ``SETTINGS_RULES`` refuses.
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed_ratio: float = 0.2
    cluster_ratio: float = 0.2
    lam: float | None = None  # None means "auto": estimated by the coreset (see selection/coreset.py)
    coreset_space: str = "embedding"
    weighted: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            # frozen: the checked value (ints widened to float) replaces the given one
            object.__setattr__(self, f.name, SETTINGS_RULES[f.name].check(f.name, getattr(self, f.name)))
        if self.seed_ratio + self.cluster_ratio >= 1.0:
            raise ConfigError(
                f"seed_ratio + cluster_ratio must be < 1, got {self.seed_ratio} + {self.cluster_ratio}"
            )

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> Settings:
        """The Settings a run logged with ``as_params``; fields it did not log keep their default."""
        values: dict[str, object] = {}
        for name, rule in SETTINGS_RULES.items():
            if name not in params:
                continue
            values[name] = parse_lam(params[name]) if name == "lam" else _from_text(rule.kind, params[name])
        return cls(**values)  # type: ignore[arg-type]

    def as_params(self) -> dict[str, object]:
        """MLflow params, lam as 'auto' or its value; ``from_params`` reads them back."""
        return {**asdict(self), "lam": self.lam_label}

    @property
    def lam_label(self) -> str | float:
        """How lam is logged: 'auto' or the fixed value."""
        return AUTO if self.lam is None else self.lam

    @property
    def label(self) -> str:
        """The knobs a sweep tunes, as one string: how reports tell settings apart."""
        lam = AUTO if self.lam is None else f"{self.lam:.4g}"
        return f"seed_ratio={self.seed_ratio:g} cluster_ratio={self.cluster_ratio:g} lam={lam}"

    def n_seed(self, budget: int) -> int:
        """k', the random seed set."""
        return int(round(self.seed_ratio * budget))

    def n_select(self, budget: int) -> int:
        """k - k', what a method selects."""
        return budget - self.n_seed(budget)

    def n_clusters(self, budget: int, n_select: int | None = None) -> int:
        """k'' as the coreset uses it: ``cluster_ratio * k``, at most the ``n_select`` picks
        (default k - k'), at least one."""
        n_select = self.n_select(budget) if n_select is None else n_select
        return max(1, min(int(round(self.cluster_ratio * budget)), n_select))

    def check_budget(self, budget: int, n_available: int, where: str) -> None:
        """Refuse a budget that ``n_available`` train points (``where``) cannot hold, or that
        leaves an empty seed set or nothing to select."""
        if budget < 1:
            raise ConfigError(f"budget k must be >= 1, got {budget}")
        if budget > n_available:
            raise ConfigError(f"budget k={budget} is larger than the {where} ({n_available})")
        if self.n_seed(budget) < 1:
            raise ConfigError(f"budget k={budget} gives an empty seed set at seed_ratio={self.seed_ratio}")
        if self.n_seed(budget) >= budget:
            raise ConfigError(f"budget k={budget} leaves nothing to select at seed_ratio={self.seed_ratio}")


PAPER_SETTING = Settings()  # the paper: k'/k = k''/k = 0.2, lam auto
PAPER_SETTING_LABEL = PAPER_SETTING.label


@dataclass(frozen=True)
class RunKey:
    """Identifies one protocol run; its hash recognises a finished run when a grid is re-run."""

    dataset: str
    method: str
    budget: int
    seed: int

    def config_hash(self, settings: Settings) -> str:
        payload = json.dumps({"key": asdict(self), "settings": asdict(settings)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """How a run of this key is named in MLflow."""
        return f"{self.dataset}-{self.method}-k{self.budget}-s{self.seed}"

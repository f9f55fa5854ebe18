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
import reprlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from altrack.errors import ConfigError

AUTO = "auto"
CORESET_SPACES = ("embedding", "loss")
DEVICES = ("auto", "cpu", "cuda", "mps")

_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", object: "a value"}


def as_float(value: int | float) -> float:
    """``float(value)``, with an integer past float's range (a YAML or CLI number of 400 digits)
    as +-inf rather than an OverflowError, so that a field's own test refuses it in one line."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


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
    convert: Callable[[Any], Any] | None = None  # canonical form, or ConfigError

    def check(self, name: str, value: Any) -> Any:
        """``value`` if it passes (ints widened to float for float fields), else ``ConfigError``."""
        label = self.label or name
        if value is None and self.optional:
            return value
        if not _is(self.kind, value):
            raise ConfigError(f"{label} must be {_TYPE_WORDS[self.kind]}, got {reprlib.repr(value)}")
        if self.kind is float:
            value = as_float(value)
        if self.convert is not None:
            value = self.convert(value)
        if self.choices is not None:
            choices = tuple(self.choices())
            if value not in choices:
                if self.unknown:
                    raise ConfigError(f"unknown {label} {value!r}; choose from {', '.join(choices)}")
                raise ConfigError(f"{label} must be one of {', '.join(choices)}, got {value!r}")
        if self.test is not None and not self.test(value):
            raise ConfigError(f"{label} must {self.must}, got {value}")
        return value


def at_least(low: int, label: str | None = None) -> Rule:
    return Rule(int, lambda v: v >= low, f"be >= {low}", label=label)


def open_interval(low: float, high: float) -> Rule:
    return Rule(float, lambda v: low < v < high, f"be in ({low:g}, {high:g})")


SETTINGS_RULES: dict[str, Rule] = {
    "epochs": at_least(1),
    "batch_size": Rule(int, lambda v: v >= 1, "be >= 1", label="batch size"),
    "lr": Rule(float, lambda v: 0 < v < math.inf, "be a finite number > 0"),
    "seed_ratio": open_interval(0, 1),
    "cluster_ratio": open_interval(0, 1),
    "lam": Rule(object, convert=lambda v: parse_lam(v)),
    "coreset_space": Rule(str, choices=lambda: CORESET_SPACES),
    "weighted": Rule(bool),
}


LEMMA8 = "lemma8"
LAM_ESTIMATORS = (AUTO, LEMMA8)
LAM_FORMS = "'auto', 'lemma8', 'auto*F', 'lemma8*F' (0 < F <= 1e12) or a number in [0, 1e12]"


@dataclass(frozen=True)
class LamMode:
    """How the coreset gets lam: an estimator ('auto', 'lemma8') times ``scale``, or ``value``."""

    estimator: str | None
    scale: float = 1.0
    value: float = 0.0


LAM_MAX = 1e12  # lam times a squared embedding distance (up to ~1e4) must stay far from float64's 1.8e308


def _finite_non_negative(number: float, text: object) -> float:
    if not (math.isfinite(number) and 0 <= number <= LAM_MAX):
        raise ConfigError(f"lam must be {LAM_FORMS}, got {text!r}")
    return number


def parse_lam_mode(value: str | float) -> LamMode:
    """The one reader of lam's forms: 'auto', 'lemma8', 'auto*10', 'lemma8*0.5', or a number.

    Raises ``ConfigError`` for anything else, a negative, NaN or infinite number included."""
    if isinstance(value, bool):
        raise ConfigError(f"lam must be {LAM_FORMS}, got {value!r}")
    if isinstance(value, int | float):
        return LamMode(None, value=_finite_non_negative(float(value), value))
    if not isinstance(value, str):
        raise ConfigError(f"lam must be {LAM_FORMS}, got {value!r}")
    text = value.strip().lower()
    name, star, factor = text.partition("*")
    if name.strip() in LAM_ESTIMATORS:
        try:
            scale = float(factor) if star else 1.0
        except ValueError:
            raise ConfigError(f"lam must be {LAM_FORMS}, got {value!r}") from None
        if not (math.isfinite(scale) and 0 < scale <= LAM_MAX):
            raise ConfigError(f"lam must be {LAM_FORMS} with F > 0, got {value!r}")
        return LamMode(name.strip(), scale)
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"lam must be {LAM_FORMS}, got {value!r}") from None
    return LamMode(None, value=_finite_non_negative(number, value))


def parse_lam(value: str | float | None) -> str | float:
    """lam in its canonical form: 'auto', 'lemma8', 'auto*10' (estimator, scale) or a float.
    None means 'auto' (specs and params written before lam had other modes)."""
    mode = parse_lam_mode(AUTO if value is None else value)
    if mode.estimator is None:
        return mode.value
    return mode.estimator if mode.scale == 1.0 else f"{mode.estimator}*{mode.scale:g}"


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
    lam: float | str = AUTO  # an estimator ('auto', 'lemma8', 'auto*10') or a constant (selection/coreset.py)
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
        """The Settings a run logged with ``as_params``; fields it did not log (its method ignores
        them, ``catalog.applies``) keep their default, except a cluster_ratio that would not fit
        beside a large seed_ratio: half the room left is taken then (never used by that run)."""
        values: dict[str, object] = {}
        for name, rule in SETTINGS_RULES.items():
            if name not in params:
                continue
            values[name] = params[name] if name == "lam" else _from_text(rule.kind, params[name])
        seed_ratio = float(values.get("seed_ratio", cls.seed_ratio))  # type: ignore[arg-type]
        if "cluster_ratio" not in values and seed_ratio + cls.cluster_ratio >= 1.0:
            values["cluster_ratio"] = (1.0 - seed_ratio) / 2
        return cls(**values)  # type: ignore[arg-type]

    def as_params(self) -> dict[str, object]:
        """MLflow params; ``from_params`` reads them back."""
        return asdict(self)

    def knobs(self) -> dict[str, str]:
        """Every knob as the label writes it: ``{"epochs": "10", ..., "lam": "auto"}``."""
        words = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "lam" and not isinstance(value, str):
                words[field.name] = f"{value:.4g}"
            else:
                words[field.name] = f"{value:g}" if isinstance(value, float) else str(value)
        return words

    @property
    def label(self) -> str:
        """The knobs a sweep tunes, then any other knob not at its default, as one string of
        ``name=value`` words: how reports tell settings apart (``report.separate_settings``).
        The paper's setting reads as it always has: ``seed_ratio=0.2 cluster_ratio=0.2 lam=auto``."""
        knobs, defaults = self.knobs(), DEFAULT_KNOBS  # defined below, before any label is read
        first = ("seed_ratio", "cluster_ratio", "lam")
        rest = [name for name in knobs if name not in first and knobs[name] != defaults[name]]
        return " ".join(f"{name}={knobs[name]}" for name in (*first, *rest))

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
DEFAULT_KNOBS = PAPER_SETTING.knobs()  # a knob a label leaves out has this value
PAPER_SETTING_LABEL = PAPER_SETTING.label
SWEPT_WORDS = len(PAPER_SETTING_LABEL.split())  # a label's first words: the knobs a sweep tunes


def label_knobs(label: str) -> dict[str, str]:
    """Every knob of a setting's ``label``, those it leaves out at their defaults:
    ``label_knobs("seed_ratio=0.1 cluster_ratio=0.3 lam=auto lr=0.01")["epochs"] == "10"``."""
    return {**DEFAULT_KNOBS, **dict(word.split("=", 1) for word in label.split())}


def paper_counterpart(label: str) -> str:
    """The paper's setting with the other knobs of ``label`` (its epochs, lr, ...): what a tuned
    setting is compared with, so that only the knobs a sweep tunes differ between the two."""
    return " ".join([*PAPER_SETTING_LABEL.split(), *label.split()[SWEPT_WORDS:]])


def is_paper_setting(label: str) -> bool:
    """Whether ``label`` is the paper's 0.2 / 0.2 / lam auto, whatever its other knobs."""
    return label == paper_counterpart(label)


@dataclass(frozen=True)
class RunKey:
    """Identifies one protocol run; its hash recognises a finished run when a grid is re-run."""

    dataset: str
    method: str
    budget: int
    seed: int

    def config_hash(self, settings: Settings, identity: Mapping[str, str]) -> str:
        """The resume key: this key, the settings and ``identity`` (``altrack.provenance``: code,
        torch, device and data), so a rerun reuses only what the same everything produced."""
        payload = json.dumps({"key": asdict(self), "settings": asdict(settings), **identity}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """How a run of this key is named in MLflow."""
        return f"{self.dataset}-{self.method}-k{self.budget}-s{self.seed}"

"""Frozen, validated configs: the one boundary where user input is checked.

Everything downstream trusts these objects, so a bad value fails here with a one-line
``ConfigError`` before any data is read, any MLflow run is opened or any file is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from altrack.data import DATASETS
from altrack.errors import ConfigError

CORESET_SPACES = ("embedding", "loss")
DEVICES = ("auto", "cpu", "cuda", "mps")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _ratio(name: str, value: float) -> None:
    _check(0.0 < value < 1.0, f"{name} must be in (0, 1), got {value}")


AUTO = "auto"


def parse_lam(value: str | float | None) -> float | None:
    """'auto' (or None) -> None, else a float; the one place the string form is read."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"lam must be 'auto' or a number, got {value!r}") from None


@dataclass(frozen=True)
class Settings:
    """The knobs of one protocol run besides dataset, method, budget and seed (paper defaults)."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed_ratio: float = 0.2
    cluster_ratio: float = 0.2
    lam: float | None = None  # None means "auto": estimated from the seed set (Lemma 8 style)
    coreset_space: str = "embedding"
    weighted: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0 and self.lr == self.lr, f"lr must be > 0, got {self.lr}")
        _ratio("seed_ratio", self.seed_ratio)
        _ratio("cluster_ratio", self.cluster_ratio)
        _check(
            self.seed_ratio + self.cluster_ratio < 1.0,
            f"seed_ratio + cluster_ratio must be < 1, got {self.seed_ratio} + {self.cluster_ratio}",
        )
        _check(
            self.lam is None or (self.lam >= 0 and self.lam != float("inf")),
            f"lam must be 'auto' or a finite float >= 0, got {self.lam}",
        )
        _check(
            self.coreset_space in CORESET_SPACES,
            f"coreset_space must be one of {', '.join(CORESET_SPACES)}, got {self.coreset_space!r}",
        )

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
        return int(round(self.seed_ratio * budget))

    def n_clusters(self, budget: int) -> int:
        return int(round(self.cluster_ratio * budget))

    def effective_clusters(self, budget: int, n_select: int | None = None) -> int:
        """k'' as the coreset uses it: at most the ``n_select`` = k - k' picks, and at least one."""
        n_select = budget - self.n_seed(budget) if n_select is None else n_select
        return max(1, min(self.n_clusters(budget), n_select))

    def check_budget(self, dataset: str, budget: int) -> None:
        n_train = DATASETS[dataset].n_train
        _check(budget >= 1, f"budget k must be >= 1, got {budget}")
        _check(budget <= n_train, f"budget k={budget} is larger than the {dataset} train split ({n_train})")
        _check(
            self.n_seed(budget) >= 1,
            f"budget k={budget} gives an empty seed set at seed_ratio={self.seed_ratio}",
        )
        _check(
            self.n_seed(budget) < budget,
            f"budget k={budget} leaves nothing to select at seed_ratio={self.seed_ratio}",
        )


PAPER_SETTING_LABEL = Settings().label  # the paper: k'/k = k''/k = 0.2, lam auto


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


def writable_dir_target(path: Path) -> bool:
    """True when ``path`` is a directory we can write, or could be created as one."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


@dataclass(frozen=True)
class GridConfig:
    """One ``altrack run`` invocation: datasets x budgets x seeds x methods."""

    datasets: tuple[str, ...] = ("mnist",)
    methods: tuple[str, ...] = ("coreset", "random")
    budgets: tuple[int, ...] = (2000,)
    runs: int = 1
    seed: int = 0
    settings: Settings = field(default_factory=Settings)
    device: str = "auto"
    data_dir: str | None = None
    out: str | None = "results"
    experiment: str | None = None
    log_models: bool = True
    fail_fast: bool = False
    workers: int = 1
    resume: bool = True

    def __post_init__(self) -> None:
        from altrack.selection import available_methods

        _check(len(self.datasets) > 0, "at least one dataset is required")
        _check(len(self.methods) > 0, "at least one method is required")
        _check(len(self.budgets) > 0, "at least one budget is required")
        for name in self.datasets:
            _check(name in DATASETS, f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
        for name in self.methods:
            _check(
                name in available_methods(),
                f"unknown method {name!r}; choose from {', '.join(available_methods())}",
            )
        _check(len(set(self.datasets)) == len(self.datasets), "a dataset is listed twice")
        _check(len(set(self.methods)) == len(self.methods), "a method is listed twice")
        _check(len(set(self.budgets)) == len(self.budgets), "a budget is listed twice")
        for dataset in self.datasets:
            for budget in self.budgets:
                self.settings.check_budget(dataset, budget)
        _check(self.runs >= 1, f"runs must be >= 1, got {self.runs}")
        _check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.out is not None:
            _check(writable_dir_target(Path(self.out)), f"--out {self.out!r} is not a writable directory")

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.seed + r for r in range(self.runs))

    def run_keys(self) -> list[RunKey]:
        """Runs in execution order: methods innermost, so each seed model is trained once."""
        return [
            RunKey(dataset, method, budget, seed)
            for dataset in self.datasets
            for budget in self.budgets
            for seed in self.seeds
            for method in self.methods
        ]

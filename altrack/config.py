"""Frozen, validated configs: the one boundary where user input is checked.

Everything downstream trusts these objects, so a bad value fails here with a one-line
``ConfigError`` before any data is read, any MLflow run is opened or any file is written.
``RULES`` is the one table of field constraints; sweep specs (``altrack.sweep.spec``) check
their fields against the same table, so both say the same thing about the same mistake.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from altrack.catalog import DATASETS, METHODS
from altrack.errors import ConfigError
from altrack.settings import DEVICES, SETTINGS_RULES, Rule, RunKey, Settings, at_least
from altrack.slurm import EXECUTORS, SlurmConfig

MAX_RUNS = 1_000_000  # each run is at least a second of training: more is a typo, not a plan

RULES: dict[str, Rule] = {
    **SETTINGS_RULES,
    "dataset": Rule(str, choices=lambda: tuple(DATASETS), unknown=True),
    "method": Rule(str, choices=lambda: METHODS, unknown=True),
    "device": Rule(str, choices=lambda: DEVICES),
    "runs": at_least(1),
    "workers": at_least(1),
    "stack": at_least(0),
    "memory_cap": Rule(float, lambda v: 0 < v < float("inf"), "be a positive number of GiB", optional=True),
    "seed": at_least(0),
    "log_models": Rule(bool),
    "experiment": Rule(str, optional=True),
    "executor": Rule(str, choices=lambda: EXECUTORS, unknown=True),
}


def check(name: str, value: object, rule: str | None = None) -> object:
    """``value`` checked against ``RULES[rule or name]``; ``ConfigError`` names the field."""
    return RULES[rule or name].check(name, value)


def check_unique(values: Iterable, what: str) -> None:
    values = list(values)
    if not values:
        raise ConfigError(f"at least one {what} is required")
    twice = [value for i, value in enumerate(values) if value in values[:i]]
    if twice:
        raise ConfigError(f"{what} {twice[0]!r} is listed twice")


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
    """One ``altrack run`` invocation: datasets x budgets x seeds x methods.

    Raises ``ConfigError`` for an unknown dataset, method or device, a repeated entry, a budget
    a dataset cannot hold, a non-positive count, or an ``out`` that cannot be a writable folder.
    """

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
    stack: int = 0  # models trained together at most; 0: altrack.protocol.stack_limit's default
    memory_cap: float | None = None  # GiB the stacks may take; None: protocol.stack_limit's default
    executor: str = "local"  # or "slurm": blocks as Slurm array tasks (altrack.slurm)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    detach: bool = False  # slurm: submit, print the parent run id and return
    system_metrics: bool = False  # MLflow samples CPU, memory and GPU use into the parent run

    def __post_init__(self) -> None:
        for values, what in ((self.datasets, "dataset"), (self.methods, "method"), (self.budgets, "budget")):
            check_unique(values, what)
        for name in self.datasets:
            check("dataset", name)
        for name in self.methods:
            check("method", name)
        for dataset in self.datasets:
            spec = DATASETS[dataset]
            for budget in self.budgets:
                self.settings.check_budget(budget, spec.n_train, f"{dataset} train split")
        for name in ("runs", "workers", "seed", "device", "experiment", "stack", "memory_cap", "executor"):
            check(name, getattr(self, name))
        n_runs = len(self.datasets) * len(self.budgets) * len(self.methods) * self.runs
        if n_runs > MAX_RUNS:
            raise ConfigError(f"the grid has {n_runs:,} runs; at most {MAX_RUNS:,} runs in one invocation")
        if self.detach and self.executor != "slurm":
            raise ConfigError("--detach needs --executor slurm")
        if self.out is not None and not writable_dir_target(Path(self.out)):
            raise ConfigError(f"--out {self.out!r} is not a writable directory")

    @property
    def memory_cap_bytes(self) -> int | None:
        return None if self.memory_cap is None else int(self.memory_cap * 2**30)

    @property
    def trains_here(self) -> bool:
        """Whether the invoking process trains the blocks itself (one worker, no Slurm), and so
        keeps the datasets it loads; workers and Slurm tasks load their own copies."""
        return self.workers <= 1 and self.executor == "local"

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

"""A study spec (YAML): what is fixed, what is searched, and how; checked once, on load.

The fixed protocol knobs are a ``Settings`` (so every knob a grid has, ``weighted`` included,
works in a sweep), checked against the same ``RULES`` table as ``altrack run``'s options.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from altrack.catalog import DATASETS, applies
from altrack.config import RULES
from altrack.errors import ConfigError
from altrack.settings import AUTO, PAPER_SETTING, SETTINGS_RULES, Rule, Settings, as_float, at_least

SEARCHABLE = ("cluster_ratio", "seed_ratio", "lam")
SAMPLERS = ("tpe", "random", "grid")
OBJECTIVES = {"val_accuracy": "maximize"}
# MLflow's longest param value (mlflow.utils.validation's; a test holds the two equal): a trial
# logs its seeds as one param, so a long seed list would fail only once the trial runs
MLFLOW_PARAM_CHARS = 6000

SPEC_RULES: dict[str, Rule] = {
    **RULES,
    "study_name": Rule(str, lambda v: v.strip() != "", "be a non-empty string"),
    "budget": at_least(1),
    "seeds_per_trial": at_least(1),
    "base_seed": at_least(0),
    "validation_fraction": Rule(float, lambda v: 0 < v < 0.5, "be in (0, 0.5)"),
    "validation_seed": at_least(0),
    "n_trials": at_least(1),
    "sampler": Rule(str, choices=lambda: SAMPLERS, unknown=True),
    "sampler_seed": at_least(0),
    "objective": Rule(str, choices=lambda: tuple(OBJECTIVES), unknown=True),
}


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _domain(name: str) -> str:
    return "[0, inf)" if name == "lam" else "(0, 1)"


def _in_domain(name: str, value: float) -> bool:
    return value >= 0 and math.isfinite(value) if name == "lam" else 0 < value < 1


@dataclass(frozen=True)
class ParamRange:
    """One searched parameter: a float range (optionally log scale) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[float, ...] | None = None

    @classmethod
    def parse(cls, name: str, raw: object, where: str) -> ParamRange:
        key = f"{where}: search_space.{name}"
        _check(name in SEARCHABLE, where, f"unknown key 'search_space.{name}'; searchable: {', '.join(SEARCHABLE)}")
        _check(isinstance(raw, dict), key, "must be a mapping with low/high[/log] or choices")
        assert isinstance(raw, dict)
        unknown = sorted(map(str, set(raw) - {"low", "high", "log", "choices"}))
        if unknown:
            raise ConfigError(f"{where}: unknown key 'search_space.{name}.{unknown[0]}'")
        if "choices" in raw:
            _check(set(raw) == {"choices"}, key, "choices cannot be combined with low/high/log")
            choices = raw["choices"]
            _check(isinstance(choices, list) and len(choices) > 0, key, "choices must be a non-empty list")
            _check(all(map(_is_number, choices)), key, "choices must be numbers")
            values = tuple(as_float(c) for c in choices)
            _check(len(set(values)) == len(values), key, "choices must differ")
            for value in values:
                _check(_in_domain(name, value), key, f"choice {value} is outside {_domain(name)}")
            return cls(name, choices=values)
        _check("low" in raw and "high" in raw, key, "needs low and high (or choices)")
        low, high, log = raw["low"], raw["high"], raw.get("log", False)
        _check(_is_number(low) and _is_number(high), key, "low and high must be numbers")
        _check(isinstance(log, bool), key, "log must be true or false")
        _check(low < high, key, f"low ({low}) must be below high ({high})")
        _check(not log or low > 0, key, "a log scale needs low > 0")
        low, high = as_float(low), as_float(high)
        for value in (low, high):
            _check(_in_domain(name, value), key, f"bound {value} is outside {_domain(name)}")
        return cls(name, low, high, log)

    @property
    def bounds(self) -> tuple[float, float]:
        if self.choices is not None:
            return min(self.choices), max(self.choices)
        assert self.low is not None and self.high is not None
        return self.low, self.high

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies in this space (the paper's 0.2 may not, and is then not enqueued)."""
        low, high = self.bounds
        return value in self.choices if self.choices is not None else low <= value <= high

    def suggest(self, trial: optuna.Trial) -> float:  # noqa: F821 - the annotation is never evaluated
        if self.choices is not None:
            return float(trial.suggest_categorical(self.name, list(self.choices)))
        assert self.low is not None and self.high is not None
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class SweepSpec:
    """A validated study spec: the fixed ``settings``, the ``search_space`` and the study's knobs."""

    study_name: str
    dataset: str
    search_space: tuple[ParamRange, ...]
    settings: Settings = field(default_factory=Settings)
    method: str = "coreset"
    budget: int = 1000
    seeds_per_trial: int = 2
    base_seed: int = 0
    validation_fraction: float = 0.1
    validation_seed: int = 0
    n_trials: int = 10
    sampler: str = "tpe"
    sampler_seed: int = 0
    objective: str = "val_accuracy"
    experiment: str | None = None
    device: str = "auto"
    log_models: bool = False
    source: str = field(default="<spec>", compare=False)

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(self.base_seed + i for i in range(self.seeds_per_trial))

    @property
    def seeds_text(self) -> str:
        """The seeds as a trial run logs them (its ``seeds`` param), comma-separated."""
        return ",".join(map(str, self.seeds))

    def space(self) -> dict[str, ParamRange]:
        return {p.name: p for p in self.search_space}

    def paper_point(self) -> dict[str, float] | None:
        """The paper's ratios for the searched ones (lam: 'auto', set apart), the point of the
        trial a study runs first; None when no trial can be the paper's setting: a searched
        ratio's range leaves the paper's value out, or the spec fixes a ratio elsewhere. (A
        partial point would be labelled the baseline while its other ratios were sampled, and
        the grid sampler refuses an enqueued trial that does not fix every searched parameter.)"""
        space = self.space()
        point = {}
        for name in ("cluster_ratio", "seed_ratio"):
            paper = getattr(PAPER_SETTING, name)
            if name in space:
                if not space[name].admits(paper):
                    return None
                point[name] = paper
            elif getattr(self.settings, name) != paper:
                return None
        return point

    def check_trials(self, n_trials: int) -> None:
        """Refuse more trials than the grid sampler has points, plus the paper's baseline trial,
        which it leaves out of its count: the rest would repeat points (the seeds are fixed, so
        their values too). Raises ``ConfigError``."""
        if self.sampler != "grid":
            return
        points = math.prod(len(p.choices or ()) for p in self.search_space)
        baseline = self.paper_point() is not None
        if n_trials > points + baseline:
            also = " and the paper's baseline trial" if baseline else ""
            raise ConfigError(f"n_trials {n_trials} exceeds the grid's {points} points{also}: "
                              "the grid sampler would repeat points")  # fmt: skip

    def trial_settings(self, params: dict[str, float], lam_auto: bool = False) -> Settings:
        """One trial's settings: the spec's fixed ones with ``params`` (and lam 'auto' for the
        paper's baseline trial) put in."""
        return dataclasses.replace(self.settings, **params, **({"lam": AUTO} if lam_auto else {}))

    # what may change between invocations of one study without changing what its trials mean
    NOT_FINGERPRINTED = ("study_name", "n_trials", "sampler", "sampler_seed", "experiment", "device", "log_models",
                         "source")  # fmt: skip

    def fingerprint(self) -> dict[str, str]:
        """Every field that changes what a trial of this study means, as text: a study remembers
        it, and a rerun of its name with a different spec is refused (``altrack.sweep.run``)."""
        values = dataclasses.asdict(self)
        return {k: repr(v) for k, v in sorted(values.items()) if k not in self.NOT_FINGERPRINTED}

    def validation_size(self) -> int:
        return int(round(self.validation_fraction * DATASETS[self.dataset].n_train))

    def n_available(self) -> int:
        """Train points left for seed sets and pools after the validation split."""
        return DATASETS[self.dataset].n_train - self.validation_size()


_SETTINGS_KEYS = set(SETTINGS_RULES)
_SPEC_KEYS = ({f.name for f in fields(SweepSpec)} - {"source", "settings", "search_space"}) | _SETTINGS_KEYS


def _validate(spec: SweepSpec, where: str) -> None:
    """What needs several fields at once: the grid sampler, the ratios' reach, the budget."""
    _check(len(spec.search_space) > 0, where, "search_space is empty")
    for param in spec.search_space:  # a study over a knob its method never reads would rank noise
        _check(applies(param.name, spec.method), where,
               f"method {spec.method} does not read {param.name}; search it with coreset or coreset-grad")  # fmt: skip
    if spec.sampler == "grid":
        _check(
            all(p.choices is not None for p in spec.search_space),
            where,
            "the grid sampler needs choices for every searched parameter",
        )
        try:
            spec.check_trials(spec.n_trials)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    space = spec.space()
    high = {name: space[name].bounds[1] if name in space else getattr(spec.settings, name)
            for name in ("seed_ratio", "cluster_ratio")}  # fmt: skip
    _check(
        high["seed_ratio"] + high["cluster_ratio"] < 1,
        where,
        f"seed_ratio + cluster_ratio can reach {high['seed_ratio'] + high['cluster_ratio']:g}; it must stay < 1",
    )
    _check(
        len(spec.seeds_text) <= MLFLOW_PARAM_CHARS,
        where,
        f"seeds_per_trial {spec.seeds_per_trial} from base_seed {spec.base_seed}: a trial's seeds take "
        f"{len(spec.seeds_text)} characters, beyond the {MLFLOW_PARAM_CHARS} of an MLflow param",
    )
    _check(
        spec.budget <= spec.n_available(),
        where,
        f"budget {spec.budget} exceeds the {spec.n_available()} train points left after the validation split",
    )
    try:  # the extreme corners must be valid protocol settings
        for corner in ({n: space[n].bounds[0] for n in space}, {n: space[n].bounds[1] for n in space}):
            settings = spec.trial_settings(corner)
            settings.check_budget(spec.budget, spec.n_available(), "train points left after the validation split")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice (YAML's default: the last one silently wins) and
    any alias (``*name``): a spec needs none, and aliases are how a few lines expand to gigabytes."""

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a spec",
                                              event.start_mark)  # fmt: skip
        return super().compose_node(parent, index)


def _mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a YAML spec.

    Every problem is a one-line ``ConfigError`` naming the file and the key: an unreadable or
    non-YAML file, a key given twice, an unknown or missing key, a value of the wrong type or
    out of its range (the ``SPEC_RULES`` table), a search space outside its domain.
    """
    where = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read spec: {getattr(exc, 'strerror', None) or 'not a text file'}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", "")
        detail = f": {problem}" if problem and ("twice" in str(problem) or "alias" in str(problem)) else ""
        raise ConfigError(f"{where}: not valid YAML{line}{detail}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML (nested too deeply)") from None
    _check(isinstance(raw, dict), where, "a spec must be a YAML mapping")
    _check(all(isinstance(k, str) for k in raw), where, "every key must be a string")
    unknown = sorted(set(raw) - _SPEC_KEYS - {"search_space"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    for required in ("study_name", "dataset", "search_space"):
        _check(required in raw, where, f"missing key {required!r}")
    _check(isinstance(raw["search_space"], dict), where, "search_space must be a mapping")
    space = tuple(ParamRange.parse(str(name), value, where) for name, value in raw["search_space"].items())
    values = {k: v for k, v in raw.items() if k != "search_space"}
    try:
        values = {k: SPEC_RULES[k].check(k, v) for k, v in values.items()}
        settings = Settings(**{k: values.pop(k) for k in list(values) if k in _SETTINGS_KEYS})
        spec = SweepSpec(search_space=space, settings=settings, source=where, **values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _validate(spec, where)
    return spec

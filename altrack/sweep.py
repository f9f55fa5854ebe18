"""Everything Optuna: study specs, storage, workers, the objective and the sweep report.

A sweep tunes the paper's fixed settings (cluster_ratio = seed_ratio = 0.2, lam auto) on a
validation split carved from the train split; the test split is logged for information only.

- ``--n-trials N`` is the study's total of COMPLETE trials: N workers started together finish
  exactly N (a trial that would overshoot is pruned before it does any work).
- The default storage is an Optuna journal file in the working directory, safe for several
  processes on one machine; any Optuna RDB URL (``postgresql://...``) works across machines.
- A trial whose worker died is marked FAIL and retried with the same params: on RDB storages by
  Optuna's heartbeat, on the journal by checking the recorded worker pid on this host. Its
  MLflow run is marked KILLED.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlflow
import numpy as np
import optuna
import torch
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from altrack.cache import SeedStageCache
from altrack.config import DEVICES, Settings, parse_lam
from altrack.data import DATASETS, load_dataset, resolve_device
from altrack.errors import AltrackError, ConfigError, TrainingDiverged
from altrack.protocol import run_method, stream_seed, threads_per_worker
from altrack.selection import available_methods
from altrack.tracking import COMMAND_TAG, ERROR_TAG, KIND_TAG, pid_alive

DEFAULT_STORAGE = "altrack-optuna.journal"
SEARCHABLE = ("cluster_ratio", "seed_ratio", "lam")
SAMPLERS = ("tpe", "random", "grid")
OBJECTIVES = {"val_accuracy": "maximize"}
PAPER_SETTING = {"cluster_ratio": 0.2, "seed_ratio": 0.2}
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 90
POLL_SECONDS = 1.0
WORKER_ATTR = "altrack.worker"
RUN_ATTR = "altrack.mlflow_run_id"
BASELINE_ATTR = "altrack.paper_baseline"


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{where}: {message}")


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
        unknown = sorted(set(raw) - {"low", "high", "log", "choices"})
        if unknown:
            raise ConfigError(f"{where}: unknown key 'search_space.{name}.{unknown[0]}'")
        if "choices" in raw:
            _check(set(raw) == {"choices"}, key, "choices cannot be combined with low/high/log")
            choices = raw["choices"]
            _check(isinstance(choices, list) and len(choices) > 0, key, "choices must be a non-empty list")
            _check(
                all(isinstance(c, int | float) and not isinstance(c, bool) for c in choices),
                key,
                "choices must be numbers",
            )
            values = tuple(float(c) for c in choices)
            for value in values:
                _check(_in_domain(name, value), key, f"choice {value} is outside {_domain(name)}")
            return cls(name, choices=values)
        _check("low" in raw and "high" in raw, key, "needs low and high (or choices)")
        low, high, log = raw["low"], raw["high"], raw.get("log", False)
        _check(
            all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)),
            key,
            "low and high must be numbers",
        )
        _check(isinstance(log, bool), key, "log must be true or false")
        _check(low < high, key, f"low ({low}) must be below high ({high})")
        _check(not log or low > 0, key, "a log scale needs low > 0")
        for value in (low, high):
            _check(_in_domain(name, value), key, f"bound {value} is outside {_domain(name)}")
        return cls(name, float(low), float(high), log)

    @property
    def bounds(self) -> tuple[float, float]:
        if self.choices is not None:
            return min(self.choices), max(self.choices)
        assert self.low is not None and self.high is not None
        return self.low, self.high

    def admits(self, value: float) -> bool:
        """Whether ``value`` lies in this space (the paper's 0.2 may not, and is then not enqueued)."""
        if self.choices is not None:
            return value in self.choices
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def suggest(self, trial: optuna.Trial) -> float:
        if self.choices is not None:
            return float(trial.suggest_categorical(self.name, list(self.choices)))
        assert self.low is not None and self.high is not None
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


def _domain(name: str) -> str:
    return "[0, inf)" if name == "lam" else "(0, 1)"


def _in_domain(name: str, value: float) -> bool:
    return value >= 0 and math.isfinite(value) if name == "lam" else 0 < value < 1


@dataclass(frozen=True)
class SweepSpec:
    """A study spec (YAML): what is fixed, what is searched, and how."""

    study_name: str
    dataset: str
    search_space: tuple[ParamRange, ...]
    method: str = "coreset"
    budget: int = 1000
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed_ratio: float = 0.2
    cluster_ratio: float = 0.2
    lam: float | None = None
    coreset_space: str = "embedding"
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

    def space(self) -> dict[str, ParamRange]:
        return {p.name: p for p in self.search_space}

    def settings(self, params: dict[str, float], lam_auto: bool = False) -> Settings:
        """The protocol settings of one trial: the spec's fixed values overridden by ``params``."""
        values = {"seed_ratio": self.seed_ratio, "cluster_ratio": self.cluster_ratio, "lam": self.lam, **params}
        if lam_auto:
            values["lam"] = None
        return Settings(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed_ratio=values["seed_ratio"],
            cluster_ratio=values["cluster_ratio"],
            lam=values["lam"],
            coreset_space=self.coreset_space,
        )

    def validation_size(self) -> int:
        return int(round(self.validation_fraction * DATASETS[self.dataset].n_train))

    def validate(self) -> None:
        where = self.source
        _check(self.dataset in DATASETS, where, f"unknown dataset {self.dataset!r}; choose from {', '.join(DATASETS)}")
        _check(
            self.method in available_methods(),
            where,
            f"unknown method {self.method!r}; choose from {', '.join(available_methods())}",
        )
        _check(self.sampler in SAMPLERS, where, f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        _check(
            self.objective in OBJECTIVES,
            where,
            f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}",
        )
        _check(len(self.search_space) > 0, where, "search_space is empty")
        _check(self.seeds_per_trial >= 1, where, "seeds_per_trial must be >= 1")
        _check(self.n_trials >= 1, where, "n_trials must be >= 1")
        _check(self.base_seed >= 0, where, "base_seed must be >= 0")
        _check(0 < self.validation_fraction < 0.5, where, "validation_fraction must be in (0, 0.5)")
        _check(self.device in DEVICES, where, f"device must be one of {', '.join(DEVICES)}")
        if self.sampler == "grid":
            _check(
                all(p.choices is not None for p in self.search_space),
                where,
                "the grid sampler needs choices for every searched parameter",
            )
        space = self.space()
        high = {name: space[name].bounds[1] if name in space else getattr(self, name) for name in PAPER_SETTING}
        _check(
            high["seed_ratio"] + high["cluster_ratio"] < 1,
            where,
            f"seed_ratio + cluster_ratio can reach {high['seed_ratio'] + high['cluster_ratio']:g}; it must stay < 1",
        )
        n_available = DATASETS[self.dataset].n_train - self.validation_size()
        _check(
            self.budget <= n_available,
            where,
            f"budget {self.budget} exceeds the {n_available} train points left after the validation split",
        )
        try:  # the extreme corners must be valid protocol settings
            for corner in ({n: space[n].bounds[0] for n in space}, {n: space[n].bounds[1] for n in space}):
                settings = self.settings({k: v for k, v in corner.items()})
                settings.check_budget(self.dataset, self.budget)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


_SPEC_KEYS = {f.name for f in fields(SweepSpec)} - {"source"}


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a YAML spec; every problem is a one-line ``ConfigError`` naming the key."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read spec: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}") from None
    _check(isinstance(raw, dict), where, "a spec must be a YAML mapping")
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    for required in ("study_name", "dataset", "search_space"):
        _check(required in raw, where, f"missing key {required!r}")
    _check(isinstance(raw["search_space"], dict), where, "search_space must be a mapping")
    space = tuple(ParamRange.parse(str(name), value, where) for name, value in raw["search_space"].items())
    values = {k: v for k, v in raw.items() if k != "search_space"}
    if isinstance(values.get("lam"), str):
        values["lam"] = parse_lam(values["lam"])
    types = {
        "budget": int,
        "epochs": int,
        "batch_size": int,
        "seeds_per_trial": int,
        "base_seed": int,
        "validation_seed": int,
        "n_trials": int,
        "sampler_seed": int,
    }
    for key, kind in types.items():
        if key in values:
            _check(
                isinstance(values[key], int) and not isinstance(values[key], bool), where, f"{key} must be an integer"
            )
            values[key] = kind(values[key])
    for key in ("lr", "seed_ratio", "cluster_ratio", "validation_fraction", "lam"):
        if values.get(key) is not None:
            _check(
                isinstance(values[key], int | float) and not isinstance(values[key], bool),
                where,
                f"{key} must be a number",
            )
    try:
        spec = SweepSpec(search_space=space, source=where, **values)
        spec.validate()
        spec.settings({})
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """A journal file by default (multi-process safe on one machine), else an Optuna RDB URL."""
    url = url or DEFAULT_STORAGE
    if "://" in url:
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    from optuna.storages.journal import JournalFileBackend

    # Optuna's default symlink lock, the same one optuna-dashboard takes on this file.
    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(url).expanduser())))


def make_sampler(spec: SweepSpec, worker: int) -> optuna.samplers.BaseSampler:
    seed = spec.sampler_seed + worker
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        grid = {p.name: list(p.choices or ()) for p in spec.search_space}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def validation_indices(spec: SweepSpec) -> np.ndarray:
    """A fixed validation split, excluded from every seed set and pool of the study."""
    rng = np.random.default_rng(stream_seed(spec.validation_seed, 100, spec.dataset))
    n_train = DATASETS[spec.dataset].n_train
    return np.sort(rng.choice(n_train, size=spec.validation_size(), replace=False)).astype(np.int64)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Recovery:
    """Fails trials of dead workers, retries them with the same params and kills their MLflow runs."""

    def __init__(self, study: optuna.Study, rdb: bool) -> None:
        self.study, self.rdb = study, rdb
        self.closed_runs: set[str] = set()

    def __call__(self) -> None:
        if self.rdb:
            optuna.storages.fail_stale_trials(self.study)
        else:
            host = socket.gethostname()
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                worker = trial.user_attrs.get(WORKER_ATTR, "")
                name, _, pid = worker.rpartition(":")
                if name == host and pid.isdigit() and not pid_alive(int(pid)):
                    try:
                        self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        continue  # another live worker recovered it first and enqueued the retry
                    self.study.enqueue_trial(
                        trial.params,
                        user_attrs={
                            "altrack.retry_of": trial.number,
                            BASELINE_ATTR: trial.user_attrs.get(BASELINE_ATTR, False),
                        },
                    )
        self._close_dead_runs()

    def _close_dead_runs(self) -> None:
        client = MlflowClient()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if not run_id or run_id in self.closed_runs:
                continue
            self.closed_runs.add(run_id)
            run = client.get_run(run_id)
            if run.info.status != "RUNNING":
                continue
            children = client.search_runs(
                [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}' and attributes.status = 'RUNNING'"
            )
            for child in children:
                client.set_terminated(child.info.run_id, status="KILLED")
            client.set_tag(run_id, ERROR_TAG, "worker died; trial retried with the same params")
            client.set_terminated(run_id, status="KILLED")


@dataclass
class _Worker:
    """State of one sweep process: the data, the cache and the objective."""

    spec: SweepSpec
    study_name: str
    storage_url: str | None
    n_trials: int
    parent_run_id: str
    worker: int = 0
    cache_dir: str | None = None
    data_dir: str | None = None

    def run(self) -> None:
        from altrack import tracking

        self.tracking = tracking
        storage = open_storage(self.storage_url)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=make_sampler(self.spec, self.worker)
        )
        recover = _Recovery(study, isinstance(storage, optuna.storages.RDBStorage))
        device = str(resolve_device(self.spec.device))
        self.data = load_dataset(self.spec.dataset, self.data_dir, device)
        self.labels = self.data.y_train.cpu().numpy()
        self.holdout = validation_indices(self.spec)
        self.cache = SeedStageCache(self.cache_dir)
        max_failures = max(3, self.n_trials)
        while True:
            recover()
            counts = Counter(t.state for t in study.get_trials(deepcopy=False))
            if counts[TrialState.COMPLETE] >= self.n_trials:
                return
            if counts[TrialState.FAIL] > max_failures:
                raise AltrackError(f"study {self.study_name!r}: {counts[TrialState.FAIL]} trials failed; giving up")
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= self.n_trials:
                time.sleep(POLL_SECONDS)
                continue
            study.optimize(self.objective, n_trials=1, catch=(AltrackError,))

    def objective(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, _worker_id())
        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.n_trials:
            raise optuna.TrialPruned("the study already has enough trials")
        baseline = bool(trial.user_attrs.get(BASELINE_ATTR, False))
        space = self.spec.space()
        params = {name: space[name].suggest(trial) for name in space if not (baseline and name == "lam")}
        settings = self.spec.settings(params, lam_auto=baseline)
        tags = {"optuna.trial_number": str(trial.number), "optuna.study": self.study_name, KIND_TAG: "trial"}
        nested = mlflow.active_run() is not None  # in-process worker: under the parent run
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", parent_run_id=self.parent_run_id, nested=nested, tags=tags
        ) as run:
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            mlflow.log_params(
                {
                    **params,
                    "lam": settings.lam_label,
                    "paper_baseline": baseline,
                    "seeds": ",".join(map(str, self.spec.seeds)),
                }
            )
            val, test = [], []
            for seed in self.spec.seeds:
                stage = self.cache.get(self.data, self.spec.budget, seed, settings, self.holdout)
                result = run_method(self.data, stage, self.spec.method, settings, holdout=self.holdout)
                self.tracking.log_run(result, self.labels, self.spec.log_models, kind="sweep-protocol")
                if result.status != "FINISHED":
                    raise TrainingDiverged(result.error or "training failed")
                val.append(result.val_accuracy)
                test.append(result.test_accuracy)
                mlflow.log_metrics({f"val_accuracy_seed{seed}": val[-1], f"test_accuracy_seed{seed}": test[-1]})
                if "lam" in result.selection.info:
                    mlflow.log_metric(f"lam_used_seed{seed}", result.selection.info["lam"])
            value = float(np.mean(val))
            mlflow.log_metrics(
                {
                    "objective": value,
                    "val_accuracy": value,
                    "test_accuracy": float(np.mean(test)),
                    "seed_cache_hits": self.cache.hits,
                }
            )
            mlflow.set_tag("optuna.state", "COMPLETE")
            trial.set_user_attr("test_accuracy", float(np.mean(test)))
        return value


def _run_worker(worker: _Worker, tracking_uri: str, threads: int) -> None:
    torch.set_num_threads(threads)
    mlflow.set_tracking_uri(tracking_uri)
    worker.run()


@dataclass(frozen=True)
class SweepOutcome:
    study_name: str
    parent_run_id: str
    n_complete: int
    best_value: float
    best_params: dict
    artifacts: list[Path]


def run_sweep(
    spec: SweepSpec,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    workers: int = 1,
    experiment: str | None = None,
    cache_dir: str | None = None,
    data_dir: str | None = None,
) -> SweepOutcome:
    """Create or resume the study, run ``workers`` processes until it has ``n_trials`` COMPLETE
    trials, and log the sweep to one MLflow parent run."""
    from altrack import tracking

    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    n_trials = spec.n_trials if n_trials is None else n_trials
    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    study_name = study_name or spec.study_name
    load_dataset(spec.dataset, data_dir, str(resolve_device(spec.device)))  # data errors before anything is written
    tracking.check_tracking_store()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name, storage=open_storage(storage), direction=spec.direction, load_if_exists=True
    )
    if not study.get_trials(deepcopy=False):
        space = spec.space()
        baseline = {k: v for k, v in PAPER_SETTING.items() if k in space and space[k].admits(v)}
        study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True})
    storage_label = storage or str(Path(DEFAULT_STORAGE).resolve())
    tags = {
        KIND_TAG: "sweep",
        COMMAND_TAG: " ".join(_redact(arg) for arg in sys.argv),
        "optuna.study": study_name,
        "optuna.storage": _redact(storage_label),
    }
    with tracking.start_parent(experiment or spec.experiment, f"sweep-{study_name}", tags) as parent:
        parent_id = parent.info.run_id
        tracking.log_new_params(
            parent_id,
            {
                "study_name": study_name,
                "dataset": spec.dataset,
                "method": spec.method,
                "budget": spec.budget,
                "n_trials": n_trials,
                "workers": workers,
                "sampler": spec.sampler,
                "seeds_per_trial": spec.seeds_per_trial,
            },
        )
        with tempfile.TemporaryDirectory(prefix="altrack-sweep-") as tmp:
            np.save(Path(tmp) / "validation_indices.npy", validation_indices(spec))
            Path(tmp, "spec.yaml").write_text(Path(spec.source).read_text() if Path(spec.source).exists() else "")
            mlflow.log_artifacts(tmp)
        jobs = [_Worker(spec, study_name, storage, n_trials, parent_id, i, cache_dir, data_dir) for i in range(workers)]
        threads = threads_per_worker(workers)
        if workers == 1:
            jobs[0].run()
        else:
            context = multiprocessing.get_context("spawn")
            uri = mlflow.get_tracking_uri()
            procs = [context.Process(target=_run_worker, args=(job, uri, threads)) for job in jobs]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join()
            failed = [p.exitcode for p in procs if p.exitcode != 0]
            if failed:
                raise AltrackError(f"{len(failed)} sweep worker(s) exited with codes {failed}")
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        artifacts = publish_sweep(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        mlflow.log_params({f"best_{k}": v for k, v in study.best_params.items()})
        mlflow.log_metrics({"best_value": study.best_value, "n_complete": len(complete)})
        mlflow.set_tag("optuna.best_trial", str(study.best_trial.number))
        return SweepOutcome(study_name, parent_id, len(complete), study.best_value, study.best_params, artifacts)


def _redact(url: str) -> str:
    """Drop a password from a database URL before it is logged."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"
    return url


def trials_table(study: optuna.Study) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **{f"param_{k}": v for k, v in trial.params.items()},
                "test_accuracy": trial.user_attrs.get("test_accuracy"),
                "paper_baseline": trial.user_attrs.get(BASELINE_ATTR, False),
                "retry_of": trial.user_attrs.get("altrack.retry_of"),
                "mlflow_run_id": trial.user_attrs.get(RUN_ATTR),
            }
        )
    return rows


def publish_sweep(study: optuna.Study) -> list[Path]:
    """trials.csv and Optuna's matplotlib plots, logged to the active (parent) run."""
    from altrack import report

    with tempfile.TemporaryDirectory(prefix="altrack-sweep-report-") as tmp:
        folder = Path(tmp)
        paths = [report.write_rows_csv(trials_table(study), folder / "trials.csv")]
        paths += report.plot_study(study, folder)
        mlflow.log_artifacts(tmp)
        return [Path(p.name) for p in paths]


def describe(outcome: SweepOutcome) -> str:
    params = ", ".join(f"{k}={v:.4g}" for k, v in outcome.best_params.items())
    return (
        f"study {outcome.study_name}: {outcome.n_complete} complete trials; best value {outcome.best_value:.4f}"
        f" with {params}\nMLflow parent run: {outcome.parent_run_id}"
    )

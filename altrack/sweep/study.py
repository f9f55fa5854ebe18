"""Optuna's side of a sweep: the storage, the sampler, the validation split and dead-worker recovery.

- The default storage is an Optuna journal file in the working directory, safe for several
  processes on one machine; any Optuna RDB URL (``postgresql://...``) works across machines.
- A trial whose worker died is marked FAIL and retried with the same params: on RDB storages by
  Optuna's heartbeat, on the journal by altrack's (``altrack.liveness``: the owner's pid on this
  machine, else a heartbeat attribute older than the grace period). Its MLflow run is marked KILLED.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from altrack.catalog import DATASETS
from altrack.errors import ConfigError
from altrack.liveness import grace_seconds, is_dead, is_stale
from altrack.protocol import stream_seed
from altrack.settings import PAPER_SETTING
from altrack.stores import probe
from altrack.sweep.spec import SweepSpec
from altrack.tracking.runs import kill_run_tree
from altrack.tracking.tags import BASELINE_ATTR, HEARTBEAT_ATTR, RETRY_OF_ATTR, RUN_ATTR, WORKER_ATTR

DEFAULT_STORAGE = "altrack-optuna.journal"
VALIDATION_STREAM = 100  # a stream_seed use of its own, apart from the protocol's


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """A journal file by default (multi-process safe on one machine), else an Optuna RDB URL.

    Raises ``ConfigError`` in one line for an RDB that cannot answer or a journal whose folder
    does not exist, before Optuna writes anything."""
    url = url or DEFAULT_STORAGE
    if "://" in url:
        probe(url, "Optuna storage")
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=max(1, int(grace_seconds() / 3)),
            grace_period=max(1, int(grace_seconds())),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    path = Path(url).expanduser()
    if path.is_dir() or not path.parent.resolve().is_dir():
        raise ConfigError(f"Optuna storage {url}: not a file in an existing folder")
    # Optuna's default symlink lock, the same one optuna-dashboard takes on this file.
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_sampler(spec: SweepSpec, worker: int) -> optuna.samplers.BaseSampler:
    seed = spec.sampler_seed + worker
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "grid":
        grid = {p.name: list(p.choices or ()) for p in spec.search_space}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def paper_baseline(spec: SweepSpec) -> dict[str, float]:
    """The paper's ratios, for the searched ones whose range admits them (lam: 'auto' apart)."""
    space = spec.space()
    ratios = {name: getattr(PAPER_SETTING, name) for name in ("cluster_ratio", "seed_ratio")}
    return {name: value for name, value in ratios.items() if name in space and space[name].admits(value)}


def validation_indices(spec: SweepSpec) -> np.ndarray:
    """A fixed validation split, excluded from every seed set and pool of the study."""
    rng = np.random.default_rng(stream_seed(spec.validation_seed, VALIDATION_STREAM, spec.dataset))
    n_train = DATASETS[spec.dataset].n_train
    return np.sort(rng.choice(n_train, size=spec.validation_size(), replace=False)).astype(np.int64)


def trial_is_dead(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING journal trial is dead when its owner on this machine is gone, or when it has not
    heart-beaten (or, untagged, not started) within the grace period (``altrack.liveness``)."""
    if is_dead(trial.user_attrs.get(WORKER_ATTR, "")):
        return True
    last = trial.user_attrs.get(HEARTBEAT_ATTR)
    if last is None and trial.datetime_start is not None:
        last = trial.datetime_start.timestamp()  # the worker died before it could tag the trial
    return is_stale(last)


class Recovery:
    """Fails trials of dead workers, retries them with the same params and kills their MLflow runs."""

    def __init__(self, study: optuna.Study, rdb: bool) -> None:
        self.study, self.rdb = study, rdb
        self.closed_runs: set[str] = set()

    def __call__(self) -> None:
        if self.rdb:
            optuna.storages.fail_stale_trials(self.study)
        else:
            for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if not trial_is_dead(trial):
                    continue
                try:
                    self.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue  # another live worker recovered it first and enqueued the retry
                self.study.enqueue_trial(
                    trial.params,
                    user_attrs={RETRY_OF_ATTR: trial.number, BASELINE_ATTR: trial.user_attrs.get(BASELINE_ATTR, False)},
                )
        self._close_dead_runs()

    def _close_dead_runs(self) -> None:
        client = MlflowClient()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if not run_id or run_id in self.closed_runs:
                continue
            self.closed_runs.add(run_id)
            kill_run_tree(client, run_id, "worker died; trial retried with the same params")

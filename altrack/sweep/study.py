"""Optuna's side of a sweep: the storage, the sampler, the validation split and dead-worker recovery.

- The default storage is an Optuna journal file in the working directory, safe for several
  processes on one machine; any Optuna RDB URL (``postgresql://...``) works across machines.
- A trial whose worker died is marked FAIL and retried with the same params: on RDB storages by
  Optuna's heartbeat, on the journal by altrack's (``altrack.liveness``: the owner's pid on this
  machine, else a heartbeat attribute older than the grace period). Its MLflow run is marked KILLED.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url  # Optuna's RDB storages are SQLAlchemy's URLs

from altrack.catalog import DATASETS
from altrack.errors import ConfigError, first_line
from altrack.liveness import grace_seconds, is_dead, is_stale
from altrack.protocol import stream_seed
from altrack.redaction import redact
from altrack.stores import probe
from altrack.sweep.spec import SweepSpec
from altrack.tracking.runs import INTERRUPTED, kill_run_tree
from altrack.tracking.tags import (
    BASELINE_ATTR,
    HEARTBEAT_ATTR,
    INTERRUPTED_ATTR,
    RETRY_OF_ATTR,
    RUN_ATTR,
    WORKER_ATTR,
)

DEFAULT_STORAGE = "altrack-optuna.journal"
VALIDATION_STREAM = 100  # a stream_seed use of its own, apart from the protocol's


def check_storage(url: str | None) -> str:
    """The storage URL (the journal file by default), checked without writing anything: an RDB
    that cannot answer, or a journal whose folder does not exist, raises ``ConfigError`` in one
    line. A sweep checks its storage and its tracking store before it creates either."""
    url = url or DEFAULT_STORAGE
    if "://" in url:
        try:
            parsed = make_url(url)
        except Exception:  # not even a URL: echo none of it (a password may sit where redact does not look)
            raise ConfigError("the Optuna storage URL does not parse; give postgresql://..., mysql://..., "
                              "sqlite:///FILE or a journal file") from None  # fmt: skip
        try:
            parsed.get_dialect().import_dbapi()  # the driver too: psycopg, mysqlclient, ...
        except Exception as exc:  # redis://, a typo, a driver not installed
            raise ConfigError(f"Optuna storage {redact(url)}: not a database URL this install can open "
                              f"({first_line(exc)}); give postgresql://..., mysql://..., sqlite:///FILE "
                              "or a journal file") from None  # fmt: skip
        probe(url, "Optuna storage")
        return url
    path = Path(url).expanduser()
    if path.is_dir() or not path.parent.resolve().is_dir():
        raise ConfigError(f"Optuna storage {url}: not a file in an existing folder")
    if path.is_file() and path.stat().st_size:  # an existing file must be a journal: its lines are JSON records
        with path.open("rb") as handle:
            first = handle.readline(1 << 20)
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and "op_code" in record):
            raise ConfigError(f"Optuna storage {url}: this file is not an Optuna journal (its first line is not a "
                              "journal record); give a new file name or the journal of the study")  # fmt: skip
    return url


def open_storage(url: str | None) -> optuna.storages.BaseStorage:
    """A journal file by default (multi-process safe on one machine), else an Optuna RDB URL;
    ``check_storage`` first."""
    url = check_storage(url)
    if "://" in url:
        with warnings.catch_warnings():  # the heartbeat API, "experimental" since Optuna 2.8: nothing a user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=max(1, int(grace_seconds() / 3)),
                grace_period=max(1, int(grace_seconds())),
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    # Optuna's default symlink lock, the same one optuna-dashboard takes on this file.
    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(url).expanduser())))


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler. TPE and random are seeded per trial (``TrialSeeded``): a study's
    proposals then never repeat because a worker or an invocation started from the same seed as
    another. The grid is seeded alike in every process, as Optuna asks: the order it shuffles its
    points into is what its trials' grid ids index, and the storage keeps any process from taking
    a point another took."""
    if spec.sampler == "grid":
        grid = {p.name: list(p.choices or ()) for p in spec.search_space}
        return optuna.samplers.GridSampler(grid, seed=spec.sampler_seed)
    if spec.sampler == "random":
        return TrialSeeded(lambda seed: optuna.samplers.RandomSampler(seed=seed), spec.sampler_seed)
    return TrialSeeded(lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True), spec.sampler_seed)


class TrialSeeded(optuna.samplers.BaseSampler):
    """An Optuna sampler made afresh for every trial, seeded by (``seed``, the trial's number).

    A sampler seeded once per process draws the same sequence in every process: the second
    invocation of a study (a resume, ``--workers N`` on another machine, the next Slurm array)
    proposed what the first had already tried, trial for trial. The trial's number is unique in
    the study (the storage hands it out), so its draws are too, and they are the same whichever
    worker runs it. TPE and the random sampler keep no state between trials apart from their
    random generator (TPE reads the study's trials each time, its constant liar included), so a
    fresh one per trial proposes what the long-lived one would have, with other random draws.
    Not for the grid, whose shuffled order is such state (``make_sampler``)."""

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build, self._seed = build, seed
        self._sampler = build(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = np.random.SeedSequence([self._seed, trial.number]).generate_state(1)[0]
        self._sampler = self._build(int(state))
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: optuna.distributions.BaseDistribution) -> object:  # fmt: skip
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:  # fmt: skip
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


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


def enqueue_retry(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> None:
    """Try ``trial``'s point again: a waiting trial with its params, marked as its retry (and as
    the paper's baseline if it was), which the next free worker takes first. As Optuna's own
    ``RetryFailedTrialCallback``, it keeps the trial's system attributes: a trial stopped before
    it drew its params keeps its point there (``fixed_params``: the baseline's; ``grid_id``: the
    grid sampler's, whose retry would otherwise be refused for want of params)."""
    frozen = trial if isinstance(trial, FrozenTrial) else study.get_trials(deepcopy=False)[trial.number]
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING,
        params=frozen.params,
        distributions=frozen.distributions,
        user_attrs={RETRY_OF_ATTR: frozen.number, BASELINE_ATTR: frozen.user_attrs.get(BASELINE_ATTR, False)},
        system_attrs=frozen.system_attrs,
    ))  # fmt: skip


def retry_interrupted(trial: optuna.Trial) -> None:
    """A running trial stopped by Ctrl-C in this process: marked interrupted, so the study's
    failure limit leaves it out (the user stopped it; it did not fail), and its point enqueued
    again. Optuna then ends it FAIL."""
    trial.set_user_attr(INTERRUPTED_ATTR, True)
    enqueue_retry(trial.study, trial)


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, interrupted: bool = False) -> bool:
    """Fail a RUNNING trial whose worker is gone and enqueue its point again (``interrupted``:
    marked so first, outside the failure limit). False when another process finished the trial
    first: it enqueued the retry."""
    try:
        if interrupted:
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    enqueue_retry(study, trial)
    return True


def retry_stopped_workers(study: optuna.Study, owners: set[str]) -> int:
    """The RUNNING trials of ``owners`` (``worker_id``s of workers this process stopped on Ctrl-C
    and saw die): each failed, marked interrupted and enqueued again, and its MLflow runs killed.
    A stopped worker does this itself (``run_worker`` takes SIGTERM as a Ctrl-C); this is for
    one that died before it could. Left alone, such trials would wait, RUNNING under a dead
    owner, for the next invocation's ``Recovery``, and then count as failures. Returns how many."""
    client, n = MlflowClient(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) not in owners or not fail_and_retry(study, trial, interrupted=True):
            continue  # another's trial, or another sweep on this study recovered it first
        if trial.user_attrs.get(RUN_ATTR):
            kill_run_tree(client, trial.user_attrs[RUN_ATTR], INTERRUPTED)
        n += 1
    return n


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
                if trial_is_dead(trial):  # False: another live worker recovered it first
                    fail_and_retry(self.study, trial)
        self._close_dead_runs()

    def _close_dead_runs(self) -> None:
        client = MlflowClient()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = trial.user_attrs.get(RUN_ATTR)
            if not run_id or run_id in self.closed_runs:
                continue
            self.closed_runs.add(run_id)
            kill_run_tree(client, run_id, "worker died; trial retried with the same params")

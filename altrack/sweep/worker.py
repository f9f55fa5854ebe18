"""One sweep worker: a process that asks the study for trials and runs them until it has enough.

``n_trials`` is the study's total of COMPLETE trials: N workers started together finish exactly
N (a trial that would overshoot is pruned before it does any work).
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass

import mlflow
import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from altrack.cache import SeedStageCache
from altrack.data import load_dataset, set_determinism
from altrack.errors import AltrackError, TrainingDiverged
from altrack.liveness import Heartbeat, grace_seconds, worker_id
from altrack.protocol import SeedStage, run_methods, stack_limit
from altrack.results import FINISHED
from altrack.sweep.spec import SweepSpec
from altrack.sweep.study import Recovery, make_sampler, open_storage, retry_interrupted, validation_indices
from altrack.tracking.runs import killed_on_interrupt, log_run
from altrack.tracking.tags import (
    BASELINE_ATTR,
    BASELINE_PARAM,
    HEARTBEAT_ATTR,
    INTERRUPTED_ATTR,
    KIND_SWEEP_PROTOCOL,
    KIND_TAG,
    KIND_TRIAL,
    LAM_USED_PARAM,
    OBJECTIVE_METRIC,
    PER_SEED_PREFIX,
    RUN_ATTR,
    SEED_CACHE_HITS_METRIC,
    SEEDS_PARAM,
    STUDY_TAG,
    TEST_ACCURACY_ATTR,
    TEST_ACCURACY_METRIC,
    TRIAL_COMPLETE,
    TRIAL_NUMBER_TAG,
    TRIAL_STATE_TAG,
    VAL_ACCURACY_METRIC,
    WORKER_ATTR,
)

POLL_SECONDS = 1.0


@dataclass
class Worker:
    """State of one sweep process: where the study is, and (once running) the data and cache."""

    spec: SweepSpec
    study_name: str
    storage_url: str | None
    n_trials: int
    parent_run_id: str
    device: str
    cache_dir: str | None = None
    data_dir: str | None = None

    def run(self) -> None:
        """Run trials until the study has ``n_trials`` COMPLETE ones; ``AltrackError`` when more
        than ``max(3, n_trials)`` have failed. A trial stopped by Ctrl-C is not counted: the user
        stopped it, and a study interrupted four times should not give up on its fifth start."""
        storage = open_storage(self.storage_url)
        study = optuna.load_study(
            study_name=self.study_name, storage=storage, sampler=make_sampler(self.spec)
        )
        recover = Recovery(study, isinstance(storage, optuna.storages.RDBStorage))
        self.data = load_dataset(self.spec.dataset, self.data_dir, self.device)
        # the memory left once torch and the data are in (a Slurm job's --mem): refused before a trial
        stack_limit(self.spec.dataset, self.data.x_train.device, batch_size=self.spec.settings.batch_size)
        self.holdout = validation_indices(self.spec)
        self.cache = SeedStageCache(self.cache_dir)
        max_failures = max(3, self.n_trials)
        said: tuple[int, ...] = ()
        while True:
            recover()
            trials = study.get_trials(deepcopy=False)
            counts = Counter(t.state for t in trials)
            if counts[TrialState.COMPLETE] >= self.n_trials:
                return
            failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get(INTERRUPTED_ATTR) for t in trials)
            if failed > max_failures:
                raise AltrackError(f"study {self.study_name!r}: {failed} trials failed; giving up")
            if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= self.n_trials:
                running = tuple(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if running != said:
                    said = running
                    print(f"waiting for trial(s) {', '.join(map(str, running))} of another worker; a trial whose "
                          f"worker stays silent for {grace_seconds():.0f} s is retried", file=sys.stderr, flush=True)
                time.sleep(POLL_SECONDS)
                continue
            study.optimize(self.objective, n_trials=1, catch=(AltrackError,))

    def objective(self, trial: optuna.Trial) -> float:
        """Mean validation accuracy over the spec's seeds, each a logged protocol run."""
        started = time.monotonic()
        try:
            trial.set_user_attr(WORKER_ATTR, worker_id())  # in the try: a Ctrl-C here still re-queues it
            if trial.user_attrs.get(INTERRUPTED_ATTR):  # Optuna's heartbeat retry copies its stale trial's
                trial.set_user_attr(INTERRUPTED_ATTR, False)  # attributes: this attempt has not been stopped
            with Heartbeat(lambda now: trial.set_user_attr(HEARTBEAT_ATTR, now)):
                value = self._objective(trial)
        except KeyboardInterrupt:
            retry_interrupted(trial)
            raise
        done = [t.value for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        best = max([value, *done]) if self.spec.direction == "maximize" else min([value, *done])
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        print(f"trial {trial.number}: {params or 'paper baseline'} -> {self.spec.objective} {value:.4f} "
              f"(best {best:.4f}; {time.monotonic() - started:.0f} s)", flush=True)  # fmt: skip
        return value

    def _objective(self, trial: optuna.Trial) -> float:
        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= self.n_trials:
            raise optuna.TrialPruned("the study already has enough trials")
        baseline = bool(trial.user_attrs.get(BASELINE_ATTR, False))
        space = self.spec.space()
        params = {name: space[name].suggest(trial) for name in space if not (baseline and name == "lam")}
        settings = self.spec.trial_settings(params, lam_auto=baseline)
        tags = {TRIAL_NUMBER_TAG: str(trial.number), STUDY_TAG: self.study_name, KIND_TAG: KIND_TRIAL}
        nested = mlflow.active_run() is not None  # in-process worker: under the parent run
        with mlflow.start_run(
            run_name=f"trial-{trial.number}", parent_run_id=self.parent_run_id, nested=nested, tags=tags
        ) as run, killed_on_interrupt():  # KILLED and saying why, as a stopped worker's trial run is
            trial.set_user_attr(RUN_ATTR, run.info.run_id)
            mlflow.log_params(
                {
                    **params,
                    "lam": settings.lam,
                    BASELINE_PARAM: baseline,
                    SEEDS_PARAM: self.spec.seeds_text,
                }
            )
            val, test = [], []
            # the trial's seeds as one stack: their seed models, then their final models (a
            # model's bits do not depend on its stack mates, so each run is the one it is alone);
            # every seed that trained is logged, then the trial fails on the first that did not
            stages = self.cache.get_many(self.data, self.spec.budget, self.spec.seeds, settings, self.holdout)
            good = [stage for stage in stages if isinstance(stage, SeedStage)]
            results = run_methods(self.data, good, [self.spec.method], settings, holdout=self.holdout) if good else []
            errors = [stage for stage in stages if isinstance(stage, str)]
            for result in results:
                name = f"trial{trial.number}-{result.key.name}"
                log_run(result, self.spec.log_models, kind=KIND_SWEEP_PROTOCOL, name=name)
                if result.status != FINISHED:
                    errors.append(result.error or "training failed")
                    continue
                val.append(result.val_accuracy)
                test.append(result.test_accuracy)
                # one metric per quantity, a step per seed: the UI then compares trials on objective,
                # not on whichever per-seed name sorts first
                per_seed = {PER_SEED_PREFIX + VAL_ACCURACY_METRIC: val[-1],
                            PER_SEED_PREFIX + TEST_ACCURACY_METRIC: test[-1]}  # fmt: skip
                if "lam" in result.selection.info:
                    per_seed[PER_SEED_PREFIX + LAM_USED_PARAM] = result.selection.info["lam"]
                mlflow.log_metrics(per_seed, step=self.spec.seeds.index(result.key.seed))
            if errors:
                raise TrainingDiverged(errors[0])
            value = float(np.mean(val))
            mlflow.log_metrics(
                {
                    OBJECTIVE_METRIC: value,
                    VAL_ACCURACY_METRIC: value,
                    TEST_ACCURACY_METRIC: float(np.mean(test)),
                    SEED_CACHE_HITS_METRIC: self.cache.hits,
                }
            )
            mlflow.set_tag(TRIAL_STATE_TAG, TRIAL_COMPLETE)
            trial.set_user_attr(TEST_ACCURACY_ATTR, float(np.mean(test)))
        return value


_TRIAL_FAILED = re.compile(r"Trial (\d+) failed with (parameters|value)")


class _QuietInterrupt(logging.Filter):
    """Optuna logs a trial that Ctrl-C stopped as failed, with a 40-line traceback, and then
    "Trial N failed with value None."; the CLI says "interrupted" in one line, and the trial is
    re-queued (``retry_interrupted``). Both records go; other trials' failures stay."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped: set[str] = set()  # trials whose first record was dropped

    def filter(self, record: logging.LogRecord) -> bool:
        failed = _TRIAL_FAILED.match(record.getMessage())
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            if failed:
                self.stopped.add(failed[1])
            return False
        if failed and failed[2] == "value" and failed[1] in self.stopped:
            self.stopped.discard(failed[1])
            return False
        return True


def quiet_optuna() -> None:
    """Optuna's warnings and errors only, without the traceback of an interrupted trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in logging.getLogger("optuna").handlers:  # a logger's own filters miss its children's records
        if not any(isinstance(f, _QuietInterrupt) for f in handler.filters):
            handler.addFilter(_QuietInterrupt())


def run_worker(worker: Worker, tracking_uri: str, threads: int) -> None:
    """A worker process (spawned, ``tethered`` to its sweep; or a Slurm task): its share of the
    cores, the parent's store, torch's determinism.

    SIGTERM is a Ctrl-C here. It comes from the sweep stopping its workers on Ctrl-C, from
    ``scancel`` (a launcher's Ctrl-C) or from a Slurm time limit, and the running trial is then
    failed as interrupted, its point re-queued and its run ended KILLED before the process goes
    (exit 130, quietly). Submitit's own handler ignores SIGTERM until Slurm's SIGKILL (KillWait
    later), which would leave all that to the next invocation."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    quiet_optuna()
    torch.set_num_threads(threads)
    set_determinism(worker.device)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        worker.run()
    except KeyboardInterrupt:
        raise SystemExit(130) from None

"""``altrack sweep``: create or resume a study, run its workers, and publish it to one MLflow parent.

A sweep tunes the paper's fixed settings (cluster_ratio = seed_ratio = 0.2, lam auto) on a
validation split carved from the train split; the test split is logged for information only.
"""

from __future__ import annotations

import multiprocessing
import sys
import warnings
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import torch  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from altrack import report  # noqa: E402
from altrack.config import writable_dir_target  # noqa: E402
from altrack.data import load_dataset, resolve_device, set_determinism  # noqa: E402
from altrack.errors import AltrackError, ConfigError  # noqa: E402
from altrack.liveness import clean_stale_temp_dirs, temp_dir, tethered, worker_id  # noqa: E402
from altrack.protocol import (  # noqa: E402
    check_planned_stacks,
    fit_threads,
    loaded_bytes,
    quiet_resource_tracker,
    stop_workers,
    threads_per_worker,
)
from altrack.redaction import redact  # noqa: E402
from altrack.resources import resident  # noqa: E402
from altrack.results import FAILED, KILLED, RUNNING  # noqa: E402
from altrack.slurm import SlurmConfig, cancel, require_shared_store, wait_for  # noqa: E402
from altrack.sweep.spec import SweepSpec  # noqa: E402
from altrack.sweep.study import (  # noqa: E402
    DEFAULT_STORAGE,
    check_storage,
    open_storage,
    retry_stopped_workers,
    validation_indices,
)
from altrack.sweep.worker import Worker, quiet_optuna, run_worker  # noqa: E402
from altrack.tracking.runs import (  # noqa: E402
    check_experiment,
    check_tracking_store,
    close_dead_runs,
    given_experiment,
    heartbeat,
    killed_on_interrupt,
    log_new_params,
    owner_tags,
    run_is_dead,
    start_parent,
    under_project_run,
    use_experiment,
)
from altrack.tracking.tags import (  # noqa: E402
    BASELINE_ATTR,
    BEST_TRIAL_TAG,
    COMMAND_TAG,
    ERROR_TAG,
    KIND_SWEEP,
    KIND_TAG,
    N_COMPLETE_METRIC,
    OBJECTIVE_METRIC,
    PARENT_ATTR,
    RETRY_OF_ATTR,
    RUN_ATTR,
    SEEDS_PER_TRIAL_PARAM,
    SLURM_JOB_TAG,
    SPEC_ATTR,
    STORAGE_TAG,
    STUDY_TAG,
    TEST_ACCURACY_ATTR,
)


@dataclass(frozen=True)
class SweepOutcome:
    study_name: str
    parent_run_id: str
    n_complete: int
    best_value: float
    best_params: dict
    artifacts: list[Path]
    metric: str = OBJECTIVE_METRIC
    nothing_to_do: bool = False  # the study already had its trials: no MLflow run was made


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
    slurm: SlurmConfig | None = None,
    new_study: bool = False,
) -> SweepOutcome:
    """Create or resume the study, run ``workers`` processes until it has ``n_trials`` COMPLETE
    trials (default: the spec's), and log the sweep to one MLflow parent run.

    Raises ``ConfigError`` for a bad count or device, ``DataError`` for missing data and
    ``AltrackError`` for an unreachable store or a worker that exits with an error; all of them
    before anything is written, except the last.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    n_trials = spec.n_trials if n_trials is None else n_trials
    if n_trials < 1:
        raise ConfigError(f"n_trials must be >= 1, got {n_trials}")
    spec.check_trials(n_trials)  # --n-trials too
    study_name = study_name or spec.study_name
    if slurm is None:
        device = str(resolve_device(spec.device))
    else:  # the workers' device; the jobs must reach the store and the storage
        device = spec.device if spec.device != "auto" else ("cuda" if slurm.gpus_per_task else "cpu")
        require_shared_store(mlflow.get_tracking_uri())
        local_file = storage is None or "://" not in storage or storage.startswith("sqlite")
        if local_file and not slurm.shared_filesystem:
            raise ConfigError(f"--executor slurm: the Optuna storage {storage or DEFAULT_STORAGE} is a local file; "
                              "give --storage postgresql://... or, if every node sees it, --shared-filesystem")
    set_determinism(device)
    fit_threads()
    before = resident()  # torch, MLflow, Optuna and altrack, as a Slurm worker holds them before its data
    data = load_dataset(spec.dataset, data_dir, "cpu" if slurm else device)  # data errors before anything is written
    # on Slurm, by the jobs' memory less what a worker holds, not the launcher's free memory
    held = before + loaded_bytes(before, data)
    check_planned_stacks(spec.dataset, torch.device(device), batch_size=spec.settings.batch_size,
                         slurm_mem_gb=slurm.mem_gb if slurm else None, held=held)  # fmt: skip
    if slurm is not None:  # Slurm is asked last, as by a grid
        slurm.check_partition()
    if cache_dir is not None and not writable_dir_target(Path(cache_dir)):
        raise ConfigError(f"--cache-dir {cache_dir!r} is not a writable directory")
    check_storage(storage)  # an unreachable storage, then store, before either is written
    check_tracking_store()
    if given_experiment(experiment or spec.experiment):  # else a resumed study goes on in its parent's experiment
        check_experiment(experiment or spec.experiment)
    opened = open_storage(storage)
    clean_stale_temp_dirs()  # what SIGKILLed invocations left in /tmp
    quiet_optuna()
    study_name = _study_for(spec, opened, study_name, new_study)
    study = optuna.create_study(study_name=study_name, storage=opened, direction=spec.direction, load_if_exists=True)
    if not study.get_trials(deepcopy=False):
        study.set_user_attr(SPEC_ATTR, spec.fingerprint())
        with warnings.catch_warnings():  # experimental in Optuna, and nothing a user can act on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.objective])  # optuna-dashboard then says val_accuracy, not Objective 0
        baseline = spec.paper_point()
        if baseline is not None:  # the paper's setting first, when the space holds it
            study.enqueue_trial(baseline, user_attrs={BASELINE_ATTR: True})
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # under `mlflow run` the launcher's run is the parent; elsewhere a study goes on in its own
    earlier = None if under_project_run() else _earlier_parent(study, experiment or spec.experiment)
    # a finished study: say so, and open no parent run; unless its parent never got its summary
    # (an invocation stopped after the last trial): then the same command goes on to write it
    if len(complete) >= n_trials and not _summary_missing(earlier, len(complete)):
        return SweepOutcome(study_name, "", len(complete), study.best_value, study.best_params, [],
                            spec.objective, nothing_to_do=True)  # fmt: skip
    storage_label = storage or str(Path(DEFAULT_STORAGE).resolve())
    tags = {
        KIND_TAG: KIND_SWEEP,
        COMMAND_TAG: " ".join(redact(arg) for arg in sys.argv),
        STUDY_TAG: study_name,
        STORAGE_TAG: redact(storage_label),
        **owner_tags(),
    }
    if earlier is not None:  # its trials go where it is, in this process and in the workers it starts
        use_experiment(experiment_id=earlier.info.experiment_id)
        if ERROR_TAG in earlier.data.tags:  # why an earlier invocation stopped is no longer true
            MlflowClient().delete_tag(earlier.info.run_id, ERROR_TAG)
        opened = mlflow.start_run(run_id=earlier.info.run_id, tags=tags)
    else:
        opened = start_parent(experiment or spec.experiment, f"sweep-{study_name}", tags)
    with opened as parent, killed_on_interrupt(), heartbeat(parent.info.run_id):
        parent_id = parent.info.run_id
        study.set_user_attr(PARENT_ATTR, parent_id)  # a resumed invocation goes on in this run
        close_dead_runs(parent.info.experiment_id)  # sweep parents of killed invocations
        log_new_params(
            parent_id,
            {
                "study_name": study_name,
                "dataset": spec.dataset,
                "method": spec.method,
                "budget": spec.budget,
                "sampler": spec.sampler,
                SEEDS_PER_TRIAL_PARAM: spec.seeds_per_trial,
            },
        )
        with temp_dir("sweep") as tmp:
            np.save(Path(tmp) / "validation_indices.npy", validation_indices(spec))
            Path(tmp, "spec.yaml").write_text(Path(spec.source).read_text() if Path(spec.source).exists() else "")
            mlflow.log_artifacts(tmp)
        if len(complete) < n_trials:  # else only the summary is missing: no worker has anything to do
            _run_workers([Worker(spec, study_name, storage, n_trials, parent_id, device, cache_dir, data_dir)
                          for _ in range(workers)], slurm)  # fmt: skip
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
        artifacts = publish_sweep(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        # metrics, not params: a resumed study goes on in this run, and its best (and the counts an
        # invocation is given) may change, where MLflow refuses to change a param; each invocation
        # logs at the count of trials complete, so a metric's history is the study's
        # every searched knob, NaN where the best trial has none (the paper's baseline keeps lam auto):
        # a knob left out would show an older best's value beside this one's
        best = {f"best_{p.name}": float(study.best_params.get(p.name, float("nan"))) for p in spec.search_space}
        mlflow.log_metrics({"best_value": study.best_value, N_COMPLETE_METRIC: len(complete), "n_trials": n_trials,
                            "workers": workers, **best}, step=len(complete))  # fmt: skip
        mlflow.set_tag(BEST_TRIAL_TAG, str(study.best_trial.number))
        return SweepOutcome(study_name, parent_id, len(complete), study.best_value, study.best_params, artifacts,
                            spec.objective)  # fmt: skip


def _run_workers(jobs: list[Worker], slurm: SlurmConfig | None) -> None:
    """The sweep's workers: Slurm jobs, this process alone, or spawned processes."""
    if slurm is not None:
        _run_slurm_jobs(jobs, slurm)
    elif len(jobs) == 1:
        jobs[0].run()
    else:
        _run_processes(jobs, threads_per_worker(len(jobs)))


def _run_processes(jobs: list[Worker], threads: int) -> None:
    context = multiprocessing.get_context("spawn")
    uri = mlflow.get_tracking_uri()
    quiet_resource_tracker()
    tethers = [tethered(run_worker, job, uri, threads) for job in jobs]  # they die with this sweep
    procs = [context.Process(target=target, args=args) for target, args in tethers]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except BaseException as exc:  # Ctrl-C: the workers ignore SIGINT (tethered); SIGTERM is their Ctrl-C
        stop_workers(procs)  # (run_worker): each re-queues its trial as interrupted and goes
        dead = {worker_id(proc.pid) for proc in procs if not proc.is_alive()}
        if isinstance(exc, KeyboardInterrupt) and dead:  # the trials of any that died before it could
            with suppress(Exception):  # the store may be what was interrupted: Recovery then has them
                study = optuna.load_study(study_name=jobs[0].study_name, storage=open_storage(jobs[0].storage_url))
                retry_stopped_workers(study, dead)
        raise
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        raise AltrackError(f"{len(failed)} sweep worker(s) exited with codes {failed}")


def _summary_missing(parent: Run | None, n_complete: int) -> bool:
    """Whether a finished study's parent run lacks the summary of its complete trials: it was
    stopped (KILLED, or RUNNING with its owner dead) or failed (a worker's non-zero exit while
    the others finished the study, a store error) after the last trial, before its summary
    (whose ``n_complete`` metric counts them). The same command then writes the summary."""
    if parent is None or parent.info.status not in (KILLED, RUNNING, FAILED):
        return False
    return parent.data.metrics.get(N_COMPLETE_METRIC, -1) < n_complete


def _earlier_parent(study: optuna.Study, experiment: str | None) -> Run | None:
    """The MLflow parent run of the study's earlier invocations, when it still exists and no live
    process holds it: a resumed sweep goes on in it, in its experiment, instead of opening a
    second parent. A sweep given an experiment (``--experiment``, the spec's,
    ``MLFLOW_EXPERIMENT_NAME``) other than that run's opens a parent there."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if not run_id:
        return None
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
        home = client.get_experiment(run.info.experiment_id).name
    except Exception:  # deleted, or another tracking store
        return None
    if run.info.lifecycle_stage != "active" or (run.info.status == RUNNING and not run_is_dead(run)):
        return None
    wanted = given_experiment(experiment)
    return run if wanted is None or home == wanted else None


def _study_for(spec: SweepSpec, storage: optuna.storages.BaseStorage, name: str, new_study: bool) -> str:
    """The study name to use: ``name`` when it is new or was made from the same spec; with
    ``new_study``, else the first of ``name-2``, ``name-3``, ... made from this spec (so the
    same command resumes it), else the first free one. Raises ``ConfigError`` naming the first
    field that differs when an existing study was made from another spec."""
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in existing or _spec_change(spec, existing[name]) is None:
        return name
    if new_study:
        fingerprint = spec.fingerprint()
        numbered = sorted((int(other.rsplit("-", 1)[1]), other) for other in existing
                          if other.startswith(f"{name}-") and other.rsplit("-", 1)[1].isdigit())  # fmt: skip
        for _, other in numbered:  # one made from this spec (by --new-study: it has the fingerprint)
            if existing[other].user_attrs.get(SPEC_ATTR) == fingerprint:
                return other
        n = 2
        while f"{name}-{n}" in existing:
            n += 1
        return f"{name}-{n}"
    raise ConfigError(f"study {name!r} was made from another spec ({_spec_change(spec, existing[name])}); give a new "
                      "study_name or --new-study")  # fmt: skip


def _spec_change(spec: SweepSpec, study: optuna.study.StudySummary) -> str | None:
    """The first field in which ``spec`` differs from the spec ``study`` was made from, as
    ``budget: 100 then, 200 now``; None when they agree, or for a study from before
    fingerprints (or made by hand), which is taken as this spec's."""
    remembered = study.user_attrs.get(SPEC_ATTR)
    if remembered is None:
        return None
    current = spec.fingerprint()
    for key in sorted(set(current) | set(remembered)):
        if current.get(key) != remembered.get(key):
            return f"{key}: {remembered.get(key, 'unset')} then, {current.get(key, 'unset')} now"
    return None


def _run_slurm_jobs(jobs: list[Worker], slurm: SlurmConfig) -> None:
    """The workers as one Slurm job array; a worker that dies has its trial retried by the others
    (RDB heartbeat) or by the next run. Raises ``AltrackError`` when every worker failed."""
    executor = slurm.executor("altrack-sweep")
    n = len(jobs)
    submitted = executor.map_array(run_worker, jobs, [mlflow.get_tracking_uri()] * n, [slurm.cpus_per_task] * n)
    try:
        mlflow.set_tag(SLURM_JOB_TAG, submitted[0].job_id.split("_")[0])
    except BaseException:  # the parent fails: no job array left running without a launcher
        cancel([job.job_id for job in submitted])
        raise
    outcomes = wait_for(submitted, [f"sweep worker {i}" for i in range(n)], progress=True)
    if all(o.error for o in outcomes):
        raise AltrackError(f"all {n} Slurm sweep workers failed (above)")


def trials_table(study: optuna.Study) -> list[dict]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": trial.value,
                **{f"param_{k}": v for k, v in trial.params.items()},
                "test_accuracy": trial.user_attrs.get(TEST_ACCURACY_ATTR),
                "paper_baseline": trial.user_attrs.get(BASELINE_ATTR, False),
                "retry_of": trial.user_attrs.get(RETRY_OF_ATTR),
                "mlflow_run_id": trial.user_attrs.get(RUN_ATTR),
            }
        )
    return rows


def plot_study(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots (no plotly needed). A plot that needs more trials is skipped."""
    params = sorted({name for t in study.get_trials(deepcopy=False) for name in t.params})
    ratios = [p for p in ("cluster_ratio", "seed_ratio") if p in params]
    plots = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study),
        "slice.png": lambda: optuna_plots.plot_slice(study, params=params),
    }
    if len(ratios) == 2:
        plots["contour.png"] = lambda: optuna_plots.plot_contour(study, params=ratios)
    written = []
    verbosity = optuna.logging.get_verbosity()
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.logging.set_verbosity(optuna.logging.ERROR)  # a skipped plot is no news (one trial, one value)
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
            finally:
                optuna.logging.set_verbosity(verbosity)
        figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        panels = axes.size if isinstance(axes, np.ndarray) else 1
        figure.set_size_inches(max(6.5, 4.8 * panels + 1.5), 4.8)
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / name)
    return written


def publish_sweep(study: optuna.Study) -> list[Path]:
    """trials.csv and Optuna's matplotlib plots, logged to the active (parent) run."""
    with temp_dir("sweep-report") as tmp:
        folder = Path(tmp)
        paths = [report.write_rows_csv(trials_table(study), folder / "trials.csv")]
        paths += plot_study(study, folder)
        mlflow.log_artifacts(tmp)
        return [Path(p.name) for p in paths]


def describe(outcome: SweepOutcome) -> str:
    params = ", ".join(f"{k}={v:.4g}" for k, v in outcome.best_params.items())
    best = f"best {outcome.metric} {outcome.best_value:.4f} with {params}"
    n = outcome.n_complete
    if outcome.nothing_to_do:
        return f"study {outcome.study_name}: nothing to do: {n}/{n} trials COMPLETE; {best}"
    return (f"study {outcome.study_name}: {report.counted(n, 'complete trial')}; {best}\n"
            f"MLflow parent run: {outcome.parent_run_id}")  # fmt: skip

"""The write side of MLflow: parent runs, one nested child per protocol run, and liveness.

Under ``mlflow run`` the launcher exports ``MLFLOW_RUN_ID``; ``mlflow.start_run()`` then resumes
that run as the parent, so the project run and the CLI run are the same thing.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_RUN_NAME

from altrack import report
from altrack.catalog import DATASETS, applies
from altrack.errors import AltrackError, ConfigError, first_line
from altrack.liveness import Heartbeat, is_dead, is_stale, temp_dir, worker_id
from altrack.protocol import RunResult
from altrack.provenance import STACK_WIDTH
from altrack.redaction import redact
from altrack.results import FAILED, FINISHED, KILLED, RUNNING
from altrack.slurm import earlier_attempt, job_alive
from altrack.stores import first_use_lock, probe, sqlite_file, start_in_wal
from altrack.tracking.tags import (
    DEFAULT_EXPERIMENT,
    DETACHED_TAG,
    ERROR_TAG,
    GROUP_TAG,
    HASH_TAG,
    HEARTBEAT_TAG,
    KIND_PROTOCOL,
    KIND_TAG,
    LAM_USED_PARAM,
    MLFLOW_PARENT_RUN_ID,
    RERUN_TAG,
    SEED_MODEL_RUN_TAG,
    SEED_TEST_ACCURACY_METRIC,
    SEED_TRAIN_LOSS_METRIC,
    SELECTION_PREFIX,
    SETTING_TAG,
    SLURM_ARRAY_TASK_TAG,
    SLURM_JOB_TAG,
    TEST_ACCURACY_METRIC,
    TEST_LOSS_METRIC,
    TICKET_TAG,
    TIME_PREFIX,
    TORCH_VERSION_KEY,
    TRAIN_LOSS_METRIC,
    VAL_ACCURACY_METRIC,
    VERSION_TAG,
    WORKER_TAG,
)

INTERRUPTED = "interrupted (Ctrl-C or SIGINT); rerun the same command to resume"  # a stopped run's ERROR_TAG


def now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def _quick_http() -> Iterator[None]:
    """No retries and a short timeout for the start-up probe (MLflow's defaults retry for minutes)."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_tracking_store(existing: bool = False) -> str:
    """Touch the store before any training, so an unreachable server fails in seconds.
    ``existing``: the command only reads runs (report, replay), so a SQLite store that is not
    there is refused rather than created empty (the user is in another folder than the grid's).

    Returns the tracking URI; raises ``AltrackError`` (one line) when the store does not answer.
    """
    uri = mlflow.get_tracking_uri()
    try:
        probe(uri, "MLflow tracking store")  # seconds, where MLflow would retry a database for minutes
    except ConfigError as exc:
        raise AltrackError(str(exc)) from exc
    path = sqlite_file(uri)
    if existing and path is not None and not path.is_file():
        raise AltrackError(f"no MLflow store at {redact(uri)}: {path} does not exist; run this where the grid ran "
                           "(beside its mlflow.db), or set MLFLOW_TRACKING_URI")  # fmt: skip
    try:
        with _quick_http(), first_use_lock(uri):  # a new SQLite store is created by one process at a time
            start_in_wal(uri)
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        # the probe found it reachable (or has no way to tell): unsupported, or refusing, not "unreachable"
        raise AltrackError(f"MLflow tracking store {redact(uri)} cannot be used: {first_line(exc)}") from exc
    return uri


def owner_tags() -> dict[str, str]:
    """Tags that let a later process tell whether this one still owns a RUNNING run."""
    return {WORKER_TAG: worker_id()}


def run_is_dead(run: Run) -> bool:
    """Whether a RUNNING run's owner is gone: its Slurm task when it has one (Slurm no longer
    lists it, or this process is a later attempt of that same task), else its process on this
    machine, or its heartbeat gone stale (``altrack.liveness``)."""
    tags = run.data.tags
    job = tags.get(SLURM_JOB_TAG)
    if job:
        task = tags.get(SLURM_ARRAY_TASK_TAG)
        return earlier_attempt(tags) or not job_alive(f"{job}_{task}" if task else job)
    owner = tags.get(WORKER_TAG, "")
    beat = tags.get(HEARTBEAT_TAG)
    if (bool(owner) and is_dead(owner)) or (beat is not None and is_stale(float(beat))):
        return True
    parent_id = tags.get(MLFLOW_PARENT_RUN_ID)
    if beat is None and parent_id:  # a child lives while its parent does (the parent heart-beats)
        try:
            parent = MlflowClient().get_run(parent_id)
        except Exception:  # the parent is gone from the store
            return True
        return parent.info.status != RUNNING or run_is_dead(parent)
    return False


def heartbeat(run_id: str) -> Heartbeat:
    """A ``with`` block during which the run's heartbeat tag is refreshed, so that another process
    can tell it alive from any host (``run_is_dead``)."""
    client = MlflowClient()
    return Heartbeat(lambda now: client.set_tag(run_id, HEARTBEAT_TAG, f"{now:.0f}"))


def fail_pending_models(client: MlflowClient, run: Run) -> int:
    """Models a killed run was still uploading stay PENDING in the UI's Models tab for ever:
    mark them FAILED. Returns how many."""
    from mlflow.entities import LoggedModelStatus  # lazy: only dead runs need it

    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id='{run.info.run_id}'")  # fmt: skip
    pending = [m for m in models if m.status == LoggedModelStatus.PENDING]
    for model in pending:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return len(pending)


def close_dead_runs(experiment_id: str) -> int:
    """Mark KILLED the RUNNING runs of this experiment whose owner has died (a SIGKILLed grid
    leaves its parent and the runs its blocks had claimed RUNNING; a cancelled Slurm task its
    runs). Returns how many."""
    client = MlflowClient()
    closed = 0
    for run in client.search_runs([experiment_id], f"attributes.status = '{RUNNING}'", max_results=5000):
        if run.data.tags.get(DETACHED_TAG) == "true":  # 'altrack report --run-id' closes it, with its report
            continue
        if run_is_dead(run):
            owner = run.data.tags.get(SLURM_JOB_TAG) or run.data.tags.get(WORKER_TAG, "")
            end_killed(client, run, f"{owner} died before the run ended")
            closed += 1
    return closed


def end_killed(client: MlflowClient, run: Run, reason: str) -> None:
    """End ``run`` KILLED with an ``ERROR_TAG`` saying why, and its models still PENDING FAILED
    (``fail_pending_models``, a store query per run): every way a run is killed (a dead owner,
    Ctrl-C, a stopped worker, a cancelled Slurm task) may have stopped it mid-upload."""
    client.set_tag(run.info.run_id, ERROR_TAG, reason)
    with suppress(Exception):  # best effort (a store without logged models): the run still ends KILLED
        fail_pending_models(client, run)
    client.set_terminated(run.info.run_id, status=KILLED)


def kill_running_children(client: MlflowClient, run_id: str, experiment_id: str, reason: str) -> int:
    """Mark the RUNNING children of ``run_id`` KILLED, saying why (``end_killed``); returns how many."""
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' and attributes.status = '{RUNNING}'"
    children = client.search_runs([experiment_id], query, max_results=5000)
    for child in children:
        end_killed(client, child, reason)
    return len(children)


def kill_run_tree(client: MlflowClient, run_id: str, reason: str) -> None:
    """Mark a RUNNING run and its RUNNING children KILLED, saying why (``end_killed``)."""
    run = client.get_run(run_id)
    if run.info.status != RUNNING:
        return
    kill_running_children(client, run_id, run.info.experiment_id, reason)
    end_killed(client, run, reason)


def under_project_run() -> bool:
    """Whether ``mlflow run`` launched this process (it exports the run it created)."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def start_parent(
    experiment: str | None, run_name: str, tags: dict | None = None, system_metrics: bool = False
) -> mlflow.ActiveRun:
    """The invocation's parent run; under ``mlflow run``, the run the launcher created.
    ``system_metrics``: MLflow samples CPU, memory (and GPU) use into it while it runs."""
    logged = {"log_system_metrics": True} if system_metrics else {}
    if under_project_run():  # the launcher named it at random: name it as the CLI does
        run = mlflow.start_run(**logged)
        mlflow.set_tags({MLFLOW_RUN_NAME: run_name, **(tags or {})})
        return run
    use_experiment(name=given_experiment(experiment) or DEFAULT_EXPERIMENT)
    return mlflow.start_run(run_name=run_name, tags=tags, **logged)


@contextmanager
def killed_on_interrupt() -> Iterator[None]:
    """End the run active on entry KILLED, with an ``ERROR_TAG`` saying why, when Ctrl-C (SIGINT) stops
    the block: MLflow's ``with start_run()`` ends it FAILED, as if the run had gone wrong. The
    interrupt goes on up (the CLI exits 130); a rerun of the command resumes."""
    run = mlflow.active_run()
    try:
        yield
    except KeyboardInterrupt:
        active = mlflow.active_run()
        # only the run this block opened on: one the block ended itself (a detached grid's parent,
        # left RUNNING on purpose) is left as it is, and the run around it is not this block's
        if run is not None and active is not None and active.info.run_id == run.info.run_id:
            with suppress(Exception):  # the store may be what was interrupted: the exit still goes on
                mlflow.set_tag(ERROR_TAG, INTERRUPTED)
                with suppress(Exception):  # Ctrl-C mid-upload leaves its model PENDING; best effort
                    fail_pending_models(MlflowClient(), run)
                mlflow.end_run(KILLED)
        raise


def check_experiment(experiment: str | None) -> None:
    """Refuse, before anything is written (a sweep's study, a grid's parent), the experiment
    ``start_parent`` would log to when MLflow would refuse it: a deleted one. Under ``mlflow run``
    the launcher's run has its experiment already. Raises ``ConfigError``."""
    if under_project_run():
        return
    name = given_experiment(experiment) or DEFAULT_EXPERIMENT
    found = MlflowClient().get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {name!r} is deleted: restore it ('mlflow experiments restore "
                          f"--experiment-id {found.experiment_id}') or give another name")  # fmt: skip


def given_experiment(experiment: str | None) -> str | None:
    """The experiment an invocation was given: its option (or spec), else MLflow's
    ``MLFLOW_EXPERIMENT_NAME``; None when neither names one."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")


def use_experiment(name: str | None = None, experiment_id: str | None = None) -> None:
    """Log to this experiment, here and in the processes this one starts (pool workers, sweep
    workers, Slurm tasks inherit the environment). MLflow's ``set_experiment`` exports only
    ``MLFLOW_EXPERIMENT_ID``: beside a user's ``MLFLOW_EXPERIMENT_NAME`` naming another, a
    worker's run failed on the mismatch, or went to that other experiment when it did not exist
    yet. Both variables now name this one."""
    experiment = mlflow.set_experiment(experiment_name=name, experiment_id=experiment_id)
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment.name


def check_system_metrics() -> None:
    """``--system-metrics`` needs psutil (MLflow's sampler); ``ConfigError`` in one line if absent."""
    try:
        import psutil  # noqa: F401  # lazy: only asked for with --system-metrics
    except ImportError as exc:
        raise ConfigError("--system-metrics needs psutil: pip install psutil") from exc


def log_new_params(run_id: str, params: dict) -> None:
    """Log params the run does not already have (``mlflow run`` logs its -P values first)."""
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    if fresh:
        client.log_batch(run_id, params=fresh)


def run_params(result: RunResult) -> dict:
    """A protocol run's params: its key, the derived sizes, where it ran and the settings its
    method reads (``catalog.applies``; the full label is the run's ``SETTING_TAG``)."""
    key, settings = result.key, result.settings
    params = {
        "dataset": key.dataset,
        "method": key.method,
        "budget": key.budget,
        "seed": key.seed,
        "n_seed": settings.n_seed(key.budget),
        "n_select": settings.n_select(key.budget),
        "device": result.device,  # the config hash is a tag (altrack.config_hash), not a param to plot
        TORCH_VERSION_KEY: torch.__version__,
        **{k: v for k, v in settings.as_params().items() if applies(k, key.method)},
    }
    if STACK_WIDTH in result.identity:  # CUDA: the padded width its bits depend on (altrack.protocol.stack_width)
        params[STACK_WIDTH] = result.identity[STACK_WIDTH]
    info = result.selection.info if result.selection is not None else {}
    if "n_clusters" in info:
        params["n_clusters"] = info["n_clusters"]
    if "lam" in info:
        params[LAM_USED_PARAM] = info["lam"]
    return params


def _run_metrics(result: RunResult, live: bool = False) -> list[Metric]:
    now = now_ms()
    stage = result.stage
    metrics = [Metric(TEST_ACCURACY_METRIC, result.test_accuracy, now, 0),
               Metric(TEST_LOSS_METRIC, result.test_loss, now, 0),
               Metric(VAL_ACCURACY_METRIC, result.val_accuracy, now, 0)]  # fmt: skip
    if stage is not None:
        metrics.append(Metric(SEED_TEST_ACCURACY_METRIC, stage.test_accuracy, now, 0))
        if not live:
            metrics += [Metric(SEED_TRAIN_LOSS_METRIC, v, now, i) for i, v in enumerate(stage.epoch_losses)]
    if not live:
        metrics += [Metric(TRAIN_LOSS_METRIC, v, now, i) for i, v in enumerate(result.final_epoch_losses)]
    # grouped by prefix, so the UI puts the timings and the selector's figures in sections of their own
    metrics += [Metric(f"{TIME_PREFIX}{k}", v, now, 0) for k, v in result.timings.items()]
    if result.selection is not None:
        for k, v in result.selection.info.items():
            if isinstance(v, int | float) and k != "lam":
                metrics.append(Metric(f"{SELECTION_PREFIX}{k}", float(v), now, 0))
    return [m for m in metrics if np.isfinite(m.value)]


class LiveLosses:
    """Epoch losses to claimed runs as they happen, so the MLflow UI draws training while it runs:
    a seed model's go to every run of its seed, a final model's to its own run.

    Each epoch's point keeps its own timestamp, but points are sent at most every ``PERIOD``
    seconds, one batch per run, and at a model's last epoch (``epochs``), so that a finished
    curve does not wait through the selection that follows it: a send is a store transaction
    per run, and sending every epoch of every stacked model (840 in the README's main job) cost
    more than three seconds of waiting at the blocks' ends. Not more often than every three
    seconds: a send holds the interpreter's lock for about 20 ms of Python per run, and the
    training beside it, dozens of small torch ops per step, each giving that lock up and waiting
    to get it back, slowed 3.5x while sends were going on (``benchmarks/bench_logging.py``);
    once a second, sends took 2.5 s of the main job.

    The sends run elsewhere, in order: ``post(fn)`` runs each (the thread a grid fills its runs
    in on, ``grid._Behind``), and whoever owns that thread waits for it before the runs are
    filled in. Not MLflow's own queue: a run's end (``set_terminated``) shuts that queue down and
    joins its thread, which only sees the request once its wait on the empty queue times out
    (one second, MLflow 3), so each block waited up to two seconds on it; and a run ended on
    another thread shuts the queue down under a sender."""

    PERIOD = 3.0

    def __init__(self, runs: dict[object, str], epochs: int, post: Callable[[Callable[[], None]], None]) -> None:
        self.runs = runs
        self.epochs = epochs
        self.post = post
        self.client = MlflowClient()
        self.pending: dict[str, list[Metric]] = {}
        self.sent = time.monotonic()

    def __call__(self, what: object, epoch: int, loss: float) -> None:
        if not np.isfinite(loss):
            return
        if isinstance(what, int):  # a seed: its model M serves every method of the seed
            targets = [(run_id, SEED_TRAIN_LOSS_METRIC) for key, run_id in self.runs.items() if key.seed == what]
        else:
            targets = [(self.runs[what], TRAIN_LOSS_METRIC)] if what in self.runs else []
        now = now_ms()
        for run_id, name in targets:
            self.pending.setdefault(run_id, []).append(Metric(name, float(loss), now, epoch))
        if epoch + 1 >= self.epochs or time.monotonic() - self.sent >= self.PERIOD:
            self._send()

    def _send(self) -> None:
        batches, self.pending = self.pending, {}
        if batches:
            self.post(partial(_log_batches, self.client, batches))
        self.sent = time.monotonic()

    def flush(self) -> None:
        """Send what is pending; whatever ``post`` runs after this sees every point."""
        self._send()


def _log_batches(client: MlflowClient, batches: dict[str, list[Metric]]) -> None:
    """A ``post``-ed send: best effort, as MLflow's queue is (it logs a failed write, and the
    run's final metrics do not depend on it), so a lost curve never costs the grid."""
    for run_id, metrics in batches.items():
        try:
            client.log_batch(run_id, metrics=metrics)
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).warning("live losses of run %s not stored: %s", run_id, first_line(exc))


def _blank_nan(value: float) -> str | float:
    return "" if np.isnan(value) else float(value)


def write_run_artifacts(result: RunResult, folder: Path) -> None:
    """seed_losses.npy, selected_indices.npy, selection.csv and selection.png for one run."""
    stage, selection = result.stage, result.selection
    assert stage is not None and selection is not None
    np.save(folder / "seed_losses.npy", stage.ce_loss.astype(np.float32))
    np.save(folder / "selected_indices.npy", result.selected_indices)
    n_seed = len(stage.seed_indices)
    with open(folder / "selection.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        # probability: one draw's; inclusion_probability: of being in the sample (1 for seed and
        # centre points); weight: 1 / inclusion_probability, what --weighted trains with
        writer.writerow(["index", "role", "probability", "inclusion_probability", "weight"])
        writer.writerows([int(i), "seed", "", 1.0, 1.0] for i in stage.seed_indices)
        columns = zip(selection.indices, selection.roles, selection.probabilities, selection.weights, strict=True)
        writer.writerows([int(i), role, _blank_nan(p), _blank_nan(1.0 / w), _blank_nan(w)] for i, role, p, w in columns)
    key = result.key
    report.plot_selection(
        stage.ce_loss,
        stage.labels,
        stage.pool_indices,
        result.selected_indices[n_seed:],
        f"{key.dataset} {key.method} k={key.budget} seed={key.seed}: acc {result.test_accuracy:.4f}",
        folder / "selection.png",
    )


def _log_model(model: torch.nn.Module, name: str, metrics: dict[str, float], epochs: int) -> list[Metric]:
    """Log the model; returns its own metrics as attached to it (MLflow 3 ``model_id``), for the
    run's one closing ``log_batch`` (a batch per model cost a store transaction each).

    MLflow copies the run's metrics already logged at the model's step onto the model, so a model
    is logged at step ``epochs``, the step after its last epoch, where the run has none: at step 0
    every model took both epoch-0 losses, the seed model the final model's and the final model
    the seed model's, at the price of a store write each. Pickle format: pt2 needs an input
    example and torch.export, and these are our own."""
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        model.cpu(),
        name=name,
        step=epochs,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
    now = now_ms()
    return [Metric(k, float(v), now, 0, model_id=info.model_id) for k, v in metrics.items() if np.isfinite(v)]


CLAIM_POLL_S = 0.2  # how often a claim waiting on a rival's ticket looks again


def claim_runs(
    parent_run_id: str,
    experiment_id: str,
    wanted: Sequence[tuple[object, str, str]],
    tags: dict[str, str],
    finished_since: int = 0,
) -> dict[object, str]:
    """Open a RUNNING child run for each wanted (key, config hash, group hash) before its work
    starts, and keep only those no other live process has claimed: two identical commands at
    once then do each run once. Returns {key: run id} of the runs this process owns.

    Lamport's bakery over the store, which offers writes and reads but no compare-and-set: a
    claim is published first without a ticket ("choosing"), then takes a ticket one past the
    highest any claim of its hash holds, then waits until every live rival of the hash has one,
    and wins if its (ticket, run id) is the smallest among the live RUNNING claims. Why not the
    oldest start time, as before: MLflow stamps a run's start on the client, before its insert
    waits for SQLite's write lock, so a claim stamped first could land after a rival had already
    looked, found nothing and won, and then win too (CI saw one run done twice). With tickets, a
    claim a rival did not see was published after that rival's ticket, so it drew a larger one.

    A FINISHED run of the hash started after ``finished_since`` (ms; 0: any, as a resume wants;
    the parent's start under --no-resume) beats every claim. A rival whose owner is dead
    (``run_is_dead``) is ignored; a live one without a ticket is waited for however long it takes
    (deferring to it after a while could leave the run to nobody: it may then draw a larger ticket
    and lose to this claim's), which for a claim of an altrack without tickets means until its
    run ends. Losing claims are deleted."""
    client = MlflowClient()
    mine: dict[str, tuple[object, Run]] = {}
    for key, config_hash, group in wanted:
        run_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, MLFLOW_RUN_NAME: key.name, KIND_TAG: KIND_PROTOCOL,
                    HASH_TAG: config_hash, GROUP_TAG: group, **owner_tags(), **tags}  # fmt: skip
        mine[config_hash] = (key, client.create_run(experiment_id, run_name=key.name, tags=run_tags))
    groups = {group: [h for _, h, g in wanted if g == group] for _, _, group in wanted}
    tickets: dict[str, int] = {}
    for group, hashes in groups.items():
        rivals = _claims(client, experiment_id, group)
        for config_hash in hashes:
            held = [_ticket(r) for r in rivals if r.data.tags.get(HASH_TAG) == config_hash]
            tickets[config_hash] = 1 + max((t for t in held if t is not None), default=0)
            client.set_tag(mine[config_hash][1].info.run_id, TICKET_TAG, str(tickets[config_hash]))
    won: dict[object, str] = {}
    undecided = groups
    while undecided:
        waiting: dict[str, list[str]] = {}  # group -> its claims still waiting on a rival's ticket
        for group, hashes in undecided.items():
            rivals = _claims(client, experiment_id, group)
            for config_hash in hashes:
                key, run = mine[config_hash]
                verdict = _verdict(run, config_hash, tickets[config_hash], rivals, finished_since)
                if verdict is None:
                    waiting.setdefault(group, []).append(config_hash)
                elif verdict:
                    won[key] = run.info.run_id
                else:
                    client.delete_run(run.info.run_id)
        undecided = waiting
        if undecided:
            time.sleep(CLAIM_POLL_S)
    return won


def _claims(client: MlflowClient, experiment_id: str, group: str) -> list[Run]:
    """Every run of the group: claims, and the runs they became (deleted ones are not listed)."""
    return client.search_runs([experiment_id], f"tags.`{GROUP_TAG}` = '{group}'", max_results=5000)


def _ticket(run: Run) -> int | None:
    value = run.data.tags.get(TICKET_TAG)
    return int(value) if value is not None else None


def _verdict(run: Run, config_hash: str, ticket: int, rivals: list[Run], finished_since: int) -> bool | None:
    """Whether the claim ``run`` holding ``ticket`` wins against the other runs of its hash;
    None while a live rival is still choosing its ticket."""
    others = [r for r in rivals if r.data.tags.get(HASH_TAG) == config_hash and r.info.run_id != run.info.run_id]
    if any(r.info.status == FINISHED and r.info.start_time >= finished_since for r in others):
        return False
    mine = (ticket, run.info.run_id)
    for rival in others:
        if rival.info.status != RUNNING or run_is_dead(rival):
            continue
        theirs = _ticket(rival)
        if theirs is None:
            return None
        if (theirs, rival.info.run_id) < mine:
            return False
    return True


DATA_SOURCES = {  # where each dataset comes from; the digest pins the exact arrays read
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html",
}


def rerun_command(result: RunResult) -> str:
    """The ``altrack run`` that does this run alone, with the same result (grouping never matters)."""
    key, s = result.key, result.settings  # floats as repr: exactly the values that were run
    return (f"altrack run --datasets {key.dataset} --methods {key.method} --budget {key.budget} --seed {key.seed} "
            f"--runs 1 --epochs {s.epochs} --batch-size {s.batch_size} --lr {s.lr!r} --seed-ratio {s.seed_ratio!r} "
            f"--cluster-ratio {s.cluster_ratio!r} --lam {s.lam!r} --coreset-space {s.coreset_space} "
            f"--{'weighted' if s.weighted else 'unweighted'} --device {result.device.split(':')[0]}"
            + (f" --stack {result.identity[STACK_WIDTH]}" if STACK_WIDTH in result.identity else ""))  # fmt: skip


def _log_inputs(datasets: list, contexts: list[str], tags: list[dict[str, str]]) -> None:
    """``mlflow.log_inputs`` (one store transaction for all), tried once more when another process
    registered the same dataset a moment before: MLflow inserts a dataset new to the experiment
    without a lock, so runs of parallel workers or Slurm tasks logging it at once collide on its
    unique key (a CI run saw SQLite's ``UNIQUE constraint failed: datasets...``); the second try
    finds it and links it."""
    try:
        mlflow.log_inputs(datasets, contexts=contexts, tags_list=tags)
    except MlflowException as exc:
        if not any(text in str(exc) for text in ("UNIQUE constraint", "duplicate key")):
            raise
        mlflow.log_inputs(datasets, contexts=contexts, tags_list=tags)


def _lineage_tags(result: RunResult, kind: str) -> list[RunTag]:
    """What produced the run and how to redo it: the commit, versions, the rerun command."""
    ident = result.identity
    tags = {VERSION_TAG: ident.get("altrack", ""), TORCH_VERSION_KEY: ident["torch"]}
    if kind == KIND_PROTOCOL:  # a sweep's runs train without its validation split: no grid command redoes them
        tags[RERUN_TAG] = rerun_command(result)
    if ident.get("git_commit"):
        tags[MLFLOW_GIT_COMMIT] = ident["git_commit"]
    return [RunTag(k, v) for k, v in tags.items()]


def _log_data_inputs(result: RunResult) -> None:
    """The data as MLflow dataset inputs of the active run: the train split, and the labelled
    subset derived from it."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource  # lazy: only real runs log inputs
    from mlflow.data.meta_dataset import MetaDataset

    key = result.key
    source = HTTPDatasetSource(DATA_SOURCES.get(key.dataset, "https://example.invalid/"))
    spec = DATASETS[key.dataset]
    datasets = [MetaDataset(source, name=key.dataset, digest=result.identity.get("data", "")[:16] or None)]
    contexts, tags = ["train"], [{"n_train": str(spec.n_train), "n_test": str(spec.n_test)}]
    if result.stage is not None and result.selection is not None:
        picked = hashlib.sha256(result.selected_indices.tobytes()).hexdigest()[:16]
        datasets.append(MetaDataset(source, name=f"{key.dataset}-labelled", digest=picked))
        contexts.append("labelled")
        tags.append({"derived_from": key.dataset, "k": str(key.budget), "artifact": "selected_indices.npy"})
    _log_inputs(datasets, contexts, tags)


def log_run(
    result: RunResult,
    log_models: bool,
    kind: str = KIND_PROTOCOL,
    name: str | None = None,
    run_id: str | None = None,
    live: bool = False,
    seed_model_run: str | None = None,
) -> str:
    """One nested child run under the active run (a sweep's trial run), or the run ``run_id``
    that ``claim_runs`` opened (a grid's, wherever its block ran), filled in; FAILED with the
    reason when the run failed. ``live``: its epoch losses were logged as they came, so they are
    not logged again; ``seed_model_run``: a run that already holds this seed's model (tagged, not
    logged again).

    Sweeps log theirs as ``kind=KIND_SWEEP_PROTOCOL``: they train on a pool without the
    validation split, so grid resumes and reports must never mistake them for grid runs.
    Returns the run id; raises ``AltrackError`` when the artifacts cannot be stored (the run
    is then FAILED, never FINISHED without its files).
    """
    tags = {KIND_TAG: kind, HASH_TAG: result.config_hash, **owner_tags()}
    opened = (
        mlflow.start_run(run_id=run_id, nested=True)
        if run_id
        else mlflow.start_run(run_name=name or result.key.name, nested=True, tags=tags)
    )
    with opened as run, killed_on_interrupt():  # Ctrl-C: KILLED and saying why, as its parent
        client = MlflowClient()
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in run_params(result).items()]
        client.log_batch(run_id, params=params, tags=[RunTag(SETTING_TAG, result.settings.label),
                                                      *_lineage_tags(result, kind)])  # fmt: skip
        _log_data_inputs(result)
        if result.status != FINISHED:
            client.log_batch(run_id, metrics=_run_metrics(result, live),
                             tags=[RunTag(ERROR_TAG, (result.error or "")[:4000])])  # fmt: skip
            mlflow.end_run(status=FAILED)
            return run_id
        on_model: list[Metric] = []  # metrics attached to their model, logged with the run's others
        try:  # a run is FINISHED only with its artifacts; leaving this block by an error marks it FAILED
            with temp_dir("run") as tmp:
                write_run_artifacts(result, Path(tmp))
                mlflow.log_artifacts(tmp)
            if log_models:
                assert result.stage is not None and result.final_model is not None
                if seed_model_run is None:
                    seed_metrics = {SEED_TEST_ACCURACY_METRIC: result.stage.test_accuracy}
                    on_model += _log_model(result.stage.model, "seed_model", seed_metrics, result.settings.epochs)
                else:  # one seed model per (dataset, k, seed): the first method's run holds it
                    client.set_tag(run_id, SEED_MODEL_RUN_TAG, seed_model_run)
                final = {TEST_ACCURACY_METRIC: result.test_accuracy, TEST_LOSS_METRIC: result.test_loss}
                on_model += _log_model(result.final_model, "final_model", final, result.settings.epochs)
            keys = {m.key for m in on_model}
            client.log_batch(run_id, metrics=on_model + [m for m in _run_metrics(result, live) if m.key not in keys])
        except Exception as exc:
            if on_model:  # a model already stored keeps its metrics; best effort, the store may be what failed
                with suppress(Exception):
                    client.log_batch(run_id, metrics=on_model)
            client.set_tag(run_id, ERROR_TAG, f"artifacts not stored: {first_line(exc, 500)}")
            raise AltrackError(
                f"run {run_id}: cannot store its artifacts at {run.info.artifact_uri}: {first_line(exc)}"
            ) from exc
    return run_id

"""``altrack run``: a grid of protocol runs under one MLflow parent run, resumable by config hash."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from altrack import report
from altrack.catalog import CORESET_METHODS
from altrack.config import GridConfig
from altrack.data import load_dataset, release_datasets, resolve_device, set_determinism
from altrack.errors import AltrackError, first_line
from altrack.liveness import clean_stale_temp_dirs, temp_dir
from altrack.protocol import (
    Progress,
    RunResult,
    check_planned_stacks,
    check_stacks,
    fit_threads,
    grid_blocks,
    loaded_bytes,
    map_in_workers,
    planning_cap,
    run_block,
    run_identity,
)
from altrack.redaction import redact
from altrack.resources import resident
from altrack.results import FAILED, FINISHED, RUNNING, ResultRow
from altrack.settings import RunKey
from altrack.slurm import TaskOutcome, job_alive, require_shared_store, slurm_tags, task_threads, wait_for
from altrack.tracking.query import finished_ids, finished_rows, get_run, rows_from_mlflow
from altrack.tracking.runs import (
    INTERRUPTED,
    LiveLosses,
    check_experiment,
    check_system_metrics,
    check_tracking_store,
    claim_runs,
    close_dead_runs,
    heartbeat,
    kill_running_children,
    killed_on_interrupt,
    log_new_params,
    log_run,
    owner_tags,
    run_is_dead,
    start_parent,
    under_project_run,
)
from altrack.tracking.tags import (
    COMMAND_TAG,
    DETACHED_TAG,
    ERROR_TAG,
    EXPECTED_RUNS_TAG,
    HASH_TAG,
    KIND_GRID,
    KIND_SWEEP,
    KIND_TAG,
    PROGRESS_METRIC,
    RESUMED_RUNS_CSV,
    RESUMED_TAG,
    RUNS_FAILED_TAG,
    RUNS_FINISHED_TAG,
    SLURM_JOB_TAG,
    SLURM_PROGRESS_METRIC,
)


@dataclass(frozen=True)
class GridOutcome:
    """The parent run, one row per run (finished here or resumed), and the report files.

    Results themselves are not kept: each holds its seed stage (tens of MB), and a grid of
    hundreds of runs must not grow with its length."""

    parent_run_id: str
    rows: list[ResultRow]
    report_paths: list[Path]
    resumed: int = 0  # rows reused from earlier invocations (same config hash)


SLOW_CLUSTERS = 5000  # k-means with more clusters than this takes minutes per run on a CPU


def slow_warnings(cfg: GridConfig) -> list[str]:
    """What will take long, said before it starts (a k'' of 10,000 runs for minutes per run)."""
    warnings = []
    if set(CORESET_METHODS) & set(cfg.methods):
        for budget in cfg.budgets:
            clusters = cfg.settings.n_clusters(budget)
            if clusters > SLOW_CLUSTERS:
                warnings.append(f"warning: k={budget} means k''={clusters} k-means clusters per coreset run; "
                                "expect minutes per run")  # fmt: skip
    return warnings


def grid_params(cfg: GridConfig, device: str) -> dict:
    return {
        "datasets": ",".join(cfg.datasets),
        "methods": ",".join(cfg.methods),
        "budgets": ",".join(map(str, cfg.budgets)),
        "runs": cfg.runs,
        "base_seed": cfg.seed,
        "device": device,
        **cfg.settings.as_params(),
    }


def run_grid(cfg: GridConfig, *, progress: bool = True, say: Callable[[str], None] = print) -> GridOutcome:
    """Run every (dataset, method, k, seed) of ``cfg`` under one parent run and write the report.

    Order of failure, so that a mistake costs nothing: the device and the datasets are checked
    first (``ConfigError``, ``DataError``), then the tracking store (``AltrackError``), and
    only then is a run opened. Runs this experiment already FINISHED with the same config hash
    are reused when ``cfg.resume``. With ``cfg.fail_fast`` the first failed run raises
    ``AltrackError``; otherwise failed runs are logged FAILED and listed in the report.
    ``say`` prints what the user must know (runs reused from earlier invocations).
    """
    slurm = cfg.executor == "slurm"
    device = slurm_device(cfg) if slurm else str(resolve_device(cfg.device))
    set_determinism(device)
    fit_threads()
    identities = {}  # data errors surface before the store is touched (no mlflow.db)
    code = resident()  # torch, MLflow and altrack, as a Slurm task holds them before its data
    loaded = {}  # what each dataset adds to it
    for dataset in cfg.datasets:
        before = resident()
        data = load_dataset(dataset, cfg.data_dir, "cpu" if slurm else device)
        identities[dataset] = run_identity(dataset, data.digest, device, cfg.settings, cfg.stack, cfg.memory_cap_bytes)
        loaded[dataset] = loaded_bytes(before, data)
    # a task of several blocks (--blocks-per-task) may hold several datasets: plan for all of them
    mixed = slurm and cfg.slurm.blocks_per_task > 1 and len(loaded) > 1
    held = code + (sum(loaded.values()) if mixed else max(loaded.values()))  # what a task holds, at most
    for dataset in cfg.datasets:
        check_planned_stacks(dataset, torch.device(device), cfg.stack, cfg.memory_cap_bytes, cfg.settings.batch_size,
                             _jobs_memory(cfg), held if mixed else code + loaded[dataset])  # fmt: skip
    if not cfg.trains_here:  # the workers load their own copies
        release_datasets()
    if slurm:  # the jobs log to a shared server, and Slurm must accept them
        require_shared_store(mlflow.get_tracking_uri())
        cfg.slurm.check_partition()
    if cfg.system_metrics:
        check_system_metrics()
    check_tracking_store()  # then the store, still before any training
    check_experiment(cfg.experiment)
    clean_stale_temp_dirs()  # what SIGKILLed invocations left in /tmp
    for warning in slow_warnings(cfg):
        say(warning)
    tags = {KIND_TAG: KIND_GRID, COMMAND_TAG: redact(" ".join(sys.argv)), **owner_tags()}
    with (start_parent(cfg.experiment, KIND_GRID, tags, cfg.system_metrics) as parent, killed_on_interrupt(),
          heartbeat(parent.info.run_id)):  # fmt: skip
        parent_id = parent.info.run_id
        log_new_params(parent_id, grid_params(cfg, device))
        close_dead_runs(parent.info.experiment_id)
        hashes = {key.config_hash(cfg.settings, identities[key.dataset]): key for key in cfg.run_keys()}
        done = finished_rows(parent.info.experiment_id, set(hashes)) if cfg.resume else {}
        # --no-resume: the runs finished before this grid claimed are not an answer to wait for
        earlier = frozenset() if cfg.resume else finished_ids(parent.info.experiment_id, set(hashes))
        rows: list[ResultRow] = list(done.values())
        mlflow.set_tag(RESUMED_TAG, len(done))
        if done:
            experiment = mlflow.get_experiment(parent.info.experiment_id).name
            say(f"reusing {report.counted(len(done), 'finished run')} from {experiment}; --no-resume to rerun")
            _log_resumed(rows)
        skip = frozenset(hashes[h] for h in done)
        if slurm:
            submitted = _submit(cfg, device, skip, parent_id, held)
            if submitted is None or cfg.detach:
                if submitted is not None:
                    mlflow.end_run(RUNNING)  # stays RUNNING; 'altrack report --run-id' closes it
                    say(f"submitted Slurm job {submitted[0][0].job_id.split('_')[0]} ({len(submitted[0])} tasks); "
                        f"'altrack report --run-id {parent_id}' collects the report")  # fmt: skip
                    return GridOutcome(parent_id, rows, [], len(done))
            else:
                failures = _collect(submitted, parent_id, progress)
                rows = rows_from_mlflow(parent_id)  # this parent's runs and the ones it reused
                paths = _publish(rows, cfg.out, len(done))
                if failures:
                    mlflow.end_run(FAILED)
                    raise AltrackError(f"{failures} of {len(submitted[0])} Slurm tasks failed (above); the report "
                                       "has the rest; rerun the same command to run only the missing runs")  # fmt: skip
                return GridOutcome(parent_id, rows, paths, len(done))
        keys = [key for key in cfg.run_keys() if key not in skip]
        client = MlflowClient()
        # closed on the way out, an error's too: the last block's runs are filled in before it leaves
        with closing(_run_blocks(cfg, device, keys, parent_id, parent.info.experiment_id, progress)) as done_blocks:
            for block_rows in done_blocks:
                rows += block_rows
                client.log_metric(parent_id, PROGRESS_METRIC, len(rows) / len(hashes), step=len(rows),
                                  synchronous=True)  # the UI's bar; never MLflow's queue: the logging thread shuts it
                failed = [row for row in block_rows if not row.finished]
                if failed and cfg.fail_fast:
                    raise AltrackError(f"{failed[0].run_id} failed: {failed[0].error} (--fail-fast)")
        ours = {(r.dataset, r.method, r.budget, r.seed) for r in rows}
        others = {h: k for h, k in hashes.items()
                  if h not in done and (k.dataset, k.method, k.budget, k.seed) not in ours}  # fmt: skip
        if others:  # runs another live process claimed: wait for them, and report them as reused
            theirs = _wait_for_others(parent.info.experiment_id, others, say, earlier)
            rows += list(theirs.values())
            done.update(theirs)
            mlflow.set_tag(RESUMED_TAG, len(done))  # what 'altrack report --run-id' counts as reused
            _log_resumed(list(done.values()))
        paths = _publish(rows, cfg.out, len(done))
    return GridOutcome(parent_id, rows, paths, len(done))


def _log_resumed(rows: list[ResultRow]) -> None:
    """The rows reused from other invocations, as the active parent's ``resumed_runs.csv``."""
    with temp_dir("resumed") as tmp:
        report.write_rows_csv(rows, Path(tmp) / RESUMED_RUNS_CSV)
        mlflow.log_artifacts(tmp)


def _publish(rows: list[ResultRow], out: str | None, resumed: int) -> list[Path]:
    """The report, and the finished and failed counts as the active parent's tags."""
    paths = publish_report(rows, out, resumed=resumed)
    n_failed = sum(not r.finished for r in rows)
    mlflow.set_tags({RUNS_FINISHED_TAG: len(rows) - n_failed, RUNS_FAILED_TAG: n_failed})
    return paths


def _wait_for_others(
    experiment_id: str, others: dict[str, RunKey], say: Callable[[str], None], earlier: frozenset[str] = frozenset()
) -> dict[str, ResultRow]:
    """Rows of the runs (config hash -> key) that other live processes claimed, once they end;
    a run whose owner died is left out (the next invocation runs it). The FINISHED runs in
    ``earlier`` (run ids) do not count (``finished_rows``)."""
    say(f"waiting for {report.counted(len(others), 'run')} another altrack process claimed first")
    client = MlflowClient()
    while True:
        found = finished_rows(experiment_id, set(others), earlier)
        pending = set(others) - set(found)
        if not pending:
            return found
        alive = False
        for config_hash in pending:
            query = f"tags.`{HASH_TAG}` = '{config_hash}' and attributes.status = '{RUNNING}'"
            alive = alive or any(not run_is_dead(r) for r in client.search_runs([experiment_id], query))
        if not alive:  # none RUNNING now: read once more, a run may have finished between the queries
            found = finished_rows(experiment_id, set(others), earlier)
            gone = len(others) - len(found)
            if gone:
                say(f"{gone} of them ended without finishing (their process died); rerun to do them")
            return found
        time.sleep(2)


def slurm_device(cfg: GridConfig) -> str:
    """The device of the Slurm tasks: what was asked for, else CUDA when they get GPUs."""
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if cfg.slurm.gpus_per_task else "cpu"


Submitted = tuple[list, list[str]]  # submitit jobs and their labels


def _jobs_memory(cfg: GridConfig) -> float | None:
    """GiB each Slurm job may take (``--mem-gb``), which its CPU stacks are checked and planned
    with (``planning_cap``), not this launcher's memory; None off Slurm."""
    return cfg.slurm.mem_gb if cfg.executor == "slurm" else None


def _submit(cfg: GridConfig, device: str, skip: frozenset, parent_id: str, held: int) -> Submitted | None:
    """The remaining runs as one Slurm job array under the parent run, its CPU stacks planned for
    tasks that hold ``held`` bytes before training; None when none remain."""
    keys = [key for key in cfg.run_keys() if key not in skip]
    cap = planning_cap(torch.device(device), cfg.memory_cap_bytes, _jobs_memory(cfg), held)
    work = grid_blocks(cfg, device, keys, cfg.slurm.array_parallelism, cap)
    if not work:
        return None
    size = cfg.slurm.blocks_per_task
    tasks = [work[start : start + size] for start in range(0, len(work), size)]
    labels = [", ".join(f"{d} k={k} seeds {s[0]}..{s[-1]}" for d, k, s, _ in task) for task in tasks]
    uri = mlflow.get_tracking_uri()
    executor = cfg.slurm.executor("altrack-grid")
    n = len(tasks)
    jobs = executor.map_array(grid_task, [cfg] * n, [device] * n, tasks, [parent_id] * n, [uri] * n)
    mlflow.set_tags({SLURM_JOB_TAG: jobs[0].job_id.split("_")[0], EXPECTED_RUNS_TAG: len(cfg.run_keys()),
                     **({DETACHED_TAG: "true"} if cfg.detach else {})})  # fmt: skip
    return jobs, labels


def _collect(submitted: Submitted, parent_id: str, progress: bool) -> int:
    """Wait for the tasks; close what a dead task left RUNNING; returns how many tasks failed."""
    jobs, labels = submitted
    done = 0

    def heard(outcome: TaskOutcome) -> None:
        nonlocal done
        done += 1
        with suppress(Exception):  # the UI's bar, best effort: a store hiccup must not stop the wait
            mlflow.log_metric(SLURM_PROGRESS_METRIC, done, step=done)

    def close_left_runs(reason: str) -> None:
        client = MlflowClient()
        kill_running_children(client, parent_id, client.get_run(parent_id).info.experiment_id, reason)

    try:
        outcomes = wait_for(jobs, labels, progress, heard)
    except KeyboardInterrupt:  # wait_for cancelled the tasks: once they have left the queue, the runs
        with suppress(Exception):  # they left say why (else, or if the store fails, the next invocation)
            if not job_alive(jobs[0].job_id.split("_")[0]):
                close_left_runs(INTERRUPTED)
        raise
    close_left_runs("its Slurm task ended before the run did")
    return sum(o.error is not None for o in outcomes)


def grid_task(cfg: GridConfig, device: str, work: list, parent_id: str, tracking_uri: str) -> int:
    """One Slurm array task: its blocks, each run claimed under the parent before its work starts.
    All its datasets are loaded first, then checked against what the job leaves (``check_stacks``:
    one model within a quarter of the memory left, a CUDA stack within its card's free memory),
    so a job too small fails before it claims a run. Returns how many runs it logged. Raises
    ``ConfigError`` for a job too small.

    SIGTERM (``scancel``: a launcher's Ctrl-C, a user's cancel) ends the task at once. Submitit's
    handler ignores it until Slurm's SIGKILL, a KillWait (30 s by default) later, while the
    launcher waits to close the runs the task leaves."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(task_threads())
    set_determinism(device)
    datasets = list(dict.fromkeys(block[0] for block in work))
    for dataset in datasets:
        load_dataset(dataset, cfg.data_dir, device)
    for dataset in datasets:
        check_stacks(dataset, torch.device(device), cfg.stack, cfg.memory_cap_bytes, cfg.settings.batch_size)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    return sum(len(run_logged_block(cfg, device, block, parent_id, experiment_id, slurm_tags())) for block in work)


def run_logged_block(
    cfg: GridConfig,
    device: str,
    block: tuple[str, int, tuple[int, ...], tuple[str, ...]],
    parent_id: str,
    experiment_id: str,
    tags: dict[str, str] | None = None,
    bar: Progress | None = None,
    behind: _Behind | None = None,
) -> list[ResultRow]:
    """One (dataset, k, seeds, methods) block, wherever it runs (this process, a pool worker, a
    Slurm task): claim its runs (``claim_runs``: they start RUNNING in the UI now, and a run
    another live process has claimed is left to it), train with live epoch losses, then fill
    the runs in, here or, with ``behind``, on its thread while the next block trains. Returns
    the rows of the runs this process did."""
    dataset, budget, seeds, methods = block
    data = load_dataset(dataset, cfg.data_dir, device)
    ident = run_identity(dataset, data.digest, data.x_train.device, cfg.settings, cfg.stack, cfg.memory_cap_bytes)
    wanted = []
    for seed in seeds:
        group = RunKey(dataset, "*", budget, seed).config_hash(cfg.settings, ident)
        for method in methods:
            key = RunKey(dataset, method, budget, seed)
            wanted.append((key, key.config_hash(cfg.settings, ident), group))
    since = 0 if cfg.resume else MlflowClient().get_run(parent_id).info.start_time  # --no-resume: redo old runs
    claimed = claim_runs(parent_id, experiment_id, wanted, tags or {}, since)
    todo = tuple(seed for seed in seeds if any(key.seed == seed for key in claimed))
    if not todo:
        return []
    own = _Behind() if behind is None else None  # a worker's or a Slurm task's: the losses' thread is the block's
    live = LiveLosses(claimed, cfg.settings.epochs, (behind or own).post)
    try:
        results = run_block(cfg, device, dataset, budget, todo, methods, bar, live)
    finally:  # a block that fails still leaves the epochs it trained in its runs
        live.flush()
        if own is not None:
            own.close()  # every point sent before the runs are filled in (and ended)
    ours = [result for result in results if result.key in claimed]
    if behind is None:
        _fill_runs(ours, claimed, cfg.log_models)
    else:
        behind.submit(_fill_runs, _on_host(ours), claimed, cfg.log_models)
    if bar is not None:
        for result in results:
            bar.finished(result)
    return [result.row(claimed[result.key]) for result in ours]


def _fill_runs(results: list[RunResult], claimed: dict, log_models: bool) -> None:
    """Fill in a block's claimed runs: params, artifacts, models and metrics (``log_run``)."""
    seed_models: dict[int, str] = {}  # seed -> the run that logged its seed model
    for result in results:
        home = seed_models.get(result.key.seed)
        run_id = log_run(result, log_models, run_id=claimed[result.key], live=True, seed_model_run=home)
        if home is None and result.status == FINISHED and log_models:
            seed_models[result.key.seed] = run_id


def _on_host(results: list[RunResult]) -> list[RunResult]:
    """``results`` with their models moved to the CPU, here: the thread that logs them then
    touches no GPU memory (a copy from another thread while this one captures a CUDA graph
    would break the capture). Everything else a result holds is numpy already."""
    for result in results:
        for model in (result.final_model, result.stage.model if result.stage is not None else None):
            if model is not None:
                model.cpu()
    return results


class _Behind:
    """One thread that fills in a block's runs while the next block trains: logging a run
    (params, selection plot, models, metrics) costs about a third of a second of host time,
    which on a GPU is most of a grid's wall time and on a CPU a sixth. At most one block is
    behind: ``submit`` first waits for the one before, so a logging error surfaces one block
    late at most (``_run_blocks`` then marks the runs it leaves unfilled KILLED), and ``close``
    waits for the last. The live epoch losses go through the same thread (``post``), in order,
    so a block's are in the store before its runs are filled in; as through MLflow's queue, a
    failed send of them is a warning. The store's writes for a run are ``log_run``'s, as
    before; a run's results do not depend on when it is logged. On a CPU the overlap saves
    little: the training's small torch ops each wait for the interpreter's lock while this thread
    runs Python, so filling runs in costs the training about as long as it takes
    (``benchmarks/bench_logging.py``); the main job took as long with it as with runs filled in
    on the main thread. A pool worker or a Slurm task, which fills its runs in itself, makes one
    per block for the live losses alone and closes it before filling them in
    (``run_logged_block``)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="altrack-log")
        self.pending: Future | None = None

    def post(self, fn: Callable[[], None]) -> None:
        self.pool.submit(fn)

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self.wait()
        self.pending = self.pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self, leaving: BaseException | None = None) -> None:
        """Wait for everything submitted and posted. A logging error is raised, unless an
        exception is ``leaving`` already: then it only says so, and that exception goes on."""
        try:
            self.wait()
        except Exception as exc:
            if leaving is None:
                raise
            print(f"altrack: also, a block's runs were not filled in: {first_line(exc)}", file=sys.stderr)
        finally:
            self.pool.shutdown()


def _kill_unfilled(parent_id: str, experiment_id: str, exc: BaseException) -> None:
    """Mark KILLED the runs this grid claimed and will not fill in now (a block trained while
    the one before failed to log, a block Ctrl-C stopped), rather than leave them RUNNING until
    the next invocation's ``close_dead_runs``. Best effort: the store may be what failed. When
    the grid's loop closed ``_run_blocks`` early (``--fail-fast``, an error in the loop), ``exc``
    is the GeneratorExit it received, and the reason is what was leaving the loop meanwhile."""
    if isinstance(exc, GeneratorExit) and exc.__context__ is not None:
        exc = exc.__context__
    reason = f"the grid stopped before this run was filled in: {first_line(exc) or type(exc).__name__}"
    with suppress(Exception):  # the exception already leaving says what went wrong
        kill_running_children(MlflowClient(), parent_id, experiment_id, reason)


def _block_worker(cfg: GridConfig, device: str, block: tuple, parent_id: str, experiment_id: str,
                  tracking_uri: str) -> list[ResultRow]:  # fmt: skip
    set_determinism(device)  # a spawned process starts with torch's defaults
    mlflow.set_tracking_uri(tracking_uri)
    return run_logged_block(cfg, device, block, parent_id, experiment_id)


def _run_blocks(
    cfg: GridConfig, device: str, keys: list[RunKey], parent_id: str, experiment_id: str, progress: bool
) -> Iterator[list[ResultRow]]:
    """Each block's rows as it ends: in this process, or in ``cfg.workers`` processes that log
    their own runs (``map_in_workers``)."""
    work = grid_blocks(cfg, device, keys, cfg.workers)
    bar = Progress(len(keys), progress)
    try:
        if cfg.workers <= 1:
            behind = _Behind()
            try:
                for block in work:
                    yield run_logged_block(cfg, device, block, parent_id, experiment_id, bar=bar, behind=behind)
                behind.close()  # every run filled in before the report
            except BaseException as exc:  # an error (the last block's logging too), Ctrl-C, fail-fast
                behind.close(leaving=exc)
                _kill_unfilled(parent_id, experiment_id, exc)
                raise
            return
        uri = mlflow.get_tracking_uri()
        jobs = [(cfg, device, block, parent_id, experiment_id, uri) for block in work]
        try:
            for job, rows in map_in_workers(cfg.workers, _block_worker, jobs):
                _, _, seeds, methods = job[2]
                bar.runs.update(len(seeds) * len(methods))
                yield rows
        except BaseException as exc:  # the workers have stopped (map_in_workers): their unfilled runs end KILLED
            _kill_unfilled(parent_id, experiment_id, exc)
            raise
    finally:
        bar.close()


def publish_report(rows: Sequence[ResultRow], out: str | None, resumed: int = 0,
                   notes: Sequence[str] = ()) -> list[Path]:  # fmt: skip
    """Write the report to ``out`` (if given) and log it to the active run."""
    with temp_dir("report") as tmp:
        written = report.write_report(rows, tmp, resumed, notes)
        mlflow.log_artifacts(tmp)
        if out is None:
            return []
        try:
            return report.install(written, Path(out))
        except OSError as exc:
            run = mlflow.active_run()
            again = f"; 'altrack report --run-id {run.info.run_id} --out {out}' writes it again" if run else ""
            raise AltrackError(f"cannot write the report to {out}: {exc.strerror or exc}{again}") from exc


def rebuild_report(parent_run_id: str | None, experiment: str | None, out: str | None) -> list[Path]:
    """``altrack report``: the grid report again, from the runs MLflow holds.

    Raises ``AltrackError`` when the run or experiment has no protocol runs."""
    if parent_run_id is not None:
        close_detached(parent_run_id)
    rows, notes = report.separate_settings(rows_from_mlflow(parent_run_id, experiment))
    if not rows and parent_run_id is not None and get_run(parent_run_id).data.tags.get(KIND_TAG) == KIND_SWEEP:
        raise AltrackError(f"run {parent_run_id} is a sweep's parent: its report is in its artifacts (trials.csv, "
                           f"the plots), and 'altrack report --paper --sweep-run-id {parent_run_id}' puts the study "
                           "on the results page")  # fmt: skip
    if not rows:
        raise AltrackError("no altrack protocol runs found for that run or experiment")
    resumed = _resumed(get_run(parent_run_id), rows) if parent_run_id is not None else 0
    if under_project_run():
        with mlflow.start_run():
            return publish_report(rows, out, resumed, notes)
    return report.write_report(rows, out or ".", resumed, notes)


def _resumed(parent: Run, rows: Sequence[ResultRow]) -> int:
    """How many of a grid parent's runs it reused from earlier invocations (``RESUMED_TAG``), at
    most its ``rows`` (a report read back with fewer rows than the tag counted)."""
    return min(int(float(parent.data.tags.get(RESUMED_TAG, "0"))), len(rows))


def close_detached(parent_run_id: str) -> None:
    """A parent submitted with ``--detach`` ends when its Slurm job has left the queue: runs a
    dead task left RUNNING are killed, the report is logged to it, and it ends FINISHED when
    every expected run finished, else FAILED. While its job runs it stays open."""
    client = MlflowClient()
    parent = get_run(parent_run_id, client)
    tags = parent.data.tags
    if parent.info.status != RUNNING or tags.get(DETACHED_TAG) != "true":
        return
    if job_alive(tags.get(SLURM_JOB_TAG, "")):
        print(f"Slurm job {tags.get(SLURM_JOB_TAG)} is still queued or running (or squeue cannot tell): a partial "
              "report; the parent stays open until the job has left the queue", file=sys.stderr)  # fmt: skip
        return
    killed = kill_running_children(client, parent_run_id, parent.info.experiment_id,
                                   "its Slurm task ended before the run did")  # fmt: skip
    rows = rows_from_mlflow(parent_run_id, None)
    finished, expected = sum(r.finished for r in rows), int(tags.get(EXPECTED_RUNS_TAG, "0"))
    with mlflow.start_run(run_id=parent_run_id):
        _publish(rows, None, _resumed(parent, rows))
        if finished < expected:
            why = (f"{finished} of {expected} runs finished ({killed} left RUNNING by their Slurm task, now KILLED; "
                   f"{len(rows) - finished} FAILED or KILLED in all): the runs' {ERROR_TAG} tags and the Slurm "
                   f"logs of job {tags.get(SLURM_JOB_TAG)} say why")  # fmt: skip
            mlflow.set_tag(ERROR_TAG, why)
            print(f"the parent run ends FAILED: {why}", file=sys.stderr)
        mlflow.end_run(FINISHED if finished >= expected else FAILED)

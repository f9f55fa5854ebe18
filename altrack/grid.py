"""``altrack run``: a grid of protocol runs under one MLflow parent run, resumable by config hash."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch

from altrack import report
from altrack.config import GridConfig
from altrack.data import load_dataset, release_datasets, resolve_device, set_determinism
from altrack.errors import AltrackError
from altrack.protocol import iterate_grid, stack_limit
from altrack.provenance import identity
from altrack.results import FINISHED, ResultRow
from altrack.tracking.query import finished_rows, rows_from_mlflow
from altrack.tracking.runs import (
    check_tracking_store,
    close_dead_runs,
    log_new_params,
    log_run,
    owner_tags,
    start_parent,
    under_project_run,
)
from altrack.tracking.tags import (
    COMMAND_TAG,
    KIND_GRID,
    KIND_TAG,
    RESUMED_RUNS_CSV,
    RESUMED_TAG,
    RUNS_FAILED_TAG,
    RUNS_FINISHED_TAG,
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
    device = str(resolve_device(cfg.device))
    set_determinism(device)
    identities = {}  # data errors surface before the store is touched (no mlflow.db)
    for dataset in cfg.datasets:
        identities[dataset] = identity(device, load_dataset(dataset, cfg.data_dir, device).digest)
        stack_limit(dataset, torch.device(device), cfg.stack, cfg.memory_cap_bytes, cfg.settings.batch_size)
    if cfg.workers > 1:  # the workers load their own copies
        release_datasets()
    check_tracking_store()  # then the store, still before any training
    tags = {KIND_TAG: KIND_GRID, COMMAND_TAG: " ".join(sys.argv), **owner_tags()}
    with start_parent(cfg.experiment, KIND_GRID, tags) as parent:
        parent_id = parent.info.run_id
        log_new_params(parent_id, grid_params(cfg, device))
        close_dead_runs(parent.info.experiment_id)
        hashes = {key.config_hash(cfg.settings, identities[key.dataset]): key for key in cfg.run_keys()}
        done = finished_rows(parent.info.experiment_id, set(hashes)) if cfg.resume else {}
        rows: list[ResultRow] = list(done.values())
        mlflow.set_tag(RESUMED_TAG, len(done))
        if done:
            experiment = mlflow.get_experiment(parent.info.experiment_id).name
            say(f"reusing {len(done)} finished runs from {experiment}; --no-resume to rerun")
            with tempfile.TemporaryDirectory(prefix="altrack-resumed-") as tmp:
                report.write_rows_csv(rows, Path(tmp) / RESUMED_RUNS_CSV)
                mlflow.log_artifacts(tmp)
        skip = frozenset(hashes[h] for h in done)
        for result in iterate_grid(cfg, device=device, skip=skip, progress=progress, workers=cfg.workers):
            run_id = log_run(result, cfg.log_models)
            rows.append(result.row(run_id))
            if result.status != FINISHED and cfg.fail_fast:
                raise AltrackError(f"{run_id} failed: {result.error} (--fail-fast)")
        paths = publish_report(rows, cfg.out, resumed=len(done))
        n_failed = sum(not r.finished for r in rows)
        mlflow.set_tags({RUNS_FINISHED_TAG: len(rows) - n_failed, RUNS_FAILED_TAG: n_failed})
    return GridOutcome(parent_id, rows, paths, len(done))


def publish_report(rows: Sequence[ResultRow], out: str | None, resumed: int = 0) -> list[Path]:
    """Write the report to ``out`` (if given) and log it to the active run."""
    with tempfile.TemporaryDirectory(prefix="altrack-report-") as tmp:
        report.write_report(rows, tmp, resumed)
        mlflow.log_artifacts(tmp)
        if out is None:
            return []
        return report.write_report(rows, out, resumed)


def rebuild_report(parent_run_id: str | None, experiment: str | None, out: str | None) -> list[Path]:
    """``altrack report``: the grid report again, from the runs MLflow holds.

    Raises ``AltrackError`` when the run or experiment has no protocol runs."""
    rows = rows_from_mlflow(parent_run_id, experiment)
    if not rows:
        raise AltrackError("no altrack protocol runs found for that run or experiment")
    if under_project_run():
        with mlflow.start_run():
            return publish_report(rows, out)
    return report.write_report(rows, out or ".")

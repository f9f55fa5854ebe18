"""The read side of MLflow: runs back as ``ResultRow``s, finished runs by config hash."""

from __future__ import annotations

import csv
from collections.abc import Collection

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from altrack.catalog import DATASETS
from altrack.errors import AltrackError
from altrack.liveness import temp_dir
from altrack.results import FINISHED, RUNNING, ResultRow
from altrack.settings import SWEPT_WORDS, Settings
from altrack.tracking.tags import (
    ERROR_TAG,
    HASH_TAG,
    KIND_PROTOCOL,
    KIND_TAG,
    MLFLOW_PARENT_RUN_ID,
    RESUMED_RUNS_CSV,
    SETTING_TAG,
    TEST_ACCURACY_METRIC,
)

PROTOCOL_QUERY = f"tags.`{KIND_TAG}` = '{KIND_PROTOCOL}'"


def get_run(run_id: str, client: MlflowClient | None = None) -> Run:
    """The run with this id; ``AltrackError`` (one line) when the store has none."""
    try:
        return (client or MlflowClient()).get_run(run_id)
    except Exception as exc:
        raise AltrackError(f"no MLflow run with id {run_id!r} at {mlflow.get_tracking_uri()}") from exc


def experiment_ids(experiment: str | None) -> list[str]:
    """The named experiment's id, or every experiment's when ``experiment`` is None."""
    client = MlflowClient()
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise AltrackError(f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
    return [found.experiment_id]


def search(experiment_ids: list[str], query: str, oldest_first: bool = False) -> list[Run]:
    """Every run matching ``query`` (up to 50,000)."""
    order = ["attributes.start_time ASC"] if oldest_first else None
    return MlflowClient().search_runs(experiment_ids, query, max_results=50000, order_by=order)


def row_of(run: Run) -> ResultRow | None:
    """A protocol run as a result row; None for a run that is not one."""
    p = run.data.params
    if p.get("dataset") not in DATASETS:
        return None
    return ResultRow(
        dataset=p["dataset"],
        method=p["method"],
        budget=int(p["budget"]),
        seed=int(p["seed"]),
        status=run.info.status,
        test_accuracy=run.data.metrics.get(TEST_ACCURACY_METRIC, float("nan")),
        run_id=run.info.run_id,
        error=run.data.tags.get(ERROR_TAG, ""),
        setting=setting_of(run),
    )


def setting_of(run: Run) -> str:
    """The Settings label a run was made with: its tag, with the knobs off their defaults that a
    tag logged before 2026-12-07 left out (it named the three a sweep tunes; the run's params
    have the rest). Runs logged before the tag existed logged every setting as a param."""
    full = Settings.from_params(run.data.params).label
    tag = run.data.tags.get(SETTING_TAG)
    if not tag:
        return full
    return tag if len(tag.split()) > SWEPT_WORDS else " ".join([*tag.split(), *full.split()[SWEPT_WORDS:]])


def _protocol_rows(experiment_ids: list[str], query: str) -> list[tuple[ResultRow, str]]:
    """(row, config hash) for the protocol runs matching ``query``, oldest first."""
    found = []
    for run in search(experiment_ids, query, oldest_first=True):
        row = row_of(run)
        if row is not None:
            found.append((row, run.data.tags.get(HASH_TAG, run.info.run_id)))
    return found


def finished_rows(
    experiment_id: str, hashes: set[str], exclude: Collection[str] = frozenset()
) -> dict[str, ResultRow]:
    """Config hash -> result row of the FINISHED protocol runs of this experiment among ``hashes``
    (the latest of a hash), leaving out the run ids in ``exclude``: a grid under --no-resume
    waits for the runs live rivals are doing, not for those earlier invocations had finished
    before it claimed (``finished_ids``; run ids, not times, which other hosts' clocks stamp)."""
    return {h: row for row, h in _finished(experiment_id, hashes) if row.run_id not in exclude}


def finished_ids(experiment_id: str, hashes: set[str]) -> frozenset[str]:
    """Run ids of every FINISHED protocol run of this experiment among ``hashes``, not only the
    latest of each."""
    return frozenset(row.run_id for row, _ in _finished(experiment_id, hashes))


def _finished(experiment_id: str, hashes: set[str]) -> list[tuple[ResultRow, str]]:
    """(row, config hash) of the FINISHED protocol runs of this experiment among ``hashes``, oldest first."""
    return [(row, h) for row, h in _protocol_rows([experiment_id], PROTOCOL_QUERY) if row.finished and h in hashes]


def resumed_ids(parent_run_id: str) -> list[str]:
    """Run ids a resumed grid reused from earlier invocations (its ``resumed_runs.csv``)."""
    try:
        with temp_dir("resumed") as tmp:  # a killed process's is cleaned up later
            path = mlflow.artifacts.download_artifacts(
                run_id=parent_run_id, artifact_path=RESUMED_RUNS_CSV, dst_path=tmp
            )
            with open(path) as handle:
                return [row["run_id"] for row in csv.DictReader(handle)]
    except Exception:
        return []


def rows_from_mlflow(parent_run_id: str | None = None, experiment: str | None = None) -> list[ResultRow]:
    """Result rows of the protocol runs under a parent run, or in a whole experiment.

    A run logged twice (same config hash) counts once: the latest finished one wins. Runs a
    resumed grid reused from an earlier, killed invocation are listed in the parent's
    ``resumed_runs.csv`` and counted too. Raises ``AltrackError`` for an unknown run or experiment.
    """
    query = PROTOCOL_QUERY
    extra: list[str] = []
    if parent_run_id is not None:
        ids = [get_run(parent_run_id).info.experiment_id]
        extra = resumed_ids(parent_run_id)
        query += f" and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    else:
        ids = experiment_ids(experiment)
    found = _protocol_rows(ids, query)
    if extra:
        wanted = set(extra)
        found = [pair for pair in _protocol_rows(ids, PROTOCOL_QUERY) if pair[0].run_id in wanted] + found
    latest: dict[str, ResultRow] = {}
    for row, key in found:
        if row.status == RUNNING:
            continue
        if key not in latest or row.status == FINISHED or latest[key].status != FINISHED:
            latest[key] = row
    return list(latest.values())

"""``altrack replay``: retrain a logged run's final model from its params and indices alone."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from altrack.data import load_dataset, resolve_device, set_determinism
from altrack.errors import AltrackError
from altrack.liveness import temp_dir
from altrack.protocol import FINAL_INIT, FINAL_ORDER, evaluate_models, fit, fit_threads, padded_width, stack_limit
from altrack.provenance import STACK_WIDTH
from altrack.results import FINISHED
from altrack.settings import Settings
from altrack.tracking.query import get_run
from altrack.tracking.runs import check_tracking_store, now_ms, under_project_run, use_experiment
from altrack.tracking.tags import (
    KIND_GRID,
    KIND_PROTOCOL,
    KIND_REPLAY,
    KIND_SWEEP,
    KIND_SWEEP_PROTOCOL,
    KIND_TAG,
    KIND_TRIAL,
    LOGGED_TEST_ACCURACY_METRIC,
    REPLAY_EQUAL_METRIC,
    REPLAY_OF_TAG,
    TEST_ACCURACY_METRIC,
    TEST_LOSS_METRIC,
    TRAIN_LOSS_METRIC,
)


@dataclass(frozen=True)
class ReplayOutcome:
    original_run_id: str
    replay_run_id: str
    logged_accuracy: float
    replayed_accuracy: float

    @property
    def equal(self) -> bool:
        return self.logged_accuracy == self.replayed_accuracy


def _replay_weights(run_id: str, folder: str) -> np.ndarray:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="selection.csv", dst_path=folder)
    with open(local) as handle:
        weights = [float(row["weight"]) if row["weight"] else 1.0 for row in csv.DictReader(handle)]
    return np.asarray(weights, dtype=np.float64)


def replay(run_id: str, data_dir: str | None = None, device: str | None = None) -> ReplayOutcome:
    """Retrain a run's final model from its logged config and ``selected_indices.npy`` alone (no
    seed model, no selection) and log it as a new run tagged with the original's id.

    A grid's protocol run or a sweep trial's: a final model is trained on its selected indices
    alone either way (a sweep's validation split only shaped the selection). ``device`` defaults
    to the run's own. Raises ``AltrackError`` for an unknown or unfinished run, or a device this
    machine lacks.
    """
    check_tracking_store(existing=True)
    client = MlflowClient()
    original = get_run(run_id, client)
    params = original.data.params
    kind = original.data.tags.get(KIND_TAG)
    if kind not in (KIND_PROTOCOL, KIND_SWEEP_PROTOCOL):
        hint = {KIND_GRID: "a grid's parent: give one of its runs, named like mnist-coreset-k2000-s0",
                KIND_SWEEP: "a sweep's parent: give a protocol run nested under one of its trials",
                KIND_TRIAL: "a sweep's trial: give one of the protocol runs nested under it",
                KIND_REPLAY: "a replay: give the run it replayed (its altrack.replay_of tag)"}  # fmt: skip
        what = hint.get(kind or "", "not a run altrack made: give one of its protocol runs")
        raise AltrackError(f"run {run_id} is {what}")
    if original.info.status != FINISHED:
        raise AltrackError(f"run {run_id} is {original.info.status}: only a FINISHED run has a final model to replay")
    settings = Settings.from_params(params)
    seed = int(params["seed"])
    wanted = device or params["device"].split(":")[0]
    try:
        resolved = str(resolve_device(wanted))
    except AltrackError as exc:
        if device is not None:  # the user's ask, not the run's
            raise
        raise AltrackError(
            f"run {run_id} trained on {wanted}, which this machine lacks; pass --device cpu (not bit-exact)"
        ) from exc
    set_determinism(resolved)
    fit_threads()
    with temp_dir("replay") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="selected_indices.npy", dst_path=tmp)
        selected = np.load(path, allow_pickle=False).astype(np.int64)
        weights = _replay_weights(run_id, tmp) if settings.weighted else None
    data = load_dataset(params["dataset"], data_dir, resolved)
    width = int(params.get(STACK_WIDTH, 0))  # a CUDA run's padded width: its bits depend on it
    stack_limit(data.name, data.x_train.device, width, None, settings.batch_size)  # refused before it trains
    model, losses = fit(data, selected, settings, seed, FINAL_INIT, FINAL_ORDER, weights, stack=width)
    [(accuracy, loss)] = evaluate_models([model], data.x_test, data.y_test, padded_width(data, settings, width),
                                         settings.batch_size)  # as the run evaluated it
    logged = float(original.data.metrics[TEST_ACCURACY_METRIC])
    tags = {KIND_TAG: KIND_REPLAY, REPLAY_OF_TAG: run_id}
    if mlflow.active_run() is None and not under_project_run():
        use_experiment(experiment_id=original.info.experiment_id)
    name = f"replay-{original.info.run_name}"
    with mlflow.start_run(run_name=name, tags=tags, nested=mlflow.active_run() is not None) as run:
        now = now_ms()
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(TEST_ACCURACY_METRIC, accuracy, now, 0), Metric(TEST_LOSS_METRIC, loss, now, 0),
                     Metric(LOGGED_TEST_ACCURACY_METRIC, logged, now, 0),
                     Metric(REPLAY_EQUAL_METRIC, float(accuracy == logged), now, 0)]
            + [Metric(TRAIN_LOSS_METRIC, v, now, i) for i, v in enumerate(losses)],
        )  # fmt: skip
    return ReplayOutcome(run_id, run.info.run_id, logged, accuracy)

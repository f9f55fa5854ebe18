"""Everything MLflow: one parent run per invocation, one nested child run per protocol run.

Under ``mlflow run`` the launcher exports ``MLFLOW_RUN_ID``; ``mlflow.start_run()`` then resumes
that run as the parent, so the project run and the CLI run are the same thing.
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from altrack import report
from altrack.config import GridConfig, Settings, parse_lam
from altrack.data import DATASETS, load_dataset, release_datasets, resolve_device
from altrack.errors import AltrackError, first_line
from altrack.protocol import FINAL_INIT, FINAL_ORDER, RunResult, fit, iterate_grid
from altrack.train import evaluate

KIND_TAG = "altrack.kind"
HOST_TAG = "altrack.host"
PID_TAG = "altrack.pid"
HASH_TAG = "altrack.config_hash"
ERROR_TAG = "altrack.error"
COMMAND_TAG = "altrack.command"  # the command line that made a parent run, for the results page
DEFAULT_EXPERIMENT = "altrack"


@dataclass(frozen=True)
class GridOutcome:
    """The parent run, one row per run (finished here or resumed), and the report files.

    Results themselves are not kept: each holds its seed stage (tens of MB), and a grid of
    hundreds of runs must not grow with its length."""

    parent_run_id: str
    rows: list[dict]
    report_paths: list[Path]


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def _quick_http():
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


def check_tracking_store() -> str:
    """Touch the store before any training, so an unreachable server fails in seconds."""
    uri = mlflow.get_tracking_uri()
    try:
        with _quick_http():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise AltrackError(f"MLflow tracking store {uri} is unreachable: {first_line(exc)}") from exc
    return uri


def _process_tags() -> dict[str, str]:
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_dead_runs(experiment_id: str) -> int:
    """Mark KILLED the RUNNING runs of this experiment whose process on this host has died
    (a SIGKILLed grid leaves its parent, and maybe one child, RUNNING)."""
    client = MlflowClient()
    host = socket.gethostname()
    closed = 0
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if tags.get(HOST_TAG) == host and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            client.set_tag(run.info.run_id, ERROR_TAG, f"process {pid} died before the run ended")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed += 1
    return closed


def finished_rows(experiment_id: str, hashes: set[str]) -> dict[str, dict]:
    """Config hash -> result row of the FINISHED protocol runs of this experiment among ``hashes``."""
    rows = {}
    for row, config_hash in _protocol_rows([experiment_id], f"tags.`{KIND_TAG}` = 'protocol'"):
        if row["status"] == "FINISHED" and config_hash in hashes:
            rows[config_hash] = row
    return rows


def _under_project_run() -> bool:
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def start_parent(experiment: str | None, run_name: str, tags: dict | None = None) -> mlflow.ActiveRun:
    """The invocation's parent run; under ``mlflow run``, the run the launcher created."""
    if _under_project_run():
        run = mlflow.start_run()
        if tags:
            mlflow.set_tags(tags)
        return run
    mlflow.set_experiment(experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT)
    return mlflow.start_run(run_name=run_name, tags=tags)


def log_new_params(run_id: str, params: dict) -> None:
    """Log params the run does not already have (``mlflow run`` logs its -P values first)."""
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    fresh = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    if fresh:
        client.log_batch(run_id, params=fresh)


def settings_params(settings: Settings) -> dict:
    """Settings as MLflow params, lam as 'auto' or its value; ``settings_from_params`` reads them back."""
    return {**asdict(settings), "lam": settings.lam_label}


def grid_params(cfg: GridConfig) -> dict:
    return {
        "datasets": ",".join(cfg.datasets),
        "methods": ",".join(cfg.methods),
        "budgets": ",".join(map(str, cfg.budgets)),
        "runs": cfg.runs,
        "base_seed": cfg.seed,
        "device": str(resolve_device(cfg.device)),
        **settings_params(cfg.settings),
    }


def run_params(result: RunResult) -> dict:
    key, settings = result.key, result.settings
    params = {
        "dataset": key.dataset,
        "method": key.method,
        "budget": key.budget,
        "seed": key.seed,
        "n_seed": settings.n_seed(key.budget),
        "n_select": key.budget - settings.n_seed(key.budget),
        "device": result.device,
        "config_hash": result.config_hash,
        "torch_version": torch.__version__,
        **settings_params(settings),
    }
    if key.method.startswith("coreset"):
        params["n_clusters"] = settings.effective_clusters(key.budget)
    if result.selection is not None and "lam" in result.selection.info:
        params["lam_used"] = result.selection.info["lam"]
    return params


def _run_metrics(result: RunResult) -> list[Metric]:
    now = _now_ms()
    stage = result.stage
    metrics = [Metric(name, getattr(result, name), now, 0) for name in ("test_accuracy", "test_loss", "val_accuracy")]
    if stage is not None:
        metrics.append(Metric("seed_test_accuracy", stage.test_accuracy, now, 0))
        metrics += [Metric("seed_train_loss", v, now, i) for i, v in enumerate(stage.epoch_losses)]
    metrics += [Metric("train_loss", v, now, i) for i, v in enumerate(result.final_epoch_losses)]
    metrics += [Metric(k, v, now, 0) for k, v in result.timings.items()]
    if result.selection is not None:
        for k, v in result.selection.info.items():
            if isinstance(v, int | float) and k != "lam":
                metrics.append(Metric(f"selection_{k}", float(v), now, 0))
    return [m for m in metrics if np.isfinite(m.value)]


def _blank_nan(value: float) -> str | float:
    return "" if np.isnan(value) else float(value)


def write_run_artifacts(result: RunResult, folder: Path, labels: np.ndarray) -> None:
    """seed_losses.npy, selected_indices.npy, selection.csv and selection.png for one run."""
    stage, selection = result.stage, result.selection
    assert stage is not None and selection is not None
    np.save(folder / "seed_losses.npy", stage.ce_loss.astype(np.float32))
    np.save(folder / "selected_indices.npy", result.selected_indices)
    n_seed = len(stage.seed_indices)
    with open(folder / "selection.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "role", "probability", "weight"])
        writer.writerows([int(i), "seed", "", 1.0] for i in stage.seed_indices)
        columns = zip(selection.indices, selection.roles, selection.probabilities, selection.weights, strict=True)
        writer.writerows([int(i), role, _blank_nan(p), _blank_nan(w)] for i, role, p, w in columns)
    key = result.key
    report.plot_selection(
        stage.ce_loss,
        labels,
        stage.pool_indices,
        result.selected_indices[n_seed:],
        f"{key.dataset} {key.method} k={key.budget} seed={key.seed}: acc {result.test_accuracy:.4f}",
        folder / "selection.png",
    )


def _log_model(model: torch.nn.Module, name: str) -> None:
    """Pickle format: pt2 needs an input example and torch.export, and these models are our own."""
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    mlflow.pytorch.log_model(
        model.cpu(),
        name=name,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def log_run(result: RunResult, labels: np.ndarray, log_models: bool, kind: str = "protocol") -> str:
    """One nested child run; FAILED with the reason when the run failed.

    Sweeps log theirs as ``kind="sweep-protocol"``: they train on a pool without the validation
    split, so grid resumes and reports must never mistake them for grid runs.
    """
    key = result.key
    name = f"{key.dataset}-{key.method}-k{key.budget}-s{key.seed}"
    tags = {KIND_TAG: kind, HASH_TAG: result.config_hash, **_process_tags()}
    with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
        client = MlflowClient()
        run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in run_params(result).items()]
        client.log_batch(run_id, metrics=_run_metrics(result), params=params)
        if result.status != "FINISHED":
            client.log_batch(run_id, tags=[RunTag(ERROR_TAG, (result.error or "")[:4000])])
            mlflow.end_run(status="FAILED")
            return run_id
        try:  # a run is FINISHED only with its artifacts; leaving this block by an error marks it FAILED
            with tempfile.TemporaryDirectory(prefix="altrack-") as tmp:
                write_run_artifacts(result, Path(tmp), labels)
                mlflow.log_artifacts(tmp)
            if log_models:
                assert result.stage is not None and result.final_model is not None
                _log_model(result.stage.model, "seed_model")
                _log_model(result.final_model, "final_model")
        except Exception as exc:
            client.set_tag(run_id, ERROR_TAG, f"artifacts not stored: {first_line(exc, 500)}")
            raise AltrackError(
                f"run {run_id}: cannot store its artifacts at {run.info.artifact_uri}: {first_line(exc)}"
            ) from exc
    return run_id


def result_row(result: RunResult, run_id: str) -> dict:
    key = result.key
    return {
        "dataset": key.dataset,
        "method": key.method,
        "budget": key.budget,
        "seed": key.seed,
        "status": result.status,
        "test_accuracy": result.test_accuracy,
        "run_id": run_id,
        "error": result.error or "",
        "setting": result.settings.label,
    }


def run_grid(cfg: GridConfig, *, progress: bool = True) -> GridOutcome:
    """Validate inputs, then run the grid under one parent run and write the report."""
    labels = {}  # data errors surface before the store is touched (no mlflow.db)
    for dataset in cfg.datasets:
        labels[dataset] = load_dataset(dataset, cfg.data_dir, str(resolve_device(cfg.device))).y_train.cpu().numpy()
    if cfg.workers > 1:  # the workers load their own copies; this process only needs the labels
        release_datasets()
    check_tracking_store()  # then the store, still before any training
    tags = {KIND_TAG: "grid", COMMAND_TAG: " ".join(sys.argv), **_process_tags()}
    with start_parent(cfg.experiment, "grid", tags) as parent:
        parent_id = parent.info.run_id
        log_new_params(parent_id, grid_params(cfg))
        close_dead_runs(parent.info.experiment_id)
        hashes = {key.config_hash(cfg.settings): key for key in cfg.run_keys()}
        done = finished_rows(parent.info.experiment_id, set(hashes)) if cfg.resume else {}
        rows: list[dict] = list(done.values())
        mlflow.set_tag("altrack.resumed_runs", len(done))
        if done:
            with tempfile.TemporaryDirectory(prefix="altrack-resumed-") as tmp:
                report.write_rows_csv(list(done.values()), Path(tmp) / "resumed_runs.csv", report.ROW_FIELDS)
                mlflow.log_artifacts(tmp)
        skip = frozenset(hashes[h] for h in done)
        for result in iterate_grid(cfg, skip=skip, progress=progress, workers=cfg.workers):
            run_id = log_run(result, labels[result.key.dataset], cfg.log_models)
            rows.append(result_row(result, run_id))
            if result.status != "FINISHED" and cfg.fail_fast:
                raise AltrackError(f"{run_id} failed: {result.error} (--fail-fast)")
        paths = publish_report(rows, cfg.out)
        n_failed = sum(r["status"] != "FINISHED" for r in rows)
        mlflow.set_tags({"altrack.runs_finished": len(rows) - n_failed, "altrack.runs_failed": n_failed})
    return GridOutcome(parent_id, rows, paths)


def publish_report(rows: Sequence[dict], out: str | None) -> list[Path]:
    """Write the report to ``out`` (if given) and log it to the active run."""
    with tempfile.TemporaryDirectory(prefix="altrack-report-") as tmp:
        report.write_report(rows, tmp)
        mlflow.log_artifacts(tmp)
        if out is None:
            return []
        return report.write_report(rows, out)


def _experiment_ids(experiment: str | None) -> list[str]:
    client = MlflowClient()
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise AltrackError(f"no MLflow experiment named {experiment!r} at {mlflow.get_tracking_uri()}")
    return [found.experiment_id]


def _protocol_rows(experiment_ids: list[str], query: str) -> list[tuple[dict, str]]:
    """(row, config hash) for the protocol runs matching ``query``, oldest first."""
    client = MlflowClient()
    runs = client.search_runs(experiment_ids, query, max_results=50000, order_by=["attributes.start_time ASC"])
    found = []
    for run in runs:
        p = run.data.params
        if p.get("dataset") not in DATASETS:
            continue
        row = {
            "dataset": p["dataset"],
            "method": p["method"],
            "budget": int(p["budget"]),
            "seed": int(p["seed"]),
            "status": run.info.status,
            "test_accuracy": run.data.metrics.get("test_accuracy", float("nan")),
            "run_id": run.info.run_id,
            "error": run.data.tags.get(ERROR_TAG, ""),
            "setting": settings_from_params(p).label,
        }
        found.append((row, run.data.tags.get(HASH_TAG, run.info.run_id)))
    return found


def _get_run(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as exc:
        raise AltrackError(f"no MLflow run with id {run_id!r} at {mlflow.get_tracking_uri()}") from exc


def rows_from_mlflow(parent_run_id: str | None = None, experiment: str | None = None) -> list[dict]:
    """Result rows of the protocol runs under a parent run, or in a whole experiment.

    A run logged twice (same config hash) counts once: the latest finished one wins. Runs a
    resumed grid reused from an earlier, killed invocation are listed in the parent's
    ``resumed_runs.csv`` and counted too.
    """
    client = MlflowClient()
    query = f"tags.`{KIND_TAG}` = 'protocol'"
    extra: list[str] = []
    if parent_run_id is not None:
        parent = _get_run(client, parent_run_id)
        experiment_ids = [parent.info.experiment_id]
        extra = _resumed_ids(parent_run_id)
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    else:
        experiment_ids = _experiment_ids(experiment)
    found = _protocol_rows(experiment_ids, query)
    if extra:
        wanted = set(extra)
        found = [pair for pair in _protocol_rows(experiment_ids, f"tags.`{KIND_TAG}` = 'protocol'")
                 if pair[0]["run_id"] in wanted] + found  # fmt: skip
    latest: dict[str, dict] = {}
    for row, key in found:
        if row["status"] == "RUNNING":
            continue
        if key not in latest or row["status"] == "FINISHED" or latest[key]["status"] != "FINISHED":
            latest[key] = row
    return list(latest.values())


def _resumed_ids(parent_run_id: str) -> list[str]:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=parent_run_id, artifact_path="resumed_runs.csv", dst_path=tmp
            )
            with open(path) as handle:
                return [row["run_id"] for row in csv.DictReader(handle)]
    except Exception:
        return []


def rebuild_report(parent_run_id: str | None, experiment: str | None, out: str | None) -> list[Path]:
    rows = rows_from_mlflow(parent_run_id, experiment)
    if not rows:
        raise AltrackError("no altrack protocol runs found for that run or experiment")
    if _under_project_run():
        with mlflow.start_run():
            return publish_report(rows, out)
    return report.write_report(rows, out or ".")


@dataclass(frozen=True)
class ReplayOutcome:
    original_run_id: str
    replay_run_id: str
    logged_accuracy: float
    replayed_accuracy: float

    @property
    def equal(self) -> bool:
        return self.logged_accuracy == self.replayed_accuracy


def settings_from_params(params: dict) -> Settings:
    """The Settings a run logged with ``settings_params``."""
    return Settings(
        epochs=int(params["epochs"]),
        batch_size=int(params["batch_size"]),
        lr=float(params["lr"]),
        seed_ratio=float(params["seed_ratio"]),
        cluster_ratio=float(params["cluster_ratio"]),
        lam=parse_lam(params.get("lam")),
        coreset_space=params.get("coreset_space", "embedding"),
        weighted=params.get("weighted", "False") == "True",
    )


def _replay_weights(run_id: str, folder: str) -> np.ndarray:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="selection.csv", dst_path=folder)
    with open(local) as handle:
        weights = [float(row["weight"]) if row["weight"] else 1.0 for row in csv.DictReader(handle)]
    return np.asarray(weights, dtype=np.float64)


def replay(run_id: str, data_dir: str | None = None, device: str | None = None) -> ReplayOutcome:
    """Retrain a run's final model from its logged config and selected_indices.npy alone (no seed
    model, no selection) and log it as a new run tagged with the original's id."""
    check_tracking_store()
    client = MlflowClient()
    original = _get_run(client, run_id)
    params = original.data.params
    if original.data.tags.get(KIND_TAG) != "protocol" or original.info.status != "FINISHED":
        raise AltrackError(f"run {run_id} is not a finished altrack protocol run")
    settings = settings_from_params(params)
    seed = int(params["seed"])
    with tempfile.TemporaryDirectory(prefix="altrack-replay-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="selected_indices.npy", dst_path=tmp)
        selected = np.load(path, allow_pickle=False).astype(np.int64)
        weights = _replay_weights(run_id, tmp) if settings.weighted else None
    wanted = device or params["device"].split(":")[0]
    if wanted == "cuda" and not torch.cuda.is_available():
        raise AltrackError(f"run {run_id} trained on CUDA, which this machine lacks; pass --device cpu (not bit-exact)")
    data = load_dataset(params["dataset"], data_dir, str(resolve_device(wanted)))
    model, losses = fit(data, selected, settings, seed, FINAL_INIT, FINAL_ORDER, weights)
    accuracy, loss = evaluate(model, data.x_test, data.y_test)
    logged = float(original.data.metrics["test_accuracy"])
    tags = {KIND_TAG: "replay", "altrack.replay_of": run_id}
    if mlflow.active_run() is None and not _under_project_run():
        mlflow.set_experiment(experiment_id=original.info.experiment_id)
    name = f"replay-{original.info.run_name}"
    with mlflow.start_run(run_name=name, tags=tags, nested=mlflow.active_run() is not None) as run:
        now = _now_ms()
        client.log_batch(
            run.info.run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric("test_accuracy", accuracy, now, 0), Metric("test_loss", loss, now, 0),
                     Metric("logged_test_accuracy", logged, now, 0),
                     Metric("replay_equal", float(accuracy == logged), now, 0)]
            + [Metric("train_loss", v, now, i) for i, v in enumerate(losses)],
        )  # fmt: skip
    return ReplayOutcome(run_id, run.info.run_id, logged, accuracy)


def paper_page(
    parent_ids: Sequence[str],
    experiment: str | None,
    docs: str,
    notes: str | None,
    setting_ids: Sequence[str] = (),
    sweep_ids: Sequence[str] = (),
) -> Path:
    """docs/reproduction.md from the protocol runs of the given parents (or a whole experiment),
    with the runs of ``setting_ids`` compared setting against setting and the studies of ``sweep_ids``."""
    from altrack.reproduction import sweep_summary, write_page

    def rows_of(parents: Sequence[str]) -> list[dict]:  # a resumed parent also lists its predecessor's runs
        return list({row["run_id"]: row for parent in parents for row in rows_from_mlflow(parent)}.values())

    sweeps = [sweep_summary(sweep_id) for sweep_id in sweep_ids]  # a wrong id fails before any other read
    if parent_ids:
        rows = rows_of(parent_ids)
    else:
        rows = rows_from_mlflow(experiment=experiment)
        ids = _experiment_ids(experiment)
        parent_ids = [r.info.run_id for r in MlflowClient().search_runs(ids, f"tags.`{KIND_TAG}` = 'grid'")]
    if not rows:
        raise AltrackError("no altrack protocol runs found for those runs")
    setting_rows = rows_of(setting_ids)
    parents = [*parent_ids, *setting_ids, *sweep_ids]
    return write_page(rows, parents, docs, notes, setting_rows=setting_rows, sweeps=sweeps)

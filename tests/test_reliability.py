"""Faults with real processes, a real MLflow store and real Optuna storage (issue: reliability)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from altrack.cache import SeedStageCache, atomic_torch_save
from altrack.config import GridConfig
from altrack.data import load_dataset
from altrack.errors import AltrackError
from altrack.grid import _kill_unfilled, run_grid
from altrack.settings import Settings
from altrack.tracking.query import rows_from_mlflow
from altrack.tracking.tags import (
    ERROR_TAG,
    MLFLOW_PARENT_RUN_ID,
    SEED_TEST_ACCURACY_METRIC,
    SEED_TRAIN_LOSS_METRIC,
    TEST_ACCURACY_METRIC,
    TEST_LOSS_METRIC,
    TRAIN_LOSS_METRIC,
)

GRID = ["run", "--datasets", "mnist", "--methods", "margin,random", "--budget", "100,200,300", "--runs", "3",
        "--epochs", "1", "--device", "cpu", "--no-log-models", "--quiet", "--experiment", "grid"]  # fmt: skip


def _env(tmp_path: Path, data_dir: Path) -> dict:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "ALTRACK_DATA_DIR": str(data_dir),
    }
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    return env


def _protocol_runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


@pytest.mark.slow
def test_sigkilled_grid_resumes_without_redoing_finished_runs(data_dir, tmp_path):
    env, uri = _env(tmp_path, data_dir), f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [sys.executable, "-m", "altrack", *GRID, "--out", str(tmp_path / "out")]
    _protocol_runs(uri, "grid")  # the store exists before this test's own polling meets the grid's first touch
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished_before = []
    while time.time() < deadline and first.poll() is None:
        runs = _protocol_runs(uri, "grid")
        finished_before = [r for r in runs if r.data.tags.get("altrack.kind") == "protocol"
                           and r.info.status == "FINISHED"]  # fmt: skip
        if len(finished_before) >= 3:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished_before = [r for r in _protocol_runs(uri, "grid")
                       if r.data.tags.get("altrack.kind") == "protocol" and r.info.status == "FINISHED"]  # fmt: skip
    assert 3 <= len(finished_before) < 18, "the grid must be killed in the middle"

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    runs = _protocol_runs(uri, "grid")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = [r for r in runs if r.data.tags.get("altrack.kind") == "grid"]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    finished = [r for r in runs if r.data.tags.get("altrack.kind") == "protocol" and r.info.status == "FINISHED"]
    hashes = [r.data.tags["altrack.config_hash"] for r in finished]
    assert len(hashes) == len(set(hashes)) == 18  # nothing redone, nothing lost
    new_parent = next(r for r in parents if r.info.status == "FINISHED")
    assert int(new_parent.data.tags["altrack.resumed_runs"]) == len(finished_before)
    assert f"reusing {len(finished_before)} finished runs from grid; --no-resume to rerun" in second.stdout
    report_text = (tmp_path / "out" / "active_learning_results.txt").read_text()
    assert f"{len(finished_before)} of the 18 runs were reused from earlier or concurrent invocations" in report_text
    mlflow.set_tracking_uri(uri)
    rows = rows_from_mlflow(new_parent.info.run_id)
    assert len(rows) == 18 and all(r.status == "FINISHED" for r in rows)
    table = (tmp_path / "out" / "active_learning_results.txt").read_text().split("paired comparisons")[0]
    counts = [line.split()[3] for line in table.splitlines() if line.strip().startswith(("margin ", "random "))]
    assert counts == ["3"] * 6  # 2 methods x 3 budgets, each over exactly its 3 seeds


def test_fail_fast_stops_the_grid_at_a_diverged_run(data_dir, mlflow_store, capsys):
    from altrack.cli import main

    code = main(["run", "--methods", "random,margin", "--budget", "100,200", "--runs", "2", "--epochs", "1",
                 "--lr", "1e30", "--data-dir", str(data_dir), "--no-log-models", "--quiet", "--fail-fast"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("altrack")]
    assert code == 1 and len(err) == 1 and "failed" in err[0] and "--fail-fast" in err[0]
    experiment = MlflowClient().get_experiment_by_name(mlflow_store)
    runs = MlflowClient().search_runs([experiment.experiment_id])
    # the first block (k=100: 2 seeds x 2 methods, trained together) fails; the k=200 block never starts
    assert len([r for r in runs if r.data.tags.get("altrack.kind") == "protocol"]) == 4
    assert {r.info.status for r in runs} == {"FAILED"}


def test_runs_a_fail_fast_leaves_unfilled_say_why_not_generatorexit(mlflow_store):
    """--fail-fast stops the grid's loop, which closes the generator of blocks with a
    GeneratorExit: the runs it leaves unfilled are KILLED with the failure that stopped it."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    parent = client.create_run(experiment_id).info.run_id
    child = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent}).info.run_id
    failure = "run abc failed: training loss became nan (--fail-fast)"

    def blocks():  # as _run_blocks: the runs left unfilled are killed on the way out
        try:
            yield
        except BaseException as exc:
            _kill_unfilled(parent, experiment_id, exc)
            raise

    with pytest.raises(AltrackError), closing(blocks()) as done_blocks:  # as run_grid's loop
        for _ in done_blocks:
            raise AltrackError(failure)
    run = client.get_run(child)
    assert run.info.status == "KILLED"
    assert run.data.tags[ERROR_TAG] == f"the grid stopped before this run was filled in: {failure}"


def test_unwritable_artifact_location_fails_the_run_clearly(data_dir, mlflow_store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    client = MlflowClient()
    client.create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    cfg = GridConfig(
        datasets=("mnist",), methods=("random",), budgets=(100,), settings=Settings(epochs=1),
        data_dir=str(data_dir), out=None, experiment="blocked", log_models=False, device="cpu",
    )  # fmt: skip
    with pytest.raises(AltrackError, match="cannot store its artifacts"):
        run_grid(cfg, progress=False)
    runs = client.search_runs([client.get_experiment_by_name("blocked").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


def _blocks_of_one_seed(data_dir, experiment):
    """Three blocks of one seed each (a stack of one model): each block's runs are filled in on
    the logging thread while the next block trains."""
    return GridConfig(
        datasets=("mnist",), methods=("random",), budgets=(100,), runs=3, settings=Settings(epochs=2),
        data_dir=str(data_dir), out=None, experiment=experiment, log_models=True, device="cpu", stack=1,
    )  # fmt: skip


def test_every_block_is_filled_in_before_the_grid_returns(data_dir, mlflow_store):
    outcome = run_grid(_blocks_of_one_seed(data_dir, mlflow_store), progress=False)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(mlflow_store).experiment_id],
                              "tags.`altrack.kind` = 'protocol'")  # fmt: skip
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(row.run_id for row in outcome.rows) == sorted(r.info.run_id for r in runs)
    for run in runs:
        assert {"selection.png", "selected_indices.npy"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                             filter_string=f"source_run_id='{run.info.run_id}'")  # fmt: skip
        assert sorted(m.name for m in models) == ["final_model", "seed_model"]  # one method: its run holds M
        # each model carries its own figures only, not the epoch losses the run had when it was logged
        assert {m.name: {x.key for x in m.metrics} for m in models} == {
            "seed_model": {SEED_TEST_ACCURACY_METRIC},
            "final_model": {TEST_ACCURACY_METRIC, TEST_LOSS_METRIC},
        }
        assert "test_accuracy" in run.data.metrics
        for name in (TRAIN_LOSS_METRIC, SEED_TRAIN_LOSS_METRIC):  # sent live, through the logging thread
            assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [0, 1]


def test_a_logging_error_stops_the_grid_one_block_later_at_most(data_dir, mlflow_store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    client = MlflowClient()
    client.create_experiment("blocked-blocks", artifact_location=str(blocker / "artifacts"))
    with pytest.raises(AltrackError, match="cannot store its artifacts"):
        run_grid(_blocks_of_one_seed(data_dir, "blocked-blocks"), progress=False)
    runs = client.search_runs([client.get_experiment_by_name("blocked-blocks").experiment_id],
                              "tags.`altrack.kind` = 'protocol'")  # fmt: skip
    # block 1 failed on the logging thread while block 2 trained (its run KILLED, not left
    # RUNNING); block 3 was never claimed
    status = {r.data.params.get("seed"): r.info.status for r in runs}
    assert len(runs) == 2 and status.pop("0") == "FAILED" and list(status.values()) == ["KILLED"]
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert "the grid stopped before this run was filled in: run " in killed.data.tags[ERROR_TAG]


def test_unreachable_tracking_server_fails_at_start_up(tmp_path, data_dir):
    env = {**_env(tmp_path, data_dir), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "altrack", *GRID], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "http://127.0.0.1:9 is unreachable" in lines[0]
    assert time.time() - started < 60
    assert not any(p.name != "mlflow.db" for p in tmp_path.iterdir() if p.name not in ("out",))


def test_truncated_cache_entry_is_rebuilt_never_trusted(data_dir, tmp_path):
    data = load_dataset("mnist", data_dir)
    cache = SeedStageCache(tmp_path / "cache")
    settings = Settings(epochs=1)
    first = cache.get(data, 100, 0, settings)
    again = cache.get(data, 100, 0, settings)
    assert (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(first.seed_indices, again.seed_indices)
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    [entry] = list((tmp_path / "cache").glob("*.pt"))
    entry.write_bytes(entry.read_bytes()[:1000])
    rebuilt = cache.get(data, 100, 0, settings)
    assert cache.misses == 2
    np.testing.assert_array_equal(first.seed_indices, rebuilt.seed_indices)
    assert torch.load(entry, weights_only=True)["budget"] == 100  # rewritten whole, loadable safely
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix == ".tmp"]


def test_atomic_save_leaves_no_partial_file_on_error(tmp_path):
    target = tmp_path / "entry.pt"

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"x": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []

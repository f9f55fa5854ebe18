"""Two `altrack run` processes and one `altrack sweep --workers 2` write to one SQLite store at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
from mlflow.tracking import MlflowClient

SPEC = """\
study_name: conc
dataset: mnist
budget: 100
epochs: 1
seeds_per_trial: 2
n_trials: 3
sampler: random
experiment: conc
search_space:
  cluster_ratio: {low: 0.1, high: 0.3}
"""


@pytest.mark.slow
def test_concurrent_writers_lose_and_duplicate_nothing(data_dir, tmp_path):
    (tmp_path / "spec.yaml").write_text(textwrap.dedent(SPEC))
    env = {**os.environ, "ALTRACK_DATA_DIR": str(data_dir), "ALTRACK_CACHE_DIR": str(tmp_path / "cache")}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)  # MLflow's default store: sqlite:///mlflow.db in the working directory
    subprocess.run(
        [sys.executable, "-c", "import mlflow; mlflow.set_experiment('conc')"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )  # fmt: skip  (create the schema once, as a user's first run does)
    grid = [
        sys.executable,
        "-m",
        "altrack",
        "run",
        "--datasets",
        "mnist",
        "--methods",
        "margin,random",
        "--budget",
        "100",
        "--runs",
        "2",
        "--epochs",
        "1",
        "--no-log-models",
        "--quiet",
        "--experiment",
        "conc",
    ]
    commands = [
        [*grid, "--seed", "0", "--out", "out0"],
        [*grid, "--seed", "10", "--out", "out1"],
        [sys.executable, "-m", "altrack", "sweep", "spec.yaml", "--workers", "2"],
    ]  # fmt: skip
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in commands]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("conc")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert Counter(r.info.status for r in runs) == Counter({"FINISHED": len(runs)})
    kinds = Counter(r.data.tags.get("altrack.kind") for r in runs)
    # 2 grids x (1 parent + 4 children); sweep: 1 parent + 3 trials x (1 + 2 protocol runs)
    assert kinds == Counter({"grid": 2, "protocol": 8, "sweep": 1, "trial": 3, "sweep-protocol": 6})
    grid_hashes = {r.data.tags["altrack.config_hash"] for r in runs if r.data.tags.get("altrack.kind") == "protocol"}
    assert len(grid_hashes) == 8  # 2 grids x 2 methods x 2 seeds, each recorded exactly once
    trial_ids = {r.info.run_id for r in runs if r.data.tags.get("altrack.kind") == "trial"}
    sweep_runs = [r for r in runs if r.data.tags.get("altrack.kind") == "sweep-protocol"]
    assert Counter(r.data.tags["mlflow.parentRunId"] for r in sweep_runs) == Counter({t: 2 for t in trial_ids})


@pytest.mark.slow
def test_two_identical_grids_at_once_do_each_run_once_and_both_report_it(data_dir, tmp_path):
    """Each run is claimed (a RUNNING child) before its work starts; the other process leaves it
    alone, waits for it, and reports it as reused."""
    env = {**os.environ, "ALTRACK_DATA_DIR": str(data_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    subprocess.run([sys.executable, "-c", "import mlflow; mlflow.set_experiment('twin')"], cwd=tmp_path, env=env,
                   check=True, capture_output=True)  # fmt: skip
    grid = [sys.executable, "-m", "altrack", "run", "--methods", "margin,random", "--budget", "100,200", "--runs", "2",
            "--epochs", "2", "--no-log-models", "--quiet", "--experiment", "twin", "--stack", "2"]  # fmt: skip
    procs = [subprocess.Popen([*grid, "--out", f"out{i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]  # fmt: skip
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("twin")
    runs = client.search_runs([experiment.experiment_id], "tags.`altrack.kind` = 'protocol'", max_results=1000)
    finished = Counter(r.data.tags["altrack.config_hash"] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 8 and set(finished.values()) == {1}
    assert {r.info.status for r in runs} == {"FINISHED"}
    for i in range(2):  # both reports hold all 8 runs, each over its 2 seeds
        table = (tmp_path / f"out{i}" / "active_learning_results.txt").read_text().split("paired comparisons")[0]
        counts = [line.split()[3] for line in table.splitlines() if line.strip().startswith(("margin ", "random "))]
        assert counts == ["2"] * 4


@pytest.mark.slow
def test_processes_that_meet_on_a_new_sqlite_store_create_it_once(tmp_path):
    # MLflow creates and migrates a new database on first use; three processes doing that at once
    # failed two or three of themselves and could leave the file unusable (a leftover alembic table)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    touch = "import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); " \
            "from altrack.tracking.runs import check_tracking_store; check_tracking_store()"  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", touch, uri], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.strip().splitlines()[-1:] for e in errors]
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("after"))  # and the store works

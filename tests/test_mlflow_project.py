"""`mlflow run . --env-manager local`: the project run is the parent, protocol runs nest under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]


def test_mlflow_run_logs_every_item(data_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # --env-manager local runs the entry point's `python` from PATH: make it this interpreter
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(REPO), "--env-manager", "local", "--experiment-name", "proj",
         "-P", "method=coreset", "-P", "budget=100", "-P", "epochs=1", "-P", f"data_dir={data_dir}",
         "-P", f"out={tmp_path / 'results'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results" / "active_learning_results.png").exists()

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("proj")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    [child] = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "main"
    assert parent.info.run_name == "grid" and child.info.run_name == "mnist-coreset-k100-s0"
    assert {"active_learning_results.png", "active_learning_results.txt"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    assert child.data.params["method"] == "coreset" and child.data.params["budget"] == "100"
    rerun = child.data.tags["altrack.rerun"]  # lineage: how to redo it, from which code and data
    assert rerun.startswith("altrack run --datasets mnist --methods coreset --budget 100 --seed 0 --runs 1 --epochs 1")
    assert child.data.tags.get("mlflow.source.git.commit") and child.data.tags["altrack.version"]
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
              for d in client.get_run(child.info.run_id).inputs.dataset_inputs}  # fmt: skip
    assert inputs == {("mnist", "train"), ("mnist-labelled", "labelled")}
    assert {"test_accuracy", "loss/test", "seed_test_accuracy", "loss/train", "loss/seed_train"} <= set(
        child.data.metrics
    )
    assert {"seed_losses.npy", "selected_indices.npy", "selection.csv", "selection.png"} <= {
        a.path for a in client.list_artifacts(child.info.run_id)
    }
    models = mlflow.search_logged_models(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"source_run_id='{child.info.run_id}'",
        output_format="list",
    )
    assert sorted(m.name for m in models) == ["final_model", "seed_model"]

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import LoggedModelStatus, Metric, Param
from mlflow.tracking import MlflowClient

from altrack import report
from altrack.config import GridConfig
from altrack.errors import AltrackError
from altrack.grid import rebuild_report, run_grid
from altrack.liveness import worker_id
from altrack.paper import paper_page
from altrack.replay import replay
from altrack.settings import RunKey, Settings, label_knobs
from altrack.tracking.query import rows_from_mlflow
from altrack.tracking.runs import LiveLosses, claim_runs, close_dead_runs, kill_run_tree, killed_on_interrupt
from altrack.tracking.tags import (
    ERROR_TAG,
    GROUP_TAG,
    HASH_TAG,
    KIND_PROTOCOL,
    KIND_TAG,
    MLFLOW_PARENT_RUN_ID,
    RESUMED_TAG,
    SEED_TRAIN_LOSS_METRIC,
    TEST_ACCURACY_METRIC,
    TICKET_TAG,
    TRAIN_LOSS_METRIC,
    WORKER_TAG,
)


def _cfg(data_dir, out, **kw) -> GridConfig:
    base = dict(
        datasets=("mnist",), methods=("coreset", "random"), budgets=(100,), runs=1,
        settings=Settings(epochs=2), log_models=False,
    )  # fmt: skip
    base.update(kw)
    return GridConfig(data_dir=str(data_dir), out=None if out is None else str(out), device="cpu", **base)


def _children(parent_id: str):
    client = MlflowClient()
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", order_by=["attributes.start_time"]
    )


def test_grid_logs_a_parent_and_one_complete_child_per_run(data_dir, mlflow_store, tmp_path):
    outcome = run_grid(_cfg(data_dir, tmp_path / "out", log_models=True), progress=False)
    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["methods"] == "coreset,random"
    assert parent.data.metrics["progress/runs_done"] == 1.0  # the share of its runs done, as it ran
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {report.PNG_NAME, report.TXT_NAME} <= parent_files
    assert {p.name for p in outcome.report_paths} >= {report.PNG_NAME, report.TXT_NAME}
    assert (tmp_path / "out" / report.PNG_NAME).stat().st_size > 10_000

    children = _children(outcome.parent_run_id)
    assert sorted(c.data.params["method"] for c in children) == ["coreset", "random"]
    coreset = next(c for c in children if c.data.params["method"] == "coreset")
    params, metrics = coreset.data.params, coreset.data.metrics
    assert params["n_seed"] == "20" and params["n_clusters"] == "20" and params["lam"] == "auto"
    assert float(params["lam_used"]) >= 0 and params["device"] == "cpu"
    for name in ("test_accuracy", "loss/test", "seed_test_accuracy", "time/selection_seconds",
                 "time/final_train_seconds", "time/seed_train_seconds", "selection/distance_share"):  # fmt: skip
        assert np.isfinite(metrics[name]), name
    history = client.get_metric_history(coreset.info.run_id, "loss/seed_train")
    assert sorted(m.step for m in history) == [0, 1]
    assert len(client.get_metric_history(coreset.info.run_id, "loss/train")) == 2
    random = next(c for c in children if c.data.params["method"] == "random")  # only the settings it reads
    assert not {"lam", "cluster_ratio", "coreset_space", "weighted"} & set(random.data.params)
    assert {"epochs", "lr", "seed_ratio"} <= set(random.data.params)
    assert random.data.tags["altrack.setting"] == coreset.data.tags["altrack.setting"] == Settings(epochs=2).label

    files = {a.path for a in client.list_artifacts(coreset.info.run_id)}
    assert {"seed_losses.npy", "selected_indices.npy", "selection.csv", "selection.png"} <= files
    local = mlflow.artifacts.download_artifacts(run_id=coreset.info.run_id, dst_path=str(tmp_path / "dl"))
    selected = np.load(f"{local}/selected_indices.npy")
    assert selected.dtype == np.int64 and len(np.unique(selected)) == 100
    assert np.load(f"{local}/seed_losses.npy").shape == (60000,)
    csv_lines = Path(local, "selection.csv").read_text().splitlines()
    assert csv_lines[0] == "index,role,probability,inclusion_probability,weight" and len(csv_lines) == 101
    rows = [line.split(",") for line in csv_lines[1:]]
    roles = [row[1] for row in rows]
    assert roles.count("seed") == 20 and roles.count("centre") == 20 and roles.count("sampled") == 60
    for _, role, p, q, w in rows:  # weight = 1 / inclusion probability; single-draw p only for sampled
        assert float(w) == pytest.approx(1 / float(q)) and (p != "") == (role == "sampled")
        assert 0 < float(q) <= 1 and (role == "sampled" or float(q) == 1)

    # one seed model per (dataset, k, seed), in the first method's run, with its own metrics
    experiment = [parent.info.experiment_id]
    models = {c.data.params["method"]: mlflow.search_logged_models(
        experiment_ids=experiment, filter_string=f"source_run_id='{c.info.run_id}'", output_format="list")
        for c in children}  # fmt: skip
    assert sorted(m.name for m in models["coreset"]) == ["final_model", "seed_model"]
    assert [m.name for m in models["random"]] == ["final_model"]
    random_run = next(c for c in children if c.data.params["method"] == "random")
    assert random_run.data.tags["altrack.seed_model_run"] == coreset.info.run_id
    by_name = {m.name: {x.key: x.value for x in m.metrics or []} for m in models["coreset"]}
    assert by_name["seed_model"]["seed_test_accuracy"] == metrics["seed_test_accuracy"]
    assert "test_accuracy" not in by_name["seed_model"]
    assert by_name["final_model"]["test_accuracy"] == metrics["test_accuracy"]
    reloaded = mlflow.pytorch.load_model(next(m for m in models["coreset"] if m.name == "final_model").model_uri)
    assert reloaded.head.out_features == 10


def test_report_rebuilds_from_mlflow(data_dir, mlflow_store, tmp_path):
    outcome = run_grid(_cfg(data_dir, None, methods=("random",), runs=2), progress=False)
    rows = rows_from_mlflow(outcome.parent_run_id)
    assert sorted((r.method, r.seed) for r in rows) == [("random", 0), ("random", 1)]
    accuracies = sorted(r.test_accuracy for r in rows)
    assert accuracies == pytest.approx(sorted(r.test_accuracy for r in outcome.rows))
    assert {r.run_id for r in rows} == {r.run_id for r in outcome.rows}
    paths = rebuild_report(outcome.parent_run_id, None, str(tmp_path / "rebuilt"))
    text = (tmp_path / "rebuilt" / report.TXT_NAME).read_text()
    assert "random" in text and " 2" in text
    assert (tmp_path / "rebuilt" / report.PNG_NAME) in paths
    assert rows_from_mlflow(experiment=tracking_name(outcome)) == rows
    again = run_grid(_cfg(data_dir, None, methods=("random",), runs=2), progress=False)  # reuses both
    rebuild_report(again.parent_run_id, None, str(tmp_path / "again"))
    assert "All 2 runs were reused" in (tmp_path / "again" / report.TXT_NAME).read_text()


def tracking_name(outcome) -> str:
    client = MlflowClient()
    return client.get_experiment(client.get_run(outcome.parent_run_id).info.experiment_id).name


def test_failed_run_is_logged_failed_and_left_out_of_the_means(data_dir, mlflow_store, tmp_path):
    cfg = _cfg(data_dir, tmp_path, methods=("random",), settings=Settings(epochs=1, lr=1e30))
    outcome = run_grid(cfg, progress=False)
    [child] = _children(outcome.parent_run_id)
    assert child.info.status == "FAILED"
    assert "loss became" in child.data.tags["altrack.error"]
    text = (tmp_path / report.TXT_NAME).read_text()
    assert "1 run(s) failed and are left out of the means" in text


@pytest.mark.parametrize("weighted", [False, True])
def test_replay_reproduces_the_logged_accuracy_exactly(data_dir, mlflow_store, tmp_path, weighted):
    cfg = _cfg(data_dir, None, methods=("coreset",), settings=Settings(epochs=2, weighted=weighted))
    outcome = run_grid(cfg, progress=False)
    [child] = _children(outcome.parent_run_id)
    replayed = replay(child.info.run_id, data_dir=str(data_dir))
    assert replayed.equal
    assert replayed.replayed_accuracy == child.data.metrics["test_accuracy"]
    run = MlflowClient().get_run(replayed.replay_run_id)
    assert run.data.tags["altrack.replay_of"] == child.info.run_id
    assert run.data.metrics["replay_equal"] == 1.0


def test_paper_page_lists_the_table_the_parents_and_the_images(data_dir, mlflow_store, tmp_path):
    cfg = _cfg(data_dir, None, methods=("coreset", "kcenter", "random"), budgets=(100, 200), runs=2)
    outcome = run_grid(cfg, progress=False)
    page = paper_page([outcome.parent_run_id], None, str(tmp_path / "docs"), "## Notes\n\nchecked.")
    text = page.read_text()
    assert outcome.parent_run_id in text and "## Notes" in text
    assert "![learning curves](reproduction_curves.png)" in text
    assert (tmp_path / "docs" / "reproduction_curves.png").exists()
    assert "| mnist | 100 | coreset | random | 2 |" in text


def test_a_random_run_is_grouped_with_the_coreset_runs_of_its_grid_whatever_their_lam(data_dir, mlflow_store):
    """A random run does not log lam (it ignores it), yet the report reads it back under the
    grid's setting, lam=0.5, not under the default: the setting travels as a tag."""
    settings = Settings(epochs=1, lam=0.5, seed_ratio=0.85, cluster_ratio=0.1)
    outcome = run_grid(_cfg(data_dir, None, settings=settings), progress=False)
    rows = rows_from_mlflow(outcome.parent_run_id)
    assert sorted(r.method for r in rows) == ["coreset", "random"]
    assert {r.setting for r in rows} == {settings.label}
    random = next(c for c in _children(outcome.parent_run_id) if c.data.params["method"] == "random")
    assert "lam" not in random.data.params
    assert Settings.from_params(random.data.params).seed_ratio == 0.85  # a valid Settings, read back


def test_paper_page_compares_a_tuned_setting_with_the_papers_paired_by_seed(data_dir, mlflow_store, tmp_path):
    grid = run_grid(_cfg(data_dir, None, methods=("random",)), progress=False)
    fresh = dict(methods=("coreset",), runs=2, seed=100)
    paper = run_grid(_cfg(data_dir, None, **fresh), progress=False)
    tuned_settings = Settings(epochs=2, seed_ratio=0.1, cluster_ratio=0.3, lam=0.01)
    tuned = run_grid(_cfg(data_dir, None, settings=tuned_settings, **fresh), progress=False)
    ids = [paper.parent_run_id, tuned.parent_run_id]
    text = paper_page([grid.parent_run_id], None, str(tmp_path / "docs"), None, ids).read_text()

    acc = {(r.setting, r.seed): r.test_accuracy for r in paper.rows + tuned.rows}
    label = "seed_ratio=0.1 cluster_ratio=0.3 lam=0.01 epochs=2"  # the knobs off their defaults, all named
    assert label == tuned_settings.label
    papers = "seed_ratio=0.2 cluster_ratio=0.2 lam=auto epochs=2"  # compared under the same other knobs
    diff = np.mean([acc[(label, s)] - acc[(papers, s)] for s in (100, 101)])
    assert f"| MNIST | 100 | `coreset`: `{label}` − the paper's | 2 | {diff:+.4f}" in text
    assert "| mnist | 100 | coreset |" not in text  # the fresh-seed runs stay out of the paper's tables
    assert all(parent in text for parent in [grid.parent_run_id, *ids])
    with pytest.raises(AltrackError, match="is not the parent run of an 'altrack sweep'"):
        paper_page([grid.parent_run_id], None, str(tmp_path / "docs"), None, sweep_ids=[grid.parent_run_id])


def test_paper_page_carries_the_lambda_ablation_paired_by_seed(data_dir, mlflow_store, tmp_path):
    base = dict(runs=2, settings=Settings(epochs=1))
    auto = run_grid(_cfg(data_dir, None, methods=("coreset", "random"), budgets=(100, 200), **base), progress=False)
    zero = run_grid(_cfg(data_dir, None, methods=("coreset",), **{**base, "settings": Settings(epochs=1, lam=0.0)}),
                    progress=False)  # fmt: skip
    ids = [auto.parent_run_id, zero.parent_run_id]
    text = paper_page([auto.parent_run_id], None, str(tmp_path / "docs"), None, ablation_ids=ids).read_text()
    assert "## λ ablation: what the distance term does" in text
    acc = {(r.method, label_knobs(r.setting)["lam"], r.seed): r.test_accuracy
           for r in auto.rows + zero.rows if r.budget == 100}  # fmt: skip
    diff = np.mean([acc[("coreset", "auto", s)] - acc[("coreset", "0", s)] for s in (0, 1)])
    assert f"| MNIST | 100 | `coreset` λ = `auto` − λ = 0 | 2 | {diff:+.4f}" in text
    assert "| MNIST | 100 | `0` |" in text and "| MNIST | 100 | `random` |" in text
    assert "| MNIST | 200 | `auto` |" not in text  # no other lam ran at k = 200: not an ablation budget
    assert all(parent in text for parent in ids)


@pytest.mark.slow
def test_child_runs_start_with_their_work_and_log_each_epoch_as_it_ends(data_dir, tmp_path):
    """The UI can watch a run train: its child is RUNNING before the grid ends, and loss/train
    has one point per epoch with increasing timestamps."""
    uri = f"sqlite:///{tmp_path / 'live.db'}"
    env = {**os.environ, "ALTRACK_DATA_DIR": str(data_dir), "MLFLOW_TRACKING_URI": uri}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "altrack", "run", "--methods", "random", "--budget", "1000", "--epochs", "25",
               "--no-log-models", "--quiet", "--experiment", "live", "--out", "out"]  # fmt: skip
    client = MlflowClient(uri)
    client.search_experiments()  # the store exists before this test's polling meets the grid's first touch
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen_running = False
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("live") if (tmp_path / "live.db").exists() else None
        if experiment is not None:
            query = "tags.`altrack.kind` = 'protocol' and attributes.status = 'RUNNING'"
            seen_running = seen_running or bool(client.search_runs([experiment.experiment_id], query))
        time.sleep(0.3)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-2000:]
    assert seen_running, "the child run appeared only after its work was done"
    experiment = client.get_experiment_by_name("live")
    [child] = client.search_runs([experiment.experiment_id], "tags.`altrack.kind` = 'protocol'")
    history = sorted(client.get_metric_history(child.info.run_id, "loss/train"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(25))
    stamps = [m.timestamp for m in history]
    assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False))


def test_live_losses_are_held_for_a_period_then_reach_every_run_of_their_seed(mlflow_store, monkeypatch):
    """Epoch points go out at most once a PERIOD per run, each with its own step and time, and at
    a model's last epoch; a seed model's to every run of its seed, a final model's to its own
    run; flush sends the rest. Sends go to ``post``, here a list run by hand, as a grid's thread
    would run them."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    keys = [RunKey("mnist", "random", 100, 0), RunKey("mnist", "kcenter", 100, 0), RunKey("mnist", "random", 100, 1)]
    runs = {key: client.create_run(experiment_id).info.run_id for key in keys}

    def history(key: RunKey, name: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(runs[key], name))

    monkeypatch.setattr(LiveLosses, "PERIOD", 3600.0)
    posted = []

    def run_posted() -> None:
        while posted:
            posted.pop(0)()

    live = LiveLosses(runs, epochs=10, post=posted.append)
    for epoch in range(3):
        live(0, epoch, 1.0 - epoch / 10)
        live(keys[2], epoch, 2.0 + epoch)
    run_posted()
    assert history(keys[0], SEED_TRAIN_LOSS_METRIC) == [] and history(keys[2], TRAIN_LOSS_METRIC) == []
    live.flush()
    run_posted()
    for key in keys[:2]:
        assert history(key, SEED_TRAIN_LOSS_METRIC) == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert history(keys[2], SEED_TRAIN_LOSS_METRIC) == []
    assert history(keys[2], TRAIN_LOSS_METRIC) == [(0, 2.0), (1, 3.0), (2, 4.0)]
    monkeypatch.setattr(LiveLosses, "PERIOD", 0.0)  # a period has passed: the next point goes out with no flush
    live(keys[2], 3, 5.0)
    run_posted()
    assert history(keys[2], TRAIN_LOSS_METRIC)[-1] == (3, 5.0)
    monkeypatch.setattr(LiveLosses, "PERIOD", 3600.0)
    live(keys[0], 8, 0.5)
    live(keys[0], 9, 0.4)  # the last epoch: the curve is complete, it goes out now
    run_posted()
    assert history(keys[0], TRAIN_LOSS_METRIC) == [(8, 0.5), (9, 0.4)]


def test_system_metrics_are_sampled_into_the_parent(data_dir, mlflow_store, tmp_path, monkeypatch):
    pytest.importorskip("psutil", reason="psutil (the test extra) samples the system metrics")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    # MLflow logs nothing of a grid shorter than one sampling interval: the 2-epoch grid took under
    # half a second in CI on fd97145, so this one trains 300 epochs (seconds)
    cfg = _cfg(data_dir, None, methods=("random",), system_metrics=True, settings=Settings(epochs=300))
    outcome = run_grid(cfg, progress=False)
    metrics = MlflowClient().get_run(outcome.parent_run_id).data.metrics
    assert any(name.startswith("system/cpu") for name in metrics), sorted(metrics)
    assert any(name.startswith("system/system_memory") for name in metrics), sorted(metrics)


def test_a_dead_runs_half_logged_models_are_marked_failed(mlflow_store):
    """SIGKILL during a model upload leaves it PENDING; the next invocation closes the run and
    fails the model, so the Models tab does not show it uploading for ever."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = worker_id().rsplit(":", 1)[0] + f":{dead.pid}"
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    run = client.create_run(experiment_id, tags={"altrack.worker": owner})
    model = client.create_logged_model(experiment_id=experiment_id, name="final_model", source_run_id=run.info.run_id)
    assert model.status == LoggedModelStatus.PENDING
    assert close_dead_runs(experiment_id) == 1
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_logged_model(model.model_id).status == LoggedModelStatus.FAILED


def test_killing_a_run_tree_fails_the_models_it_was_uploading(mlflow_store):
    """A stopped worker's or a cancelled task's runs are ended KILLED by whoever stops them (not
    by a later ``close_dead_runs``, which only sees RUNNING runs): their PENDING models fail too."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    parent = client.create_run(experiment_id, tags={WORKER_TAG: worker_id()})
    child = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id, WORKER_TAG: worker_id()})
    models = [client.create_logged_model(experiment_id=experiment_id, name="final_model", source_run_id=run.info.run_id)
              for run in (parent, child)]  # fmt: skip
    kill_run_tree(client, parent.info.run_id, "stopped")
    for run in (parent, child):
        info = client.get_run(run.info.run_id)
        assert info.info.status == "KILLED" and info.data.tags[ERROR_TAG] == "stopped"
    assert [client.get_logged_model(m.model_id).status for m in models] == [LoggedModelStatus.FAILED] * 2


def test_ctrl_c_mid_upload_ends_the_run_killed_and_its_model_failed(mlflow_store):
    """A KeyboardInterrupt while a model uploads: MLflow leaves the model PENDING (it fails one on
    an Exception only); ``killed_on_interrupt`` ends the run KILLED and the model FAILED."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    with pytest.raises(KeyboardInterrupt), mlflow.start_run() as run, killed_on_interrupt():
        model = client.create_logged_model(experiment_id=experiment_id, name="final_model",
                                           source_run_id=run.info.run_id)  # fmt: skip
        raise KeyboardInterrupt
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert client.get_logged_model(model.model_id).status == LoggedModelStatus.FAILED


def test_no_resume_reruns_what_an_earlier_invocation_finished(data_dir, mlflow_store):
    """Claims leave a run FINISHED by an earlier invocation alone only when resuming."""
    first = run_grid(_cfg(data_dir, None, methods=("random",)), progress=False)
    again = run_grid(_cfg(data_dir, None, methods=("random",)), progress=False)
    fresh = run_grid(_cfg(data_dir, None, methods=("random",), resume=False), progress=False)
    assert again.resumed == 1 and fresh.resumed == 0
    assert fresh.rows[0].run_id not in {first.rows[0].run_id}
    assert _children(fresh.parent_run_id)[0].info.status == "FINISHED"


def test_no_resume_waits_for_a_rivals_run_not_an_earlier_invocations(data_dir, mlflow_store):
    """Under --no-resume, a run a live rival claimed first is waited for until the rival finishes
    it; the same run FINISHED by an earlier invocation is not the answer (it was, at once)."""
    client = MlflowClient()
    first = run_grid(_cfg(data_dir, None, methods=("random",)), progress=False)
    old = client.get_run(first.rows[0].run_id)
    experiment_id = old.info.experiment_id
    rival_parent = client.create_run(experiment_id, tags={WORKER_TAG: worker_id()}).info  # a --no-resume grid's
    wanted = [(RunKey("mnist", "random", 100, 0), old.data.tags[HASH_TAG], old.data.tags[GROUP_TAG])]
    [rival] = claim_runs(rival_parent.run_id, experiment_id, wanted, {}, rival_parent.start_time).values()
    waiting = threading.Event()

    def finish_rival() -> None:  # once the grid waits, as the rival process would
        waiting.wait(120)
        time.sleep(0.5)
        client.log_batch(rival, params=[Param(k, str(v)) for k, v in
                                        {"dataset": "mnist", "method": "random", "budget": 100, "seed": 0}.items()],
                         metrics=[Metric(TEST_ACCURACY_METRIC, 0.5, 0, 0)])  # fmt: skip
        client.set_terminated(rival, "FINISHED")

    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("waiting for"):
            waiting.set()

    rival_thread = threading.Thread(target=finish_rival)
    rival_thread.start()
    try:
        again = run_grid(_cfg(data_dir, None, methods=("random",), resume=False), progress=False, say=say)
    finally:
        waiting.set()
        rival_thread.join()
    assert "waiting for 1 run another altrack process claimed first" in said, said
    assert [row.run_id for row in again.rows] == [rival] and again.resumed == 1
    assert client.get_run(again.parent_run_id).data.tags[RESUMED_TAG] == "1"  # what 'altrack report' reads


def _claim(experiment_id: str) -> dict:
    """Claim one run under a new RUNNING parent that this live process owns, as a grid would."""
    parent = MlflowClient().create_run(experiment_id, tags={WORKER_TAG: worker_id()}).info.run_id
    return claim_runs(parent, experiment_id, [(RunKey("mnist", "margin", 100, 0), "h", "g")], {})


def test_a_claim_made_after_a_rivals_win_loses_though_its_clock_is_behind(mlflow_store, monkeypatch):
    """MLflow stamps a run's start on the client, before its insert waits for SQLite's lock (or on
    another host's clock): a claim stamped a minute early but published after a rival won must
    lose, or both do the run (CI saw it with the oldest start winning)."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    first = _claim(experiment_id)
    assert len(first) == 1
    behind = int(time.time() * 1000) - 60_000
    monkeypatch.setattr("mlflow.tracking._tracking_service.client.get_current_time_millis", lambda: behind)
    assert _claim(experiment_id) == {}
    runs = client.search_runs([experiment_id], f"tags.`{HASH_TAG}` = 'h'")
    assert [r.info.run_id for r in runs] == list(first.values())  # the loser's claim is deleted
    assert runs[0].data.tags[TICKET_TAG] == "1"


@pytest.mark.parametrize("theirs, wins", [("0", False), ("5", True)])
def test_a_claim_waits_for_a_live_rival_still_choosing_its_ticket(mlflow_store, theirs, wins):
    """A rival published but not yet ticketed may have read the store before this claim existed:
    the claim waits for its ticket, then the lower ticket wins (this claim's is 1). Ignoring the
    rival fails the first case, deferring to it at once the second."""
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(mlflow_store).experiment_id
    tags = {HASH_TAG: "h", GROUP_TAG: "g", KIND_TAG: KIND_PROTOCOL, WORKER_TAG: worker_id()}
    later = int(time.time() * 1000) + 60_000  # its start says nothing: it may come from a clock ahead
    rival = client.create_run(experiment_id, start_time=later, tags=tags).info.run_id
    ticketing = threading.Timer(1.0, client.set_tag, (rival, TICKET_TAG, theirs))
    ticketing.start()
    try:
        won = _claim(experiment_id)
    finally:
        ticketing.join()
    assert len(won) == wins
    left = {r.info.run_id for r in client.search_runs([experiment_id], f"tags.`{HASH_TAG}` = 'h'")}
    assert left == {rival, *won.values()}  # a losing claim is deleted


def test_a_run_tagged_before_labels_named_every_knob_reads_its_knobs_from_its_params(mlflow_store):
    """Runs logged before 2026-12-07 tagged only the three knobs a sweep tunes: their other knobs
    off the default (here lr) come from their params, so a report keeps them apart from the
    default's runs, as it does for runs logged since."""
    from altrack.tracking.query import setting_of

    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 0.01, "seed_ratio": 0.2, "epochs": 10})
        mlflow.set_tag("altrack.setting", "seed_ratio=0.2 cluster_ratio=0.2 lam=auto")
    old = MlflowClient().get_run(run.info.run_id)
    assert setting_of(old) == "seed_ratio=0.2 cluster_ratio=0.2 lam=auto lr=0.01" == Settings(lr=0.01).label
    with mlflow.start_run() as run:
        mlflow.log_params({"lr": 0.01})
        mlflow.set_tag("altrack.setting", Settings(lr=0.01, epochs=3).label)  # a new tag is taken as it is
    assert setting_of(MlflowClient().get_run(run.info.run_id)) == Settings(lr=0.01, epochs=3).label

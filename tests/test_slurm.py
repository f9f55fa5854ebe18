"""Grids and sweeps on a real Slurm (munge, slurmctld, slurmd on this machine) logging to a real
``mlflow server`` on PostgreSQL, through the CLI as a user types it. Skips, saying why, where the
services cannot run (not root, packages missing); .ci/run installs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from contextlib import ExitStack, suppress

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import Unavailable, create_database, mlflow_server, postgres, slurm_cluster
from test_faults import _kill_group, _sigint_default, stopped_and_requeued
from test_sweep import TINY_SPEC

from altrack.tracking.runs import INTERRUPTED
from altrack.tracking.tags import (
    ERROR_TAG,
    HASH_TAG,
    KIND_PROTOCOL,
    KIND_TAG,
    KIND_TRIAL,
    MLFLOW_PARENT_RUN_ID,
    SLURM_ARRAY_TASK_TAG,
    SLURM_JOB_TAG,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    """PostgreSQL, an MLflow server on it, and a one-node Slurm; the environment a user would set."""
    folder = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        try:
            pg = stack.enter_context(postgres())
            server = stack.enter_context(mlflow_server(create_database(pg, "mlflow"), folder / "mlflow"))
            slurm_env = stack.enter_context(slurm_cluster(folder / "slurm"))
        except Unavailable as exc:
            pytest.skip(str(exc))
        env = {**os.environ, **slurm_env, "MLFLOW_TRACKING_URI": server, "ALTRACK_DATA_DIR": str(data_dir)}
        env.pop("MLFLOW_RUN_ID", None)
        yield {"env": env, "server": server, "pg": pg}


def altrack(cluster, tmp_path, *args, wait=True):
    command = [sys.executable, "-m", "altrack", *args]
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=cluster["env"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=cluster["env"], capture_output=True, text=True, timeout=600)


def protocol_runs(cluster, experiment):
    client = MlflowClient(cluster["server"])
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"tags.`{KIND_TAG}` = '{KIND_PROTOCOL}'", max_results=1000)


GRID = ["run", "--methods", "random", "--budget", "100", "--epochs", "1", "--no-log-models", "--quiet",
        "--executor", "slurm", "--cpus-per-task", "1", "--mem-gb", "2"]  # fmt: skip


def test_a_grid_runs_as_slurm_array_tasks_under_one_parent(cluster, tmp_path):
    done = altrack(cluster, tmp_path, *GRID, "--datasets", "mnist,fashion_mnist", "--runs", "2",
                   "--experiment", "slurm-grid", "--out", "out")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = protocol_runs(cluster, "slurm-grid")
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags[HASH_TAG] for r in runs}) == 4
    assert len({r.data.tags[MLFLOW_PARENT_RUN_ID] for r in runs}) == 1
    assert all(r.data.tags.get(SLURM_JOB_TAG) for r in runs)
    table = (tmp_path / "out" / "active_learning_results.txt").read_text()
    assert table.count("\n  random ") == 2 and "View run" not in done.stdout


def _logs(tmp_path, tail=1500):
    """The tail of each Slurm task log under ``tmp_path``: what a failing test should show."""
    return {p.name: p.read_text(errors="replace")[-tail:] for p in sorted(tmp_path.rglob("*_log.*"))}


def _squeue(cluster):
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=cluster["env"], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines())


def test_a_cancelled_task_is_rerun_alone_and_nothing_is_left_running(cluster, tmp_path):
    """Three array tasks one at a time; the second is cancelled while it trains. The launcher says
    so in one line and fails; the same command again runs only the missing run."""
    # 1000 epochs of 1,000 points (about 10 s of training), and the cancel once task 1 has claimed its
    # run: scancel's SIGTERM passes through submitit and its SIGKILL follows KillWait (2 s) later, so
    # the run must have more than that left. The 1-epoch task finished within a fixed 2 s wait after
    # squeue's RUNNING, and with 200 epochs the fused Adam finished within the KillWait (CI on e972dcd)
    args = [*GRID, "--datasets", "mnist", "--runs", "3", "--budget", "1000", "--epochs", "1000", "--stack", "1",
            "--array-parallelism", "1", "--experiment", "slurm-cancel", "--out", "out"]  # fmt: skip
    launcher = altrack(cluster, tmp_path, *args, wait=False)
    deadline = time.monotonic() + 300
    cancelled = None
    while cancelled is None and time.monotonic() < deadline and launcher.poll() is None:
        claimed = [r for r in protocol_runs(cluster, "slurm-cancel")
                   if r.info.status == "RUNNING" and r.data.tags.get(SLURM_ARRAY_TASK_TAG) == "1"]  # fmt: skip
        if claimed:
            cancelled = f"{claimed[0].data.tags[SLURM_JOB_TAG]}_1"
            subprocess.run(["scancel", cancelled], env=cluster["env"], check=True)
        time.sleep(0.3)
    assert cancelled is not None, "task 1 was never seen training"
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 1
    failures = [line for line in err.splitlines() if "failed" in line]
    assert any(cancelled in line and "left the queue" in line for line in failures), err[-2000:]
    assert "Traceback" not in err
    first = protocol_runs(cluster, "slurm-cancel")
    assert "RUNNING" not in {r.info.status for r in first}
    assert sum(r.info.status == "FINISHED" for r in first) == 2

    again = altrack(cluster, tmp_path, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing 2 finished runs" in again.stdout
    runs = protocol_runs(cluster, "slurm-cancel")
    finished = Counter(r.data.tags[HASH_TAG] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 3 and set(finished.values()) == {1}
    assert "RUNNING" not in {r.info.status for r in runs}


def test_ctrl_c_cancels_the_grids_slurm_tasks_and_ends_their_runs_killed(cluster, tmp_path, request):
    """SIGINT to a launcher waiting on Slurm: it cancels its job array (``--detach`` is the way to
    leave tasks running), waits for the tasks to leave the queue, and ends the runs they left
    KILLED, saying why, under a KILLED parent; one line, exit 130. Before, the tasks trained on
    under the KILLED parent and their runs stayed RUNNING until the next invocation."""
    args = [*GRID, "--datasets", "mnist", "--runs", "2", "--budget", "1000", "--epochs", "1000", "--stack", "1",
            "--experiment", "slurm-interrupt", "--out", "out"]  # fmt: skip
    launcher = subprocess.Popen([sys.executable, "-m", "altrack", *args], cwd=tmp_path, env=cluster["env"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_sigint_default)  # fmt: skip
    request.addfinalizer(lambda: _kill_group(launcher))
    deadline = time.monotonic() + 300
    claimed: list = []
    while not claimed and time.monotonic() < deadline and launcher.poll() is None:
        claimed = [r for r in protocol_runs(cluster, "slurm-interrupt") if r.info.status == "RUNNING"]
        time.sleep(0.3)
    assert claimed, "no task was seen training"
    job = claimed[0].data.tags[SLURM_JOB_TAG]
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and err.strip().endswith("altrack: interrupted"), err[-2000:]
    assert f"cancelling Slurm job {job}" in err and "Traceback" not in err
    assert not [task for task in _squeue(cluster) if task.startswith(f"{job}_")]
    runs = protocol_runs(cluster, "slurm-interrupt")
    assert "RUNNING" not in {r.info.status for r in runs}, _logs(tmp_path)
    assert claimed[0].info.run_id in {r.info.run_id for r in runs if r.info.status == "KILLED"}
    assert {r.data.tags[ERROR_TAG] for r in runs if r.info.status == "KILLED"} == {INTERRUPTED}
    parent = MlflowClient(cluster["server"]).get_run(claimed[0].data.tags[MLFLOW_PARENT_RUN_ID])
    assert parent.info.status == "KILLED"


def test_a_requeued_task_does_the_runs_its_killed_attempt_claimed(cluster, tmp_path):
    """Slurm requeues a task while it trains (``scontrol requeue``, as after a node failure): the
    killed attempt leaves its claimed run RUNNING under a job id squeue still lists. The second
    attempt must take that run over, not wait on it nor leave it, and the grid ends complete."""
    # 1000 epochs (about 10 s of training): the kill must land while the task trains; with 40, and
    # then with 200 once Adam was fused, this CPU finished the run within the 2 s between Slurm's
    # SIGTERM (which submitit lets pass) and its SIGKILL
    args = [*GRID, "--datasets", "mnist", "--runs", "1", "--budget", "1000", "--epochs", "1000", "--stack", "1",
            "--experiment", "slurm-requeue", "--out", "out"]  # fmt: skip
    launcher = altrack(cluster, tmp_path, *args, wait=False)
    deadline = time.monotonic() + 300
    requeued = None
    while requeued is None and time.monotonic() < deadline and launcher.poll() is None:
        claimed = [r for r in protocol_runs(cluster, "slurm-requeue") if r.info.status == "RUNNING"]
        if claimed:
            requeued = claimed[0].data.tags[SLURM_JOB_TAG]
            task = claimed[0].data.tags.get(SLURM_ARRAY_TASK_TAG)
            subprocess.run(["scontrol", "requeue", f"{requeued}_{task}" if task else requeued],
                           env=cluster["env"], check=True)  # fmt: skip
        time.sleep(0.3)
    assert requeued is not None, "no run was ever seen RUNNING"
    _, err = launcher.communicate(timeout=400)
    assert launcher.returncode == 0, err[-3000:]
    runs = protocol_runs(cluster, "slurm-requeue")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["slurm.restart_count"] == "1", [
        (r.info.status, r.data.tags.get("slurm.restart_count")) for r in runs]  # fmt: skip
    assert "RUNNING" not in {r.info.status for r in runs}
    assert (tmp_path / "out" / "active_learning_results.txt").read_text().count("\n  random ") == 1


def test_a_sweep_runs_its_workers_as_slurm_jobs_on_postgres(cluster, tmp_path):
    storage = create_database(cluster["pg"], "optuna_slurm")
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(TINY_SPEC.replace("study_name: tiny", "study_name: on-slurm")))
    done = altrack(cluster, tmp_path, "sweep", str(spec), "--storage", storage, "--executor", "slurm",
                   "--workers", "2", "--n-trials", "4", "--cpus-per-task", "1", "--mem-gb", "2",
                   "--experiment", "slurm-sweep")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="on-slurm", storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4


def test_ctrl_c_cancels_a_slurm_sweep_whose_workers_re_queue_their_trials(cluster, tmp_path, request):
    """SIGINT to a sweep launcher waiting on two Slurm workers: it cancels their job array, and
    each worker takes the SIGTERM as its Ctrl-C (submitit's own handler ignored it until Slurm's
    SIGKILL): its trial ends FAIL marked interrupted, its point waits in the study, and its run
    ends KILLED, saying why. Before, the trials stayed RUNNING for the heartbeat to fail them
    later, as failures that count toward the study's limit."""
    storage = create_database(cluster["pg"], "optuna_interrupt")
    spec = tmp_path / "spec.yaml"
    spec.write_text(TINY_SPEC.replace("study_name: tiny", "study_name: stopped").replace("epochs: 1", "epochs: 20000"))
    command = [sys.executable, "-m", "altrack", "sweep", str(spec), "--storage", storage, "--executor", "slurm",
               "--workers", "2", "--n-trials", "4", "--cpus-per-task", "1", "--mem-gb", "2",
               "--experiment", "slurm-sweep-interrupt"]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=tmp_path, env=cluster["env"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                preexec_fn=_sigint_default)  # fmt: skip
    request.addfinalizer(lambda: _kill_group(launcher))
    deadline = time.monotonic() + 300
    running: list = []
    while not running and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(1)
        with suppress(Exception):  # the study may not exist yet
            running = optuna.load_study(study_name="stopped", storage=storage).get_trials(states=(TrialState.RUNNING,))
    assert running, "no trial started"
    time.sleep(3)
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 130 and err.strip().endswith("altrack: interrupted"), err[-2000:]
    assert "cancelling Slurm job" in err and "Traceback" not in err
    study = optuna.load_study(study_name="stopped", storage=storage)
    stopped_and_requeued(study, running[0].number, _logs(tmp_path))
    client = MlflowClient(cluster["server"])
    experiment = client.get_experiment_by_name("slurm-sweep-interrupt").experiment_id
    trials = client.search_runs([experiment], f"tags.`{KIND_TAG}` = '{KIND_TRIAL}'")
    assert trials and {(t.info.status, t.data.tags[ERROR_TAG]) for t in trials} == {("KILLED", INTERRUPTED)}


def test_a_task_plans_with_its_jobs_memory_where_slurm_holds_it_without_cgroups(cluster, tmp_path):
    """This cluster puts no job in a memory cgroup (``TaskPlugin=task/none``), so a task there
    reads no cgroup limit: it must still plan its stacks within its job's --mem, not with the
    host's memory, which a cluster that enforces --mem from its accounting would kill it for."""
    script = tmp_path / "free.py"  # a batch job, as submitit submits altrack's tasks
    script.write_text("import torch\nfrom altrack.resources import free_memory, host_available\n"
                      "print(free_memory(torch.device('cpu')), host_available())\n")  # fmt: skip
    out = tmp_path / "free.out"
    done = subprocess.run(["sbatch", "--wait", "--mem=1024M", "--cpus-per-task=1", "--output", str(out),
                           "--wrap", f"{sys.executable} {script}"], cwd=tmp_path, env=cluster["env"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:] + (out.read_text()[-3000:] if out.exists() else "")
    free, host = (int(word) for word in out.read_text().split()[-2:])
    assert free < 1 << 30 < host  # the job's GiB less what the task holds, not the host's


def test_a_partition_slurm_does_not_know_is_refused_before_anything_is_written(cluster, tmp_path):
    before = _squeue(cluster)
    done = altrack(cluster, tmp_path, *GRID, "--partition", "nowhere", "--experiment", "slurm-refused")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "partition" in done.stderr.lower(), done.stderr
    assert _squeue(cluster) == before
    assert MlflowClient(cluster["server"]).get_experiment_by_name("slurm-refused") is None


@pytest.mark.parametrize(
    ("extra", "executor_file", "message"),
    [
        ((), None, "needs a shared MLflow tracking server"),
        (("--executor", "nomad"), None, "'nomad' is not one of"),
        ((), "partition: [debug\n", "executor file"),
        ((), "array_parallelism: 0\n", "--array-parallelism (array_parallelism) must be >= 1"),
        ((), "colour: blue\n", "unknown Slurm setting 'colour'"),
        # a CPU job's stacks are checked against a quarter of its --mem-gb, not the launcher's memory
        (("--datasets", "cifar10", "--mem-gb", "0.3"), None, "cannot hold one cifar10 model (about"),
        # less what a task holds before it trains: torch and CIFAR-10, about 1.7 GiB of the 1.5
        (("--datasets", "cifar10", "--mem-gb", "1.5"), None, "leaves once a task holds torch and the data"),
        # a task of three blocks may hold all three datasets (about 2.1 GiB): 2.3 GiB leaves a CifarNet
        # too little, though a task of CIFAR-10 alone (1.7 GiB) would fit
        (("--datasets", "mnist,fashion_mnist,cifar10", "--mem-gb", "2.3", "--blocks-per-task", "3"), None,
         "cannot hold one cifar10 model"),
    ],
)
def test_bad_slurm_input_is_refused_in_one_line(tmp_path, data_dir, extra, executor_file, message):
    """No Slurm needed: these are refused before sbatch is asked anything."""
    db = tmp_path / "mlflow.db"
    args = [*GRID, *extra]
    if executor_file is not None:
        (tmp_path / "slurm.yaml").write_text(executor_file)
        args += ["--executor-config", str(tmp_path / "slurm.yaml")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "ALTRACK_DATA_DIR": str(data_dir)}
    done = subprocess.run([sys.executable, "-m", "altrack", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not db.exists()


def test_a_detached_grid_is_collected_later_by_report(cluster, tmp_path):
    done = altrack(cluster, tmp_path, *GRID, "--datasets", "mnist", "--runs", "2", "--detach",
                   "--experiment", "slurm-detach")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parent_id = done.stdout.strip().splitlines()[-1].split()[-1]
    client = MlflowClient(cluster["server"])
    assert client.get_run(parent_id).info.status == "RUNNING"
    deadline = time.monotonic() + 300
    while _squeue(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    collected = altrack(cluster, tmp_path, "report", "--run-id", parent_id, "--out", "later")
    assert collected.returncode == 0, collected.stderr[-3000:]
    assert (tmp_path / "later" / "active_learning_results.txt").read_text().count("\n  random ") == 1
    runs = protocol_runs(cluster, "slurm-detach")
    why = [collected.stderr[-2000:], [(r.info.status, r.data.tags.get(ERROR_TAG)) for r in runs], _logs(tmp_path)]
    assert client.get_run(parent_id).info.status == "FINISHED", why
    assert len(runs) == 2

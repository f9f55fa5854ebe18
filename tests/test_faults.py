"""Faults and hostile input, as a user or an attacker would cause them: real processes, real
signals, real journal files and stores, ``unshare`` for another hostname (skipping, with the
reason, where it is not permitted)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from services import Unavailable, mlflow_server
from test_sweep import TINY_SPEC, _spec

from altrack.liveness import clean_stale_temp_dirs, temp_dir
from altrack.redaction import redact
from altrack.tracking.runs import INTERRUPTED, close_dead_runs
from altrack.tracking.tags import INTERRUPTED_ATTR, TRIAL_NUMBER_TAG, WORKER_ATTR


def _env(data_dir, tmp_path, **extra):
    env = {**os.environ, "ALTRACK_DATA_DIR": str(data_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}",
           "ALTRACK_CACHE_DIR": str(tmp_path / "cache"), **extra}  # fmt: skip
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _altrack(*args, env, cwd, timeout=300):
    command = [sys.executable, "-m", "altrack", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _journal(path):
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://alice:S3cretPW@127.0.0.1:9", "http://alice:***@127.0.0.1:9"),
        ("postgresql://host/db?user=alice&password=S3cretPW", "postgresql://host/db?user=alice&password=***"),
        ("--storage 'mysql://u:p@h/d?token=abc&x=1'", "--storage 'mysql://u:***@h/d?token=***&x=1'"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ],
)
def test_secrets_are_redacted(text, expected):
    assert redact(text) == expected


@pytest.mark.slow
@pytest.mark.parametrize(
    "uri",
    ["http://alice:S3cretPW@127.0.0.1:9", "postgresql://alice:S3cretPW@127.0.0.1:1/mlflow",
     "postgresql://127.0.0.1:1/mlflow?user=alice&password=S3cretPW"],
)  # fmt: skip
def test_an_unreachable_store_fails_fast_in_one_line_without_its_password(uri, data_dir, tmp_path):
    start = time.monotonic()
    done = _altrack("run", "--budget", "100", "--epochs", "1", "--methods", "random",
                    env=_env(data_dir, tmp_path, MLFLOW_TRACKING_URI=uri), cwd=tmp_path)  # fmt: skip
    assert time.monotonic() - start < 30  # MLflow alone retries a database for about 100 s
    assert done.returncode in (1, 2)
    assert done.stderr.count("\n") == 1 and "unreachable" in done.stderr, done.stderr
    assert "S3cretPW" not in done.stderr + done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--storage", "sqlite:////nonexistent/x.db"], "does not exist or is not writable"),
        (["--storage", "postgresql://alice:S3cretPW@127.0.0.1:1/optuna"], "is unreachable"),
        (["--storage", "/nonexistent/x.journal"], "not a file in an existing folder"),
        (["--storage", "FILE"], "Optuna storage FILE: this file is not an Optuna journal"),
        (["--storage", "redis://localhost/0"], "Optuna storage redis://localhost/0: not a database URL this install"),
        (["--cache-dir", "FILE"], "--cache-dir 'FILE' is not a writable directory"),
    ],
)
def test_bad_sweep_stores_are_refused_in_one_line_before_anything_is_written(args, message, data_dir, tmp_path):
    spec = _spec(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "FILE").write_text("a file")
    done = _altrack("sweep", str(spec), *args, env=_env(data_dir, work, MLFLOW_TRACKING_URI="sqlite:///m.db"),
                    cwd=work)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert "S3cretPW" not in done.stderr
    assert sorted(p.name for p in work.iterdir()) == ["FILE"]


@pytest.mark.slow
def test_a_sweep_whose_tracking_store_is_unreachable_writes_no_journal(data_dir, tmp_path):
    done = _altrack("sweep", str(_spec(tmp_path)), env=_env(data_dir, tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:9"),
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "http://127.0.0.1:9 is unreachable" in done.stderr, done.stderr
    assert not (tmp_path / "altrack-optuna.journal").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uri", "message"),
    [("http://127.0.0.1:9", "http://127.0.0.1:9 is unreachable"),
     ("sqlite:////nonexistent/x.db", "the folder /nonexistent does not exist")],
)  # fmt: skip
@pytest.mark.parametrize("args", [["--run-id", "abc"], ["--experiment", "altrack"]])
def test_a_report_from_an_unreachable_store_fails_fast_in_one_line(uri, message, args, data_dir, tmp_path):
    """MLflow retries an HTTP server for minutes and creates a SQLite file's folders: a report
    checks the store first, as run, sweep and replay do."""
    start = time.monotonic()
    done = _altrack("report", *args, env=_env(data_dir, tmp_path, MLFLOW_TRACKING_URI=uri), cwd=tmp_path)
    assert time.monotonic() - start < 30
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert not Path("/nonexistent").exists()


@pytest.mark.slow
def test_a_study_refuses_another_spec_under_its_name_unless_asked(data_dir, tmp_path):
    env = _env(data_dir, tmp_path)
    journal = tmp_path / "study.journal"
    first = _altrack("sweep", str(_spec(tmp_path)), "--n-trials", "1", "--storage", str(journal), env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    edited = _spec(tmp_path, TINY_SPEC.replace("budget: 100", "budget: 200"), "edited.yaml")
    again = _altrack("sweep", str(edited), "--n-trials", "1", "--storage", str(journal), env=env, cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.count("\n") == 1
    assert "study 'tiny' was made from another spec (budget: 100 then, 200 now)" in again.stderr
    fresh = _altrack("sweep", str(edited), "--n-trials", "1", "--storage", str(journal), "--new-study",
                     env=env, cwd=tmp_path)  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "study tiny-2:" in fresh.stdout
    # the same command again resumes tiny-2 (it made tiny-3, and never went on in tiny-2); the
    # first spec still goes on in tiny itself
    resumed = _altrack("sweep", str(edited), "--n-trials", "2", "--storage", str(journal), "--new-study",
                       env=env, cwd=tmp_path)  # fmt: skip
    assert resumed.returncode == 0 and "study tiny-2:" in resumed.stdout, resumed.stderr[-2000:]
    names = {s.study_name for s in optuna.get_all_study_summaries(_journal(journal))}
    assert names == {"tiny", "tiny-2"}
    study = optuna.load_study(study_name="tiny-2", storage=_journal(journal))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    original = _altrack("sweep", str(_spec(tmp_path)), "--n-trials", "1", "--storage", str(journal), "--new-study",
                        env=env, cwd=tmp_path)  # fmt: skip
    assert original.returncode == 0 and "study tiny:" in original.stdout, original.stderr[-2000:]


@pytest.mark.slow
def test_a_trial_whose_worker_died_before_tagging_it_is_retried_not_waited_for(data_dir, tmp_path):
    """A RUNNING trial with no owner (the worker died between Optuna creating it and altrack
    tagging it) used to count toward n_trials for ever; it is dead once the grace period passes."""
    journal = tmp_path / "study.journal"
    study = optuna.create_study(study_name="tiny", storage=_journal(journal), direction="maximize")
    study.ask()  # RUNNING, untagged, its worker gone
    env = _env(data_dir, tmp_path, ALTRACK_LIVENESS_GRACE="3")
    done = _altrack("sweep", str(_spec(tmp_path)), "--n-trials", "2", "--storage", str(journal),
                    env=env, cwd=tmp_path, timeout=150)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    states = [t.state for t in optuna.load_study(study_name="tiny", storage=_journal(journal)).trials]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states


@pytest.mark.slow
def test_a_worker_killed_under_another_hostname_does_not_hang_the_rerun(data_dir, tmp_path):
    """The pod-restart case: a worker ran under hostname pod-a and was SIGKILLed mid-trial; its
    pid means nothing here, so only its silent heartbeat can tell it dead."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --uts is not permitted here: {probe.stderr.strip()}")
    journal = tmp_path / "study.journal"
    spec = _spec(tmp_path, TINY_SPEC.replace("epochs: 1", "epochs: 30"))
    env = _env(data_dir, tmp_path, ALTRACK_LIVENESS_GRACE="6")
    inner = f"hostname pod-a; exec {sys.executable} -m altrack sweep {spec} --n-trials 2 --storage {journal}"
    pod = subprocess.Popen(["unshare", "--uts", "sh", "-c", inner], env=env, cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            running = optuna.load_study(study_name="tiny", storage=_journal(journal)).get_trials(
                states=(TrialState.RUNNING,)
            )
        except KeyError:  # the study is not created yet
            running = []
        if any(str(t.user_attrs.get(WORKER_ATTR, "")).startswith("pod-a:") for t in running):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the pod never started a trial")
    os.killpg(pod.pid, signal.SIGKILL)
    pod.wait()
    rerun_spec = _spec(tmp_path, TINY_SPEC.replace("epochs: 1", "epochs: 30"), "rerun.yaml")
    done = _altrack("sweep", str(rerun_spec), "--n-trials", "2", "--storage", str(journal), env=env, cwd=tmp_path,
                    timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="tiny", storage=_journal(journal))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert not study.get_trials(states=(TrialState.RUNNING,))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _left_alive(pids: list[int], within: float) -> list[str]:
    """The command lines of ``pids`` still alive after up to ``within`` seconds. A process the
    parent has stopped may still be tearing down when the parent exits (its memory released,
    ``/proc`` showing it without a command line, not yet a zombie), and the resource tracker ends
    only when it reads the parent's end of its pipe: both go on their own within moments."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.25)
    return [_cmdline(p)[:200] or f"pid {p}" for p in pids if _alive(p)]


def _sigkill_leaves_no_workers(proc: subprocess.Popen) -> bool:
    """Wait for ``proc``'s two worker processes, let them work, SIGKILL ``proc``; whether every
    worker is gone 15 s later. Workers that finished before the kill would prove nothing, so they
    must still be alive when it lands."""
    deadline = time.monotonic() + 120
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = [p for p in _children(proc.pid) if "resource_tracker import main" not in _cmdline(p)]
        time.sleep(0.5)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(3)  # they are training
    assert all(_alive(p) for p in workers), "a worker finished before the kill: train longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return not _left_alive(workers, within=15)


SLOW_MODULE = """
import os, pathlib, time
if os.environ.get("SLOW_IMPORT"):  # only in the spawned child: a torch-sized import
    pathlib.Path(os.environ["IMPORTING"]).touch()
    time.sleep(60)

def work():
    time.sleep(60)
"""

PARENT = """
import multiprocessing, os, sys, time
import slowmod
from altrack.liveness import tethered
os.environ["SLOW_IMPORT"] = "1"
target, args = tethered(slowmod.work) if sys.argv[1] == "tethered" else (slowmod.work, ())
child = multiprocessing.get_context("spawn").Process(target=target, args=args)
child.start()
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("how", ["tethered", "plain"])
def test_a_child_still_importing_its_target_dies_with_a_sigkilled_parent(tmp_path, how):
    """The parent is SIGKILLed while its spawned child is still importing the target's module
    (seconds of torch and MLflow on a loaded machine): a ``tethered`` child dies at once, a plain
    one (the control) lives on."""
    (tmp_path / "slowmod.py").write_text(SLOW_MODULE)
    importing = tmp_path / "importing"
    env = {**os.environ, "IMPORTING": str(importing), "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    with subprocess.Popen([sys.executable, "-c", PARENT, how], env=env, cwd=tmp_path, stdout=subprocess.PIPE) as parent:
        child = int(parent.stdout.readline())
        try:
            deadline = time.monotonic() + 60
            while not importing.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert importing.exists(), "the child never began importing its target"
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + 5
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _alive(child) == (how == "plain")
        finally:
            parent.kill()
            if _alive(child):
                os.kill(child, signal.SIGKILL)


def _sigint_default() -> None:
    """In the child before it execs: SIGINT's default action. A job started in the background by
    a shell without job control (CI's) ignores SIGINT, its children inherit that, and Python
    then never turns SIGINT into KeyboardInterrupt: a Ctrl-C test would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_group(proc: subprocess.Popen) -> None:
    """A failed test leaves no grid training on beside the next ones."""
    if proc.poll() is None:
        with suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "to"), [("1", "main"), ("2", "main"), ("2", "group")])
def test_ctrl_c_ends_the_grid_parent_killed_and_says_why(workers, to, data_dir, tmp_path, request):
    """SIGINT mid-grid, to the main process alone (``kill -INT``) or to its process group (a
    terminal's Ctrl-C; four blocks for two workers): the CLI exits 130 at once with one line, no
    traceback, and the parent ends KILLED with an ``altrack.error`` tag, as its runs do. MLflow's
    ``with start_run()`` ended it FAILED, untagged; the workers trained on to the end of their
    blocks, then took the next, while the main process waited for them."""
    env = _env(data_dir, tmp_path)
    command = [sys.executable, "-m", "altrack", "run", "--datasets", "mnist,fashion_mnist", "--runs", "2",
               "--methods", "random", "--budget", "500", "--epochs", "50000", "--workers", workers, "--quiet",
               "--no-log-models"]  # fmt: skip
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.search_experiments()  # the store made first: polled while the grid migrates it, it broke
    grid = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_sigint_default)  # fmt: skip
    request.addfinalizer(lambda: _kill_group(grid))

    def runs(query: str) -> list:
        return client.search_runs([e.experiment_id for e in client.search_experiments()], query)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # the grid's runs are claimed (RUNNING): it is training
        time.sleep(1)
        with suppress(Exception):
            if len(runs("attributes.status = 'RUNNING'")) >= 2:
                break
    time.sleep(2)
    workers_before = _children(grid.pid)
    if to == "group":
        os.killpg(grid.pid, signal.SIGINT)
    else:
        grid.send_signal(signal.SIGINT)
    stopped = time.monotonic()
    _, err = grid.communicate(timeout=60)
    assert time.monotonic() - stopped < 30, "it waited for the workers' blocks"
    assert grid.returncode == 130 and err.strip().endswith("altrack: interrupted"), err
    assert "Traceback" not in err and not _left_alive(workers_before, within=5), err
    parents = runs("tags.`altrack.kind` = 'grid'")
    assert [p.info.status for p in parents] == ["KILLED"], err
    assert "interrupted" in parents[0].data.tags["altrack.error"]
    assert {r.info.status for r in runs("tags.`altrack.kind` = 'protocol'")} == {"KILLED"}


@pytest.mark.slow
def test_workers_die_with_a_sigkilled_grid(data_dir, tmp_path):
    env = _env(data_dir, tmp_path)
    command = [sys.executable, "-m", "altrack", "run", "--datasets", "mnist,fashion_mnist", "--runs", "2",
               "--methods", "random", "--budget", "500", "--epochs", "20000", "--workers", "2", "--quiet",
               "--no-log-models"]  # fmt: skip
    grid = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _sigkill_leaves_no_workers(grid), "workers outlived their grid"


@pytest.mark.slow
def test_a_full_disk_for_the_report_is_one_line_and_leaves_no_half_written_file(data_dir, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(full)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        done = _altrack("run", "--methods", "random", "--budget", "100", "--epochs", "1", "--no-log-models",
                        "--quiet", "--out", str(full / "out"), env=_env(data_dir, tmp_path), cwd=tmp_path)  # fmt: skip
        assert done.returncode == 1
        ours = [line for line in done.stderr.splitlines() if line.startswith("altrack")]
        assert len(ours) == 1 and "cannot write the report to" in ours[0] and "Traceback" not in done.stderr
        assert "No space left on device" in done.stderr and "altrack report --run-id" in done.stderr
        left = list((full / "out").iterdir()) if (full / "out").exists() else []
        assert all(p.stat().st_size > 0 and not p.name.endswith(".partial") for p in left), left
    finally:
        subprocess.run(["umount", str(full)], capture_output=True)


def test_temp_folders_of_dead_owners_are_cleaned_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    namespace = os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    stale = Path(tempfile.gettempdir()) / f"altrack-{namespace}-{dead.pid}-run-x1"
    stale.mkdir()
    (stale / "selection.png").write_bytes(b"left by a SIGKILL")
    with temp_dir("run") as mine:
        assert clean_stale_temp_dirs() >= 1
        assert not stale.exists() and Path(mine).exists()


@pytest.mark.slow
def test_a_grid_in_another_pid_namespace_is_not_taken_for_dead(data_dir, tmp_path):
    """Same hostname, its own pid namespace (a container): its pid means nothing out here, so a
    process out here must not mark its RUNNING parent KILLED."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not permitted here: {probe.stderr.strip()}")
    env = _env(data_dir, tmp_path)
    # 2000 epochs (seconds of training, and killed once checked): the parent must still be RUNNING
    # after this test has found it and run close_dead_runs
    command = ["unshare", "--pid", "--fork", sys.executable, "-m", "altrack", "run", "--methods", "random",
               "--budget", "500", "--epochs", "2000", "--no-log-models", "--quiet", "--experiment", "ns"]  # fmt: skip
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    client.search_experiments()  # the store exists before this test's polling meets the grid's first touch
    grid = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    parent = None
    while parent is None and time.monotonic() < deadline and grid.poll() is None:
        experiment = client.get_experiment_by_name("ns") if (tmp_path / "m.db").exists() else None
        if experiment is not None:
            found = client.search_runs([experiment.experiment_id], "tags.`altrack.kind` = 'grid'")
            parent = found[0] if found else None
        time.sleep(0.3)
    assert parent is not None, "the namespaced grid never opened its parent"
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    assert close_dead_runs(parent.info.experiment_id) == 0  # its owner pid is not ours to judge
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    grid.kill()
    grid.wait()


def stopped_and_requeued(study: optuna.Study, seen_running: int, logs: object = None) -> list:
    """The trials a Ctrl-C stopped, checked: ``seen_running`` among them, none left RUNNING, each
    FAIL marked interrupted (outside the failure limit) with one waiting retry of its params."""
    stopped = [t for t in study.trials if t.state == TrialState.FAIL]
    assert seen_running in [t.number for t in stopped] and not study.get_trials(states=(TrialState.RUNNING,))
    assert all(t.user_attrs[INTERRUPTED_ATTR] for t in stopped), logs
    retry = {t.user_attrs["altrack.retry_of"]: t for t in study.trials if t.state == TrialState.WAITING}
    assert sorted(retry) == [t.number for t in stopped]
    assert all(retry[t.number].params == t.params for t in stopped)  # waiting with the same params
    return stopped


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_in_a_sweep_is_one_line_and_its_trial_is_tried_again(workers, data_dir, tmp_path, request):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-trial: no Optuna
    traceback, the workers stop, and the parent ends KILLED. Each stopped trial ends FAIL, marked
    interrupted (outside the failure limit), its point waits in the study at once (an enqueued
    retry), and its MLflow run ends KILLED, saying why. Before, one process lost the point for
    good, and two workers left their trials RUNNING under a dead owner until the next invocation,
    and before that trained on under the KILLED parent while the sweep waited for them."""
    journal = tmp_path / "study.journal"
    spec = _spec(tmp_path, TINY_SPEC.replace("epochs: 1", "epochs: 20000"))
    env = _env(data_dir, tmp_path)
    command = [sys.executable, "-m", "altrack", "sweep", str(spec), "--n-trials", "3", "--storage", str(journal),
               "--workers", workers]  # fmt: skip
    sweep = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, preexec_fn=_sigint_default)  # fmt: skip
    request.addfinalizer(lambda: _kill_group(sweep))
    deadline = time.monotonic() + 120
    running: list = []
    while time.monotonic() < deadline and not running:
        time.sleep(1)
        with suppress(Exception):
            study = optuna.load_study(study_name="tiny", storage=_journal(journal))
            running = study.get_trials(states=(TrialState.RUNNING,))
    assert running, "no trial started"
    time.sleep(3)
    workers_before = _children(sweep.pid)
    os.killpg(sweep.pid, signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "failed with" not in err and err.strip().endswith("altrack: interrupted"), err  # no Optuna lines
    left = _left_alive(workers_before, within=5)
    assert not left, left
    study = optuna.load_study(study_name="tiny", storage=_journal(journal))
    stopped = stopped_and_requeued(study, running[0].number)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("altrack").experiment_id
    parents = client.search_runs([experiment], "tags.`altrack.kind` = 'sweep'")
    assert [p.info.status for p in parents] == ["KILLED"] and "interrupted" in parents[0].data.tags["altrack.error"]
    trials = client.search_runs([experiment], "tags.`altrack.kind` = 'trial'")
    numbers = {t.data.tags[TRIAL_NUMBER_TAG] for t in trials}  # a trial stopped before its run opened has none
    assert str(running[0].number) in numbers and numbers <= {str(t.number) for t in stopped}
    assert {(t.info.status, t.data.tags["altrack.error"]) for t in trials} == {("KILLED", INTERRUPTED)}


@pytest.mark.slow
def test_a_sigkilled_sweep_leaves_no_workers_and_the_next_one_finishes_its_parent(data_dir, tmp_path):
    journal = tmp_path / "study.journal"
    spec = _spec(tmp_path, TINY_SPEC.replace("epochs: 1", "epochs: 40"))
    env = _env(data_dir, tmp_path)
    command = [sys.executable, "-m", "altrack", "sweep", str(spec), "--n-trials", "2", "--workers", "2",
               "--storage", str(journal)]  # fmt: skip
    sweep = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _sigkill_leaves_no_workers(sweep), "sweep workers went on alone"

    quick = _spec(tmp_path, TINY_SPEC.replace("epochs: 1", "epochs: 40"), "again.yaml")
    again = _altrack("sweep", str(quick), "--n-trials", "2", "--storage", str(journal),
                     env=_env(data_dir, tmp_path, ALTRACK_LIVENESS_GRACE="3"), cwd=tmp_path, timeout=400)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("altrack").experiment_id
    parents = client.search_runs([experiment], "tags.`altrack.kind` = 'sweep'")
    # the rerun goes on in the dead invocation's parent (the study remembers it) and ends it
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")


@pytest.mark.slow
def test_a_server_url_with_credentials_is_never_printed_nor_are_download_bars(data_dir, tmp_path):
    """Against a real ``mlflow server`` reached as ``http://alice:S3cretPW@…``, MLflow itself would
    print "View run … at: <that URL>" per run, and a progress bar per artifact download in
    ``replay`` and ``report``: altrack prints neither, nor the password anywhere."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server"))
        except Unavailable as exc:
            pytest.skip(str(exc))
        env = _env(data_dir, tmp_path, MLFLOW_TRACKING_URI=url.replace("http://", "http://alice:S3cretPW@"))
        ran = _altrack("run", "--methods", "random", "--budget", "100", "--epochs", "1", "--no-log-models",
                       "--experiment", "creds", "--out", "out", env=env, cwd=tmp_path)  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-2000:]
        parent = ran.stdout.strip().splitlines()[-1].split()[-1]
        child = MlflowClient(url).search_runs([MlflowClient(url).get_run(parent).info.experiment_id],
                                              f"tags.`mlflow.parentRunId` = '{parent}'")[0]  # fmt: skip
        replayed = _altrack("replay", child.info.run_id, env=env, cwd=tmp_path)
        reported = _altrack("report", "--run-id", parent, "--out", "again", env=env, cwd=tmp_path)
        for done in (ran, replayed, reported):
            text = done.stdout + done.stderr
            assert done.returncode == 0, text[-2000:]
            assert "S3cretPW" not in text and "View run" not in text and "Downloading artifacts" not in text, text
        assert (tmp_path / "again" / "active_learning_results.txt").exists()

"""altrack.stores on real SQLite files and real MLflow stores."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from contextlib import closing
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from altrack import stores
from altrack.tracking.runs import check_tracking_store


def _journal_mode(path: Path) -> str:
    with closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.fixture
def store_uri(tmp_path: Path):
    """A SQLite URL not created yet, made MLflow's tracking URI for the test."""
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(before)


def test_a_new_sqlite_store_is_created_with_a_write_ahead_log_and_works(store_uri, tmp_path):
    check_tracking_store()
    assert _journal_mode(tmp_path / "mlflow.db") == "wal"
    client = MlflowClient(store_uri)
    run = client.create_run(client.create_experiment("wal"))
    client.log_metric(run.info.run_id, "m", 0.5, step=3)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "m")] == [(3, 0.5)]


def test_an_existing_store_keeps_its_journal_mode(store_uri, tmp_path):
    MlflowClient(store_uri).search_experiments()  # MLflow alone creates it with a rollback journal
    check_tracking_store()
    assert _journal_mode(tmp_path / "mlflow.db") == "delete"


def test_a_store_on_a_network_filesystem_gets_no_write_ahead_log(store_uri, tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "filesystem_type", lambda path: "nfs4")
    assert not stores.start_in_wal(store_uri)
    assert not (tmp_path / "mlflow.db").exists()  # left for MLflow to create, as before


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
auto.data /data autofs rw 0 0
srv:/export/data /data nfs4 rw 0 0
/dev/vdb /data2 xfs rw 0 0
/dev/vdc /scratch\\040space\\011x btrfs rw 0 0
"""


@pytest.mark.parametrize(("path", "kind"), [
    ("/home/me/mlflow.db", "ext4"),  # only the root holds it
    ("/data/runs", "nfs4"),  # NFS mounted over an autofs point: the last listed, as the kernel does
    ("/data2/runs", "xfs"),  # /data is not a prefix of /data2
    ("/scratch space\tx/db", "btrfs"),  # the table escapes spaces and tabs as octal
    ("/proc/self", "proc"),
])  # fmt: skip
def test_the_filesystem_of_a_path_is_its_last_longest_mount(path, kind):
    assert stores.filesystem_type(Path(path), MOUNTS) == kind


@pytest.mark.skipif(not Path("/proc/mounts").exists(), reason="reads /proc/mounts (Linux)")
def test_this_machines_temp_folder_is_on_a_local_filesystem(tmp_path):
    """Where the tests run a new store gets its log (the first test above), so say why if not."""
    assert stores.filesystem_type(tmp_path) in stores.LOCAL_FILESYSTEMS


NOBODY = 65534
LOCK_AS_NOBODY = """
import sys
from altrack.stores import first_use_lock
with first_use_lock(sys.argv[1]):
    print("held")
"""


def test_a_store_lock_another_user_made_still_opens(tmp_path, monkeypatch):
    """Two users of one machine reading one SQLite store (a shared results folder): the first
    made the lock file in the temp folder, and the second's ``altrack report`` must still take
    it. It opened the file for writing, which another user's 0644 file refuses (PermissionError).
    Run as ``nobody`` with the system Python, as root cannot be refused; the lock lies in a
    world-writable temp folder of the test's own, removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a process as another user")
    python = shutil.which("python3", path="/usr/bin:/bin")
    repo = Path(stores.__file__).resolve().parents[1]
    shared_tmp = Path(tempfile.mkdtemp(prefix="altrack-test-", dir="/tmp"))
    try:
        shared_tmp.chmod(0o1777)
        monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))  # where first_use_lock puts the lock
        env = {"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "TMPDIR": str(shared_tmp)}
        as_nobody = {"env": env, "user": NOBODY, "group": NOBODY, "extra_groups": [], "capture_output": True,
                     "text": True, "timeout": 60}  # fmt: skip
        probe = "import sys, tempfile, altrack.stores; sys.exit(tempfile.gettempdir() != sys.argv[1])"
        if python is None or subprocess.run([python, "-c", probe, str(shared_tmp)], **as_nobody).returncode:
            pytest.skip(f"no Python that user nobody can run with {repo} importable")
        url = f"sqlite:///{tmp_path / 'mlflow.db'}"
        with stores.first_use_lock(url):  # root makes the lock file
            pass
        assert [p.stat().st_uid for p in shared_tmp.iterdir()] == [0]
        done = subprocess.run([python, "-c", LOCK_AS_NOBODY, url], **as_nobody)
        assert done.returncode == 0 and done.stdout.strip() == "held", done.stderr[-2000:]
    finally:
        shutil.rmtree(shared_tmp, ignore_errors=True)

"""The multi-machine path: `altrack sweep` processes sharing a real PostgreSQL storage.

Starts a throwaway server (initdb + pg_ctl in a temp dir) when Debian's binaries exist; skips with
the reason otherwise.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_sweep import TINY_SPEC

from altrack.sweep import open_storage


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed: pip install 'psycopg[binary]'")
    folder = Path(tempfile.mkdtemp(prefix="altrack-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    subprocess.run([*prefix, str(pg_bin / "initdb"), "-D", str(data), "-U", "altrack", "--auth=trust"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    log = folder / "server.log"  # the server must not inherit our pipes, or waiting on them hangs
    start = [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "start"]
    subprocess.run(start, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=60)
    try:
        yield f"postgresql://altrack@127.0.0.1:{port}/postgres"
    finally:
        stop = [*prefix, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]
        subprocess.run(stop, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


SPEC = TINY_SPEC.replace("study_name: tiny", "study_name: pg")


def test_two_machines_share_a_postgres_study(postgres_url, data_dir, tmp_path):
    """Two independent `altrack sweep` invocations, as on two machines, finish exactly 3 trials."""
    spec = tmp_path / "pg.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    optuna.create_study(study_name="pg", storage=open_storage(postgres_url), direction="maximize")
    procs = []
    for machine in ("a", "b"):
        workdir = tmp_path / machine
        workdir.mkdir()
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
               "ALTRACK_CACHE_DIR": str(workdir / "cache")}  # fmt: skip
        command = [sys.executable, "-m", "altrack", "sweep", str(spec), "--storage", postgres_url,
                   "--data-dir", str(data_dir)]  # fmt: skip
        procs.append(subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    storage = open_storage(postgres_url)
    assert storage.get_heartbeat_interval() is not None
    study = optuna.load_study(study_name="pg", storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 3
    assert len(numbers) == len(set(numbers))

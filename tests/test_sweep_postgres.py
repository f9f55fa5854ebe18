"""The multi-machine path: `altrack sweep` processes sharing a real PostgreSQL storage.

Starts a throwaway server (initdb + pg_ctl in a temp dir) when Debian's binaries exist; skips with
the reason otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from services import Unavailable, postgres
from test_sweep import TINY_SPEC

from altrack.sweep import open_storage

pytestmark = pytest.mark.slow  # a real PostgreSQL server: run by .ci/run with -m slow


@pytest.fixture(scope="module")
def postgres_url():
    try:
        with postgres() as url:
            yield url
    except Unavailable as exc:
        pytest.skip(str(exc))


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


def test_a_storage_password_never_reaches_tags_or_output_and_workers_stay_quiet(postgres_url, data_dir, tmp_path):
    """A ``?password=`` storage URL (the server trusts, so any password works) is redacted in the
    sweep's tags; two spawned workers print no Optuna INFO lines and no download bars."""
    spec = tmp_path / "secret.yaml"
    spec.write_text(textwrap.dedent(TINY_SPEC.replace("study_name: tiny", "study_name: secret")))
    storage = f"{postgres_url}?password=S3cretPW"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ALTRACK_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "altrack", "sweep", str(spec), "--storage", storage, "--workers", "2",
               "--n-trials", "2", "--data-dir", str(data_dir), "--experiment", "secret"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "S3cretPW" not in done.stdout + done.stderr
    assert "[I " not in done.stderr and "Downloading artifacts" not in done.stderr
    client = MlflowClient(uri)
    [parent] = client.search_runs([client.get_experiment_by_name("secret").experiment_id],
                                  "tags.`altrack.kind` = 'sweep'")  # fmt: skip
    for tag in ("optuna.storage", "altrack.command"):
        assert "S3cretPW" not in parent.data.tags[tag] and "password=***" in parent.data.tags[tag]

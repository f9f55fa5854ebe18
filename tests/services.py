"""Real services for the tests that are about them: PostgreSQL, an MLflow tracking server on it, and
a one-machine Slurm cluster (munge, slurmctld, slurmd), each started in a temp folder and stopped
by pid. Each start function raises ``Unavailable`` (the fixture skips with its reason) when the
binaries are missing or it cannot run here; CI installs them (.ci/run).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


class Unavailable(Exception):
    """The service cannot run on this machine; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl, trust auth on 127.0.0.1); yields its URL.

    Its folder is a fresh one under /tmp: as root the server runs as ``postgres``, which cannot
    enter pytest's private temp folders."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest_psycopg()
    folder = Path(tempfile.mkdtemp(prefix="altrack-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
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


def pytest_psycopg() -> None:
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise Unavailable("the psycopg driver is not installed: pip install 'psycopg[binary]'") from exc


def create_database(url: str, name: str) -> str:
    """A new database on the server of ``url``; returns its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def mlflow_server(backend_url: str, folder: Path) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with a PostgreSQL backend store and artifacts in ``folder``,
    proxied (``--artifacts-destination``), as a team deploys it; yields its http URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    backend = backend_url.replace("postgresql://", "postgresql+psycopg://", 1)  # psycopg 3, not psycopg2
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
               "--workers", "2"]  # fmt: skip
    log = open(folder / "mlflow-server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Unavailable(f"mlflow server did not start: {(folder / 'mlflow-server.log').read_text()[-500:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


SLURM_CONF = """\
ClusterName=altrack
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MpiDefault=none
MinJobAge=600
KillWait=2
NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _pid_of(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def slurm_cluster(folder: Path) -> Iterator[dict[str, str]]:
    """munged (the system's, started if needed), then a slurmctld and a slurmd for this machine,
    configured in ``folder`` on free ports; yields the environment clients need (SLURM_CONF).
    Needs root (the daemons run as root, as the recipe in the Slurm issue)."""
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "squeue")
    missing = [name for name in needed if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        raise Unavailable(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        raise Unavailable("starting slurmctld, slurmd and munged needs root")
    folder.mkdir(parents=True, exist_ok=True)
    started_munge = _ensure_munge()
    host = socket.gethostname().split(".")[0]
    (folder / "state").mkdir(exist_ok=True)
    (folder / "spool").mkdir(exist_ok=True)
    conf = folder / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, folder=folder, ctld_port=free_port(), d_port=free_port(),
                                      cpus=os.cpu_count() or 1, memory=int(_memory_mb() * 0.9)))  # fmt: skip
    env = {"SLURM_CONF": str(conf)}
    full_env = {**os.environ, **env}
    daemons = [("slurmctld", folder / "slurmctld.pid"), ("slurmd", folder / "slurmd.pid")]
    try:
        for name, _ in daemons:
            binary = shutil.which(name) or f"/usr/sbin/{name}"
            done = subprocess.run([binary, "-f", str(conf)], env=full_env, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise Unavailable(f"{name} did not start: {(done.stderr or done.stdout).strip()[-300:]}")
            time.sleep(1)
        deadline = time.monotonic() + 60
        while True:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=full_env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                break
            if time.monotonic() > deadline:
                log = (folder / "slurmctld.log").read_text()[-500:] if (folder / "slurmctld.log").exists() else ""
                raise Unavailable(f"the Slurm node never became idle ({state.stdout.strip()}): {log}")
            time.sleep(0.5)
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=full_env, capture_output=True)
        pids = [_pid_of(pidfile) for _, pidfile in reversed(daemons)] + [started_munge]
        for pid in pids:
            if pid:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)


def _ensure_munge() -> int | None:
    """Start munged as the munge user unless one runs; returns the pid it started, if any."""
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return None
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    munged = shutil.which("munged") or "/usr/sbin/munged"
    done = subprocess.run(["runuser", "-u", "munge", "--", munged], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise Unavailable(f"munged did not start: {done.stderr.strip()[-300:]}")
    time.sleep(0.5)
    return _pid_of(run_dir / "munged.pid")

"""Grids and sweeps on a Slurm cluster, through submitit.

``altrack run --executor slurm`` turns the grid's (dataset, k, seeds) blocks into one Slurm job
array (``blocks_per_task`` blocks per array task); each task trains its blocks and logs its runs
to the shared MLflow tracking server under the invocation's parent run, tagged with its Slurm
job id. ``altrack sweep --executor slurm --workers N`` submits N sweep workers that share the
study's storage. The launching process waits, shows the tasks finishing, says in one line why a
task failed and where its log is, closes the runs a dead task left RUNNING, and builds the report
from MLflow.

Slurm's accounting (``sacct``) is often absent on small clusters, and submitit then cannot tell
a cancelled task from a pending one; ``squeue`` can, so a task is over when its result file
exists or when ``squeue`` no longer lists it.

What must be shared between the launcher and the nodes: the tracking server (a local SQLite or
file store is refused), the data folder, the seed-stage cache and ``log_dir``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from altrack.errors import ConfigError, first_line
from altrack.resources import usable_cores
from altrack.settings import Rule, at_least

EXECUTORS = ("local", "slurm")
SHARED_STORE_SCHEMES = ("http", "https", "postgresql", "mysql", "mssql", "databricks")
POLL_SECONDS = 2.0
GONE_GRACE_SECONDS = 10.0  # a task squeue stopped listing has this long to leave its result file
SBATCH_TEST_SECONDS = 60  # how long `sbatch --test-only` may take before the launcher refuses in one line

# labels name the flag and, after it, the executor file's key
SLURM_RULES: dict[str, Rule] = {
    "partition": Rule(str, optional=True, label="--partition (partition)"),
    "time_limit": Rule(int, lambda v: v >= 1, "be >= 1 minute", label="--time-limit (time_limit)"),
    "cpus_per_task": at_least(1, "--cpus-per-task (cpus_per_task)"),
    "gpus_per_task": at_least(0, "--gpus-per-task (gpus_per_task)"),
    "mem_gb": Rule(float, lambda v: 0 < v < 1e6, "be a positive number of GiB", label="--mem-gb (mem_gb)"),
    "array_parallelism": at_least(1, "--array-parallelism (array_parallelism)"),
    "blocks_per_task": at_least(1, "--blocks-per-task (blocks_per_task)"),
    "log_dir": Rule(str, label="--slurm-log-dir (log_dir)"),
    "shared_filesystem": Rule(bool, label="--shared-filesystem (shared_filesystem)"),
}


@dataclass(frozen=True)
class SlurmConfig:
    """Where and how big the Slurm jobs are; every field checked against ``SLURM_RULES``.

    ``sbatch``: extra ``#SBATCH`` options (``{"account": "lab", "qos": "short"}``).
    ``shared_filesystem``: the user says the launcher's files (an Optuna journal) are visible to
    the nodes. Raises ``ConfigError`` for a bad value.
    """

    partition: str | None = None
    time_limit: int = 60  # minutes
    cpus_per_task: int = 2
    gpus_per_task: int = 0
    mem_gb: float = 8.0
    array_parallelism: int = 32
    blocks_per_task: int = 1
    log_dir: str = "slurm-logs"
    shared_filesystem: bool = False
    sbatch: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        for name, rule in SLURM_RULES.items():
            object.__setattr__(self, name, rule.check(name, getattr(self, name)))
        for key, value in self.sbatch:
            if not isinstance(key, str) or not key or not isinstance(value, str | int | float):
                raise ConfigError(f"sbatch options must be name: value pairs, got {key!r}: {value!r}")

    def executor(self, name: str) -> Any:
        """A submitit executor for these settings, its logs under ``log_dir/name``."""
        try:
            import submitit  # lazy: only Slurm runs need it
        except ImportError as exc:
            raise ConfigError("--executor slurm needs submitit: pip install submitit") from exc
        executor = submitit.AutoExecutor(folder=Path(self.log_dir).resolve() / name / "%j", cluster="slurm")
        params: dict[str, Any] = {
            "timeout_min": self.time_limit,
            "cpus_per_task": self.cpus_per_task,
            "mem_gb": self.mem_gb,
            "slurm_array_parallelism": self.array_parallelism,
            "name": name,
        }
        if self.partition:
            params["slurm_partition"] = self.partition
        if self.gpus_per_task:
            params["slurm_gpus_per_task"] = self.gpus_per_task
        if self.sbatch:
            params["slurm_additional_parameters"] = {k.replace("-", "_"): str(v) for k, v in self.sbatch}
        executor.update_parameters(**params)
        return executor

    def check_partition(self) -> None:
        """Ask Slurm whether a job of this shape could be queued (``sbatch --test-only``), so a
        wrong partition or an impossible size is refused before anything is written."""
        if shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm: sbatch is not on PATH (is this a Slurm login node?)")
        command = ["sbatch", "--test-only", f"--time={self.time_limit}", f"--cpus-per-task={self.cpus_per_task}",
                   f"--mem={int(self.mem_gb * 1024)}M", "--wrap", "true"]  # fmt: skip
        if self.partition:
            command.insert(2, f"--partition={self.partition}")
        if self.gpus_per_task:
            command.insert(2, f"--gpus-per-task={self.gpus_per_task}")
        command[2:2] = [f"--{k.replace('_', '-')}={v}" for k, v in self.sbatch]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=SBATCH_TEST_SECONDS)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"--executor slurm: 'sbatch --test-only' did not answer in {SBATCH_TEST_SECONDS} s "
                              "(is slurmctld up?)") from None  # fmt: skip
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
            raise ConfigError(f"Slurm refuses these jobs: {message[-1].removeprefix('sbatch: error: ')}")


def load_slurm_config(path: str | None, overrides: dict[str, Any]) -> SlurmConfig:
    """The executor file's settings (YAML mapping of ``SlurmConfig`` fields), then the flags
    that were given (``None`` values are ignored). Raises ``ConfigError`` in one line."""
    values: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"executor file {path}: {first_line(exc)}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"executor file {path}: expected a mapping of Slurm settings")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None and v != ()})
    known = {f.name for f in fields(SlurmConfig)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(f"unknown Slurm setting {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    sbatch = values.get("sbatch", ())
    if isinstance(sbatch, dict):
        values["sbatch"] = tuple((str(k), str(v)) for k, v in sbatch.items())
    elif isinstance(sbatch, list | tuple):
        pairs = [str(item).split("=", 1) for item in sbatch] if sbatch and isinstance(sbatch[0], str) else sbatch
        if any(not isinstance(pair, list | tuple) or len(pair) != 2 for pair in pairs):
            raise ConfigError("sbatch options must be NAME=VALUE")
        values["sbatch"] = tuple((str(k).lstrip("-"), str(v)) for k, v in pairs)
    else:
        raise ConfigError(f"sbatch options must be a mapping, got {sbatch!r}")
    return SlurmConfig(**values)


def require_shared_store(uri: str) -> None:
    """Slurm jobs run on other machines: they must log to a tracking server (or a database
    server), never to a local SQLite file or folder. Raises ``ConfigError``."""
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    if scheme not in SHARED_STORE_SCHEMES:
        raise ConfigError(
            f"--executor slurm needs a shared MLflow tracking server, not the local store {uri} (SQLite over NFS "
            "loses writes): start 'mlflow server' and set MLFLOW_TRACKING_URI=http://HOST:PORT"
        )


def slurm_tags() -> dict[str, str]:
    """This Slurm task's ids and its attempt (``SLURM_RESTART_COUNT``), as run tags; empty
    outside Slurm."""
    from altrack.tracking.tags import SLURM_ARRAY_TASK_TAG, SLURM_JOB_TAG, SLURM_RESTART_TAG  # lazy: MLflow

    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    tags = {SLURM_JOB_TAG: job, SLURM_RESTART_TAG: os.environ.get("SLURM_RESTART_COUNT") or "0"}
    if os.environ.get("SLURM_ARRAY_TASK_ID"):
        tags[SLURM_ARRAY_TASK_TAG] = os.environ["SLURM_ARRAY_TASK_ID"]
    return tags


def earlier_attempt(tags: Mapping[str, str]) -> bool:
    """Whether a run with these tags was claimed by an earlier attempt of the very Slurm task this
    process runs in. Slurm requeues a task (a node failure, ``scontrol requeue``) under the same
    job id, so squeue still lists the job whose first attempt died with its runs RUNNING: those
    runs are dead, and the new attempt must do them, not wait for them."""
    from altrack.tracking.tags import SLURM_ARRAY_TASK_TAG, SLURM_JOB_TAG, SLURM_RESTART_TAG  # lazy: MLflow

    here = slurm_tags()
    if not here or any(tags.get(k) != here.get(k) for k in (SLURM_JOB_TAG, SLURM_ARRAY_TASK_TAG)):
        return False
    try:
        return int(tags.get(SLURM_RESTART_TAG) or 0) < int(here[SLURM_RESTART_TAG])
    except ValueError:
        return False


def task_threads() -> int:
    """The cores Slurm gave this task (``--cpus-per-task``), else those it may run on."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK") or usable_cores())


def squeue_states(job_ids: Sequence[str]) -> dict[str, str] | None:
    """``{task id: state}`` of the jobs Slurm still lists (``12_3``: array job 12, task 3), or
    None when squeue cannot answer (then nothing is concluded)."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays:
        return {}
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i %T"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:  # squeue errors on ids it has forgotten: ask one by one
        if len(arrays) > 1:
            merged: dict[str, str] = {}
            for array in arrays:
                states = squeue_states([array])
                if states is None:
                    return None
                merged.update(states)
            return merged
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        states[task] = state
    return states


CANCEL_WAIT_SECONDS = 15.0


def cancel(job_ids: Sequence[str], wait: float = CANCEL_WAIT_SECONDS) -> bool:
    """``scancel`` the job arrays of these tasks (``12_3``), best effort, and wait up to ``wait``
    seconds for the tasks to leave the queue, since until then a task may still write to its
    runs. altrack's tasks end at the SIGTERM (``grid_task``, ``run_worker``), not at Slurm's
    SIGKILL a KillWait later. Returns whether they left. Ctrl-C while a grid or sweep waits on
    Slurm stops its work, as it does on one machine; ``--detach`` is the way to leave it running."""
    from tqdm.auto import tqdm  # lazy; its write keeps clear of a progress bar

    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    if not arrays:
        return True
    tqdm.write(f"cancelling Slurm job {', '.join(arrays)}; waiting up to {wait:.0f} s for its tasks to stop",
               file=sys.stderr)  # fmt: skip
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=30)
    deadline = time.monotonic() + wait
    while True:
        states = squeue_states(job_ids)
        if states is not None and not any(job_id in states for job_id in job_ids):
            return True
        if time.monotonic() > deadline:
            tqdm.write("Slurm still lists some of them; the next invocation closes the runs they leave",
                       file=sys.stderr)  # fmt: skip
            return False
        time.sleep(0.5)


def job_alive(job_id: str) -> bool:
    """Whether Slurm still lists this job (pending, running, completing); True when unsure."""
    states = squeue_states([job_id])
    return True if states is None else job_id in states or any(k.startswith(f"{job_id}_") for k in states)


@dataclass
class TaskOutcome:
    label: str
    job_id: str
    error: str | None  # one line, with the log path; None when the task finished


def wait_for(jobs: Sequence[Any], labels: Sequence[str], progress: bool,
             on_done: Callable[[TaskOutcome], None] | None = None) -> list[TaskOutcome]:  # fmt: skip
    """Wait until every submitit job has a result or has left the queue without one.

    Returns one outcome per job, in order; a failed task's error says why in one line and where
    its log is, printed on stderr as it happens. ``on_done`` hears each as it ends. On Ctrl-C
    (``KeyboardInterrupt``, raised on) the tasks not yet over are cancelled."""
    from tqdm.auto import tqdm  # lazy

    outcomes: dict[int, TaskOutcome] = {}
    gone_since: dict[int, float] = {}
    bar = tqdm(total=len(jobs), desc="slurm tasks", unit="task", disable=not progress, dynamic_ncols=True)
    try:
        while len(outcomes) < len(jobs):
            states = squeue_states([job.job_id for job in jobs])
            for i, job in enumerate(jobs):
                if i in outcomes:
                    continue
                outcome = None
                if job.paths.result_pickle.exists():
                    outcome = TaskOutcome(labels[i], job.job_id, _job_error(job))
                elif states is not None and job.job_id not in states:
                    gone_since.setdefault(i, time.monotonic())
                    if time.monotonic() - gone_since[i] > GONE_GRACE_SECONDS:
                        log = job.paths.stderr
                        outcome = TaskOutcome(labels[i], job.job_id,
                                              f"left the queue without a result (cancelled, timed out or its "
                                              f"node failed); log: {log}")  # fmt: skip
                if outcome is not None:
                    outcomes[i] = outcome
                    bar.update(1)
                    if outcome.error:  # on stderr, above the bar, as it happens
                        tqdm.write(f"slurm task {outcome.job_id} ({outcome.label}) failed: {outcome.error}",
                                   file=sys.stderr)  # fmt: skip
                    if on_done is not None:
                        on_done(outcome)
            if len(outcomes) < len(jobs):
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        cancel([job.job_id for i, job in enumerate(jobs) if i not in outcomes])
        raise
    finally:
        bar.close()
    return [outcomes[i] for i in range(len(jobs))]


def _job_error(job: Any) -> str | None:
    """None for a task that returned, else its exception's line and its log path."""
    try:
        job.result()
    except Exception as exc:  # submitit's message: a header, the task's traceback between dashes, paths
        parts = str(exc).split("-" * 22)
        trace = parts[1] if len(parts) > 2 else str(exc)
        lines = [line.strip() for line in trace.splitlines() if line.strip()]
        cause = lines[-1] if lines else type(exc).__name__
        return f"{cause[:300]}; log: {job.paths.stderr}"
    return None

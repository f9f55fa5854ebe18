"""What a process may use: its cores (CPU affinity, bounded by its cgroups' CPU quota), and the
memory a host gives, MemAvailable bounded by the process's memory cgroups (a Slurm job's
``--mem``, a container's limit), read from real files: the live ones, cgroups made for the test
where the host lets root make them, and cgroup trees written under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import torch_threads
from mlflow.tracking import MlflowClient

from altrack import resources
from altrack.catalog import METHODS
from altrack.config import GridConfig
from altrack.data import load_dataset
from altrack.errors import ConfigError
from altrack.grid import grid_task
from altrack.protocol import (
    _model_need,
    check_planned_stacks,
    fit_threads,
    grid_blocks,
    planning_cap,
    stack_limit,
    threads_per_worker,
)
from altrack.resources import (
    MEMINFO,
    cgroup_available,
    cpu_quota,
    free_memory,
    host_available,
    resident,
    slurm_available,
    usable_cores,
)
from altrack.settings import Settings

CPU = torch.device("cpu")
GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712"


def _mem_available() -> int:
    text = MEMINFO.read_text()
    return int(next(line for line in text.splitlines() if line.startswith("MemAvailable:")).split()[1]) * 1024


@pytest.mark.skipif(not MEMINFO.exists(), reason="no /proc/meminfo: not Linux")
def test_the_host_counts_the_page_cache_the_kernel_can_drop():
    """A quarter of MemAvailable, not of the free pages alone: once the page cache fills the RAM
    (torch's libraries, the datasets, a store; a CI run after its installs) free pages were
    419 MiB of 24 GiB, and CIFAR-10 was refused on a CPU."""
    before = _mem_available()
    got = host_available()
    after = _mem_available()
    slack = 256 << 20  # what other processes allocate or free between the reads
    assert min(before, after) - slack <= got <= max(before, after) + slack


def test_host_available_reads_memavailable_in_bytes_and_falls_back_without_it(monkeypatch, tmp_path):
    meminfo = tmp_path / "meminfo"
    monkeypatch.setattr(resources, "MEMINFO", meminfo)
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:            1000 kB\nMemAvailable:       5000 kB\n")
    assert host_available() == 5000 * 1024
    try:
        free_pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        free_pages = None
    for text in ("MemTotal: 24000000 kB\n", "MemAvailable: lots\n", None):  # no line, a bad one, no file
        if text is None:
            meminfo.unlink()
        else:
            meminfo.write_text(text)
        got = host_available()
        if free_pages is None:
            assert got == 8 << 30
        else:
            assert abs(got - free_pages) < 256 << 20  # free pages, read a moment apart


def _cgroup(folder: Path, limit: str, usage: int, inactive_key: str, inactive: int, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    v1 = inactive_key == "total_inactive_file"
    (folder / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(limit + "\n")
    (folder / ("memory.usage_in_bytes" if v1 else "memory.current")).write_text(f"{usage}\n")
    local = "inactive_file 123\n" if v1 else ""  # v1 has both; the hierarchical total is the one read
    (folder / "memory.stat").write_text(f"cache 5\n{local}{inactive_key} {inactive}\nmapped_file 3\n")
    for name, text in files.items():
        (folder / name).write_text(text)


SLURM_MEMORY = ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_CPUS_ON_NODE", "SLURM_MEM_PER_GPU",
                "SLURM_GPUS_ON_NODE")  # fmt: skip


@pytest.fixture(autouse=True)
def outside_a_slurm_job(monkeypatch):
    """These tests' figures are a host's: run inside a Slurm job, its --mem would bound them."""
    for name in SLURM_MEMORY:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_host(monkeypatch, tmp_path):
    """A host with 20 GiB available whose cgroup files live under tmp_path; returns (proc file,
    cgroup mount root)."""
    monkeypatch.setattr(resources, "MEMINFO", tmp_path / "meminfo")
    (tmp_path / "meminfo").write_text(f"MemAvailable: {20 * GIB // 1024} kB\n")
    monkeypatch.setattr(resources, "PROC_CGROUP", tmp_path / "proc-self-cgroup")
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "cgroup")
    return tmp_path / "proc-self-cgroup", tmp_path / "cgroup"


def test_a_slurm_jobs_v1_memory_limit_bounds_what_its_task_may_take(fake_host):
    """Slurm (task/cgroup, v1) limits the job's cgroup and runs a task in a step's cgroup below it,
    whose own limit is unset: the job's headroom is what counts, its inactive page cache freeable."""
    proc, root = fake_host
    proc.write_text("9:name=systemd:/\n4:memory:/slurm/uid_0/job_7/step_0/task_0\n1:cpu:/\n0::/\n")
    mem = root / "memory"
    _cgroup(mem, V1_UNLIMITED, 30 * GIB, "total_inactive_file", 0)
    _cgroup(mem / "slurm", V1_UNLIMITED, 9 * GIB, "total_inactive_file", 0)
    _cgroup(mem / "slurm/uid_0/job_7", str(4 * GIB), 3 * GIB, "total_inactive_file", GIB)
    _cgroup(mem / "slurm/uid_0/job_7/step_0/task_0", V1_UNLIMITED, GIB, "total_inactive_file", 0)
    (mem / "slurm/uid_0/job_7/step_0").mkdir(exist_ok=True)  # a level with no files: skipped
    assert cgroup_available() == 2 * GIB  # 4 GiB - (3 - 1 GiB of inactive page cache)
    assert free_memory(CPU) == 2 * GIB  # not the host's 20
    _cgroup(mem / "slurm/uid_0/job_7/step_0/task_0", str(GIB), GIB // 2, "total_inactive_file", 0)
    assert free_memory(CPU) == GIB // 2  # the tightest level wins
    _cgroup(mem / "slurm/uid_0/job_7/step_0/task_0", str(GIB), 2 * GIB, "total_inactive_file", 0)
    assert free_memory(CPU) == 0  # over its limit: nothing left, never negative
    proc.write_text("4:memory:/slurm/uid_0/job_7/step_1/task_0\n")  # a folder the mount lacks
    assert cgroup_available() == 2 * GIB  # read from its nearest ancestor there, the job's


def test_a_v2_limit_on_an_ancestor_counts_and_the_host_bounds_a_generous_one(fake_host):
    proc, root = fake_host
    proc.write_text("0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n")
    (root / "cgroup.controllers").parent.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    job = root / "system.slice/slurmstepd.scope/job_7"
    _cgroup(job, str(3 * GIB), 5 * GIB // 2, "inactive_file", GIB)
    _cgroup(job / "step_0/user/task_0", "max", GIB, "inactive_file", 0)
    assert cgroup_available() == 3 * GIB // 2
    _cgroup(job, str(64 * GIB), GIB, "inactive_file", 0)
    assert cgroup_available() == 63 * GIB and free_memory(CPU) == 20 * GIB  # the host has less


def test_a_container_that_sees_its_own_cgroup_as_the_root_reads_the_mount_root(fake_host):
    """Docker without a cgroup namespace names the host's path (/docker/<id>), which the
    container's mount does not have; its own limit is at the mount's root. On a hybrid host
    (v2 mounted at unified/, no memory controller there) v1's memory controller is the one read."""
    proc, root = fake_host
    proc.write_text("12:memory:/docker/0123abcd\n0::/docker/0123abcd\n")
    _cgroup(root / "memory", str(6 * GIB), 2 * GIB, "total_inactive_file", 0)
    (root / "unified").mkdir()
    assert cgroup_available() == 4 * GIB
    proc.write_text("0::/docker/0123abcd\n")  # v2 only, its mount at unified/
    _cgroup(root / "unified", str(5 * GIB), 2 * GIB, "inactive_file", 0)
    assert cgroup_available() == 3 * GIB


def test_no_limit_or_no_cgroup_leaves_the_host_figure(fake_host):
    proc, root = fake_host
    assert cgroup_available() is None and free_memory(CPU) == 20 * GIB  # no /proc/self/cgroup
    proc.write_text("4:memory:/user.slice\n")
    assert cgroup_available() is None  # no mount
    _cgroup(root / "memory/user.slice", V1_UNLIMITED, GIB, "total_inactive_file", 0)
    assert cgroup_available() is None
    (root / "memory/user.slice/memory.limit_in_bytes").write_text("garbage\n")
    assert cgroup_available() is None  # unreadable: as if unlimited, the host's figure stands
    _cgroup(root / "memory/user.slice", str(2 * GIB), GIB, "total_inactive_file", 0)
    (root / "memory/user.slice/memory.stat").unlink()
    assert cgroup_available() == GIB  # no memory.stat: no page cache counted as freeable


def test_the_default_cap_follows_the_cgroup_and_refuses_one_too_small(fake_host):
    """The CPU's default cap is a quarter of free_memory: in a job whose cgroup has 200 MiB left,
    50 MiB cannot hold a CifarNet (about 115 MiB to train), refused in one line."""
    proc, root = fake_host
    proc.write_text("0::/job\n")
    (root / "job").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    _cgroup(root / "job", str(GIB + (200 << 20)), GIB, "inactive_file", 0)
    with pytest.raises(ConfigError, match=r"memory cap 50\.0 MiB cannot hold one cifar10 model"):
        stack_limit("cifar10", CPU)
    assert stack_limit("mnist", CPU) >= 1


def _own_memory_cgroup() -> tuple[Path, str] | None:
    """(folder to make a test cgroup in, its limit file) where root can limit memory there, else
    None. v2's rule of no processes in an inner cgroup puts the test cgroup beside ours."""
    lines = Path("/proc/self/cgroup").read_text().splitlines() if Path("/proc/self/cgroup").exists() else []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.strip("/"), "memory.limit_in_bytes"
    for line in lines:
        if line.startswith("0::"):
            parent = (Path("/sys/fs/cgroup") / line[3:].strip("/")).parent
            controllers = parent / "cgroup.subtree_control"
            if controllers.exists() and "memory" in controllers.read_text().split():
                return parent, "memory.max"
    return None


def test_a_process_in_a_real_memory_cgroup_reads_its_limit_not_the_hosts():
    """A child process that joins a cgroup made for the test, limited to 2 GiB, sees at most that
    (less what it holds after importing torch), though the host has more available."""
    own = _own_memory_cgroup()
    if own is None or os.geteuid() != 0 or not os.access(own[0], os.W_OK):
        pytest.skip("no writable memory cgroup: needs root and a cgroup v1 memory controller, or v2's delegated")
    if free_memory(CPU) < 4 * GIB:
        pytest.skip("under 4 GiB available here: a 2 GiB limit would not be the tighter one")
    folder = own[0] / f"altrack-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        (folder / own[1]).write_text(str(2 * GIB))
        code = textwrap.dedent(f"""
            import os, pathlib
            pathlib.Path({str(folder / "cgroup.procs")!r}).write_text(str(os.getpid()))  # join, then allocate
            import torch
            from altrack.resources import cgroup_available, free_memory, host_available
            print(free_memory(torch.device("cpu")), cgroup_available(), host_available())
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        folder.rmdir()
    assert done.returncode == 0, done.stderr
    free, limited, host = (int(word) for word in done.stdout.split())
    assert abs(free - limited) < 64 << 20 and max(free, limited) <= 2 * GIB < host  # two reads, a moment apart
    assert free > GIB // 2  # what importing torch holds is charged, not the host's usage


def test_worker_threads_follow_the_cores_the_process_may_run_on():
    """A container's cpuset or a batch job's allocation, not the machine's core count: a process
    pinned to one core gives its one worker one thread."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    quota = cpu_quota()  # a CI runner's container may have one
    assert usable_cores() == max(1, min(_affinity(), _affinity() if quota is None else int(quota)))
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from altrack.protocol import threads_per_worker; from altrack.resources import usable_cores; "
            "print(usable_cores(), threads_per_worker(1), threads_per_worker(4))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1"]
    assert threads_per_worker(1) == usable_cores()


@pytest.mark.parametrize(
    ("given", "spin"),
    [({}, "1000"), ({"GOMP_SPINCOUNT": "50000"}, "50000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, None)],
)
def test_openmp_idle_threads_spin_briefly_unless_the_user_says_otherwise(given, spin):
    """libgomp's default spin (300,000 rounds) makes torch's threads hold each other up beside any
    other busy process (the main job: 143 s against 30 s, docs/speed.md): importing altrack
    shortens it before torch loads, and leaves a user's own setting alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    code = "import os, altrack, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, **given})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(spin)


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def test_a_docker_cpus_quota_bounds_the_threads_and_the_tightest_ancestor_wins(fake_host):
    """``docker run --cpus 1.5`` (v1: cfs quota over period, at the container's cgroup, which the
    container sees as the mount's root): the affinity may name every core of the host, the quota
    gives a core and a half's time, so one thread, not two. v2's ``cpu.max`` likewise, on an
    ancestor of the process's cgroup; "max" and v1's -1 set none."""
    proc, root = fake_host
    proc.write_text("12:memory:/docker/0123abcd\n3:cpu,cpuacct:/docker/0123abcd\n0::/\n")
    cpu = root / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    (cpu / "cpu.cfs_quota_us").write_text("150000\n")
    assert cpu_quota() == 1.5
    assert usable_cores() == 1
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu_quota() is None and usable_cores() == _affinity()
    proc.write_text("0::/system.slice/job_7/step_0\n")  # v2 only: a quota on the job, none below it
    (root / "cgroup.controllers").write_text("cpu memory\n")
    (root / "system.slice/job_7/step_0").mkdir(parents=True)
    (root / "system.slice/job_7/cpu.max").write_text("50000 100000\n")
    (root / "system.slice/job_7/step_0/cpu.max").write_text("max 100000\n")
    assert cpu_quota() == 0.5 and usable_cores() == 1  # half a core still runs one thread
    (root / "system.slice/cpu.max").write_text("6400000 100000\n")  # 64 cores: the job's half binds
    assert cpu_quota() == 0.5
    (root / "system.slice/job_7/cpu.max").write_text("garbage\n")
    assert cpu_quota() == 64 and usable_cores() == min(_affinity(), 64)  # unreadable: no quota there


def _own_cpu_cgroup() -> Path | None:
    """A cgroup v1 cpu controller folder root may make a test cgroup in, else None."""
    lines = Path("/proc/self/cgroup").read_text().splitlines() if Path("/proc/self/cgroup").exists() else []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            for name in (controllers, "cpu"):
                if (Path("/sys/fs/cgroup") / name).is_dir():
                    return Path("/sys/fs/cgroup") / name / path.strip("/")
    return None


def test_a_process_in_a_real_cpu_cgroup_runs_as_many_threads_as_its_quota():
    """A child that joins a cgroup made for the test, with one core's quota (v1's cfs quota),
    gets one worker thread though its affinity names two cores or more."""
    own = _own_cpu_cgroup()
    if _affinity() < 2:
        pytest.skip("one core here: a one-core quota would change nothing")
    if own is None or os.geteuid() != 0 or not os.access(own, os.W_OK):
        pytest.skip("no writable cgroup v1 cpu controller: needs root and v1's cpu controller")
    folder = own / f"altrack-test-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        (folder / "cpu.cfs_quota_us").write_text(str(int((folder / "cpu.cfs_period_us").read_text())))
        code = textwrap.dedent(f"""
            import os, pathlib
            pathlib.Path({str(folder / "cgroup.procs")!r}).write_text(str(os.getpid()))
            from altrack.protocol import threads_per_worker
            from altrack.resources import cpu_quota, usable_cores
            print(cpu_quota(), usable_cores(), threads_per_worker(1), len(os.sched_getaffinity(0)))
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        folder.rmdir()
    assert done.returncode == 0, done.stderr
    quota, cores, threads, affinity = done.stdout.split()
    assert (float(quota), cores, threads) == (1.0, "1", "1") and int(affinity) >= 2


def test_a_path_outside_the_namespace_or_an_unreadable_file_counts_as_no_limit(fake_host):
    proc, root = fake_host
    _cgroup(root / "memory", str(GIB), 0, "total_inactive_file", 0)  # the mount's root: not our ancestor
    proc.write_text("4:memory:/../../elsewhere\n")
    assert cgroup_available() is None
    proc.write_bytes(b"4:memory:/\xff\xfe\n")  # undecodable
    assert cgroup_available() is None and free_memory(CPU) == 20 * GIB
    proc.write_text("4:memory:/ (deleted)\n")
    assert cgroup_available() == GIB


def test_v2_memory_high_binds_when_under_memory_max_and_held_never_goes_below_zero(fake_host):
    proc, root = fake_host
    proc.write_text("0::/user.slice\n")
    (root / "user.slice").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    _cgroup(root / "user.slice", str(8 * GIB), GIB, "inactive_file", 2 * GIB, **{"memory.high": str(3 * GIB)})
    assert cgroup_available() == 3 * GIB  # inactive cache above the usage: nothing held, not less
    (root / "user.slice/memory.high").write_text("max\n")
    assert cgroup_available() == 8 * GIB


def test_a_slurm_jobs_memory_bounds_what_its_task_may_take_without_cgroups(fake_host, monkeypatch):
    """A cluster may hold a job to its --mem without cgroups (``task/none``, or a kill from its
    accounting): a task there sees no cgroup limit, and the host's 20 GiB would plan stacks the
    job is killed for. Slurm's environment bounds it: the job's memory less what this process
    holds, per node or per CPU; outside a job, or with --mem=0 or a garbled value, no bound."""
    assert slurm_available() is None and free_memory(CPU) == 20 * GIB
    held = resident()
    assert held > 100 << 20  # this process, torch loaded
    job = held + 4 * GIB  # a job with 4 GiB to spare
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(job >> 20))
    slack = 64 << 20  # what the process allocates between the two reads
    assert abs(slurm_available() - 4 * GIB) < slack
    assert abs(free_memory(CPU) - 4 * GIB) < slack  # not the host's 20 GiB
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "64")  # less than it holds: nothing left, never negative
    assert slurm_available() == 0 and free_memory(CPU) == 0
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", str((held >> 20) + 1024))  # --mem-per-cpu, three CPUs
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "3")
    assert abs(slurm_available() - (3 * held + 3 * GIB - resident())) < slack
    monkeypatch.delenv("SLURM_MEM_PER_CPU")
    monkeypatch.setenv("SLURM_MEM_PER_GPU", str((held >> 20) + 2048))  # --mem-per-gpu, two GPUs
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    assert abs(slurm_available() - (2 * held + 4 * GIB - resident())) < slack
    monkeypatch.delenv("SLURM_MEM_PER_GPU")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1024")
    for garbled in ("0", "lots"):
        monkeypatch.setenv("SLURM_MEM_PER_CPU", garbled)
        assert slurm_available() is None and free_memory(CPU) == 20 * GIB
    proc, root = fake_host  # with a cgroup as well, the tighter of the two
    proc.write_text("0::/job\n")
    (root / "job").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("memory\n")
    _cgroup(root / "job", str(2 * GIB), GIB, "inactive_file", 0)
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "8192")
    assert free_memory(CPU) == GIB


def test_a_slurm_launcher_plans_cpu_stacks_with_its_jobs_memory_not_its_own():
    """The launcher's memory says nothing of the nodes': CPU runs on Slurm are checked against a
    quarter of each job's --mem-gb, which a CifarNet (about 115 MiB) does not fit in 0.3 GiB."""
    cpu, cuda = CPU, torch.device("cuda")
    assert planning_cap(cpu, None, 0.3) == int(0.3 * GIB) // 4
    assert planning_cap(cpu, 5 * GIB, 0.3) == 5 * GIB  # an explicit cap wins
    assert planning_cap(cpu, None) is None and planning_cap(cuda, None, 8.0) is None
    with pytest.raises(ConfigError, match=r"memory cap 76\.8 MiB cannot hold one cifar10 model.*--mem-gb 0\.3"):
        check_planned_stacks("cifar10", cpu, slurm_mem_gb=0.3)
    check_planned_stacks("cifar10", cpu, slurm_mem_gb=8.0)
    with pytest.raises(ConfigError, match=r"cannot hold one cifar10 model \(about [\d.]+ MiB to train\)$"):
        check_planned_stacks("cifar10", cpu, memory_cap=1 << 20, slurm_mem_gb=8.0)  # the user's cap: no --mem-gb
    # a task holds torch and its data before it trains (1.5-1.7 GiB for CIFAR-10): a 2 GiB job
    # leaves it room for a CifarNet, a 1.5 GiB one does not, and the launcher says how much would
    held = int(1.5 * GIB)
    assert planning_cap(cpu, None, 2.0, held) == GIB // 8
    assert planning_cap(cpu, None, 1.0, held) == 0  # never negative
    check_planned_stacks("cifar10", cpu, slurm_mem_gb=2.0, held=held)
    refusal = r"a quarter of what --mem-gb 1\.5 leaves once a task holds torch and the data \(about 1\.5 GiB\)"
    with pytest.raises(ConfigError, match=refusal + r".*give the jobs --mem-gb 2\.3 or more$"):
        check_planned_stacks("cifar10", cpu, slurm_mem_gb=1.5, held=held)
    check_planned_stacks("cifar10", cpu, slurm_mem_gb=2.3, held=held)  # what it names is enough, a margin over


def test_a_slurm_grids_blocks_are_planned_with_the_jobs_memory(tmp_path):
    """Seven methods, four seeds: a job whose memory holds two models' stacks gets a seed a block;
    plenty of it, the default stack of 16 (two seeds a block)."""
    cfg = GridConfig(datasets=("mnist",), methods=METHODS, budgets=(100,), runs=4, settings=Settings(epochs=1),
                     out=None, data_dir=str(tmp_path), device="cpu")  # fmt: skip
    assert len(METHODS) == 7
    for cap, seeds_per_block in ((7 * _model_need("mnist", 32), 1), (1 << 40, 2)):
        blocks = grid_blocks(cfg, "cpu", cfg.run_keys(), memory_cap=cap)
        assert [len(seeds) for _, _, seeds, _ in blocks] == [seeds_per_block] * (4 // seeds_per_block)


def test_a_default_cap_memory_shrank_below_one_model_mid_run_trains_one(monkeypatch):
    """Checked before any run starts, a cap too small is refused; once training is under way
    (``refuse=False``, as ``fit_many`` asks) memory that has shrunk since gives a stack of one
    model instead of failing runs already claimed. A cap the user gave is refused either way."""
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str((resident() >> 20) + 4))  # 4 MiB left: a quarter holds no MLP
    with pytest.raises(ConfigError, match="cannot hold one mnist model"):
        stack_limit("mnist", CPU)
    assert stack_limit("mnist", CPU, refuse=False) == 1
    with pytest.raises(ConfigError, match="cannot hold one mnist model"):
        stack_limit("mnist", CPU, memory_cap=1 << 20, refuse=False)


def test_a_slurm_task_too_small_for_one_model_fails_before_it_claims_a_run(monkeypatch, mlflow_store, data_dir):
    """The task loads its data and checks what its job leaves first: a refusal then costs no run
    (none is claimed RUNNING under the parent, none is failed for it)."""
    client = MlflowClient()
    parent = client.create_run(client.create_experiment(mlflow_store)).info
    cfg = GridConfig(datasets=("mnist",), methods=("random",), budgets=(100,), runs=1, settings=Settings(epochs=1),
                     out=None, data_dir=data_dir, device="cpu", log_models=False)  # fmt: skip
    load_dataset("mnist", data_dir, "cpu")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str((resident() >> 20) + 4))
    with pytest.raises(ConfigError, match="cannot hold one mnist model"), torch_threads(torch.get_num_threads()):
        grid_task(cfg, "cpu", [("mnist", 100, (0,), ("random",))], parent.run_id, mlflow.get_tracking_uri())
    assert [run.info.run_id for run in client.search_runs([parent.experiment_id])] == [parent.run_id]


def test_a_process_that_trains_itself_keeps_torchs_threads_within_its_cpu_quota(fake_host):
    """``docker run --cpus 1`` on a host of several cores: torch starts a thread per core; a
    grid, a sweep or a replay that trains in its own process lowers them to the quota."""
    proc, root = fake_host
    proc.write_text("1:cpu:/\n0::/\n")
    (root / "cpu").mkdir(parents=True)
    (root / "cpu/cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu/cpu.cfs_quota_us").write_text("100000\n")
    with torch_threads(2):
        fit_threads()
        assert torch.get_num_threads() == 1
    (root / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    with torch_threads(2):
        fit_threads()
        assert torch.get_num_threads() == min(2, usable_cores())  # no quota: as many as before, at most the cores

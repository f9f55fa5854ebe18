"""What this process may use: the cores it may run on (its CPU affinity, bounded by the CPU
quota of its cgroups), and the memory it may still take (a device's free memory, the host's
available memory, the tightest memory cgroup around the process).

A container started with ``docker run --cpus 2`` on a 64-core host may run on all 64 cores but
only for two cores' worth of time: 64 torch threads there spend most of each period throttled.
So the cores are the affinity's count, at most the quota (quota / period, rounded down, at least
1), the least over the process's cgroup and its ancestors.

A container, a systemd slice or a Slurm job (``--mem``, where Slurm enforces it with cgroups:
``task/cgroup``) runs inside a memory cgroup whose limit can be far below what the host has
available; past it the kernel kills the job. So on a host the answer is the smaller of the
kernel's ``MemAvailable`` and, for the process's cgroup and each of its ancestors, the limit less
what the group holds: its usage less its inactive page cache, the part the kernel drops first
(as ``docker stats`` counts it). Active page cache counts as held, so the figure errs low.

Slurm may also hold a job to its ``--mem`` without cgroups (``task/none``, or a cluster that
kills jobs over their memory from its accounting): inside a job the figure is also bounded by
the job's memory (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` or ``SLURM_MEM_PER_GPU`` times
the node's CPUs or GPUs) less what this process holds. Other processes of the job are not seen there; cgroups see them.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

try:
    import resource
except ImportError:  # Windows: no peak to fall back on
    resource = None  # type: ignore[assignment]

MEMINFO = Path("/proc/meminfo")
PROC_STATUS = Path("/proc/self/status")
SLURM_MEM_PER_NODE = "SLURM_MEM_PER_NODE"  # MiB; Slurm sets these in a job that asked for memory
SLURM_MEM_PER_CPU = "SLURM_MEM_PER_CPU"
SLURM_CPUS_ON_NODE = "SLURM_CPUS_ON_NODE"
SLURM_MEM_PER_GPU = "SLURM_MEM_PER_GPU"
SLURM_GPUS_ON_NODE = "SLURM_GPUS_ON_NODE"
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
FALLBACK = 8 << 30  # where the platform says nothing
N = TypeVar("N", int, float)  # what a cgroup file reads as: bytes, cores
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class CgroupFiles:
    """One cgroup version's file names: the limit, the usage, and the memory.stat key of the
    page cache the kernel drops first."""

    limits: tuple[str, ...]
    usage: str
    inactive_file: str


V1 = CgroupFiles(("memory.limit_in_bytes",), "memory.usage_in_bytes", "total_inactive_file")
# memory.high: past it the kernel reclaims and throttles hard (systemd's MemoryHigh=)
V2 = CgroupFiles(("memory.max", "memory.high"), "memory.current", "inactive_file")


def usable_cores() -> int:
    """The cores this process may keep busy: its CPU affinity (a container's cpuset, a Slurm
    allocation, ``taskset``), not the machine's count, where the platform says; at most its
    cgroups' CPU quota in whole cores (``cpu_quota``), never below 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, cores if quota is None else min(cores, math.floor(quota)))


def cpu_quota() -> float | None:
    """Cores' worth of CPU time the process's cgroups allow per period, the least over its cgroup
    and every ancestor that sets a quota (v2's ``cpu.max``, v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``); None where none does or nothing can be read. Never raises."""
    return _least("cpu", _quota)


def free_memory(device: torch.device) -> int:
    """Bytes ``device`` can still give: CUDA's free memory; on a host, ``host_available()``
    bounded by ``cgroup_available()`` where a memory cgroup limits the process and by
    ``slurm_available()`` inside a Slurm job that asked for memory."""
    if device.type == "cuda":
        import torch  # lazy: loaded already by whoever holds a device; Slurm's checks import this module without it

        return int(torch.cuda.mem_get_info(device)[0])
    return min(b for b in (host_available(), cgroup_available(), slurm_available()) if b is not None)


def slurm_available() -> int | None:
    """Bytes the Slurm job around this process still allows it: the job's memory on this node
    (``SLURM_MEM_PER_NODE`` MiB, or ``SLURM_MEM_PER_CPU`` MiB times ``SLURM_CPUS_ON_NODE``, or
    ``SLURM_MEM_PER_GPU`` times ``SLURM_GPUS_ON_NODE``) less this process's resident memory,
    never below 0; None outside a job, or one that set no memory. Per process: the other
    processes of the job (``--workers N`` inside it) are not subtracted; cgroups count them.
    A job that Slurm holds to its ``--mem`` without cgroups is killed past it all the same. Slurm
    sets these in batch jobs (``sbatch``, as submitit submits altrack's tasks), not in the tasks
    of a bare ``srun``."""
    try:
        per_node = os.environ.get(SLURM_MEM_PER_NODE)
        if per_node:
            limit = int(per_node)
        elif os.environ.get(SLURM_MEM_PER_CPU):
            limit = int(os.environ[SLURM_MEM_PER_CPU]) * int(os.environ.get(SLURM_CPUS_ON_NODE) or 1)
        elif os.environ.get(SLURM_MEM_PER_GPU):
            limit = int(os.environ[SLURM_MEM_PER_GPU]) * int(os.environ.get(SLURM_GPUS_ON_NODE) or 1)
        else:
            return None
    except ValueError:  # not a number: as if unset
        return None
    if limit <= 0:  # --mem=0: all of the node's memory, which the host's figure already bounds
        return None
    return max(0, limit * 2**20 - resident())


def resident() -> int:
    """This process's resident bytes (Linux's ``VmRSS``); elsewhere its peak so far, which errs
    high (``ru_maxrss``: bytes on macOS, KiB on the BSDs); 0 where neither exists."""
    now = _proc_kib(PROC_STATUS, "VmRSS")
    if now is not None or resource is None:
        return now or 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _proc_kib(file: Path, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a /proc file; None where it cannot be read."""
    try:
        for line in file.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_available() -> int:
    """The host's available bytes. On Linux the kernel's ``MemAvailable``: free pages plus the
    page cache it can drop. Not ``SC_AVPHYS_PAGES``, free pages alone: on a machine whose page
    cache had filled its RAM (a CI run after installing torch, 24 GiB with 23 available) those
    were 419 MiB, and CIFAR-10 on a CPU (115 MiB a model, under a quarter of that) was refused.
    Elsewhere free pages, where the platform says, else 8 GiB."""
    available = _proc_kib(MEMINFO, "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK


def cgroup_available() -> int | None:
    """Bytes the process's memory cgroups still allow, the least over its cgroup and every
    ancestor up to the mount's root that sets a limit (Slurm limits the job's cgroup, and runs
    a task in a step's cgroup below it); None where none does, or there is no cgroup to read.

    cgroup v1's memory controller where it is mounted (``/sys/fs/cgroup/memory``, also on
    hybrid hosts), else the v2 hierarchy (``/sys/fs/cgroup``, or ``/sys/fs/cgroup/unified``).
    A path ``/proc/self/cgroup`` names that the mount lacks is read from its deepest folder the
    mount has (a container that sees its own cgroup as the root: the mount's root); one outside
    the process's cgroup namespace (``..``) is not read at all. Never raises: what cannot be read
    counts as no limit."""
    return _least("memory", _headroom)


def _least(controller: str, read: Callable[[Path, bool], N | None]) -> N | None:
    """The least of ``read(folder, v1)`` over the process's cgroup folder for ``controller`` and
    its ancestors up to the mount's root, as ``/proc/self/cgroup`` names it; None where every
    folder reads None, or what it needs cannot be read (a permission error on a stat, an
    undecodable file). v1's controller where it is mounted (``/sys/fs/cgroup/memory``,
    ``/sys/fs/cgroup/cpu,cpuacct``; also on hybrid hosts), else the v2 hierarchy."""
    try:
        return _least_in(PROC_CGROUP.read_text().splitlines(), controller, read)
    except (OSError, ValueError):
        return None


def _least_in(lines: list[str], controller: str, read: Callable[[Path, bool], N | None]) -> N | None:
    """``_least`` from the lines of ``/proc/self/cgroup``."""
    v1, v2 = None, None
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controller in controllers.split(","):
            mount = next((CGROUP_ROOT / name for name in (controllers, controller)
                          if (CGROUP_ROOT / name).is_dir()), None)  # fmt: skip
            v1 = None if mount is None else (mount, path)
        elif line.startswith("0::"):
            v2 = path
    if v1 is not None:
        return _least_over(*v1, lambda folder: read(folder, True))
    if v2 is not None:
        mount = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
        return _least_over(mount, v2, lambda folder: read(folder, False))
    return None


def _least_over(mount: Path, path: str, read: Callable[[Path], N | None]) -> N | None:
    """The least of ``read(folder)`` over ``path``'s folder in ``mount`` and its ancestors up to
    ``mount``; None where every folder reads None."""
    parts = path.removesuffix(" (deleted)").strip("/").split("/")
    if ".." in parts:  # outside our cgroup namespace: no folder of the mount is an ancestor
        return None
    folder = mount.joinpath(*parts)
    while folder != mount and not folder.is_dir():  # a folder the mount lacks: its nearest ancestor
        folder = folder.parent
    least = None
    while True:
        value = read(folder)
        if value is not None:
            least = value if least is None else min(least, value)
        if folder == mount or mount not in folder.parents:
            return least
        folder = folder.parent


def _quota(folder: Path, v1: bool) -> float | None:
    """One cgroup's CPU quota in cores; None without one ("max", v1's -1) or a readable file."""
    try:
        if v1:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        else:
            text = (folder / "cpu.max").read_text().split()
            if text[0] == "max":
                return None
            quota, period = int(text[0]), int(text[1])
    except (OSError, ValueError, IndexError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _headroom(folder: Path, v1: bool) -> int | None:
    """One cgroup's tightest memory limit less what it holds (usage less inactive page cache),
    never below 0; None without a limit (or where its files cannot be read)."""
    files = V1 if v1 else V2
    limits = [limit for name in files.limits if (limit := _limit(folder / name)) is not None]
    if not limits:
        return None
    try:
        usage = int((folder / files.usage).read_text())
    except (OSError, ValueError):
        return None
    return max(0, min(limits) - max(0, usage - _stat(folder, files.inactive_file)))


def _limit(file: Path) -> int | None:
    """A limit file's bytes; None for no limit ("max", v1's huge number) or no readable file."""
    try:
        text = file.read_text().strip()
        return None if text == "max" or int(text) >= NO_LIMIT else int(text)
    except (OSError, ValueError):
        return None


def _stat(folder: Path, key: str) -> int:
    """``key``'s value in the cgroup's memory.stat, 0 where it is missing or unreadable (so the
    headroom errs low)."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0

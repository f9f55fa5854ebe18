"""Who owns a RUNNING grid run or sweep trial, and whether that owner is still alive.

Two signals, one helper:

- **The owner**, ``host:pidns:pid``: a process on this host, in this pid namespace, that is gone
  is dead at once. An owner elsewhere (another host, a container with its own pid namespace)
  cannot be judged by pid, since its pid may be reused or invisible here.
- **The heartbeat**: the owner writes the time every ``grace / 3`` seconds; an owner silent for
  ``grace`` seconds is dead wherever it ran (a pod restarted under another hostname, a worker
  killed between creating a trial and tagging it). ``ALTRACK_LIVENESS_GRACE`` sets the grace
  (seconds, default 90).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pickle
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_GRACE_SECONDS = 90.0
PR_SET_PDEATHSIG = 1


def grace_seconds() -> float:
    """How long an owner may stay silent before it is taken for dead."""
    try:
        return max(1.0, float(os.environ.get("ALTRACK_LIVENESS_GRACE", DEFAULT_GRACE_SECONDS)))
    except ValueError:
        return DEFAULT_GRACE_SECONDS


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def worker_id(pid: int | None = None) -> str:
    """This process (or its child ``pid``, which shares its pid namespace) as an owner:
    ``host:pidns:pid``."""
    return f"{socket.gethostname()}:{_pid_namespace()}:{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists in this pid namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(owner: str) -> bool:
    """True only for an owner on this host, in this pid namespace, whose process is gone (never
    for this process). Owners written before namespaces (``host:pid``) are judged by host alone."""
    parts = owner.split(":")
    if len(parts) == 3:
        host, namespace, pid = parts
        if namespace != _pid_namespace():
            return False
    elif len(parts) == 2:
        host, pid = parts
    else:
        return False
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not pid_alive(int(pid))


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux ``PR_SET_PDEATHSIG``), and
    exit now if the parent is already gone. Elsewhere, nothing: the parent's own teardown remains."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the signal was armed
        os._exit(1)


def _tethered_call(parent_pid: int, payload: bytes) -> object:
    """A spawned child's entry: arm ``die_with_parent`` first, then unpickle and call the target.
    Unpickling imports the target's module (torch, MLflow, Optuna: many seconds on a loaded
    machine); a parent SIGKILLed during those seconds would otherwise leave its child running.
    The child ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
    parent alone decides what its children do then (``protocol.map_in_workers``, a sweep's
    workers), the same whether the signal came from a terminal or was sent to it alone."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn, args = pickle.loads(payload)
    return fn(*args)


def tethered(fn: Callable, *args: object) -> tuple[Callable, tuple]:
    """``(target, args)`` for a spawned ``Process`` (or a pool's ``initializer, initargs``) that
    runs ``fn(*args)`` in a child dying with this process, armed before ``fn``'s module loads."""
    return _tethered_call, (os.getpid(), pickle.dumps((fn, args)))


TEMP_PREFIX = "altrack-"


def temp_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A temp folder named by its owner (``altrack-<pidns>-<pid>-<kind>-…``), so that one a
    SIGKILLed process leaves behind can be told from one a live process is using."""
    return tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{_pid_namespace()}-{os.getpid()}-{kind}-")


def clean_stale_temp_dirs() -> int:
    """Delete the altrack temp folders whose owner (this pid namespace) is gone; returns how many."""
    pattern = re.compile(rf"{TEMP_PREFIX}(?P<ns>\d+)-(?P<pid>\d+)-")
    removed = 0
    for path in Path(tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*"):
        found = pattern.match(path.name)
        if found is None or found["ns"] != _pid_namespace() or int(found["pid"]) == os.getpid():
            continue
        if path.is_dir() and not pid_alive(int(found["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def is_stale(last_beat: float | None) -> bool:
    """Whether a heartbeat written at ``last_beat`` (epoch seconds) is older than the grace."""
    return last_beat is not None and time.time() - last_beat > grace_seconds()


class Heartbeat:
    """Calls ``beat(now)`` at once and then every ``grace / 3`` seconds from a daemon thread,
    until the ``with`` block ends. A failing beat is retried at the next tick: the work goes on."""

    def __init__(self, beat: Callable[[float], None]) -> None:
        self.beat = beat
        self.interval = grace_seconds() / 3
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="altrack-heartbeat", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # the next tick tries again; the owner must not die of it
                self.beat(time.time())

    def __enter__(self) -> Heartbeat:
        self.beat(time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

"""Who owns a RUNNING grid run or sweep trial, and whether that owner is still alive.

One encoding, ``host:pid``, for grid runs (an MLflow tag) and sweep trials (an Optuna user
attribute). An owner on another host is taken as alive: only its own machine can tell.
"""

from __future__ import annotations

import os
import socket


def worker_id() -> str:
    """This process as an owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dead(owner: str) -> bool:
    """True only for an owner on this host whose process is gone (never for this process)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not pid_alive(int(pid))

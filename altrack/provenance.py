"""What produced a result: altrack's code, torch, the device and the data.

Part of every run's resume key (a rerun after a fix to selection or training, a torch upgrade,
another device or other data never reuses an old result) and of its lineage tags.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

import torch

from altrack import __version__

SOURCE = Path(__file__).resolve().parent  # the altrack package folder
STACK_WIDTH = "stack_width"  # the identity key, and the run param, of a CUDA run's padded stack width
GIT_TIMEOUT = 10


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", "-C", str(SOURCE.parent), *args], capture_output=True, timeout=GIT_TIMEOUT, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.decode(errors="replace")


@functools.cache
def git_commit() -> str:
    """The checkout's commit when altrack runs from one, with ``+`` and a digest of any uncommitted
    change to ``altrack/`` (edited or new files); '' when it is not a git checkout."""
    if not (SOURCE.parent / ".git").exists():
        return ""
    head = (_git("rev-parse", "HEAD") or "").strip()
    if not head:
        return ""
    digest = hashlib.sha256((_git("diff", "HEAD", "--", str(SOURCE)) or "").encode())
    untracked = (_git("ls-files", "--others", "--exclude-standard", "--", str(SOURCE)) or "").split()
    for name in sorted(untracked):
        path = SOURCE.parent / name
        if path.suffix == ".py" and path.is_file():
            digest.update(name.encode() + path.read_bytes())
    changed = bool(untracked) or bool((_git("diff", "HEAD", "--stat", "--", str(SOURCE)) or "").strip())
    return f"{head}+{digest.hexdigest()[:12]}" if changed else head


def code_version() -> dict[str, str]:
    """altrack's version and git commit, and torch's version."""
    return {"altrack": __version__, "git_commit": git_commit(), "torch": torch.__version__}


def identity(device: torch.device | str, data_digest: str, stack_width: int | None = None) -> dict[str, str]:
    """Everything besides the run's key and settings that decides its result: the code, torch,
    the device type, the data and, where stacks are padded (CUDA), their width."""
    width = {} if stack_width is None else {STACK_WIDTH: str(stack_width)}
    return {**code_version(), "device": torch.device(device).type, "data": data_digest, **width}

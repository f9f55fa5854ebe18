"""Shared helpers for the benchmark scripts: real MNIST pool embeddings and a timer."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from altrack.data import load_dataset
from altrack.protocol import SeedStage, train_seed_stage
from altrack.settings import Settings


def data_dir() -> str:
    return os.environ.get("ALTRACK_DATA_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def mnist_stage(budget: int = 2000, seed: int = 0) -> tuple[object, SeedStage]:
    data = load_dataset("mnist", data_dir())
    return data, train_seed_stage(data, budget, seed, Settings())


def pool_embeddings(budget: int = 2000, seed: int = 0) -> np.ndarray:
    _, stage = mnist_stage(budget, seed)
    return np.ascontiguousarray(stage.embeddings[stage.pool_indices], dtype=np.float32)


@contextmanager
def timer(store: dict, key: str):
    start = time.perf_counter()
    yield
    store[key] = time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree) / 2**20


ENTRY = "import sys; sys.path.insert(0, sys.argv.pop(1)); from altrack.cli import main; sys.exit(main())"


def timed_cli(root: Path, arguments: list[str], work: Path, env: dict[str, str]) -> tuple[float, float, str, str]:
    """(wall seconds, peak MB of the process tree, stdout, stderr) of ``altrack ARGUMENTS`` run
    from ``root``'s altrack package in ``work``, with ``env`` added; exits with the tail of
    stderr if it fails. Output goes to files in ``work``, so a chatty command never blocks."""
    command = [sys.executable, "-c", ENTRY, str(root), *arguments]
    out, err = work / "stdout.txt", work / "stderr.txt"
    start = time.perf_counter()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(command, cwd=work, env={**os.environ, **env}, stdout=stdout, stderr=stderr)
        peak = 0.0
        try:
            while proc.poll() is None:
                peak = max(peak, tree_rss_mb(proc.pid))
                time.sleep(0.5)
        finally:  # Ctrl-C: the command goes too
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"altrack {arguments[0]} failed ({root}): {err.read_text()[-2000:]}")
    return wall, peak, out.read_text(), err.read_text()

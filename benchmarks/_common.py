"""Shared helpers for the benchmark scripts: real MNIST pool embeddings and a timer."""

from __future__ import annotations

import os
import resource
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

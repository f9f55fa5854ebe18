"""Shared fixtures: real data from ../shared/data (copied writable once), real MLflow stores."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import altrack  # noqa: F401 - before torch, as in the CLI: it shortens libgomp's spin (altrack/__init__.py)

# isort: split
import mlflow
import numpy as np
import pytest
import torch

from altrack.selection import SelectionContext
from altrack.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    for candidate in (os.environ.get("ALTRACK_TEST_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate, "MNIST", "raw").is_dir():
            return Path(candidate)
    raise RuntimeError("tests need the offline datasets: set ALTRACK_TEST_DATA or place them in ../shared/data")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable copy: torchvision unpacks archives next to themselves. CIFAR npz files are linked."""
    source = _shared_data()
    target = tmp_path_factory.mktemp("data")
    for name in ("MNIST", "FashionMNIST"):
        shutil.copytree(source / name / "raw", target / name / "raw")
        for path in (target / name / "raw").iterdir():
            path.chmod(0o644)
    (target / "cifar10").mkdir()
    for name in ("cifar10_train.npz", "cifar10_test.npz"):
        (target / "cifar10" / name).symlink_to(source / "cifar10" / name)
    return target


@pytest.fixture(scope="session")
def _tracking_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(_tracking_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request) -> str:
    """A real SQLite MLflow store (shared by the session), with a fresh experiment per test.

    The test runs in its own folder, where MLflow puts the experiment's artifacts.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _tracking_db)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(_tracking_db)
    experiment = f"test-{request.node.name}-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    yield experiment
    while mlflow.active_run() is not None:
        mlflow.end_run()


def make_context(
    *,
    n_train: int = 300,
    n_seed: int = 20,
    budget: int = 80,
    dim: int = 6,
    num_classes: int = 4,
    seed: int = 0,
    settings: Settings | None = None,
    embeddings: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    ce_loss: np.ndarray | None = None,
) -> SelectionContext:
    """A toy selection problem with consistent probabilities, labels and losses."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(num_classes, size=n_train)
    if probs is None:
        probs = rng.dirichlet(np.full(num_classes, 0.5), size=n_train)
    if embeddings is None:
        embeddings = rng.normal(size=(n_train, dim)).astype(np.float32)
    if ce_loss is None:
        ce_loss = -np.log(np.clip(probs[np.arange(n_train), labels], 1e-12, None))
    residual = probs - np.eye(probs.shape[1])[labels]
    grad_loss = (residual**2).sum(1) * ((embeddings.astype(np.float64) ** 2).sum(1) + 1)
    seed_indices = np.sort(rng.choice(n_train, n_seed, replace=False)).astype(np.int64)
    return SelectionContext(
        seed_indices=seed_indices,
        pool_indices=np.setdiff1d(np.arange(n_train, dtype=np.int64), seed_indices),
        budget=budget,
        probs=probs,
        embeddings=embeddings,
        labels=labels,
        ce_loss=ce_loss,
        grad_loss=grad_loss,
        settings=settings or Settings(),
        rng=np.random.default_rng(seed + 1),
        shared_seed=seed + 2,
    )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block, put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

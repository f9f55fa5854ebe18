"""One protocol run (§5.2.2), and a grid of them that trains each seed model once.

seed set (k' random points) -> seed model M -> score the pool with M -> select k - k' points
-> retrain from scratch on all k -> test accuracy.

Randomness comes from named streams of one integer seed, so every method of a
(dataset, k, seed) shares the seed set, M, the final model's initialisation and its batch order:
the comparison between methods is paired.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from altrack.config import GridConfig
from altrack.data import Dataset, load_dataset, resolve_device, set_determinism
from altrack.errors import TrainingDiverged
from altrack.models import build_model
from altrack.provenance import identity
from altrack.results import FAILED, FINISHED, ResultRow
from altrack.selection import SelectionContext, SelectionResult, get_selector
from altrack.settings import RunKey, Settings
from altrack.train import evaluate, forward_all, train

SEED_SET, SEED_INIT, SEED_ORDER, SELECT, FINAL_INIT, FINAL_ORDER = range(6)

EpochHook = Callable[[int, float], None]


def stream_seed(seed: int, stream: int, salt: str = "") -> int:
    """A 63-bit seed for one named use of ``seed``; ``salt`` separates methods."""
    entropy = [seed, stream, zlib.crc32(salt.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def fresh_model(dataset: str, device: torch.device, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(dataset, device)


def fit(
    data: Dataset,
    indices: np.ndarray,
    settings: Settings,
    seed: int,
    init_stream: int,
    order_stream: int,
    weights: np.ndarray | None = None,
    on_epoch: EpochHook | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """A fresh model trained on ``indices`` of the train split."""
    device = data.x_train.device
    model = fresh_model(data.name, device, stream_seed(seed, init_stream))
    idx = torch.from_numpy(indices).to(device)
    w = None if weights is None else torch.from_numpy(weights).float().to(device)
    losses = train(
        model,
        data.x_train[idx],
        data.y_train[idx],
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        generator=torch.Generator().manual_seed(stream_seed(seed, order_stream)),
        weights=w,
        on_epoch=on_epoch,
    )
    return model, losses


@dataclass
class SeedStage:
    """The seed set, the seed model M and M's outputs on the whole train split."""

    dataset: str
    budget: int
    seed: int
    seed_indices: np.ndarray
    pool_indices: np.ndarray
    labels: np.ndarray  # (n_train,) the train labels, for selection and the selection plot
    model: torch.nn.Module
    epoch_losses: list[float]
    probs: np.ndarray
    embeddings: np.ndarray
    ce_loss: np.ndarray
    grad_loss: np.ndarray
    test_accuracy: float
    seconds: float


def available_indices(n_train: int, holdout: np.ndarray | None) -> np.ndarray:
    """Train indices that may be labelled: all of them, minus a validation holdout if any."""
    everything = np.arange(n_train, dtype=np.int64)
    return everything if holdout is None else np.setdiff1d(everything, holdout)


def train_seed_stage(
    data: Dataset,
    budget: int,
    seed: int,
    settings: Settings,
    on_epoch: EpochHook | None = None,
    holdout: np.ndarray | None = None,
) -> SeedStage:
    """Draw the seed set, train M on it, and score the whole train split with M.

    ``holdout`` (a validation split carved from train) is excluded from the seed set and the pool.
    """
    started = time.perf_counter()
    available = available_indices(data.x_train.shape[0], holdout)
    rng = np.random.default_rng(stream_seed(seed, SEED_SET))
    seed_indices = np.sort(rng.choice(available, size=settings.n_seed(budget), replace=False)).astype(np.int64)
    pool_indices = np.setdiff1d(available, seed_indices)
    model, losses = fit(data, seed_indices, settings, seed, SEED_INIT, SEED_ORDER, on_epoch=on_epoch)
    out = forward_all(model, data.x_train)
    accuracy, _ = evaluate(model, data.x_test, data.y_test)
    return SeedStage(
        dataset=data.name,
        budget=budget,
        seed=seed,
        seed_indices=seed_indices,
        pool_indices=pool_indices,
        labels=data.y_train.cpu().numpy(),
        model=model,
        epoch_losses=losses,
        probs=out.probs.cpu().numpy(),
        embeddings=out.embeddings.cpu().numpy(),
        ce_loss=out.ce_loss(data.y_train).cpu().numpy(),
        grad_loss=out.grad_loss(data.y_train).cpu().numpy(),
        test_accuracy=accuracy,
        seconds=time.perf_counter() - started,
    )


@dataclass
class RunResult:
    """A finished or failed protocol run; failed runs carry ``error`` and no accuracy."""

    key: RunKey
    settings: Settings
    device: str
    identity: dict[str, str]  # altrack.provenance.identity: code, torch, device and data
    status: str = FINISHED
    error: str | None = None
    test_accuracy: float = float("nan")
    test_loss: float = float("nan")
    val_accuracy: float = float("nan")
    stage: SeedStage | None = None
    selection: SelectionResult | None = None
    final_model: torch.nn.Module | None = None
    final_epoch_losses: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def selected_indices(self) -> np.ndarray:
        """All k labelled train indices: the seed set, then the selection in selection order."""
        assert self.stage is not None and self.selection is not None
        return np.concatenate([self.stage.seed_indices, self.selection.indices]).astype(np.int64)

    @property
    def config_hash(self) -> str:
        return self.key.config_hash(self.settings, self.identity)

    def row(self, run_id: str) -> ResultRow:
        """This result as the report's row, logged as MLflow run ``run_id``."""
        return ResultRow(**asdict(self.key), status=self.status, test_accuracy=self.test_accuracy, run_id=run_id,
                         error=self.error or "", setting=self.settings.label)  # fmt: skip


def run_method(
    data: Dataset,
    stage: SeedStage,
    method: str,
    settings: Settings,
    start_training: Callable[[], EpochHook | None] | None = None,
    holdout: np.ndarray | None = None,
) -> RunResult:
    """Select with ``method`` from the stage's pool, then retrain from scratch on all k points.

    ``start_training`` is called between selection and retraining (a progress bar hook).
    With a ``holdout``, the final model's accuracy on it is ``val_accuracy``.
    """
    key = RunKey(data.name, method, stage.budget, stage.seed)
    device = data.x_train.device
    result = RunResult(key, settings, str(device), identity(device, data.digest), stage=stage)
    started = time.perf_counter()
    ctx = SelectionContext(
        seed_indices=stage.seed_indices,
        pool_indices=stage.pool_indices,
        budget=stage.budget,
        probs=stage.probs,
        embeddings=stage.embeddings,
        labels=stage.labels,
        ce_loss=stage.ce_loss,
        grad_loss=stage.grad_loss,
        settings=settings,
        rng=np.random.default_rng(stream_seed(stage.seed, SELECT, method)),
    )
    result.selection = get_selector(method).select(ctx)
    selected = result.selected_indices
    result.timings["selection_seconds"] = time.perf_counter() - started

    weights = None
    if settings.weighted:
        weights = np.concatenate([np.ones(len(stage.seed_indices)), result.selection.weights])
        weights = np.where(np.isnan(weights), 1.0, weights)
    on_epoch = start_training() if start_training is not None else None
    started = time.perf_counter()
    try:
        model, losses = fit(data, selected, settings, stage.seed, FINAL_INIT, FINAL_ORDER, weights, on_epoch)
    except TrainingDiverged as exc:
        result.status, result.error = FAILED, str(exc)
        return result
    result.timings["final_train_seconds"] = time.perf_counter() - started
    result.timings["seed_train_seconds"] = stage.seconds
    result.final_model, result.final_epoch_losses = model, losses
    result.test_accuracy, result.test_loss = evaluate(model, data.x_test, data.y_test)
    if holdout is not None:
        idx = torch.from_numpy(holdout).to(data.x_train.device)
        result.val_accuracy, _ = evaluate(model, data.x_train[idx], data.y_train[idx])
    return result


class _Progress:
    """Runs bar plus a transient epochs bar; silent when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.runs = tqdm(total=total, desc="runs", unit="run", disable=not enabled, dynamic_ncols=True)
        self.epochs: tqdm | None = None

    def start_training(self, label: str, epochs: int) -> EpochHook:
        if self.epochs is not None:
            self.epochs.close()
        self.epochs = tqdm(total=epochs, desc=label, unit="ep", leave=False, disable=not self.enabled)

        def hook(epoch: int, loss: float) -> None:
            assert self.epochs is not None
            self.epochs.update(1)
            self.epochs.set_postfix(loss=f"{loss:.4f}")

        return hook

    def finished(self, result: RunResult) -> None:
        self.runs.update(1)
        if result.status == FINISHED:
            self.runs.set_postfix(last=f"{result.key.method} {result.test_accuracy:.4f}")

    def close(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
        self.runs.close()


def run_group(
    cfg: GridConfig,
    device: str,
    dataset: str,
    budget: int,
    seed: int,
    methods: Sequence[str],
    bar: _Progress | None = None,
) -> Iterator[RunResult]:
    """Every method of one (dataset, k, seed) on ``device``: one seed model, shared by all of them.

    A diverged seed model fails every method that depended on it.
    """
    data = load_dataset(dataset, cfg.data_dir, device)
    bar = bar or _Progress(0, False)
    hook = bar.start_training(f"seed model {dataset} k={budget} s={seed}", cfg.settings.epochs)
    try:
        stage: SeedStage | None = train_seed_stage(data, budget, seed, cfg.settings, hook)
        stage_error = None
    except TrainingDiverged as exc:
        stage, stage_error = None, f"seed model: {exc}"
    for method in methods:
        key = RunKey(dataset, method, budget, seed)
        if stage is None:
            yield RunResult(key, cfg.settings, device, identity(device, data.digest), status=FAILED, error=stage_error)
            continue
        start = functools.partial(bar.start_training, f"{method} k={budget} s={seed}", cfg.settings.epochs)
        yield run_method(data, stage, method, cfg.settings, start)


def _group_worker(
    cfg: GridConfig, device: str, dataset: str, budget: int, seed: int, methods: Sequence[str]
) -> list[RunResult]:
    set_determinism(device)  # a spawned process starts with torch's defaults
    return list(run_group(cfg, device, dataset, budget, seed, methods))


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` processes gets its share of the cores, so they do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // workers)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _groups(keys: Sequence[RunKey]) -> dict[tuple[str, int, int], list[str]]:
    groups: dict[tuple[str, int, int], list[str]] = {}
    for key in keys:
        groups.setdefault((key.dataset, key.budget, key.seed), []).append(key.method)
    return groups


def iterate_grid(
    cfg: GridConfig,
    *,
    device: str | None = None,
    skip: frozenset[RunKey] = frozenset(),
    progress: bool = True,
    workers: int = 1,
) -> Iterator[RunResult]:
    """Yield each run's result as soon as it exists; keys in ``skip`` are not run.

    ``device`` is a resolved device (``resolve_device(cfg.device)`` when omitted). A seed model
    is trained once per (dataset, k, seed), and only if a method still needs it. With
    ``workers > 1``, (dataset, k, seed) groups run in that many processes, each with its share
    of the cores; results are the same as with one worker, in completion order.
    """
    if device is None:
        device = str(resolve_device(cfg.device))
        set_determinism(device)
    groups = _groups([key for key in cfg.run_keys() if key not in skip])
    bar = _Progress(sum(map(len, groups.values())), progress)
    try:
        if workers <= 1:
            for (dataset, budget, seed), methods in groups.items():
                for result in run_group(cfg, device, dataset, budget, seed, methods, bar):
                    bar.finished(result)
                    yield result
            return
        threads = threads_per_worker(workers)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(_group_worker, cfg, device, *group, methods) for group, methods in groups.items()]
            for future in as_completed(futures):
                for result in future.result():
                    bar.finished(result)
                    yield result
    finally:
        bar.close()

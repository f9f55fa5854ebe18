"""One protocol run (§5.2.2), and a grid of them that trains each seed model once.

seed set (k' random points) -> seed model M -> score the pool with M -> select k - k' points
-> retrain from scratch on all k -> test accuracy.

Randomness comes from named streams of one integer seed, so every method of a
(dataset, k, seed) shares the seed set, M, the final model's initialisation and its batch order:
the comparison between methods is paired.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import suppress
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from altrack.config import GridConfig
from altrack.data import DATASETS, Dataset, load_dataset, resolve_device, set_determinism
from altrack.errors import ConfigError, TrainingDiverged
from altrack.liveness import tethered
from altrack.models import build_model
from altrack.provenance import identity
from altrack.resources import free_memory, resident, usable_cores
from altrack.results import FAILED, FINISHED, ResultRow
from altrack.selection import SelectionContext, SelectionResult, get_selector
from altrack.settings import RunKey, Settings
from altrack.stack import infer_stacked, model_bytes, train_stacked
from altrack.train import Outputs, forward_all, score

SEED_SET, SEED_INIT, SEED_ORDER, SELECT, FINAL_INIT, FINAL_ORDER, SHARED_SELECT = range(7)

EpochHook = Callable[[int, float], None]
# one model's epoch loss as it trains: (what, epoch, loss), what a seed (seed model) or a RunKey (final model)
LiveHook = Callable[[object, int, float], None]


def stream_seed(seed: int, stream: int, salt: str = "") -> int:
    """A 63-bit seed for one named use of ``seed``; ``salt`` separates methods."""
    entropy = [seed, stream, zlib.crc32(salt.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def fresh_model(dataset: str, device: torch.device, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(dataset, device)


@dataclass(frozen=True)
class Fit:
    """One model to train: its train indices, the seed of its streams and its example weights."""

    indices: np.ndarray
    seed: int
    weights: np.ndarray | None = None


# models trained together by default, by (device, convolutional). An MLP's step on a GPU is launch-bound:
# 64 cost what 16 do. CifarNet's is compute-bound (H100, per model-step: 0.46 ms at 16, 0.37 at 35,
# 0.33 at 64), and every stack is padded to this width on CUDA, the seed models' too: 35 is the
# final models of 5 seeds x 7 methods, with 5 seed models a stack (``fit_many``'s ``share``)
DEFAULT_STACK = {("cpu", False): 16, ("accelerator", False): 64, ("accelerator", True): 35}
# seed models share a stack's width this many ways (the paper's seven methods): a constant, not the
# registry's size, so that registering a method leaves every seed model's bits alone
SEED_SHARE = 7


@functools.cache
def _model_need(dataset: str, batch_size: int) -> int:
    """Bytes one model of ``dataset`` takes to train (a probe, so computed once per process)."""
    return model_bytes(build_model(dataset, "cpu"), batch_size, DATASETS[dataset].image_shape)


DEFAULT_CAP_SHARE = 4  # off CUDA the default memory cap is this share of ``free_memory``
MEMORY_MARGIN = 1 << 28  # in the --mem-gb a refusal suggests: a task measures itself, a little more


def planning_cap(
    device: torch.device, memory_cap: int | None, slurm_mem_gb: float | None = None, held: int = 0
) -> int | None:
    """The memory cap to plan and check stacks with, in bytes: an explicit ``memory_cap``; for CPU
    runs that Slurm jobs of ``slurm_mem_gb`` (``--mem-gb``) will train, the default such a task
    gets, a ``DEFAULT_CAP_SHARE``-th of what its job's memory leaves once the task holds ``held``
    bytes (torch, MLflow and the data: ``loaded_bytes``; a task checks its own), not of the
    launcher's free memory, which says nothing of the nodes'; else None, the default of the host
    that asks."""
    if memory_cap is not None or slurm_mem_gb is None or device.type == "cuda":
        return memory_cap
    return max(0, int(slurm_mem_gb * 2**30) - held) // DEFAULT_CAP_SHARE


def loaded_bytes(before: int, data: Dataset) -> int:
    """What loading ``data`` added to this process, as a Slurm task that loads it holds it on top
    of its code (torch, MLflow, altrack: the launcher's ``resident()`` before any data):
    ``resident()`` now less ``before``, read just before the load (the tensors and what the
    loader left in the heap), at least the tensors' bytes (a dataset this process had loaded
    already adds nothing now)."""
    return max(resident() - before, data.nbytes)


def stack_limit(
    dataset: str, device: torch.device, requested: int = 0, memory_cap: int | None = None, batch_size: int = 32,
    *, refuse: bool = True,
) -> int:
    """How many models train together: ``requested`` (0: ``DEFAULT_STACK``), at most what
    ``memory_cap`` bytes hold. On CUDA that is the width every stack is padded to
    (``stack_width``), which a run's bits depend on, so it follows from the config alone: the
    cap lowers it only when given, and ``check_stacks`` refuses a card too small for it. Elsewhere
    the cap defaults to a quarter of ``free_memory`` (the host's, bounded by its memory cgroups
    and a Slurm job's ``--mem``); convolutions train one at a time on a CPU
    (a grouped convolution is slower there than N plain ones, and its bits depend on N).
    Raises ``ConfigError`` when the cap cannot hold one model; with ``refuse`` False (training
    under way, checked before it started) a default cap that memory has shrunk below one model
    gives 1, as a claimed run failed for it would help nobody, and an explicit cap still raises."""
    need = _model_need(dataset, batch_size)
    cuda = device.type == "cuda"
    cap = memory_cap if memory_cap is not None or cuda else free_memory(device) // DEFAULT_CAP_SHARE
    if cap is not None and cap < need:
        if not refuse and memory_cap is None:
            return 1
        raise ConfigError(f"memory cap {cap / 2**20:.1f} MiB cannot hold one {dataset} model "
                          f"(about {need / 2**20:.1f} MiB to train)")  # fmt: skip
    conv = DATASETS[dataset].image_shape[0] > 1
    if device.type == "cpu" and conv:
        return 1
    limit = requested or DEFAULT_STACK[("cpu" if device.type == "cpu" else "accelerator", conv)]
    return limit if cap is None else min(limit, cap // need)


def stack_width(
    dataset: str, device: torch.device, requested: int = 0, memory_cap: int | None = None, batch_size: int = 32
) -> int | None:
    """The width every CUDA stack of ``dataset``'s final models is padded to (the seed models':
    a ``SEED_SHARE``-th of it), which a run's bits depend on; None off CUDA, where a stack's
    size changes no bit. The config alone decides it, so a Slurm launcher without a GPU and
    its tasks, or a replay on another card, agree. Raises ``ConfigError`` as ``stack_limit``."""
    if device.type != "cuda":
        return None
    return stack_limit(dataset, device, requested, memory_cap, batch_size)


def check_stacks(
    dataset: str, device: torch.device, stack: int = 0, memory_cap: int | None = None, batch_size: int = 32,
    gpu_here: bool = True,
) -> None:
    """Refuse, in one line before any run starts, a memory cap that cannot hold one model and a
    CUDA width whose stack the card's free memory cannot train: the width is never lowered to fit,
    since that would change the runs' bits (``gpu_here`` False: a Slurm launcher, whose tasks'
    cards are elsewhere). Raises ``ConfigError``."""
    width = stack_limit(dataset, device, stack, memory_cap, batch_size)
    if device.type != "cuda" or not gpu_here:
        return
    need, free = width * _model_need(dataset, batch_size), free_memory(device)
    if need > free:
        raise ConfigError(f"{width} stacked {dataset} models need about {need / 2**30:.1f} GiB to train, more "
                          f"than the GPU's {free / 2**30:.1f} GiB free: pass a smaller --stack "
                          "(runs' bits depend on it)")  # fmt: skip


def check_planned_stacks(
    dataset: str, device: torch.device, stack: int = 0, memory_cap: int | None = None, batch_size: int = 32,
    slurm_mem_gb: float | None = None, held: int = 0,
) -> None:
    """``check_stacks`` where the runs will train: here, or in Slurm jobs of ``slurm_mem_gb`` GiB
    each whose tasks hold about ``held`` bytes before training (``planning_cap``; their cards are
    elsewhere). A refusal by the jobs' memory says so, as the user gave no cap. A task checks
    again on its node, against a quarter of what its cgroup or its job's ``--mem`` has left after
    loading torch and the data. Raises ``ConfigError``."""
    cap = planning_cap(device, memory_cap, slurm_mem_gb, held)
    try:
        check_stacks(dataset, device, stack, cap, batch_size, gpu_here=slurm_mem_gb is None)
    except ConfigError as exc:
        if memory_cap is None and cap is not None:
            what = f"what --mem-gb {slurm_mem_gb:g} leaves" if held else f"--mem-gb {slurm_mem_gb:g}"
            once = f" once a task holds torch and the data (about {held / 2**30:.1f} GiB)" if held else ""
            least = (held + DEFAULT_CAP_SHARE * _model_need(dataset, batch_size) + MEMORY_MARGIN) / 2**30
            raise ConfigError(f"{exc}: a quarter of {what}{once}, what a Slurm job's stacks may take; "
                              f"give the jobs --mem-gb {math.ceil(least * 10) / 10:g} or more") from None  # fmt: skip
        raise


def padded_width(data: Dataset, settings: Settings, stack: int = 0, memory_cap: int | None = None,
                 share: int = 1) -> int | None:
    """The width of ``data``'s CUDA stacks for models that share a stack ``share`` ways
    (``stack_width`` // ``share``; the seed models pass ``SEED_SHARE``); None off CUDA."""
    width = stack_width(data.name, data.x_train.device, stack, memory_cap, settings.batch_size)
    return None if width is None else max(1, width // share)


def outputs_of(
    models: Sequence[torch.nn.Module], x: torch.Tensor, width: int | None, batch_size: int, features: bool = True
) -> Iterator[Outputs]:
    """Each model's outputs on all rows of ``x`` (embeddings as well if ``features``), in order and
    as they come, so a caller holds one model's (or one stack's) at a time. With ``width`` None
    (stacks of one GEMM per model: a CPU, MPS) one model at a time, ``forward_all``, as a model
    alone computes them; else as stacks padded to ``width``, the GEMMs the models trained with
    (``stack.infer_stacked``), so a model's outputs do not depend on which others share its stack."""
    if width is None:
        yield from (forward_all(model, x) for model in models)
        return
    for start in range(0, len(models), width):
        logits, embeddings = infer_stacked(models[start : start + width], x, width=width, batch_size=batch_size,
                                           features=features)  # fmt: skip
        empty = logits.new_empty(logits.shape[1], 0)
        for i in range(len(logits)):
            yield Outputs(logits[i], embeddings[i] if embeddings is not None else empty)


def evaluate_models(
    models: Sequence[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, width: int | None, batch_size: int
) -> list[tuple[float, float]]:
    """(accuracy, mean cross-entropy) of each model on (x, y), computed as ``outputs_of`` does."""
    return [score(out, y) for out in outputs_of(models, x, width, batch_size, features=False)]


def run_identity(
    dataset: str,
    digest: str,
    device: torch.device | str,
    settings: Settings,
    stack: int = 0,
    memory_cap: int | None = None,
) -> dict[str, str]:
    """What besides its key and settings decides a run's result: ``provenance.identity`` (code,
    torch, device, data) and, on CUDA, the stack width, so that a grid resumed with another
    ``--stack`` or ``--memory-cap`` reruns its runs instead of reusing them."""
    device = torch.device(device)
    return identity(device, digest, stack_width(dataset, device, stack, memory_cap, settings.batch_size))


def fit_many(
    data: Dataset,
    fits: Sequence[Fit],
    settings: Settings,
    init_stream: int,
    order_stream: int,
    on_epoch: EpochHook | None = None,
    stack: int = 0,
    memory_cap: int | None = None,
    on_fit_epoch: Callable[[int, int, float], None] | None = None,
    share: int = 1,
) -> list[tuple[torch.nn.Module | None, list[float], str | None]]:
    """Fresh models trained on their ``fits``, in stacks (``altrack.stack``) of at most
    ``stack_limit`` models of one training-set size. A model's result does not depend on which
    others share its stack. On a CPU each trains exactly as it would alone (``train.train``). On
    CUDA every stack is padded to ``stack_width // share`` models and runs batched GEMMs
    (``train_stacked``'s ``width``): the same bits in any grouping at that width, which
    ``--stack`` sets and, on a GPU too small for the default, the memory cap lowers; the
    width is part of the runs' identity (``run_identity``). The seed models pass
    ``share=SEED_SHARE``, so that a block of seeds fills one padded stack of each kind.

    Returns, per fit, (model or None, epoch losses, divergence message or None)."""
    device = data.x_train.device
    width = padded_width(data, settings, stack, memory_cap, share)
    # refuse=False: what starts training checks the cap first (a grid's ``check_planned_stacks``,
    # a Slurm task's ``check_stacks``, a sweep worker, ``replay``); a default cap that memory has
    # shrunk since trains one model at a time rather than failing claimed runs
    limit = width if width is not None else stack_limit(data.name, device, stack, memory_cap, settings.batch_size,
                                                        refuse=False)  # fmt: skip
    out: list[tuple[torch.nn.Module | None, list[float], str | None]] = [(None, [], None)] * len(fits)
    by_size: dict[int, list[int]] = {}
    for i, f in enumerate(fits):
        by_size.setdefault(len(f.indices), []).append(i)
    for members in by_size.values():
        for start in range(0, len(members), limit):
            chunk = members[start : start + limit]
            # the methods of a seed share their final model's initialisation: build it once (a CifarNet
            # takes 6 ms), as the stack copies each slot's parameters
            built: dict[int, torch.nn.Module] = {}
            for i in chunk:
                if fits[i].seed not in built:
                    built[fits[i].seed] = fresh_model(data.name, device, stream_seed(fits[i].seed, init_stream))
            models = [built[fits[i].seed] for i in chunk]
            indices = torch.from_numpy(np.stack([fits[i].indices for i in chunk])).to(device)
            weights = None
            if any(fits[i].weights is not None for i in chunk):
                rows = [fits[i].weights if fits[i].weights is not None else np.ones(len(fits[i].indices))
                        for i in chunk]  # fmt: skip
                weights = torch.from_numpy(np.stack(rows)).float().to(device)
            outcome = train_stacked(
                models, data.x_train, data.y_train, indices,
                epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                generators=[torch.Generator().manual_seed(stream_seed(fits[i].seed, order_stream)) for i in chunk],
                weights=weights, on_epoch=on_epoch,
                on_epoch_each=None if on_fit_epoch is None else _each(on_fit_epoch, chunk), width=width,
            )  # fmt: skip
            for j, i in enumerate(chunk):
                error = outcome.diverged[j]
                out[i] = (None if error else outcome.models[j], outcome.losses[j], error)
    return out


def _each(hook: Callable[[int, int, float], None], chunk: Sequence[int]) -> Callable[[int, list[float]], None]:
    """A stack's per-model epoch losses as (fit index, epoch, loss) calls."""

    def each(epoch: int, losses: list[float]) -> None:
        for i, loss in zip(chunk, losses, strict=True):
            hook(i, epoch, loss)

    return each


def fit(
    data: Dataset,
    indices: np.ndarray,
    settings: Settings,
    seed: int,
    init_stream: int,
    order_stream: int,
    weights: np.ndarray | None = None,
    on_epoch: EpochHook | None = None,
    stack: int = 0,
) -> tuple[torch.nn.Module, list[float]]:
    """A fresh model trained on ``indices`` of the train split, exactly as in any stack (on
    CUDA: any stack of width ``stack``, 0 for the default; see ``stack_width``).

    Raises ``TrainingDiverged`` when its loss stops being finite."""
    [(model, losses, error)] = fit_many(data, [Fit(indices, seed, weights)], settings, init_stream, order_stream,
                                        on_epoch, stack)  # fmt: skip
    if model is None:
        raise TrainingDiverged(error or "training diverged")
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
    # what the stage's selection methods share (``SelectionContext.shared``), filled in as they run
    shared: dict = field(default_factory=dict, repr=False, compare=False)


def available_indices(n_train: int, holdout: np.ndarray | None) -> np.ndarray:
    """Train indices that may be labelled: all of them, minus a validation holdout if any."""
    everything = np.arange(n_train, dtype=np.int64)
    return everything if holdout is None else _without(everything, holdout)


def _without(available: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """``np.setdiff1d(available, taken)`` for sorted unique ``available``, by a mask: setdiff1d
    sorts both (15 ms on MNIST's 60,000 indices), a mask indexes once."""
    mask = np.ones(int(available.max(initial=-1)) + 1, dtype=bool)
    mask[taken] = False
    return available[mask[available]]


def train_seed_stages(
    data: Dataset,
    budget: int,
    seeds: Sequence[int],
    settings: Settings,
    on_epoch: EpochHook | None = None,
    holdout: np.ndarray | None = None,
    stack: int = 0,
    memory_cap: int | None = None,
    live: LiveHook | None = None,
) -> list[SeedStage | str]:
    """For each seed: draw the seed set, train M on it (all seeds' Ms in stacks), and score the
    whole train split with M. A seed whose M diverged gives its error message instead.

    ``holdout`` (a validation split carved from train) is excluded from the seed set and the pool.
    """
    started = time.perf_counter()
    available = available_indices(data.x_train.shape[0], holdout)
    seed_sets = []
    for seed in seeds:
        rng = np.random.default_rng(stream_seed(seed, SEED_SET))
        seed_sets.append(np.sort(rng.choice(available, size=settings.n_seed(budget), replace=False)).astype(np.int64))
    fitted = fit_many(data, [Fit(s, seed) for s, seed in zip(seed_sets, seeds, strict=True)], settings,
                      SEED_INIT, SEED_ORDER, on_epoch, stack, memory_cap,
                      None if live is None else lambda i, epoch, loss: live(seeds[i], epoch, loss),
                      share=SEED_SHARE)  # fmt: skip
    seconds = (time.perf_counter() - started) / len(seeds)
    labels = data.y_train.cpu().numpy()
    trained = [model for model, _, _ in fitted if model is not None]
    width = padded_width(data, settings, stack, memory_cap, SEED_SHARE)
    outputs = outputs_of(trained, data.x_train, width, settings.batch_size)
    scores = iter(evaluate_models(trained, data.x_test, data.y_test, width, settings.batch_size))
    stages: list[SeedStage | str] = []
    for seed, seed_indices, (model, losses, error) in zip(seeds, seed_sets, fitted, strict=True):
        if model is None:
            stages.append(f"seed model: {error}")
            continue
        out, (accuracy, _) = next(outputs), next(scores)
        stages.append(SeedStage(
            dataset=data.name, budget=budget, seed=seed, seed_indices=seed_indices,
            pool_indices=_without(available, seed_indices), labels=labels, model=model, epoch_losses=losses,
            probs=out.probs.cpu().numpy(), embeddings=out.embeddings.cpu().numpy(),
            ce_loss=out.ce_loss(data.y_train).cpu().numpy(), grad_loss=out.grad_loss(data.y_train).cpu().numpy(),
            test_accuracy=accuracy, seconds=seconds,
        ))  # fmt: skip
    return stages


def train_seed_stage(
    data: Dataset,
    budget: int,
    seed: int,
    settings: Settings,
    on_epoch: EpochHook | None = None,
    holdout: np.ndarray | None = None,
) -> SeedStage:
    """One seed's stage (``train_seed_stages``); raises ``TrainingDiverged`` if its M diverged."""
    [stage] = train_seed_stages(data, budget, [seed], settings, on_epoch, holdout)
    if isinstance(stage, str):
        raise TrainingDiverged(stage)
    return stage


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


def select(stage: SeedStage, method: str, settings: Settings, device: str = "cpu") -> SelectionResult:
    """``method``'s selection from the stage's pool, from the method's own random stream and
    what the stage's methods share (the coreset's clustering); the distance kernels run on
    ``device``."""
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
        shared_seed=stream_seed(stage.seed, SHARED_SELECT),
        device=device,
        shared=stage.shared,
    )
    return get_selector(method).select(ctx)


def run_methods(
    data: Dataset,
    stages: Sequence[SeedStage],
    methods: Sequence[str],
    settings: Settings,
    on_epoch: EpochHook | None = None,
    holdout: np.ndarray | None = None,
    stack: int = 0,
    memory_cap: int | None = None,
    live: LiveHook | None = None,
) -> list[RunResult]:
    """Every method on every stage: select from the stage's pool, then retrain from scratch on
    all k points, the final models of all (stage, method) pairs in stacks.

    With a ``holdout``, the final model's accuracy on it is ``val_accuracy``. Timings: selection
    per run; final training is the stacks' time shared out evenly."""
    device = data.x_train.device
    ident = run_identity(data.name, data.digest, device, settings, stack, memory_cap)
    results, fits = [], []
    for stage in stages:
        for method in methods:
            key = RunKey(data.name, method, stage.budget, stage.seed)
            result = RunResult(key, settings, str(device), ident, stage=stage)
            started = time.perf_counter()
            result.selection = select(stage, method, settings, str(device))
            result.timings["selection_seconds"] = time.perf_counter() - started + result.selection.shared_seconds
            result.timings["seed_train_seconds"] = stage.seconds
            weights = None
            if settings.weighted:
                weights = np.concatenate([np.ones(len(stage.seed_indices)), result.selection.weights])
                weights = np.where(np.isnan(weights), 1.0, weights)
            results.append(result)
            fits.append(Fit(result.selected_indices, stage.seed, weights))
    started = time.perf_counter()
    each = None if live is None else lambda i, epoch, loss: live(results[i].key, epoch, loss)
    fitted = fit_many(data, fits, settings, FINAL_INIT, FINAL_ORDER, on_epoch, stack, memory_cap, each)
    seconds = (time.perf_counter() - started) / max(len(fits), 1)
    done = []  # (result, model, epoch losses) of the models that trained
    for result, (model, losses, error) in zip(results, fitted, strict=True):
        if model is None:
            result.status, result.error = FAILED, error
        else:
            done.append((result, model, losses))
    width = padded_width(data, settings, stack, memory_cap)
    models = [model for _, model, _ in done]
    tests = evaluate_models(models, data.x_test, data.y_test, width, settings.batch_size)
    if holdout is not None:
        idx = torch.from_numpy(holdout).to(device)
        vals = evaluate_models(models, data.x_train[idx], data.y_train[idx], width, settings.batch_size)
    for j, (result, model, losses) in enumerate(done):
        result.timings["final_train_seconds"] = seconds
        result.final_model, result.final_epoch_losses = model, losses
        result.test_accuracy, result.test_loss = tests[j]
        if holdout is not None:
            result.val_accuracy = vals[j][0]
    return results


def run_method(
    data: Dataset, stage: SeedStage, method: str, settings: Settings, holdout: np.ndarray | None = None
) -> RunResult:
    """One method on one stage (``run_methods``); the same result as in any stack."""
    return run_methods(data, [stage], [method], settings, holdout=holdout)[0]


class Progress:
    """Runs bar plus a transient epochs bar; silent when disabled. Written to a log rather than a
    terminal (``nohup``, a batch job), the runs bar updates every ``LOG_INTERVAL`` seconds and
    the epochs bar is left out: its cursor moves read as ``[A`` escapes there, hundreds of lines
    for the README's main job."""

    LOG_INTERVAL = 30.0

    def __init__(self, total: int, enabled: bool) -> None:
        enabled = enabled and total > 0  # every run reused: no "runs: 0run" bar
        self.enabled = enabled
        self.terminal = enabled and sys.stderr.isatty()
        every = {} if self.terminal else {"mininterval": self.LOG_INTERVAL, "maxinterval": self.LOG_INTERVAL,
                                          "miniters": 1}  # fmt: skip
        self.runs = tqdm(total=total, desc="runs", unit="run", disable=not enabled, dynamic_ncols=True, **every)
        self.epochs: tqdm | None = None

    def start_training(self, label: str, epochs: int) -> EpochHook:
        if self.epochs is not None:
            self.epochs.close()
        self.epochs = tqdm(total=epochs, desc=label, unit="ep", leave=False, disable=not self.terminal)

        def hook(epoch: int, loss: float) -> None:
            assert self.epochs is not None
            self.epochs.update(1)
            self.epochs.set_postfix(loss=f"{loss:.4f}")

        return hook

    def finished(self, result: RunResult) -> None:
        if result.status == FINISHED:  # before the update, which may print it
            self.runs.set_postfix(last=f"{result.key.method} {result.test_accuracy:.4f}", refresh=False)
        self.runs.update(1)

    def close(self) -> None:
        if self.epochs is not None:
            self.epochs.close()
        self.runs.close()


def run_block(
    cfg: GridConfig,
    device: str,
    dataset: str,
    budget: int,
    seeds: Sequence[int],
    methods: Sequence[str],
    bar: Progress | None = None,
    live: LiveHook | None = None,
) -> list[RunResult]:
    """Every method of several seeds of one (dataset, k) on ``device``: the seeds' models M in
    stacks, then every final model in stacks. A diverged M fails every method of its seed.
    ``live`` hears every model's epoch losses as they come (a seed for M, a RunKey for a final model)."""
    data = load_dataset(dataset, cfg.data_dir, device)
    bar = bar or Progress(0, False)
    label = f"{dataset} k={budget} s={seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "")
    hook = bar.start_training(f"seed models {label}", cfg.settings.epochs)
    stages = train_seed_stages(data, budget, seeds, cfg.settings, hook, stack=cfg.stack,
                               memory_cap=cfg.memory_cap_bytes, live=live)  # fmt: skip
    good = [s for s in stages if not isinstance(s, str)]
    hook = bar.start_training(f"final models {label}", cfg.settings.epochs)
    ran = run_methods(data, good, methods, cfg.settings, hook, stack=cfg.stack, memory_cap=cfg.memory_cap_bytes,
                      live=live)  # fmt: skip
    finished = {(r.key.seed, r.key.method): r for r in ran}
    results = []
    ident = run_identity(dataset, data.digest, data.x_train.device, cfg.settings, cfg.stack, cfg.memory_cap_bytes)
    for seed, stage in zip(seeds, stages, strict=True):
        for method in methods:
            if isinstance(stage, str):
                key = RunKey(dataset, method, budget, seed)
                results.append(RunResult(key, cfg.settings, device, ident, status=FAILED, error=stage))
            else:
                results.append(finished[(seed, method)])
    return results


def _block_worker(
    cfg: GridConfig, device: str, dataset: str, budget: int, seeds: Sequence[int], methods: Sequence[str]
) -> list[RunResult]:
    set_determinism(device)  # a spawned process starts with torch's defaults
    return run_block(cfg, device, dataset, budget, seeds, methods)


def fit_threads() -> None:
    """Keep torch's threads (by default one per physical core the affinity allows) within the
    cores this process may keep busy (``usable_cores``: its cgroups' CPU quota too): under
    ``docker run --cpus 1.5`` on a 64-core host torch would start 64 threads, throttled most of
    each period. For a process that trains itself; pool workers and Slurm tasks set theirs."""
    torch.set_num_threads(min(torch.get_num_threads(), usable_cores()))


def threads_per_worker(workers: int) -> int:
    """Each of ``workers`` processes gets its share of the cores this process may use (its CPU
    affinity, a container's or a batch job's cores, not the machine's; at most its cgroups' CPU
    quota), so they do not oversubscribe."""
    return max(1, usable_cores() // workers)


def init_worker(threads: int) -> None:
    """A pool worker's share of the cores."""
    torch.set_num_threads(threads)


def map_in_workers(workers: int, fn: Callable, jobs: Sequence[tuple]) -> Iterator[tuple[tuple, object]]:
    """(job, ``fn(*job)``) for each job, in completion order, from ``workers`` spawned processes,
    each with its share of the cores (``init_worker``) and dying with this one (``tethered``:
    a SIGKILLed grid must not leave its workers training for minutes). When the caller stops
    early (Ctrl-C, ``--fail-fast``, an error), the workers stop at once (``stop_workers``):
    the jobs not started never start, and the running ones end where they are (the grid marks
    their runs KILLED). The workers ignore SIGINT (``tethered``), so a terminal's Ctrl-C and a
    SIGINT sent to this process alone take this one path."""
    context = multiprocessing.get_context("spawn")
    initializer, initargs = tethered(init_worker, threads_per_worker(workers))
    quiet_resource_tracker()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        futures = {pool.submit(fn, *job): job for job in jobs}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:  # GeneratorExit too: the caller closed this early
            # the pool breaks: its jobs not started fail with BrokenProcessPool and never run. No
            # future.cancel() first: the pool's manager thread then fails on the cancelled ones
            stop_workers(multiprocessing.active_children())
            raise


def quiet_resource_tracker() -> None:
    """The warnings filter multiprocessing's resource tracker starts with (it copies this
    process's ``-W`` options): workers stopped mid-job leave the pool's semaphores to it, which
    it removes at exit, warning of "leaked semaphore objects" below the CLI's one line."""
    option = "ignore::UserWarning:multiprocessing.resource_tracker"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


def stop_workers(children: Iterable[multiprocessing.process.BaseProcess], grace: float = 10.0) -> None:
    """SIGTERM ``children`` (spawned workers, which ignore SIGINT) and wait up to ``grace``
    seconds for them to go: the default action ends a process without a traceback, and a sweep
    worker takes it as its Ctrl-C (``sweep.worker.run_worker``), a moment of cleaning up."""
    children = list(children)
    for child in children:
        with suppress(OSError, ValueError):
            child.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        with suppress(OSError, ValueError, AssertionError):
            child.join(max(0.0, deadline - time.monotonic()))


def blocks(
    keys: Sequence[RunKey], seeds_per_block: Callable[[str, int], int]
) -> list[tuple[str, int, tuple[int, ...], tuple[str, ...]]]:
    """(dataset, k, seeds, methods) blocks: seeds that need the same methods,
    ``seeds_per_block(dataset, n_methods)`` at a time, in the keys' order."""
    needs: dict[tuple[str, int, int], list[str]] = {}
    for key in keys:
        needs.setdefault((key.dataset, key.budget, key.seed), []).append(key.method)
    grouped: dict[tuple[str, int, tuple[str, ...]], list[int]] = {}
    for (dataset, budget, seed), methods in needs.items():
        grouped.setdefault((dataset, budget, tuple(methods)), []).append(seed)
    out = []
    for (dataset, budget, methods), seeds in grouped.items():
        size = seeds_per_block(dataset, len(methods))
        for start in range(0, len(seeds), size):
            out.append((dataset, budget, tuple(seeds[start : start + size]), methods))
    return out


def grid_blocks(
    cfg: GridConfig, device: str, keys: Sequence[RunKey], workers: int = 1, memory_cap: int | None = None
) -> list[tuple[str, int, tuple[int, ...], tuple[str, ...]]]:
    """``keys`` as blocks of seeds whose models fill a stack on ``device``, and at least
    ``workers`` blocks when there are that many seeds, so that every worker has work. The stacks
    are sized by ``memory_cap`` where given (``planning_cap``), else by ``cfg``'s cap."""
    cap = memory_cap if memory_cap is not None else cfg.memory_cap_bytes

    def per_block(dataset: str, n_methods: int) -> int:
        limit = stack_limit(dataset, torch.device(device), cfg.stack, cap, cfg.settings.batch_size)
        size = max(1, limit // n_methods)
        return min(size, max(1, math.ceil(cfg.runs / workers)))

    return blocks(keys, per_block)


def iterate_grid(
    cfg: GridConfig,
    *,
    device: str | None = None,
    skip: frozenset[RunKey] = frozenset(),
    progress: bool = True,
    workers: int = 1,
) -> Iterator[RunResult]:
    """Yield each run's result as soon as its block is done; keys in ``skip`` are not run.

    ``device`` is a resolved device (``resolve_device(cfg.device)`` when omitted). A seed model
    is trained once per (dataset, k, seed), and only if a method still needs it. Seeds of one
    (dataset, k) run in blocks whose models train in stacks; with ``workers > 1`` blocks run in
    that many processes, each with its share of the cores. A run's result is the same whatever
    its block, its stack or the worker count (tests/test_stack.py); results come in completion
    order.
    """
    if device is None:
        device = str(resolve_device(cfg.device))
        set_determinism(device)
    keys = [key for key in cfg.run_keys() if key not in skip]
    work = grid_blocks(cfg, device, keys, workers)
    bar = Progress(len(keys), progress)
    try:
        if workers <= 1:
            for block in work:
                for result in run_block(cfg, device, *block, bar):
                    bar.finished(result)
                    yield result
            return
        for _, results in map_in_workers(workers, _block_worker, [(cfg, device, *block) for block in work]):
            for result in results:
                bar.finished(result)
                yield result
    finally:
        bar.close()

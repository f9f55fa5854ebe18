"""Distance kernels shared by k-means, k-center and the coreset: BLAS blocks, no Python per point.

Every kernel runs on the device of its inputs (``as_tensor(x, device)``): a CPU gives today's
results bit for bit, at any thread count (a product of fewer rows than outputs runs on one
thread, ``altrack.threads``), a GPU the same selections up to float rounding."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from altrack.graphs import warm_and_capture
from altrack.threads import fewer_rows

BLOCK_ROWS = 4096  # a block of distances stays in cache for the min that follows (bench_kmeans)
DEVICE_BLOCK = 1 << 25  # off a CPU, distance blocks of up to 32M elements (128 MB): one GEMM, one min
GRAPH_STEPS = 16  # steps per CUDA graph (StepLoop)
T = TypeVar("T")


def as_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)


def sq_dists(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """(n, m) squared Euclidean distances via ||x||^2 - 2 x.c + ||c||^2, clamped at 0."""
    x_sq = (x * x).sum(1) if x_sq is None else x_sq
    with fewer_rows(x.device, x.shape[0], c.shape[0]):  # altrack.threads
        d = torch.addmm((c * c).sum(1).unsqueeze(0), x, c.T, alpha=-2.0)
    return d.add_(x_sq.unsqueeze(1)).clamp_(min=0.0)


def _numpy_reduces(block: torch.Tensor) -> bool:
    """Whether ``row_min`` and ``row_argmin`` reduce ``block`` through numpy: on a CPU torch's
    indexed reductions are a scalar loop, 2.6 ms for a (4096, 800) block on one thread (a fifth
    of the GEMM that made it), where numpy's vectorised argmin takes 0.42 ms and torch's amin
    0.17 ms. Not off a CPU, nor for what numpy cannot hold (bfloat16, autograd)."""
    return block.device.type == "cpu" and not block.requires_grad and block.dtype in (torch.float32, torch.float64)


def row_argmin(block: torch.Tensor) -> torch.Tensor:
    """Each row's index of its first minimum (and of its first NaN), as ``block.argmin(1)``."""
    return torch.from_numpy(block.numpy().argmin(1)) if _numpy_reduces(block) else block.argmin(1)


def row_min(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's minimum and the index of its first occurrence, as ``block.min(1)`` gives them:
    on a CPU numpy's argmin, which takes the first of equal minima (and of NaNs) as ``min(1)``
    does, so the labels are the same, and the values read at those places: the minima themselves
    (up to the sign of a zero), a quarter faster than a separate amin pass."""
    if not _numpy_reduces(block):
        return block.min(1)
    values = block.numpy()
    first = values.argmin(1)
    return torch.from_numpy(np.take_along_axis(values, first[:, None], 1)[:, 0]), torch.from_numpy(first)


def nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of x: (index of the nearest row of c, squared distance), in row blocks.

    The argmin only needs ||c||^2 - 2 x.c; ||x||^2 is added to the n minima, not the n x m matrix.
    A CPU takes blocks that stay in cache; a GPU as few as memory allows (each is a launch).
    """
    x_sq = (x * x).sum(1)
    c_sq = (c * c).sum(1).unsqueeze(0)
    labels = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dists = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    rows = BLOCK_ROWS if x.device.type == "cpu" else max(1, DEVICE_BLOCK // max(c.shape[0], 1))
    for start in range(0, x.shape[0], rows):
        stop = start + rows
        with fewer_rows(x.device, min(stop, x.shape[0]) - start, c.shape[0]):  # a short last block
            partial = torch.addmm(c_sq, x[start:stop], c.T, alpha=-2.0)
        dists[start:stop], labels[start:stop] = row_min(partial)
    dists.add_(x_sq).clamp_(min=0.0)
    return labels, dists


def nearest_distinct(x: torch.Tensor, c: torch.Tensor) -> np.ndarray:
    """Row of x nearest to each centre, in centre order, never reusing a row.

    A centre whose nearest row is taken gets its nearest free row instead.
    """
    if c.shape[0] > x.shape[0]:
        raise ValueError(f"{c.shape[0]} centres but only {x.shape[0]} points")
    x_sq = (x * x).sum(1).unsqueeze(0)
    chosen = np.empty(c.shape[0], dtype=np.int64)
    taken = np.zeros(x.shape[0], dtype=bool)  # on the host: a GPU would be waited on per centre
    for start in range(0, c.shape[0], 256):
        # fewer rows than outputs, but thousands of outputs: the same bits at any thread count (altrack.threads)
        d = torch.addmm(x_sq, c[start : start + 256], x.T, alpha=-2.0)  # ||x||^2 - 2 c.x: same argmin
        first = row_argmin(d).cpu().numpy()
        for row in range(d.shape[0]):
            j = int(first[row])
            if taken[j]:  # rare: the nearest free row, on the device
                j = int(d[row].masked_fill(torch.from_numpy(taken).to(x.device), float("inf")).argmin())
            taken[j] = True
            chosen[start + row] = j
    return chosen


def padded_steps(n: int) -> int:
    """How many steps ``StepLoop.run(n)`` may run: n rounded up to whole graphs."""
    return -(-n // GRAPH_STEPS) * GRAPH_STEPS


class StepLoop:
    """``step`` called n times. On CUDA, whole rounds of ``GRAPH_STEPS`` calls recorded once as a
    graph and replayed: a greedy loop (k-center, k-means++) launches a few tiny kernels per step,
    and launching them one by one costs more than running them. The kernels are the same either
    way, so are the results. ``step`` must keep its state in tensors it updates in place, with no
    host round trip, and its buffers must hold ``padded_steps(n)`` steps (the last round may run
    past n). The graph is kept: a loop reused with new values in the same buffers (``workspace``)
    replays it without capturing again."""

    def __init__(self, step: Callable[[], None], device: torch.device, per_round: int = GRAPH_STEPS) -> None:
        self.step, self.device, self.per_round = step, device, per_round
        self.graph: torch.cuda.CUDAGraph | None = None

    def _round(self) -> None:
        for _ in range(self.per_round):
            self.step()

    def run(self, n: int) -> None:
        """n steps: whole rounds on CUDA once there are two, n plain steps otherwise."""
        rounds = -(-n // self.per_round)
        if self.device.type != "cuda" or rounds < 2:
            for _ in range(n):
                self.step()
            return
        self.run_rounds(rounds)

    def run_rounds(self, rounds: int) -> None:
        """``rounds * per_round`` steps; on CUDA the first round ever runs eagerly and is recorded."""
        if self.device.type != "cuda":
            for _ in range(rounds):
                self._round()
            return
        with torch.cuda.device(self.device):  # capture on the tensors' GPU, not on whichever is current
            if self.graph is None:
                self.graph = warm_and_capture(self._round, self.device)
                rounds -= 1
            for _ in range(rounds):
                self.graph.replay()


_WORKSPACES: OrderedDict[tuple, object] = OrderedDict()
KEPT_WORKSPACES = 6  # a grid step uses four (k-means++, two Lloyd phases, k-center)


def workspace(key: tuple, build: Callable[[], T]) -> T:
    """The buffers and ``StepLoop`` of a greedy loop for one ``key`` (its kind, shapes and device),
    built once and reused: on an H100 a graph's capture took 12-40 ms, more than the loop it
    records, and a grid runs one such loop per run, all of one shape. The last
    ``KEPT_WORKSPACES`` are kept. Callers load every buffer before each use; one thread per
    process selects at a time (altrack's workers are processes), as the shared buffers need."""
    ws = _WORKSPACES.pop(key, None)
    if ws is None:
        ws = build()
    _WORKSPACES[key] = ws
    while len(_WORKSPACES) > KEPT_WORKSPACES:
        _WORKSPACES.popitem(last=False)
    return ws  # type: ignore[return-value]

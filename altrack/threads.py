"""Bits that do not depend on the thread count: the products that would otherwise run on one.

``altrack run --workers N`` runs N processes of fewer threads each, a Slurm task runs the cores
it was given, and a run must select and train exactly what ``--workers 1`` does. MKL's strict
reproducibility mode (``MKL_CBWR``, altrack/__init__.py) keeps a GEMM's bits independent of the
thread count on Intel's AVX2 and AVX-512 code paths only, and oneDNN's convolutions are outside
it. On a 2-core AMD EPYC (MKL 2024.2, 2026-12-07) a sweep of shapes at 1 and 2 threads found:

- float32 GEMMs of fewer rows than outputs, where the outputs are few (up to about 100): a
  linear layer's forward product (the head on 2 to 9 rows, an epoch's short last batch) and the
  distances of a short block of points to k-means' few centres. Backward products, and products
  of 128 outputs or more, took the same bits at both thread counts;
- float64 GEMMs of most shapes, rows >= outputs included (the coreset's neighbour distances);
- oneDNN's convolution weight gradient, on any batch (it splits the batch's sum among threads).

So these run on one thread (``one_thread``): a float32 product of fewer rows than outputs
(``fewer_rows``) in the models' linear layers (``models.Linear``, the stack's exact path) and in
the selection's distances (``geometry.sq_dists``, ``geometry.nearest``), the coreset's float64
neighbour distances, and convolution weight gradients (``models.conv2d``). tests/test_models.py
and tests/test_threads.py check them at 1 and 2 threads, except the float64 distances, which
only rank neighbours: random points have no near ties for a test to see the ranking move.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch


@contextmanager
def one_thread(device: torch.device, needed: bool = True) -> Iterator[None]:
    """Run the block on one CPU thread (where ``needed``), for a product whose bits would
    otherwise depend on the thread count, so that ``--workers 2`` (one thread per worker on two
    cores), a Slurm task's cores and ``--workers 1`` (all of them) get the same results.

    The price, measured on that EPYC in one process of two threads: none for the MLP (the head on
    8 rows 4.4 against 8.9 us; 7 stacked MLPs 0.37 against 0.41 s per model,
    ``benchmarks/bench_stack.py``) or the README's main job (0.84 against 0.85 min,
    ``benchmarks/bench_grid.py --main-job``), about a sixth of CifarNet's training speed on a CPU
    (``benchmarks/bench_cifarnet.py``: 793 and 748 against 940 and 1041 img/s), where the paper's
    CIFAR-10 runs belong on a GPU.
    Off a CPU, and on one thread already, the block runs as it is."""
    threads = torch.get_num_threads()
    if not needed or threads == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fewer_rows(device: torch.device, rows: int, outputs: int) -> AbstractContextManager[None]:
    """``one_thread`` for a float32 GEMM of ``rows`` rows and ``outputs`` outputs where it has fewer
    rows than outputs, the first kind above. A GEMM of many outputs (the MLP's 128) takes it too:
    no slower there (``one_thread``'s price)."""
    return one_thread(device, rows < outputs)

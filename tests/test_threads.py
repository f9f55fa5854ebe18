"""altrack.threads: the products whose bits MKL leaves to the thread count run on one thread, so
selection gives the same picks at 1 and 2 threads (``--workers N`` against ``--workers 1``)."""

import pytest
import torch
from conftest import torch_threads

from altrack.selection.geometry import BLOCK_ROWS, nearest, sq_dists
from altrack.threads import one_thread


def _at(threads: int, fn, *args):
    with torch_threads(threads):
        return fn(*args)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def test_selections_products_take_the_same_bits_at_one_and_two_threads():
    # on a 2-core AMD EPYC before one_thread: a short last block of points against 20 centres
    # (k-means' assignment at k = 100) and 8 points against 20 (sq_dists) took other bits at 2
    # threads than at 1. (The coreset's float64 neighbour distances also did, but they only rank
    # neighbours, and random points have no near ties for the ranking to show it.)
    g = torch.Generator().manual_seed(0)
    points = torch.randn(BLOCK_ROWS + 5, 128, generator=g)
    centres = torch.randn(20, 128, generator=g)
    cases = {"nearest": (nearest, points, centres), "sq_dists": (sq_dists, points[:8], centres)}
    for name, (fn, *args) in cases.items():
        assert _same(_at(1, fn, *args), _at(2, fn, *args)), name


def test_one_thread_puts_the_thread_count_back_even_on_an_error():
    with torch_threads(2):
        with pytest.raises(RuntimeError), one_thread(torch.device("cpu")):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with one_thread(torch.device("cpu"), needed=False):
            assert torch.get_num_threads() == 2

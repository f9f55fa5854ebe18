"""CUDA graphs: a loop of many tiny kernels launched as one replay.

altrack's loops on a GPU (a stacked training epoch, the greedy picks of k-center and k-means++)
run kernels of microseconds each, and launching them one by one from Python costs more than
running them. ``warm_and_capture`` runs a step once eagerly and records it as a graph that can
be replayed: the same kernels on the same buffers, so the same bits as running it eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per GPU, reused: capture needs one, and cuBLAS keeps a workspace per stream."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def warm_and_capture(step: Callable[[], None], device: torch.device) -> torch.cuda.CUDAGraph:
    """Run ``step`` once, for real, then record it (not run) as a graph to ``replay`` later.

    The eager run on the capture stream is what capture needs first (cuBLAS workspaces,
    autograd's state) and also does a step's worth of real work, so nothing is wasted.
    ``step`` must keep its state in tensors it updates in place, read its inputs from fixed
    buffers and never wait for the device (no ``.item()``, no data-dependent shapes). Unlike
    ``torch.cuda.graph``, it does not synchronise the device or empty the allocator's cache
    first: on an H100 that cost about 40 ms per capture, more than a greedy loop's kernels.
    Call it and ``replay`` inside ``torch.cuda.device(device)``, from one thread per device at a
    time (the side stream is shared).
    """
    stream = side_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            step()
        except BaseException:
            with contextlib.suppress(Exception):  # the capture is void; the step's error is the one to see
                graph.capture_end()
            raise
        graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph

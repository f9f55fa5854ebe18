"""The paper's two architectures, split into ``body`` (the embedding) and ``head`` (last linear).

The embedding used by k-center, k-means and the gradient loss is the input to the last
linear layer: 128-d for the MLP, 256-d for CifarNet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from altrack.catalog import DATASETS


@contextmanager
def one_thread(device: torch.device, needed: bool = True) -> Iterator[None]:
    """Run the block on one CPU thread (where ``needed``), for a product whose bits would
    otherwise depend on the thread count, so that ``--workers 2`` (one thread per worker on two
    cores), a Slurm task's cores and ``--workers 1`` (all of them) train the same models.

    MKL's strict reproducibility mode (``MKL_CBWR``, altrack/__init__.py) keeps a GEMM's bits
    independent of the thread count on Intel's AVX2 and AVX-512 code paths only, and oneDNN's
    convolutions are outside it. Measured on a 2-core AMD EPYC (``tests/test_models.py``):
    a linear layer's forward GEMM of fewer rows than outputs (the head on 2 to 9 rows, an epoch's
    short last batch) and a convolution's weight gradient (oneDNN splits the batch's sum among its
    threads, on every batch size) took other bits at 2 threads than at 1. The price, measured
    there in one process of two threads: none for the MLP (the head on 8 rows 4.4 against 8.9 us;
    7 stacked MLPs 0.37 against 0.41 s per model, ``benchmarks/bench_stack.py``), about a sixth
    of CifarNet's training speed on a CPU (``benchmarks/bench_cifarnet.py``: 793 and 748 against
    940 and 1041 img/s), where the paper's CIFAR-10 runs belong on a GPU anyway."""
    threads = torch.get_num_threads()
    if not needed or threads == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward GEMM of fewer rows than outputs runs on one thread (``one_thread``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with one_thread(x.device, x.numel() // max(x.shape[-1], 1) < self.out_features):
            return super().forward(x)


class _Conv(torch.autograd.Function):
    """``F.conv2d`` whose weight and bias gradients are computed on one thread (``one_thread``);
    the input's gradient, the same bits at any thread count, keeps every thread. The backward is
    ``aten.convolution_backward``, the op autograd runs for a convolution, in two calls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: tuple, padding: tuple,
                dilation: tuple, groups: int) -> torch.Tensor:  # fmt: skip
        ctx.save_for_backward(x, w)
        ctx.options = (stride, padding, dilation, groups, b is not None)
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.options
        args = (grad, x, w, [w.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0], groups)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(*args, [True, False, False])[0]
        with one_thread(x.device):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(*args, [False, True, has_bias])
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: tuple = (1, 1),
           padding: tuple = (0, 0), dilation: tuple = (1, 1), groups: int = 1) -> torch.Tensor:  # fmt: skip
    """``F.conv2d`` whose bits, gradients included, do not depend on the thread count."""
    if not torch.is_grad_enabled() or not (x.requires_grad or w.requires_grad):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    return _Conv.apply(x, w, b, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose weight gradient is computed on one thread (``conv2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MLP(nn.Module):
    """784 -> 128 (ReLU) -> 10, the paper's MNIST / Fashion-MNIST model."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), Linear(in_features, hidden), nn.ReLU())
        self.head = Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CifarNet(nn.Module):
    """DISTIL's CifarNet: three unpadded 3x3 convs (64, 128, 256) with ReLU and 2x2 max-pool,
    then 1024 -> 128 -> 256 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            Conv2d(3, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
            Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            Linear(256 * 2 * 2, 128), nn.ReLU(),
            Linear(128, 256), nn.ReLU(),
        )  # fmt: skip
        self.head = Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(dataset: str, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised model for ``dataset``; seed the torch RNG before calling."""
    spec = DATASETS[dataset]
    if spec.image_shape[0] == 1:
        c, h, w = spec.image_shape
        model: nn.Module = MLP(c * h * w, 128, spec.num_classes)
    else:
        model = CifarNet(spec.num_classes).to(memory_format=torch.channels_last)
    return model.to(device)

"""The paper's two architectures, split into ``body`` (the embedding) and ``head`` (last linear).

The embedding used by k-center, k-means and the gradient loss is the input to the last
linear layer: 128-d for the MLP, 256-d for CifarNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from altrack.catalog import DATASETS
from altrack.threads import fewer_rows, one_thread


class Linear(nn.Linear):
    """``nn.Linear`` whose forward GEMM of fewer rows than outputs runs on one thread (``fewer_rows``);
    its backward GEMMs took the same bits at one and two threads (tests/test_models.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fewer_rows(x.device, x.numel() // max(x.shape[-1], 1), self.out_features):
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
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if needs_x:
            grad_x = torch.ops.aten.convolution_backward(*args, [True, False, False])[0]
        if needs_w or (has_bias and needs_b):
            with one_thread(x.device):
                _, grad_w, grad_b = torch.ops.aten.convolution_backward(*args, [False, needs_w, has_bias and needs_b])
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, stride: int | tuple = 1,
           padding: int | tuple = 0, dilation: int | tuple = 1, groups: int = 1) -> torch.Tensor:  # fmt: skip
    """``F.conv2d`` (numeric zero padding) whose bits, gradients included, do not depend on the
    thread count. ``x``: (B, C, H, W); ``w``: (C_out, C / groups, kh, kw); ``b``: (C_out,) or None.
    Raises ``ValueError`` for a padding given as a string ('same', 'valid')."""
    if isinstance(padding, str):
        raise ValueError(f"conv2d takes numeric padding, got {padding!r}")
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, w, b)):
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    return _Conv.apply(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight gradient is computed on one thread (``conv2d``). Raises
    ``ValueError`` for a padding mode other than zeros or a padding given as a string."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(f"Conv2d takes numeric zero padding, got {self.padding!r} ({self.padding_mode})")

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

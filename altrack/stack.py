"""Many independent models trained as one: for each, the steps ``train.train`` takes, in one pass.

N models of one architecture, each with its own training indices, initialisation, batch order,
example weights and Adam state, step together. Their parameters are stacked along a leading
model axis and the forward pass is written for the stack, in one of two ways. Exact (a CPU's):
one ``addmm`` per model for linear layers, the very GEMM ``nn.Linear`` runs (a batched GEMM,
MKL's or cuBLAS's, picks its kernels by batch count, so a model's bits would depend on its
stack), and grouped convolutions for CifarNet. Batched (CUDA's): the stack padded to a fixed
width, one batched GEMM per layer, convolutions as GEMMs of their im2col patches; the width
fixes the kernels, so a model's bits depend on the width, not on its stack mates. The loss is
the sum of the models' mean losses, so each model's gradient is its own, and one Adam steps
every stacked tensor (Adam is elementwise: N independent Adams). On a GPU a step's hundreds of
tiny kernels are recorded once as a CUDA graph and replayed (``altrack.graphs``): on an H100, 35
stacked MLPs train in a third of the time per model of one alone; on a CPU stacking saves Python
overhead.

A model whose loss stops being finite is reported diverged; the others go on (their parameters
never mix).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from altrack.graphs import warm_and_capture
from altrack.train import Adam, adam_schedule, mean_loss

PARAM_BYTES = 24  # fp32 weight, gradient, Adam's two moments and (off a CPU) its two scratch rows


@dataclass
class StackOutcome:
    """N plain trained modules, their epoch losses, and for each a divergence message or None."""

    models: list[nn.Module]
    losses: list[list[float]]
    diverged: list[str | None]


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model as a flat list of supported layers (body then head)."""
    layers: list[nn.Module] = []
    for module in (model.body, model.head):
        layers += list(module) if isinstance(module, nn.Sequential) else [module]
    for layer in layers:
        if not isinstance(layer, nn.Linear | nn.Conv2d | nn.ReLU | nn.MaxPool2d | nn.Flatten):
            raise TypeError(f"stacked training does not support {type(layer).__name__}")
    return layers


class StackedNet:
    """The stacked parameters of N models and a forward pass over a stack of batches.

    Exact path: activations are (N, B, features) for linear layers and (B, N * C, H, W) for
    convolutions, which turns N convolutions into one grouped convolution without moving memory.
    Batched path (``batched=True``): (N, B, features) and (N, B, H, W, C), every layer one batched
    GEMM; it supports unpadded stride-1 convolutions and plain max-pooling (CifarNet's) and raises
    ``TypeError`` for others.
    """

    def __init__(self, models: Sequence[nn.Module], batched: bool = False) -> None:
        self.layers = _layers(models[0])
        self.n = len(models)
        self.batched = batched  # one batched GEMM per layer (fixed-width stacks), else one per model
        for layer in self.layers if batched else ():
            simple_conv = not isinstance(layer, nn.Conv2d) or (
                layer.stride == (1, 1) and layer.padding == (0, 0) and layer.dilation == (1, 1) and layer.groups == 1)
            if not simple_conv or (isinstance(layer, nn.MaxPool2d) and layer.ceil_mode):
                raise TypeError(f"batched stacked training does not support {layer}")
        self.params: list[torch.Tensor] = []
        self.slots: list[tuple[int, str]] = []  # (layer position, 'weight' | 'bias') per stacked tensor
        per_model = [_layers(m) for m in models]
        for position, layer in enumerate(self.layers):
            for name in ("weight", "bias"):
                if getattr(layer, name, None) is None:
                    continue
                stacked = torch.stack([getattr(layers[position], name).detach() for layers in per_model])
                self.params.append(stacked.clone().requires_grad_(True))
                self.slots.append((position, name))
        self.index = {slot: i for i, slot in enumerate(self.slots)}

    def _param(self, position: int, name: str) -> torch.Tensor:
        return self.params[self.index[(position, name)]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (N, B, *input shape) -> logits (N, B, classes)."""
        if self.batched:
            return self._forward_batched(x)
        n, batch = x.shape[0], x.shape[1]
        grouped = isinstance(self.layers[0], nn.Conv2d)
        if grouped:  # (N, B, C, H, W) -> (B, N*C, H, W), channels last as the single model runs
            h = x.transpose(0, 1).reshape(batch, n * x.shape[2], *x.shape[3:])
            h = h.contiguous(memory_format=torch.channels_last)
        else:
            h = x
        for position, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                w = self._param(position, "weight")
                b = self._param(position, "bias")
                h = F.conv2d(h, w.flatten(0, 1), b.flatten(), layer.stride, layer.padding, layer.dilation, groups=n)
            elif isinstance(layer, nn.MaxPool2d):
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten):
                if grouped:  # (B, N*C, h, w) -> (N, B, C*h*w), each model's features in its own order
                    h = h.reshape(batch, n, -1).transpose(0, 1)
                    grouped = False
                else:
                    h = h.flatten(2)
            else:
                w = self._param(position, "weight")
                b = self._param(position, "bias")
                # one addmm per model, the GEMM nn.Linear runs: a batched GEMM (MKL's, cuBLAS's) picks
                # its kernels by batch count, so a model's bits would depend on its stack. unbind, not
                # w[i]: one backward for all slices instead of a zero-filled stack each (whose sum also
                # turned an exact -0.0 gradient into +0.0, as nn.Linear does not)
                h = torch.stack([torch.addmm(bi, hi, wi.t()) for bi, hi, wi in
                                 zip(b.unbind(), h.unbind(), w.unbind(), strict=True)])  # fmt: skip
        return h

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` as one batched GEMM per layer, convolutions included: a convolution is a
        GEMM of its im2col patches, (N, B*h*w, C*kh*kw) @ (N, C*kh*kw, C_out), with activations
        kept as (N, B, h, w, C) so that the GEMM's output is the next layer's input. On an H100
        this trained 35 stacked CifarNets 1.37x faster per step than cuDNN's grouped convolution
        (64: 1.6x), and a model's bits depend only on the stack's width (``train_stacked``)."""
        n, batch = x.shape[0], x.shape[1]
        spatial = isinstance(self.layers[0], nn.Conv2d)
        h = x.permute(0, 1, 3, 4, 2).contiguous() if spatial else x.flatten(2)  # (N, B, h, w, C) or (N, B, F)
        for position, layer in enumerate(self.layers):
            if isinstance(layer, nn.Conv2d):
                w = self._param(position, "weight")  # (N, C_out, C, kh, kw)
                kh, kw = layer.kernel_size
                out_h, out_w = h.shape[2] - kh + 1, h.shape[3] - kw + 1
                # (N, B, h, w, C, kh, kw): the patch in the weight's (C, kh, kw) order
                cols = h.unfold(2, kh, 1).unfold(3, kw, 1).reshape(n, batch * out_h * out_w, -1)
                h = torch.baddbmm(self._param(position, "bias").unsqueeze(1), cols, w.flatten(2).transpose(1, 2))
                h = h.view(n, batch, out_h, out_w, -1)
            elif isinstance(layer, nn.MaxPool2d):  # on a channels-last view, the kernel the model runs
                pooled = F.max_pool2d(h.flatten(0, 1).permute(0, 3, 1, 2), layer.kernel_size, layer.stride,
                                      layer.padding, layer.dilation)  # fmt: skip
                h = pooled.permute(0, 2, 3, 1).reshape(n, batch, *pooled.shape[2:], pooled.shape[1])
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten) and spatial:  # the model flattens (C, h, w)
                h, spatial = h.permute(0, 1, 4, 2, 3).reshape(n, batch, -1), False
            elif isinstance(layer, nn.Flatten):
                pass
            else:
                w = self._param(position, "weight")
                h = torch.baddbmm(self._param(position, "bias").unsqueeze(1), h, w.transpose(1, 2))
        return h

    def export(self, models: Sequence[nn.Module]) -> list[nn.Module]:
        """Trained copies of ``models`` with this stack's parameters."""
        trained = []
        for i, model in enumerate(models):
            twin = copy.deepcopy(model)
            layers = _layers(twin)
            with torch.no_grad():
                for (position, name), tensor in zip(self.slots, self.params, strict=True):
                    getattr(layers[position], name).copy_(tensor[i])
            trained.append(twin)
        return trained


def model_bytes(model: nn.Module, batch_size: int, input_shape: Sequence[int]) -> int:
    """A generous estimate of one stacked model's training memory: parameters with their
    gradients and Adam state, plus the activations of one batch (a probe forward pass) and, for
    a convolution, its im2col patches and their gradient (the batched path's GEMM operands)."""
    params = sum(p.numel() for p in model.parameters()) * PARAM_BYTES
    probe = copy.deepcopy(model).cpu().float()
    activations = patches = 0
    h = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for layer in _layers(probe):
            h = layer(h)
            activations += h.numel()
            if isinstance(layer, nn.Conv2d):
                patches += h[0, 0].numel() * layer.in_channels * math.prod(layer.kernel_size)
    # activations: forward, its saved copy and the gradient; patches: themselves and their gradient
    return params + (activations * 3 + patches * 2) * batch_size * 4


def train_stacked(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generators: Sequence[torch.Generator],
    weights: torch.Tensor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    on_epoch_each: Callable[[int, list[float]], None] | None = None,
    graphs: bool = True,
    width: int | None = None,
) -> StackOutcome:
    """Train ``models`` (N, freshly initialised, one architecture) on their own rows of ``x``.

    ``indices``: (N, n) int64 train indices per model, on x's device; ``generators``: N CPU
    generators for the batch orders; ``weights``: (N, n) per-example weights or None (each row is
    normalised to mean 1, as ``train.train`` does). ``on_epoch`` hears each epoch's mean loss over
    the stack, ``on_epoch_each`` every model's. Unless ``graphs=False``, full
    batches step through fixed buffers, and on CUDA the first such step runs eagerly and is
    replayed as a CUDA graph for the others (``altrack.graphs``):
    the same kernels, so the same bits (``tests/test_stack.py``'s CUDA tests,
    ``benchmarks/bench_cuda.py``).

    ``width=None`` runs one GEMM per model per linear layer, the GEMM ``train.train`` runs, so each
    model gets its bits alone (on a CPU, tested). ``width=W`` (>= N; altrack's choice on CUDA)
    pads the stack to W models with copies of the first (same rows, same batch order; trained
    and dropped) and runs one batched GEMM per layer, convolutions as GEMMs of their im2col
    patches: the library picks its kernels by the batch count, which W fixes, so a model's bits
    do not depend on which others share its stack, though they differ from ``train.train``'s
    (the gradients agree to rounding, tested) and from another width's.
    Returns trained copies of ``models``.
    Raises ``ValueError`` when the counts disagree or ``width`` is below N.
    """
    n_models, n = indices.shape
    if len(models) != n_models or len(generators) != n_models:
        raise ValueError(f"{len(models)} models and {len(generators)} generators for {n_models} index rows")
    if width is not None and width < n_models:
        raise ValueError(f"a stack of width {width} cannot hold {n_models} models")
    pads = 0 if width is None else width - n_models
    device = x.device
    net = StackedNet(list(models) + [models[0]] * pads, batched=width is not None)
    if pads:  # the padding trains model 0's copy on model 0's rows: a real step's shapes, no NaN
        indices = torch.cat([indices, indices[:1].expand(pads, -1)])
        weights = None if weights is None else torch.cat([weights, weights[:1].expand(pads, -1)])
    optimizer = Adam(net.params, lr, schedule=adam_schedule(device, epochs, n, batch_size))
    if weights is not None:
        weights = weights / weights.mean(1, keepdim=True)
    losses: list[list[float]] = [[] for _ in range(n_models)]
    diverged: list[str | None] = [None] * n_models
    rows = n_models + pads
    total = torch.zeros(rows, device=device)
    # a full batch's step reads fixed buffers and keeps its state in place, so on CUDA it is recorded
    # once as a graph and replayed (an MNIST step is hundreds of kernels of microseconds each); a CPU
    # runs the same buffered steps eagerly, which is how the tests see this path
    batch_idx = torch.empty(rows, batch_size, dtype=torch.int64, device=device)
    batch_w = None if weights is None else torch.empty(rows, batch_size, dtype=weights.dtype, device=device)

    def step(idx: torch.Tensor, w: torch.Tensor | None, size: int) -> None:
        loss = mean_loss(net.forward(x[idx]), y[idx], w)  # (N,)
        optimizer.zero_grad()
        loss.sum().backward()
        optimizer.step()
        total.add_(loss.detach() * size)

    def full_step() -> None:
        step(batch_idx, batch_w, batch_size)

    graph = None
    for epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in generators])
        order = torch.cat([order, order[:1].expand(pads, -1)]).to(device)
        ordered = indices.gather(1, order)  # (N, n) train indices in this epoch's order
        ws = weights.gather(1, order) if weights is not None else None
        total.zero_()
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if not graphs or stop - start < batch_size:  # the short last batch runs eagerly
                step(ordered[:, start:stop], None if ws is None else ws[:, start:stop], stop - start)
                continue
            batch_idx.copy_(ordered[:, start:stop])
            if batch_w is not None:
                batch_w.copy_(ws[:, start:stop])
            if device.type != "cuda":
                full_step()
                continue
            with torch.cuda.device(device):
                if graph is None:  # this step runs eagerly, then is recorded for the others
                    graph = warm_and_capture(full_step, device)
                else:
                    graph.replay()
        epoch_losses = [value / n for value in total[:n_models].tolist()]  # as train.train: float(total) / n
        for i, value in enumerate(epoch_losses):
            if diverged[i] is None and not math.isfinite(value):
                diverged[i] = f"training loss became {value} in epoch {epoch + 1} (lr={lr})"
            if diverged[i] is None:
                losses[i].append(value)
        if on_epoch_each is not None:  # every model's loss, as it happens (live MLflow metrics)
            on_epoch_each(epoch, epoch_losses)
        if on_epoch is not None:
            finite = [v for v in epoch_losses if math.isfinite(v)]
            on_epoch(epoch, sum(finite) / len(finite) if finite else float("nan"))
    del graph  # its memory pool holds a step's activations
    return StackOutcome(net.export(models), losses, diverged)

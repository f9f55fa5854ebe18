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
them all, N independent Adams: on a CPU each model's slice of a stacked tensor is a leaf of its
own and Adam torch's fused kernel, tensor by tensor; elsewhere Adam's elementwise ops run over
the stacked tensors. An MLP on the exact path skips autograd: its backward is written out as
the ops autograd would run (``StackedNet.loss_and_grads``), a fifth of a CPU step saved. On a GPU a step's hundreds of
tiny kernels are recorded once as a CUDA graph and replayed (``altrack.graphs``): on an H100, 35
stacked MLPs train in a third of the time per model of one alone; on a CPU stacking saves Python
overhead. Trained CUDA stacks are evaluated the same way, padded to their width
(``infer_stacked``), so a model's outputs do not depend on its stack mates either.

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
from altrack.models import conv2d
from altrack.threads import fewer_rows
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


# a weight gradient's GEMM with few outputs per model (C_out x C*kh*kw: the first convolution's
# 64 x 27) but a long reduction over B*h*w rows (28,800) leaves most of an H100 idle, one long sum
# per output tile (0.97 ms of a 35-wide CifarNet step); it runs as SPLIT_ROWS GEMMs over
# consecutive row blocks, summed after
SPLIT_BELOW = 16384  # output elements per model
SPLIT_ROWS = 8


class _PatchGemm(torch.autograd.Function):
    """N unpadded stride-1 convolutions as one batched GEMM of their im2col patches.

    ``h``: (N, B, H, W, C) activations; ``w``: (N, C_out, kh, kw, C), the patch's own order, so a
    patch row is kh*kw runs of C contiguous channels and the im2col copy moves whole runs (in the
    weight's (C, kh, kw) order it gathered single floats); ``b``: (N, C_out). Returns
    (N, B, H-kh+1, W-kw+1, C_out).

    The backward is written out: the patches' gradient goes back to ``h`` as kh*kw slice-adds in a
    fixed order (autograd's unfold backward zero-filled and re-read 7-d intermediates), and a
    weight gradient of few elements over many rows is summed from SPLIT_ROWS row blocks. Every
    shape here follows from the model, the batch size and the stack's width, so the kernels and
    the bits do too. One 35-wide CifarNet step on an H100 (graph replays of a probe's variants of
    this path, which permuted the weight each step): 8.70 ms with unfold and autograd, 8.35 ms with
    the patch order and this backward, 7.58 ms with the split.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, batch, height, width, c = h.shape
        c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        out_h, out_w = height - kh + 1, width - kw + 1
        s = h.stride()  # patch (i, j, channel) of output (y, x) is h[y + i, x + j, channel]
        cols = h.as_strided((n, batch, out_h, out_w, kh, kw, c), (s[0], s[1], s[2], s[3], s[2], s[3], s[4]))
        cols = cols.reshape(n, batch * out_h * out_w, kh * kw * c)
        weight = w.view(n, c_out, kh * kw * c)
        ctx.save_for_backward(cols, weight)
        ctx.shapes = (h.shape, w.shape)
        return torch.baddbmm(b.unsqueeze(1), cols, weight.transpose(1, 2)).view(n, batch, out_h, out_w, c_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cols, weight = ctx.saved_tensors
        (n, batch, height, width, c), (_, c_out, kh, kw, _) = ctx.shapes
        out_h, out_w = height - kh + 1, width - kw + 1
        rows = batch * out_h * out_w
        g = grad.reshape(n, rows, c_out)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            patches = torch.bmm(g, weight).view(n, batch, out_h, out_w, kh * kw, c)
            grad_h = grad.new_zeros(n, batch, height, width, c)
            for i in range(kh):
                for j in range(kw):
                    grad_h[:, :, i : i + out_h, j : j + out_w].add_(patches[:, :, :, :, i * kw + j])
        if ctx.needs_input_grad[1]:
            k = cols.shape[2]
            if k * c_out < SPLIT_BELOW and rows % SPLIT_ROWS == 0 and rows // SPLIT_ROWS >= k * c_out:
                part = rows // SPLIT_ROWS
                grad_w = torch.bmm(cols.reshape(n * SPLIT_ROWS, part, k).transpose(1, 2),
                                   g.reshape(n * SPLIT_ROWS, part, c_out)).view(n, SPLIT_ROWS, k, c_out).sum(1)
            else:
                grad_w = torch.bmm(cols.transpose(1, 2), g)  # (N, C*kh*kw, C_out)
            grad_w = grad_w.transpose(1, 2).reshape(n, c_out, kh, kw, c)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(1)
        return grad_h, grad_w, grad_b


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
                tensors = [getattr(layers[position], name).detach() for layers in per_model]
                if self._patch_major(position, name):  # (C_out, C, kh, kw) -> (C_out, kh, kw, C), dense
                    stacked = torch.stack([t.permute(0, 2, 3, 1) for t in tensors]).contiguous()
                else:  # as the models keep it (channels last)
                    stacked = torch.stack(tensors).clone()
                self.params.append(stacked)
                self.slots.append((position, name))
        self.index = {slot: i for i, slot in enumerate(self.slots)}
        # on a CPU the exact path trains each model's slice of a stacked tensor as a leaf of its
        # own, a view of the stack: its gradient is the model's GEMM's output, kept as it is.
        # Slicing a stacked leaf in the forward pass instead has the backward stack N slices'
        # gradients into a new (N, ...) tensor every step: on a CPU that copy took half of a step
        # of 7 MNIST MLPs. Off a CPU the stacked leaf stays: an elementwise Adam launches kernels
        # per tensor, and N leaves would multiply its launches by N
        self.per_model = not batched and all(t.device.type == "cpu" for t in self.params)
        self.leaves: list[list[torch.Tensor]] = [
            [t.detach()[i].requires_grad_(True) for i in range(self.n)] if self.per_model else [] for t in self.params
        ]
        for t in self.params if not self.per_model else ():
            t.requires_grad_(True)
        # the order the layers run in: a ReLU then a max-pool runs as the pool then the ReLU. Max
        # commutes with a monotone ReLU, in value and in the gradient's route (the window's first
        # maximum, zeroed where it is not positive), so the bits are the model's up to the sign of
        # an exact zero (tests/test_stack.py), and the ReLU and its backward see a quarter of the elements
        self.order = list(range(len(self.layers)))
        for i in range(len(self.layers) - 1):
            if isinstance(self.layers[i], nn.ReLU) and isinstance(self.layers[i + 1], nn.MaxPool2d):
                self.order[i], self.order[i + 1] = i + 1, i
        # an MLP on a CPU's exact path steps without autograd (``loss_and_grads``)
        self.by_hand = self.per_model and all(isinstance(layer, nn.Linear | nn.ReLU | nn.Flatten)
                                              and getattr(layer, "bias", True) is not None
                                              for layer in self.layers)  # fmt: skip

    def _param(self, position: int, name: str) -> torch.Tensor:
        return self.params[self.index[(position, name)]]

    def _leaves(self, position: int, name: str) -> Sequence[torch.Tensor]:
        """Each model's tensor of a slot: its own leaf on a CPU, a slice of the stacked leaf elsewhere
        (``unbind``: one backward for all slices, not a zero-filled stack each, whose sum also turned
        an exact -0.0 gradient into +0.0, as ``nn.Linear`` does not)."""
        i = self.index[(position, name)]
        return self.leaves[i] if self.per_model else self.params[i].unbind()

    def _grouped(self, position: int, name: str) -> torch.Tensor:
        if not self.per_model:
            return self._param(position, name)
        leaves = self._leaves(position, name)
        return torch.stack(list(leaves)) if len(leaves) > 1 else leaves[0].unsqueeze(0)

    @property
    def trainable(self) -> list[torch.Tensor]:
        """What autograd fills in and Adam steps: each model's leaves on a CPU's exact path, else
        the stacked tensors (first dim: the models)."""
        return [leaf for leaves in self.leaves for leaf in leaves] if self.per_model else list(self.params)

    def _patch_major(self, position: int, name: str) -> bool:
        """Whether this stacked tensor is a batched convolution's weight, kept as (N, C_out, kh, kw,
        C): the order of its im2col patches, so its GEMM reads it and writes its gradient in place."""
        return self.batched and name == "weight" and isinstance(self.layers[position], nn.Conv2d)

    def model_layout(self, slot: tuple[int, str], tensor: torch.Tensor) -> torch.Tensor:
        """A stacked tensor of ``slot`` (a parameter or its gradient) as (N, *the model's shape)."""
        return tensor.permute(0, 1, 4, 2, 3) if self._patch_major(*slot) else tensor

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
        for position in self.order:
            layer = self.layers[position]
            if isinstance(layer, nn.Conv2d):  # one grouped weight (the leaves' stack; a view when N is 1)
                w, b = (self._grouped(position, name) for name in ("weight", "bias"))
                h = conv2d(h, w.flatten(0, 1), b.flatten(), layer.stride, layer.padding, layer.dilation, groups=n)
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
                h = self._per_model_linear(position, h)
        return h

    def _per_model_linear(self, position: int, h: torch.Tensor) -> torch.Tensor:
        """Linear layer ``position`` on (N, B, features): one addmm per model on its own leaves,
        the GEMM nn.Linear runs; a batched GEMM (MKL's, cuBLAS's) picks its kernels by batch
        count, so a model's bits would depend on its stack. Few rows run on one thread, as
        ``models.Linear`` runs them (``threads.fewer_rows``)."""
        with fewer_rows(h.device, h.shape[1], self.layers[position].out_features):
            return torch.stack([torch.addmm(bi, hi, wi.t()) for bi, hi, wi in
                                zip(self._leaves(position, "bias"), h.unbind(), self._leaves(position, "weight"),
                                    strict=True)])  # fmt: skip

    @torch.no_grad()
    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """``mean_loss(self.forward(x), y, w)``, (N,), with each leaf's gradient of its sum in
        ``.grad``, for a stack of linear, ReLU and flatten layers (``by_hand``), without autograd.

        The backward is written out as the ops autograd runs for it, on the same tensors, so the
        bits are the same (tests/test_stack.py compares every parameter with ``train.train``'s):
        the mean's 1/B and the weights' product, ``nll_loss_backward`` and
        ``_log_softmax_backward_data`` (``cross_entropy``), ``threshold_backward`` (ReLU) and, per
        model and linear layer, AddmmBackward0's products and its bias gradient (``sum_to``). Not
        recording a graph of some 60 nodes per step of 7 MNIST MLPs, nor walking it: 0.29
        against 0.36 s per model stacked by 7, 0.29 against 0.33 by 21, the same bits
        (``benchmarks/bench_stack.py``, a 2-core Intel Xeon). ``x``: (N, B, *input shape);
        ``y``, ``w``: (N, B)."""
        n, batch = x.shape[0], x.shape[1]
        h = x
        inputs: list[torch.Tensor] = []  # each layer's input, in ``order``
        for position in self.order:
            layer = self.layers[position]
            inputs.append(h)
            if isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten):
                h = h.flatten(2)
            else:
                h = self._per_model_linear(position, h)
        # cross_entropy is log_softmax then nll_loss; mean_loss then scales (w) and means over B
        target = y.reshape(-1)
        log_p = torch.log_softmax(h.flatten(0, -2), 1)
        ce, total_weight = torch.ops.aten.nll_loss_forward(log_p, target, None, 0, -100)
        ce = ce.view(y.shape)
        loss = (ce if w is None else ce * w).mean(-1)
        grad = torch.ones(n, 1).expand(n, batch) / batch  # MeanBackward1 of the summed losses
        if w is not None:
            grad = grad * w
        grad = torch.ops.aten.nll_loss_backward(grad.reshape(-1), log_p, target, None, 0, -100, total_weight)
        grad = torch.ops.aten._log_softmax_backward_data(grad, log_p, 1, log_p.dtype).view(h.shape)
        first_linear = next(p for p in self.order if isinstance(self.layers[p], nn.Linear))
        for step in reversed(range(len(self.order))):
            position, h_in = self.order[step], inputs[step]
            layer = self.layers[position]
            if isinstance(layer, nn.ReLU):
                grad = torch.ops.aten.threshold_backward(grad, inputs[step + 1] if step + 1 < len(inputs) else h, 0)
            elif isinstance(layer, nn.Flatten):
                grad = grad.view(h_in.shape)
            else:
                below = []
                for g, hi, wi, bi in zip(grad.unbind(), h_in.unbind(), self._leaves(position, "weight"),
                                         self._leaves(position, "bias"), strict=True):  # fmt: skip
                    wi.grad = torch.mm(g.t(), hi)  # mm_mat2_backward: W.t() is column-major
                    bi.grad = g.sum([0], keepdim=True).view(bi.shape)
                    if position != first_linear:  # mm_mat1_backward, its two layouts
                        column_major = hi.stride(0) == 1 and hi.stride(1) == hi.shape[0]
                        below.append(wi.t().mm(g.t()).t() if column_major else g.mm(wi))
                if position == first_linear:
                    break
                grad = torch.stack(below)
        return loss

    def _forward_batched(self, x: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``forward`` as one batched GEMM per layer, convolutions included (``_PatchGemm``), with
        activations kept as (N, B, h, w, C) so that a GEMM's output is the next layer's input. On
        an H100 this trained 35 stacked CifarNets 1.37x faster per step than cuDNN's grouped
        convolution (64: 1.6x), and a model's bits depend only on the stack's width
        (``train_stacked``). ``features``, if given, receives the head's input (the embeddings)."""
        n, batch = x.shape[0], x.shape[1]
        spatial = isinstance(self.layers[0], nn.Conv2d)
        h = x.permute(0, 1, 3, 4, 2).contiguous() if spatial else x.flatten(2)  # (N, B, h, w, C) or (N, B, F)
        head = len(self.layers) - 1
        for position in self.order:
            layer = self.layers[position]
            if isinstance(layer, nn.Conv2d):
                h = _PatchGemm.apply(h, self._param(position, "weight"), self._param(position, "bias"))
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
                if position == head and features is not None:
                    features.append(h)
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
                for slot, tensor in zip(self.slots, self.params, strict=True):
                    position, name = slot
                    getattr(layers[position], name).copy_(self.model_layout(slot, tensor)[i])
            trained.append(twin)
        return trained


def _padded(models: Sequence[nn.Module], width: int | None) -> list[nn.Module]:
    """``models`` padded to ``width`` with copies of the first (None: as they are), the stack a
    batched path runs. Raises ``ValueError`` when ``width`` is below their count."""
    if width is None:
        return list(models)
    if width < len(models):
        raise ValueError(f"a stack of width {width} cannot hold {len(models)} models")
    return list(models) + [models[0]] * (width - len(models))


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
    net = StackedNet(_padded(models, width), batched=width is not None)
    pads = net.n - n_models
    device = x.device
    if pads:  # the padding trains model 0's copy on model 0's rows: a real step's shapes, no NaN
        indices = torch.cat([indices, indices[:1].expand(pads, -1)])
        weights = None if weights is None else torch.cat([weights, weights[:1].expand(pads, -1)])
    schedule = adam_schedule(device, epochs, n, batch_size)
    optimizer = Adam(net.trainable, lr, schedule=schedule, stacked=not net.per_model)
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
        rows = idx.reshape(-1)  # index_select, not x[idx]: the same copy, on a CPU twice as fast
        batch = x.index_select(0, rows).view(*idx.shape, *x.shape[1:])
        targets = y.index_select(0, rows).view(idx.shape)
        optimizer.zero_grad()
        if net.by_hand:
            loss = net.loss_and_grads(batch, targets, w)
        else:
            loss = mean_loss(net.forward(batch), targets, w)  # (N,)
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


# inference rows per model and chunk, in training batches: no gradient or saved activation is held,
# so four batches' forward pass stays under the training step's memory that ``check_stacks`` checked
INFER_BATCHES = 4


@torch.no_grad()
def infer_stacked(
    models: Sequence[nn.Module], x: torch.Tensor, *, width: int, batch_size: int, features: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every model's logits (N, n, classes) on all n rows of ``x`` and, if ``features``, its
    embeddings (N, n, d): the trained models as one stack padded to ``width`` (N <= width), through
    the batched GEMMs they trained with, in chunks of ``INFER_BATCHES * batch_size`` rows. The
    shapes follow from the width, the batch size and n alone, so a model's outputs do not depend
    on its stack mates. On an H100, 35 CifarNets took 21 ms each on 10,000 images this way against
    29 ms through cuDNN one at a time. Raises ``ValueError`` when ``width`` is below N."""
    n_models = len(models)
    net = StackedNet(_padded(models, width), batched=True)
    chunk = INFER_BATCHES * batch_size
    logits, embeddings = [], []
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        seen: list[torch.Tensor] = []
        stacked = rows.expand(width, *rows.shape).contiguous()  # as a training batch, one copy per model
        logits.append(net._forward_batched(stacked, seen if features else None)[:n_models])
        if features:
            embeddings.append(seen[0][:n_models])
    return torch.cat(logits, 1), torch.cat(embeddings, 1) if features else None

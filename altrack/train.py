"""A plain whole-tensor training loop: one gather per epoch, contiguous slices per step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from altrack.errors import TrainingDiverged

EVAL_BATCH = 2048


class Adam:
    """``torch.optim.Adam``'s update (default betas and eps, no weight decay), with the same bits
    for a model trained alone (``train``) or stacked with others (``altrack.stack``).

    On a CPU (``fused=None``) it is torch's fused Adam kernel, one pass per tensor instead of a
    dozen: the update of 7 stacked MLPs 3.5x faster (0.30 against 1.04 ms a step, one core). That
    kernel's vector and scalar lanes round differently, so an element's bits depend on its place
    in the tensor: a stacked parameter (``stacked=True``: its first dim indexes models) is
    therefore handed to it as one tensor per model, each of which the kernel sees exactly as it
    sees that model's parameter alone (tested, with 1 and 2 threads). A tensor that is not
    contiguous takes the elementwise path below.

    Elsewhere (``fused=False``; CUDA, MPS) the update is plain elementwise ops: no fused kernel, no
    FMA, so each element gets the same bits whatever the size of the tensor it sits in. Each
    tensor is updated in flat blocks (in its memory order, channels last included) through two
    preallocated scratch rows: no temporaries, and the blocks of ``CPU_BLOCK`` elements keep the
    update's dozen elementwise passes in cache where it runs on a CPU. Elementwise ops give the
    same bits in any blocking. The blocks are views planned once; a parameter whose storage is
    swapped afterwards (``p.data = ...``) is planned again.

    ``schedule=S`` (used on CUDA) precomputes the bias corrections of steps 1..S as a device table
    read through a device step counter, so that a CUDA graph recorded over many steps
    (``altrack.stack``) gives each replayed step its own. S must cover every step taken; ``steps``
    then counts the Python calls only (a replayed step makes none). On a CPU the elementwise path
    gives the same bits with and without the table (tested); on CUDA a Python divisor is applied
    as a multiply by its reciprocal, so ``train`` uses the table there too.
    """

    CPU_BLOCK = 1 << 18  # elements (1 MiB of fp32): the fastest block measured for 1 to 21 stacked MLPs
    DEVICE_BLOCK = 1 << 24  # off a CPU, one launch per op for any stack altrack trains

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, schedule: int = 0, *, stacked: bool = False,
                 fused: bool | None = None) -> None:  # fmt: skip
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0
        on_cpu = all(p.device.type == "cpu" for p in params)
        if fused and not on_cpu:
            raise ValueError("the fused Adam path runs on a CPU only")
        self.fused = (on_cpu and not schedule) if fused is None else fused
        self.stacked = stacked
        self._fused_step = torch.zeros((), dtype=torch.float32)  # the kernel reads it for every tensor
        with torch.no_grad():  # views outside autograd: a view with a grad_fn would create each
            # parameter's AccumulateGrad node here, on the default stream, and CUDA graph capture
            # on a side stream then fails (the node syncs with the stream it was made on)
            self._plans = [self._plan(i) for i in range(len(params))]
        self._scratch: dict[tuple, torch.Tensor] = {}  # (device, dtype) -> (2, largest block)
        self._table: torch.Tensor | None = None
        if schedule:  # steps 1..schedule's bias corrections on the device, read through a device counter
            rows = [[lr / (1 - betas[0] ** s), (1 - betas[1] ** s) ** 0.5] for s in range(1, schedule + 1)]
            self._table = torch.tensor(rows, dtype=params[0].dtype).to(params[0].device)
            self._step = torch.zeros(1, dtype=torch.int64, device=params[0].device)

    def _plan(self, i: int) -> tuple:
        """Parameter i's storage pointer, its dims in memory order, block size, (p, m, v) block
        views and the largest block; a tensor whose strides do not flatten (a slice) is one block
        as shaped."""
        p, m, v = self.params[i], self.exp_avg[i], self.exp_avg_sq[i]
        block = self.CPU_BLOCK if p.device.type == "cpu" else self.DEVICE_BLOCK
        order = sorted(range(p.dim()), key=lambda d: -p.stride(d))
        try:
            views = list(zip(*(t.permute(order).view(-1).split(block) for t in (p, m, v)), strict=True))
        except RuntimeError:  # not dense in any order: no blocks, the same ops on the whole tensor
            order, block, views = None, p.numel(), [(p, m, v)]
        return p.data_ptr(), order, block, views, max((pb.numel() for pb, _, _ in views), default=0)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1, beta2 = self.betas
        if self._table is None:
            step_size = self.lr / (1 - beta1**self.steps)
            bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        else:  # 0-dim device tensors: a captured graph of many steps reads each step's own
            row = self._table.index_select(0, self._step).squeeze(0)
            step_size, bias_correction2_sqrt = row[0], row[1]
            self._step.add_(1)
        fused = self._fused_update() if self.fused else set()
        for i, p in enumerate(self.params):
            if p.grad is None or i in fused:  # as torch's Adam: a parameter without a gradient is left alone
                continue
            if self._plans[i][0] != p.data_ptr():
                self._plans[i] = self._plan(i)
            _, order, block, views, largest = self._plans[i]
            grads = [p.grad] if order is None else p.grad.permute(order).reshape(-1).split(block)
            scratch = self._scratch_for(p, largest)
            for (pb, mb, vb), g in zip(views, grads, strict=True):  # the plain Adam above, into scratch
                s, t = scratch[0, : pb.numel()].view(pb.shape), scratch[1, : pb.numel()].view(pb.shape)
                mb.mul_(beta1).add_(torch.mul(g, 1 - beta1, out=s))
                vb.mul_(beta2).add_(torch.mul(g, g, out=s).mul_(1 - beta2))
                denom = torch.sqrt(vb, out=s).div_(bias_correction2_sqrt).add_(self.eps)
                pb.sub_(torch.div(mb, denom, out=t).mul_(step_size))

    def _fused_update(self) -> set[int]:
        """Step every parameter the fused kernel can take (contiguous, with a gradient), each
        model's slice of a stacked one as a tensor of its own; returns their positions."""
        split = (lambda t: t.unbind(0)) if self.stacked else (lambda t: (t,))
        done, params, grads, exp_avgs, exp_avg_sqs = set(), [], [], [], []
        for i, p in enumerate(self.params):
            if p.grad is None or not (p.is_contiguous() and self.exp_avg[i].is_contiguous()):
                continue
            done.add(i)
            params += split(p.detach())
            grads += split(p.grad.contiguous())
            exp_avgs += split(self.exp_avg[i])
            exp_avg_sqs += split(self.exp_avg_sq[i])
        if params:
            self._fused_step.add_(1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], [self._fused_step] * len(params),
                               lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0,
                               eps=self.eps, amsgrad=False, maximize=False)  # fmt: skip
        return done

    def _scratch_for(self, p: torch.Tensor, n: int) -> torch.Tensor:
        """Two scratch rows of at least n elements on p's device, shared by every parameter."""
        key = (p.device, p.dtype)
        scratch = self._scratch.get(key)
        if scratch is None or scratch.shape[1] < n:
            scratch = self._scratch[key] = torch.empty(2, n, dtype=p.dtype, device=p.device)
        return scratch


def adam_schedule(device: torch.device, epochs: int, n: int, batch_size: int) -> int:
    """``Adam``'s ``schedule`` for ``epochs`` over n examples: every step's bias corrections in a
    device table on CUDA (where a replayed graph needs them, and where a Python divisor would take
    CUDA's multiply-by-reciprocal path and round otherwise), none elsewhere."""
    return epochs * -(-n // batch_size) if device.type == "cuda" else 0


def mean_loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean cross-entropy over the last batch axis, each example scaled by its weight if given.

    ``logits`` (..., B, C), ``y`` and ``weights`` (..., B) -> (...): one loss per model."""
    ce = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    return (ce if weights is None else ce * weights).mean(-1)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Adam on (x, y); returns the mean training loss of each epoch.

    ``weights`` (optional, one per example) scale each example's loss; they are normalised to
    mean 1 so the learning rate means the same thing with and without them.
    Raises ``TrainingDiverged`` as soon as an epoch's loss is not finite.
    """
    model.train()
    n = x.shape[0]
    optimizer = Adam(list(model.parameters()), lr, schedule=adam_schedule(x.device, epochs, n, batch_size))
    if weights is not None:
        weights = weights / weights.mean()
    losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        xs, ys = x[order], y[order]
        ws = weights[order] if weights is not None else None
        total = torch.zeros((), device=x.device)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            loss = mean_loss(model(xs[start:stop]), ys[start:stop], None if ws is None else ws[start:stop])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.detach() * (stop - start)
        epoch_loss = float(total) / n
        if not math.isfinite(epoch_loss):
            raise TrainingDiverged(f"training loss became {epoch_loss} in epoch {epoch + 1} (lr={lr})")
        losses.append(epoch_loss)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    return losses


@dataclass(frozen=True)
class Outputs:
    """What one forward pass of a model over a split gives the selection methods."""

    logits: torch.Tensor
    embeddings: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def ce_loss(self, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits, y, reduction="none")

    def grad_loss(self, y: torch.Tensor) -> torch.Tensor:
        """Squared norm of d CE / d (last linear layer's weight and bias), in closed form:
        ||p - onehot(y)||^2 * (||h||^2 + 1)."""
        residual = self.probs - F.one_hot(y, self.logits.shape[1]).to(self.logits.dtype)
        return residual.pow(2).sum(1) * (self.embeddings.pow(2).sum(1) + 1.0)


@torch.inference_mode()
def forward_all(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> Outputs:
    model.eval()
    logits, embeddings = [], []
    for start in range(0, x.shape[0], batch_size):
        h = model.body(x[start : start + batch_size])
        embeddings.append(h)
        logits.append(model.head(h))
    return Outputs(torch.cat(logits).float(), torch.cat(embeddings).float())


def score(out: Outputs, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a model's outputs on a split; the accuracy is the exact
    fraction correct / n (a float32 mean would log 0.86470001 for 8647 / 10000)."""
    accuracy = int((out.logits.argmax(1) == y).sum()) / len(y)
    return accuracy, out.ce_loss(y).mean().item()

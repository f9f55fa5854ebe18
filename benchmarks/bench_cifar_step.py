"""On a CUDA device: one step of N stacked CifarNets (batch 32, a replayed graph) and their
evaluation, this tree against b13383f's batched path (kept below: unfold patches in the weight's
(C, kh, kw) order, autograd's backward, ReLU before the pool), with a kernel profile of each step.

    python benchmarks/bench_cifar_step.py [--models 35] [--profile]

Random pixels: the timings mean what they say, the values nothing. Prints the gradients' relative
difference between the two paths (float rounding: the patch order sums in another order).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from altrack.data import set_determinism
from altrack.graphs import warm_and_capture
from altrack.protocol import fresh_model, stream_seed
from altrack.stack import StackedNet, infer_stacked
from altrack.train import Adam, forward_all, mean_loss


class Before(StackedNet):
    """b13383f's ``_forward_batched``, parameters in the model's own layout."""

    def __init__(self, models):
        super().__init__(models, batched=False)  # weights as the model keeps them, (N, C_out, C, kh, kw)
        self.per_model, self.leaves = False, [[] for _ in self.params]  # the stacked tensors, as then
        for p in self.params:
            p.requires_grad_(True)

    def forward(self, x):
        n, batch = x.shape[0], x.shape[1]
        h = x.permute(0, 1, 3, 4, 2).contiguous()
        for position, layer in enumerate(self.layers):  # the model's order: ReLU, then the pool
            if isinstance(layer, nn.Conv2d):
                w = self._param(position, "weight")
                kh, kw = layer.kernel_size
                out_h, out_w = h.shape[2] - kh + 1, h.shape[3] - kw + 1
                cols = h.unfold(2, kh, 1).unfold(3, kw, 1).reshape(n, batch * out_h * out_w, -1)
                h = torch.baddbmm(self._param(position, "bias").unsqueeze(1), cols, w.flatten(2).transpose(1, 2))
                h = h.view(n, batch, out_h, out_w, -1)
            elif isinstance(layer, nn.MaxPool2d):
                pooled = F.max_pool2d(h.flatten(0, 1).permute(0, 3, 1, 2), layer.kernel_size, layer.stride)
                h = pooled.permute(0, 2, 3, 1).reshape(n, batch, *pooled.shape[2:], pooled.shape[1])
            elif isinstance(layer, nn.ReLU):
                h = torch.relu(h)
            elif isinstance(layer, nn.Flatten):
                h = h.permute(0, 1, 4, 2, 3).reshape(n, batch, -1)
            else:
                w = self._param(position, "weight")
                h = torch.baddbmm(self._param(position, "bias").unsqueeze(1), h, w.transpose(1, 2))
        return h


def now(models):
    return StackedNet(models, batched=True)


def step_of(net, x, y, idx):
    opt = Adam(net.params, 1e-3, schedule=10_000)

    def step():
        loss = mean_loss(net.forward(x[idx]), y[idx], None)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()

    return step


def replay_ms(step, reps=60):
    device = torch.device("cuda")
    with torch.cuda.device(device):
        graph = warm_and_capture(step, device)
        for _ in range(5):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def profile(step, label):
    # lazy: the profiler loads only with --profile
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as record

    step()
    torch.cuda.synchronize()
    with record(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in kernels) / 3000
    print(f"{label}: {total:.2f} ms of GPU time per step; the largest kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:10]:
        print(f"  {e.self_device_time_total / 3000:7.3f} ms  {e.count // 3:>3}x  {e.key[:90]}")


def gradients(make, models, x, y, idx):
    net = make(models)
    mean_loss(net.forward(x[idx]), y[idx], None).sum().backward()
    return [net.model_layout(slot, p.grad) for slot, p in zip(net.slots, net.params, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=int, default=35)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cifar_step.py needs a CUDA device")
    set_determinism("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 3, 32, 32, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4096,), generator=g).cuda()
    models = [fresh_model("cifar10", torch.device("cuda"), stream_seed(i, 4)) for i in range(args.models)]
    idx = torch.randint(0, 4096, (args.models, 32), generator=g).cuda()
    before, after = gradients(Before, models, x, y, idx), gradients(now, models, x, y, idx)
    err = max(float((a - b).norm() / b.norm()) for a, b in zip(after, before, strict=True))
    print(f"{args.models} CifarNets, batch 32, {torch.cuda.get_device_name()}; gradients' largest relative "
          f"difference from b13383f's: {err:.1e}")  # fmt: skip
    times = {}
    for label, make in (("b13383f", Before), ("this tree", now)):
        step = step_of(make(models), x, y, idx)
        if args.profile:
            profile(step, label)
        times[label] = replay_ms(step)
    test = torch.randn(10_000, 3, 32, 32, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    forward_all(models[0], test[:2048])
    infer_stacked(models, test[:256], width=args.models, batch_size=32)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for model in models[:5]:
        forward_all(model, test)
    torch.cuda.synchronize()
    alone = (time.perf_counter() - start) / 5
    start = time.perf_counter()
    infer_stacked(models, test, width=args.models, batch_size=32)
    torch.cuda.synchronize()
    stacked = (time.perf_counter() - start) / args.models
    print(f"{'':<44}{'b13383f':>10}{'this tree':>11}{'ratio':>8}")
    print(f"{'one training step, ms':<44}{times['b13383f']:>10.2f}{times['this tree']:>11.2f}"
          f"{times['b13383f'] / times['this tree']:>7.2f}x")  # fmt: skip
    print(f"{'10,000 test images, ms per model':<44}{alone * 1000:>10.1f}{stacked * 1000:>11.1f}"
          f"{alone / stacked:>7.2f}x   (cuDNN alone -> infer_stacked)")  # fmt: skip


if __name__ == "__main__":
    main()

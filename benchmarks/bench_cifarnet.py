"""CifarNet throughput in img/s on real CIFAR-10 images: altrack's loop (channels-last tensors,
altrack's Adam, contiguous slices; inference at batch 2048) against a plain NCHW loop (batch 32 for
training, 256 for inference, foreach Adam).

    python benchmarks/bench_cifarnet.py [--images 2000]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import data_dir

from altrack.data import load_dataset
from altrack.models import CifarNet
from altrack.train import forward_all, train


def plain_train(x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = CifarNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = x.contiguous()  # NCHW
    start = time.perf_counter()
    for i in range(0, len(x), 32):
        loss = F.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(x) / (time.perf_counter() - start)


@torch.no_grad()
def plain_infer(x: torch.Tensor) -> float:
    model = CifarNet().eval()
    x = x.contiguous()
    start = time.perf_counter()
    for i in range(0, len(x), 256):
        model(x[i : i + 256])
    return len(x) / (time.perf_counter() - start)


def altrack_train(x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    model = CifarNet().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    train(model, x, y, epochs=1, batch_size=32, lr=1e-3, generator=torch.Generator().manual_seed(0))
    return len(x) / (time.perf_counter() - start)


def altrack_infer(x: torch.Tensor) -> float:
    model = CifarNet().to(memory_format=torch.channels_last)
    start = time.perf_counter()
    forward_all(model, x)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    data = load_dataset("cifar10", data_dir())
    x, y = data.x_train[: args.images], data.y_train[: args.images]  # channels-last, as altrack keeps them
    x_test = data.x_test
    print(f"CifarNet on {args.images} CIFAR-10 images; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = [
        ("training, batch 32", plain_train(x, y), altrack_train(x, y)),
        (f"inference, {len(x_test)} test images", plain_infer(x_test), altrack_infer(x_test)),
    ]
    print(f"{'':<34}{'plain NCHW img/s':>18}{'altrack img/s':>15}{'ratio':>8}")
    for name, plain, ours in rows:
        print(f"{name:<34}{plain:>18.0f}{ours:>15.0f}{ours / plain:>7.2f}x")


if __name__ == "__main__":
    main()

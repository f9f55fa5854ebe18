"""One MNIST `coreset` protocol run at k=2000 with the paper's settings, end to end, against a
seed-style reference: torchvision datasets with per-sample ToTensor/Normalize, a DataLoader at
batch 32, and sklearn's default KMeans. Same seed set, same architecture, same Algorithm 1.
No MLflow logging in either, so only the protocol is timed.

    python benchmarks/bench_protocol.py [--seeds 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from _common import data_dir
from sklearn.cluster import KMeans
from torch.utils.data import DataLoader, Subset

from altrack.data import load_dataset
from altrack.protocol import SEED_SET, SELECT, SHARED_SELECT, run_method, stream_seed, train_seed_stage
from altrack.selection import SelectionContext
from altrack.selection.coreset import CoresetSelector
from altrack.settings import Settings

BUDGET = 2000


class SklearnCoreset(CoresetSelector):
    """Algorithm 1 exactly as altrack runs it, with sklearn's default KMeans."""

    @staticmethod
    def cluster(points, k, seed, device="cpu"):
        fitted = KMeans(k, random_state=seed).fit(points)
        return fitted.cluster_centers_.astype(np.float32), fitted.labels_


def _train(model, dataset, epochs, generator):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(dataset, batch_size=32, shuffle=True, generator=generator)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def _outputs(model, dataset):
    model.eval()
    logits, embeddings = [], []
    for x, _ in DataLoader(dataset, batch_size=64):
        h = model.body(x)
        embeddings.append(h)
        logits.append(model.head(h))
    return torch.cat(logits), torch.cat(embeddings)


def reference_run(root: Path, seed: int) -> tuple[float, float]:
    """(seconds, test accuracy) of the seed-style implementation."""
    from altrack.models import MLP

    start = time.perf_counter()
    transform = torchvision.transforms.Compose(
        [torchvision.transforms.ToTensor(), torchvision.transforms.Normalize((0.1307,), (0.3081,))]
    )
    train = torchvision.datasets.MNIST(str(root), train=True, download=True, transform=transform)
    test = torchvision.datasets.MNIST(str(root), train=False, download=True, transform=transform)
    settings = Settings()
    rng = np.random.default_rng(stream_seed(seed, SEED_SET))
    seed_idx = np.sort(rng.choice(len(train), size=settings.n_seed(BUDGET), replace=False))
    torch.manual_seed(seed)
    model = MLP()
    _train(model, Subset(train, seed_idx.tolist()), 10, torch.Generator().manual_seed(seed))
    logits, embeddings = _outputs(model, train)
    labels = train.targets
    probs = torch.softmax(logits, 1)
    ce = F.cross_entropy(logits, labels, reduction="none")
    ctx = SelectionContext(
        seed_indices=seed_idx.astype(np.int64),
        pool_indices=np.setdiff1d(np.arange(len(train)), seed_idx).astype(np.int64),
        budget=BUDGET,
        probs=probs.numpy(),
        embeddings=embeddings.numpy(),
        labels=labels.numpy(),
        ce_loss=ce.numpy(),
        grad_loss=ce.numpy(),
        settings=settings,
        rng=np.random.default_rng(stream_seed(seed, SELECT, "coreset")),
        shared_seed=stream_seed(seed, SHARED_SELECT),
    )
    chosen = SklearnCoreset().select(ctx).indices
    torch.manual_seed(seed + 1)
    final = MLP()
    _train(final, Subset(train, np.concatenate([seed_idx, chosen]).tolist()), 10, torch.Generator().manual_seed(seed))
    final.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += int((final(x).argmax(1) == y).sum())
    return time.perf_counter() - start, correct / len(test)


def altrack_run(seed: int) -> tuple[float, float]:
    start = time.perf_counter()
    data = load_dataset("mnist", data_dir())
    settings = Settings()
    stage = train_seed_stage(data, BUDGET, seed, settings)
    result = run_method(data, stage, "coreset", settings)
    return time.perf_counter() - start, result.test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    workdir = tempfile.TemporaryDirectory(prefix="altrack-bench-")  # removed at exit, after an error too
    root = Path(workdir.name)
    shutil.copytree(Path(data_dir()) / "MNIST", root / "MNIST")
    load_dataset("mnist", data_dir())  # both sides start with the data on disk, parsed once for altrack
    torchvision.datasets.MNIST(str(root), train=True, download=True)
    print(f"MNIST coreset, k={BUDGET}, paper settings; torch threads {torch.get_num_threads()}")
    print(f"{'seed':>4} {'altrack s':>10} {'reference s':>12} {'speed-up':>9} {'altrack acc':>12} {'ref acc':>8}")
    rows = []
    for seed in range(args.seeds):
        ours = altrack_run(seed)
        ref = reference_run(root, seed)
        rows.append((ours, ref))
        print(f"{seed:>4} {ours[0]:>10.2f} {ref[0]:>12.2f} {ref[0] / ours[0]:>8.1f}x {ours[1]:>12.4f} {ref[1]:>8.4f}")
    ours_t = np.mean([o[0] for o, _ in rows])
    ref_t = np.mean([r[0] for _, r in rows])
    ours_acc, ref_acc = np.mean([o[1] for o, _ in rows]), np.mean([r[1] for _, r in rows])
    print(f"mean: altrack {ours_t:.2f} s, reference {ref_t:.2f} s, speed-up {ref_t / ours_t:.1f}x (target >= 8x); ")
    print(f"accuracy altrack {ours_acc:.4f} vs reference {ref_acc:.4f}")
    workdir.cleanup()


if __name__ == "__main__":
    main()

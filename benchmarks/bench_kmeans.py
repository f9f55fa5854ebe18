"""k-means alone on the real MNIST pool embeddings (k=2000, seed 0) at k''=400:
altrack's implementation against sklearn's default KMeans, same data, several seeds.

    python benchmarks/bench_kmeans.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import pool_embeddings
from sklearn.cluster import KMeans

from altrack.selection.kmeans import kmeans


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clusters", type=int, default=400)
    args = parser.parse_args()
    x = pool_embeddings()
    print(f"data: MNIST seed-model pool embeddings {x.shape}, k''={args.clusters}")
    print(f"{'seed':>4} {'altrack s':>10} {'sklearn s':>10} {'speed-up':>9} {'inertia ratio':>14}")
    ratios, speedups = [], []
    for seed in range(args.seeds):
        start = time.perf_counter()
        ours = kmeans(x, args.clusters, seed=seed)
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = KMeans(args.clusters, random_state=seed).fit(x)
        t_theirs = time.perf_counter() - start
        ratios.append(ours.inertia / theirs.inertia_)
        speedups.append(t_theirs / t_ours)
        print(f"{seed:>4} {t_ours:>10.2f} {t_theirs:>10.2f} {speedups[-1]:>8.1f}x {ratios[-1]:>14.4f}")
    print(f"mean speed-up {np.mean(speedups):.1f}x (target >= 5x); "
          f"inertia ratio altrack/sklearn {np.mean(ratios):.4f} (target <= 1.01)")  # fmt: skip


if __name__ == "__main__":
    main()

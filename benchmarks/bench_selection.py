"""k-center greedy and k-means alone, on the real MNIST seed-model pool embeddings at k=2000 and
k=5000 (seed 0), this tree against another checkout's (``--reference REF``, for example a6cf675's:
``git archive a6cf675 altrack | tar -x -C REF``), side by side, at 1 thread and at all cores.

Each side runs in its own process (the two trees are both called ``altrack``), on the same saved
embeddings; k-center picks k - k' points seeded with the seed set, k-means clusters the pool into
the coreset's k'' = 0.2 (k - k') clusters.

    python benchmarks/bench_selection.py --reference REF [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--side" in sys.argv:  # a side's altrack before numpy and torch: it sets their thread defaults, as in its CLI
    sys.path.insert(0, sys.argv[sys.argv.index("--side") + 1])
    import altrack  # noqa: F401

import numpy as np  # noqa: E402

BUDGETS = (2000, 5000)


def time_side(npz: str, threads: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per (algorithm, k) for the ``altrack`` first on sys.path."""
    import torch

    from altrack.selection.kcenter import kcenter_greedy
    from altrack.selection.kmeans import kmeans

    torch.set_num_threads(threads)
    out = {}
    for budget in BUDGETS:
        z = np.load(npz.format(budget=budget))
        pool, seeds = torch.from_numpy(z["pool"]), torch.from_numpy(z["seed"])
        n_select = budget - len(seeds)
        for name, work in (
            ("kcenter", lambda p=pool, s=seeds, n=n_select: kcenter_greedy(p, s, n)),
            ("kmeans", lambda p=z["pool"], n=n_select: kmeans(p, round(0.2 * n), seed=0)),
        ):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                work()
                best = min(best, time.perf_counter() - start)
            out[f"{name} k={budget}"] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", default=None, help="folder holding another checkout's altrack package")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--side", nargs=3, help=argparse.SUPPRESS)  # ROOT NPZ THREADS: one side, as JSON
    args = parser.parse_args()
    if args.side:
        root, npz, threads = args.side
        sys.path.insert(0, root)
        print(json.dumps(time_side(npz, int(threads), args.repeats)))
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import mnist_stage

    with tempfile.TemporaryDirectory(prefix="altrack-bench-selection-") as tmp:  # the embeddings go with it
        folder = Path(tmp)
        for budget in BUDGETS:
            _, stage = mnist_stage(budget, 0)
            np.savez(folder / f"emb{budget}.npz", pool=stage.embeddings[stage.pool_indices],
                     seed=stage.embeddings[stage.seed_indices])  # fmt: skip
        sides = [("this tree", Path(__file__).resolve().parents[1])]
        if args.reference:
            sides.append(("reference", Path(args.reference).resolve()))
        cores = os.cpu_count() or 1
        print(
            f"MNIST seed-model pool embeddings (seed 0), best of {args.repeats}; k-center picks 0.8k, k-means k''=0.16k"
        )
        header = f"{'what':<16}{'threads':>8}" + "".join(f"{name:>12}" for name, _ in sides)
        print(header + ("  speed-up" if args.reference else ""))
        for threads in sorted({1, cores}):
            timings = []
            for _, root in sides:
                command = [sys.executable, __file__, "--repeats", str(args.repeats),
                           "--side", str(root), str(folder / "emb{budget}.npz"), str(threads)]  # fmt: skip
                timings.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
            for what in timings[0]:
                row = f"{what:<16}{threads:>8}" + "".join(f"{t[what]:>11.2f}s" for t in timings)
                if args.reference:
                    row += f"{timings[1][what] / timings[0][what]:>9.1f}x"
                print(row)


if __name__ == "__main__":
    main()

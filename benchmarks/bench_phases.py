"""Where a grid's time goes: 7 methods x 5 seeds at k=2000 (``--budget``) with synchronised timers around the
engine's phases (training stacks, building and exporting models, outputs and evaluation, each
selection method), then a cProfile of the selections. On CUDA the timers' synchronisations cost
a little; the plain grid's wall time is printed first.

    python benchmarks/bench_phases.py [cuda|cpu] [cifar10|mnist|fashion_mnist] [--one | --first] [--budget K]

cifar10 runs on CIFAR-10-shaped random pixels (``bench_engine.synthetic_cifar``); the others read
``$ALTRACK_DATA_DIR``. ``--one``: one plain grid before the timed one (default two); ``--first``:
time the process's first grid, graph captures included. Nested phases (building, training and
exporting stacks) are listed after the others and not added to the accounted time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import synthetic_cifar  # noqa: E402

from altrack import protocol, stack  # noqa: E402
from altrack.config import GridConfig, Settings  # noqa: E402
from altrack.data import load_dataset, set_determinism  # noqa: E402
from altrack.selection import available_methods  # noqa: E402

PHASES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(name_of, fn, device):
    def wrapper(*args, **kwargs):
        name = name_of(args, kwargs)
        sync(device)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(device)
        PHASES[name] += time.perf_counter() - t
        COUNTS[name] += 1
        return out

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("device", nargs="?", default="cuda")
    parser.add_argument("dataset", nargs="?", default="cifar10")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--one", action="store_true", help="one plain grid before the timed one")
    runs.add_argument("--first", action="store_true", help="time the process's first grid")
    parser.add_argument("--budget", type=int, default=2000, help="k (default 2000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="altrack-synthetic-") as synthetic:
        if args.dataset == "cifar10":
            synthetic_cifar(Path(synthetic))
            folder = synthetic
        else:
            folder = os.environ.get("ALTRACK_DATA_DIR", str(ROOT.parent / "shared/data"))
        phases(args.device, args.dataset, folder, 0 if args.first else 1 if args.one else 2, args.budget)


def phases(device: str, dataset: str, folder: str, plain_runs: int, budget: int = 2000) -> None:
    set_determinism(device)
    cfg = GridConfig(datasets=(dataset,), methods=available_methods(), budgets=(budget,), runs=5, device=device,
                     data_dir=folder, out=None, log_models=False, settings=Settings())  # fmt: skip
    load_dataset(dataset, folder, device)
    walls = []
    for _ in range(plain_runs):
        sync(device)
        t = time.perf_counter()
        results = list(protocol.iterate_grid(cfg, progress=False))
        sync(device)
        walls.append(time.perf_counter() - t)
    if walls:
        print(f"{dataset} grid on {device}: {' then '.join(f'{w:.2f} s' for w in walls)}; "
              f"acc {sum(r.test_accuracy for r in results) / len(results):.4f}", flush=True)  # fmt: skip
    nested = "  "  # phases inside another: not added to the accounted time
    protocol.fit_many = timed(lambda a, k: "fit_many seed" if a[3] == protocol.SEED_INIT else "fit_many final",
                              protocol.fit_many, device)  # fmt: skip
    protocol.fresh_model = timed(lambda a, k: nested + "fresh_model", protocol.fresh_model, device)
    protocol.train_stacked = timed(lambda a, k: nested + "train_stacked", protocol.train_stacked, device)
    stack.StackedNet.export = timed(lambda a, k: nested + "export", stack.StackedNet.export, device)
    protocol.outputs_of = timed(lambda a, k: f"outputs_of {len(a[0])} models x {a[1].shape[0]} rows",
                                protocol.outputs_of, device)  # fmt: skip
    profiler = cProfile.Profile()
    plain_select = protocol.select

    def profiled_select(*args, **kwargs):
        profiler.enable()
        try:
            return plain_select(*args, **kwargs)
        finally:
            profiler.disable()

    protocol.select = timed(lambda a, k: f"select {a[1]}", profiled_select, device)
    sync(device)
    t = time.perf_counter()
    list(protocol.iterate_grid(cfg, progress=False))
    sync(device)
    wall = time.perf_counter() - t
    print(f"timed grid: {wall:.2f} s", flush=True)
    top = sorted(name for name in PHASES if not name.startswith(nested))
    for name in top + sorted(name for name in PHASES if name.startswith(nested)):
        print(f"  {name:<34}{PHASES[name]:8.3f} s  x{COUNTS[name]}", flush=True)
    print(f"  {'(outside these)':<34}{wall - sum(PHASES[name] for name in top):8.3f} s", flush=True)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()

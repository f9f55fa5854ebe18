"""Where a grid's time goes: 7 methods x 5 seeds at k=2000 with synchronised timers around the
engine's phases (training stacks, building and exporting models, outputs and evaluation, each
selection method), then a cProfile of the selections. On CUDA the timers' synchronisations cost
a little; the plain grid's wall time is printed first.

    python benchmarks/bench_phases.py [cuda|cpu] [cifar10|mnist|fashion_mnist] [--one | --first]

cifar10 runs on CIFAR-10-shaped random pixels (``bench_engine.synthetic_cifar``); the others read
``$ALTRACK_DATA_DIR``. ``--one``: one plain grid before the timed one (default two); ``--first``:
time the process's first grid, graph captures included.
"""

from __future__ import annotations

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


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    dataset = sys.argv[2] if len(sys.argv) > 2 else "cifar10"
    data_dir = tempfile.mkdtemp()
    if dataset == "cifar10":
        synthetic_cifar(Path(data_dir))
    else:
        import os
        data_dir = os.environ.get("ALTRACK_DATA_DIR", str(ROOT.parent / "shared/data"))
    set_determinism(device)
    cfg = GridConfig(datasets=(dataset,), methods=available_methods(), budgets=(2000,), runs=5, device=device,
                     data_dir=data_dir, out=None, log_models=False, settings=Settings())
    load_dataset(dataset, data_dir, device)
    walls = []
    for _ in range(0 if "--first" in sys.argv else 1 if "--one" in sys.argv else 2):
        sync(device)
        t = time.perf_counter()
        results = list(protocol.iterate_grid(cfg, progress=False))
        sync(device)
        walls.append(time.perf_counter() - t)
    if walls:
        print(f"{dataset} grid on {device}: {' then '.join(f'{w:.2f} s' for w in walls)}; "
              f"acc {sum(r.test_accuracy for r in results) / len(results):.4f}", flush=True)
    if "--plain-only" in sys.argv:
        return
    protocol.fit_many = timed(lambda a, k: "fit_many seed" if a[3] == protocol.SEED_INIT else "fit_many final",
                              protocol.fit_many, device)
    protocol.fresh_model = timed(lambda a, k: "  fresh_model", protocol.fresh_model, device)
    protocol.train_stacked = timed(lambda a, k: "  train_stacked", protocol.train_stacked, device)
    stack.StackedNet.export = timed(lambda a, k: "    export", stack.StackedNet.export, device)
    stack.StackedNet.__init__ = timed(lambda a, k: "    StackedNet()", stack.StackedNet.__init__, device)
    protocol.outputs_of = timed(lambda a, k: f"outputs_of {len(a[0])}x{a[1].shape[0]} {k.get('features', True)}",
                                protocol.outputs_of, device)
    import cProfile
    import pstats
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
    results = list(protocol.iterate_grid(cfg, progress=False))
    sync(device)
    wall = time.perf_counter() - t
    print(f"instrumented grid: {wall:.2f} s", flush=True)
    accounted = 0.0
    for name in sorted(PHASES):
        if not name.startswith(" "):
            accounted += PHASES[name]
        print(f"  {name:<28}{PHASES[name]:8.3f} s  x{COUNTS[name]}", flush=True)
    print(f"  {'(unaccounted)':<28}{wall - accounted:8.3f} s", flush=True)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()

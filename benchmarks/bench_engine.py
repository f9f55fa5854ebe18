"""The engine alone (``iterate_grid``, no MLflow): this tree against a reference tree, side by side.

Each side runs in its own process, so the reference can be another checkout of altrack (for
example a6cf675, the one-model-at-a-time engine: ``git archive a6cf675 altrack | tar -x -C REF``).
Both run the same grid: one dataset x 7 methods x one budget x N seeds, after a warm-up that
loads the data. This tree runs it twice in one process and reports both: the first call pays
for CUDA graph captures that later calls of the same shapes reuse. ``--synthetic-cifar`` writes
CIFAR-10-shaped random pixels first (for machines without the real files); its accuracies mean
nothing, its timings do.

    python benchmarks/bench_engine.py --device cuda --dataset mnist --seeds 5 --reference REF
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SIDE = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
import altrack
from altrack.config import GridConfig, Settings  # both trees have these names here
from altrack.protocol import iterate_grid
assert altrack.__file__.startswith({root!r}), altrack.__file__
from altrack.data import load_dataset
from altrack.selection import available_methods
torch.set_num_threads({threads})
cfg = GridConfig(datasets=({dataset!r},), methods=available_methods(), budgets=({budget},), runs={seeds},
                 device={device!r}, data_dir={data!r}, out=None, log_models=False, settings=Settings())
load_dataset({dataset!r}, {data!r}, {device!r})
for repeat in range({repeats}):
    if {device!r} == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = list(iterate_grid(cfg, progress=False))
    if {device!r} == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    print(json.dumps({{
        "wall": wall,
        "acc": {{f"{{r.key.method}}/{{r.key.seed}}": r.test_accuracy for r in results}},
        "indices": {{f"{{r.key.method}}/{{r.key.seed}}": int(r.selected_indices.sum()) for r in results
                     if r.stage is not None}},
        "selection": sum(r.timings.get("selection_seconds", 0.0) for r in results),
        "by_method": {{m: sum(r.timings.get("selection_seconds", 0.0) for r in results if r.key.method == m)
                       for m in available_methods()}},
        "seed_train": sum(r.timings.get("seed_train_seconds", 0.0) for r in results) / 7,
        "final_train": sum(r.timings.get("final_train_seconds", 0.0) for r in results),
    }}), flush=True)
"""


def synthetic_cifar(folder: Path) -> None:
    rng = np.random.default_rng(0)
    (folder / "cifar10").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 50000), ("test", 10000)):
        x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(folder / "cifar10" / f"cifar10_{split}.npz", x=x, y=rng.integers(0, 10, size=n))


def side(root: Path, args: argparse.Namespace, device: str, repeats: int = 1) -> list[dict]:
    code = SIDE.format(root=str(root), threads=args.threads, dataset=args.dataset, budget=args.budget,
                       seeds=args.seeds, device=device, data=args.data_dir, repeats=repeats)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    if proc.returncode != 0:
        sys.exit(f"{root} on {device} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-too", action="store_true", help="also run this tree on the host CPU")
    parser.add_argument("--reference", default=None, help="folder holding the reference altrack package")
    parser.add_argument("--data-dir", default=os.environ.get("ALTRACK_DATA_DIR", str(ROOT.parent / "shared/data")))
    parser.add_argument("--synthetic-cifar", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())
    if not args.synthetic_cifar:
        compare(args)
        return
    with tempfile.TemporaryDirectory(prefix="altrack-synthetic-") as folder:  # 180 MB of pixels
        args.data_dir = folder
        synthetic_cifar(Path(folder))
        compare(args)


def compare(args: argparse.Namespace) -> None:
    n_runs = 7 * args.seeds
    print(f"{args.dataset} x 7 methods x k={args.budget} x {args.seeds} seeds = {n_runs} runs; "
          f"{args.threads} CPU threads")  # fmt: skip
    ours = side(ROOT, args, args.device, repeats=2)
    same = ours[0]["acc"] == ours[1]["acc"] and ours[0]["indices"] == ours[1]["indices"]
    rows = [("this tree", args.device, ours[1]), ("1st call", args.device, ours[0])]
    if args.cpu_too:
        rows.append(("this tree", "cpu", side(ROOT, args, "cpu")[0]))
    if args.reference:
        rows.append(("reference", args.device, side(Path(args.reference).resolve(), args, args.device)[0]))
    base = rows[0][2]["wall"]
    print(f"{'engine':<11}{'device':<8}{'wall s':>9}{'s/run':>8}{'select s':>10}{'final s':>9}{'mean acc':>10}"
          f"{'x this':>9}")  # fmt: skip
    for name, device, r in rows:
        acc = float(np.mean(list(r["acc"].values())))
        print(f"{name:<11}{device:<8}{r['wall']:>9.2f}{r['wall'] / n_runs:>8.3f}{r['selection']:>10.2f}"
              f"{r['final_train']:>9.2f}{acc:>10.4f}{r['wall'] / base:>9.2f}")  # fmt: skip
    print(f"this tree twice on {args.device}: identical indices and accuracies: {same}")
    for name, device, r in rows:
        if "by_method" in r:
            print(f"selection seconds by method, {name} on {device}: "
                  + ", ".join(f"{m} {v:.2f}" for m, v in r["by_method"].items()))
    if args.reference:
        ref = rows[-1][2]
        by_method: dict[str, list[float]] = {}
        for run, acc in ours[1]["acc"].items():
            by_method.setdefault(run.split("/")[0], []).append(acc - ref["acc"][run])
        diffs = ", ".join(f"{m} {np.mean(d):+.4f}" for m, d in by_method.items())
        print(f"mean accuracy, this tree - reference, per method: {diffs}")


if __name__ == "__main__":
    main()

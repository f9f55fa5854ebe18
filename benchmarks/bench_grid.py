"""A whole grid through the CLI: MNIST and Fashion-MNIST x 7 methods x budgets 1000..5000 x 5
seeds (350 runs), into a throwaway MLflow store, with the wall time and the peak resident memory
of the whole process tree (parent plus workers), sampled every 0.5 s.

    python benchmarks/bench_grid.py [--seeds 5] [--budgets 1000,2000,3000,4000,5000] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import data_dir


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(pid, 0) for pid in tree) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="mnist,fashion_mnist")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", default="1000,2000,3000,4000,5000")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="altrack-bench-grid-"))
    env = {**os.environ, "ALTRACK_DATA_DIR": data_dir(), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    command = [sys.executable, "-m", "altrack", "run", "--datasets", args.datasets, "--methods", "all",
               "--budget", args.budgets, "--runs", str(args.seeds), "--no-log-models", "--quiet",
               "--workers", str(args.workers), "--out", str(work / "out")]  # fmt: skip
    n_runs = len(args.datasets.split(",")) * 7 * len(args.budgets.split(",")) * args.seeds
    print(f"grid: {args.datasets} x 7 methods x k={args.budgets} x {args.seeds} seeds = {n_runs} runs, "
          f"--workers {args.workers}, models not logged")  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"grid failed: {proc.stderr.read().decode()[-2000:]}")
    print(f"wall time {wall / 60:.1f} min ({wall / n_runs:.2f} s per run; target < 30 min for 350 runs)")
    print(f"peak resident memory of the process tree {peak:.0f} MB (target < 2048 MB)")
    print((work / "out" / "active_learning_results.txt").read_text().split("paired comparisons")[0])


if __name__ == "__main__":
    main()

"""A whole grid through the CLI, MLflow logging included, into a throwaway store: the wall time
and the peak resident memory of the whole process tree (parent plus workers), sampled every
0.5 s; with ``--reference REF`` the same command on another checkout's ``altrack`` (for example
a6cf675's: ``git archive a6cf675 altrack | tar -x -C REF``), side by side.

    python benchmarks/bench_grid.py [--seeds 5] [--budgets 1000,2000,3000,4000,5000] [--workers 2]
    python benchmarks/bench_grid.py --main-job --reference REF   # the README's main job
    python benchmarks/bench_grid.py --main-job --also "--workers 2"   # and beside it with extra options
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


ENTRY = "import sys; sys.path.insert(0, sys.argv.pop(1)); from altrack.cli import main; sys.exit(main())"


def run(root: Path, arguments: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak MB, report table) of ``altrack run ARGUMENTS`` from ``root``'s altrack."""
    work = Path(tempfile.mkdtemp(prefix="altrack-bench-grid-"))
    env = {**os.environ, "ALTRACK_DATA_DIR": data_dir(), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    command = [sys.executable, "-c", ENTRY, str(root), "run", *arguments, "--quiet", "--out", str(work / "out")]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"grid failed ({root}): {proc.stderr.read().decode()[-2000:]}")
    return wall, peak, (work / "out" / "active_learning_results.txt").read_text().split("paired comparisons")[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", default="mnist,fashion_mnist")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budgets", default="1000,2000,3000,4000,5000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--main-job", action="store_true",
                        help="the README's: mnist,fashion_mnist x 7 methods x k=2000 x 3 seeds, models logged")
    parser.add_argument("--reference", action="append", default=[],
                        help="folder holding another checkout's altrack package (repeatable)")
    parser.add_argument("--also", default=None, help="options for a second run of this tree beside the first")
    args = parser.parse_args()
    if args.main_job:
        arguments = ["--datasets", "mnist,fashion_mnist", "--runs", "3"]
        n_runs, what = 42, "the README's main job (42 runs, models logged, --workers 1)"
    else:
        arguments = ["--datasets", args.datasets, "--methods", "all", "--budget", args.budgets,
                     "--runs", str(args.seeds), "--no-log-models", "--workers", str(args.workers)]  # fmt: skip
        n_runs = len(args.datasets.split(",")) * 7 * len(args.budgets.split(",")) * args.seeds
        what = (f"{args.datasets} x 7 methods x k={args.budgets} x {args.seeds} seeds = {n_runs} runs, "
                f"--workers {args.workers}, models not logged")  # fmt: skip
    print(what)
    sides = [("this tree", Path(__file__).resolve().parents[1])]
    sides += [(Path(ref).name if len(args.reference) > 1 else "reference", Path(ref).resolve())
              for ref in args.reference]  # fmt: skip
    runs = [(name, root, arguments) for name, root in sides]
    if args.also:
        runs.insert(1, (args.also, sides[0][1], [*arguments, *args.also.split()]))
    results = [(name, *run(root, options)) for name, root, options in runs]
    base = results[0][1]
    width = max(11, *(len(name) + 2 for name, *_ in results))
    print(f"{'engine':<{width}}{'wall':>9}{'s/run':>8}{'peak MB':>9}{'x this':>8}  same table")
    for name, wall, peak, table in results:
        same = "yes" if accuracy_rows(table) == accuracy_rows(results[0][3]) else "NO"
        print(f"{name:<{width}}{wall / 60:>8.2f}m{wall / n_runs:>8.2f}{peak:>9.0f}{wall / base:>8.2f}  {same}")
    print(results[0][3])


def accuracy_rows(table: str) -> list[list[str]]:
    """The report's (method, mean, std) rows, in order: what two engines must agree on."""
    return [line.split()[:3] for line in table.splitlines() if line.startswith("  ") and "method" not in line]


if __name__ == "__main__":
    main()

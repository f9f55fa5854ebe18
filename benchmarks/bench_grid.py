"""A whole grid through the CLI, MLflow logging included, into a throwaway store: the wall time
and the peak resident memory of the whole process tree (parent plus workers), sampled every
0.5 s; with ``--reference REF`` the same command on another checkout's ``altrack`` (for example
a6cf675's: ``git archive a6cf675 altrack | tar -x -C REF``), side by side.

    python benchmarks/bench_grid.py [--seeds 5] [--budgets 1000,2000,3000,4000,5000] [--workers 2]
    python benchmarks/bench_grid.py --main-job --reference REF   # the README's main job
    python benchmarks/bench_grid.py --main-job --also "--workers 2"   # and beside it with extra options
    python benchmarks/bench_grid.py --main-job --reference REF --repeats 3   # interleaved rounds
    python benchmarks/bench_grid.py --main-job --busy 1 --also "" --also-env GOMP_SPINCOUNT=300000
        # beside one busy process, as shipped and with libgomp's default spin (altrack/__init__.py)

On a shared 2-core machine one call's ratio moves by a tenth or more from call to call (the same
code gave 2.0x to 2.6x against a6cf675 in one afternoon), so ``--repeats N`` runs the sides in N
interleaved rounds (this tree, the others, this tree again, ...) and prints each round's ratio,
then the median and the range: a neighbour's load then hits both sides of a round alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import data_dir, timed_cli


def run(root: Path, arguments: list[str], extra_env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak MB, report table) of ``altrack run ARGUMENTS`` from ``root``'s altrack."""
    with tempfile.TemporaryDirectory(prefix="altrack-bench-grid-") as tmp:  # store, journal, report: all go
        work = Path(tmp)
        env = {"ALTRACK_DATA_DIR": data_dir(), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", **extra_env}
        wall, peak, _, _ = timed_cli(root, ["run", *arguments, "--quiet", "--out", str(work / "out")], work, env)
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
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of all sides (median, range)")
    parser.add_argument("--also-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the --also run (repeatable)")
    parser.add_argument("--busy", type=int, default=0,
                        help="processes keeping a core busy (pure Python) beside every side, as on a shared machine")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
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
    runs = [(name, root, arguments, {}) for name, root in sides]
    if args.also is not None:
        also_env = dict(item.split("=", 1) for item in args.also_env)
        label = " ".join([*args.also_env, args.also]).strip()
        runs.insert(1, (label, sides[0][1], [*arguments, *args.also.split()], also_env))
    if args.busy:
        print(f"beside {args.busy} busy process(es)")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rounds = []
    try:
        for round_ in range(args.repeats):
            rounds.append([(name, *run(root, options, env)) for name, root, options, env in runs])
            if args.repeats > 1:
                walls = "  ".join(f"{name} {wall / 60:.2f}m" for name, wall, *_ in rounds[-1])
                print(f"round {round_ + 1}: {walls}", flush=True)
    finally:
        for proc in busy:
            proc.kill()
    results = [(name, statistics.median(r[i][1] for r in rounds), max(r[i][2] for r in rounds), rounds[0][i][3])
               for i, (name, *_) in enumerate(runs)]  # fmt: skip
    base = results[0][1]
    width = max(11, *(len(name) + 2 for name, *_ in results))
    wall_head = "wall" if args.repeats == 1 else "median"
    spread = "" if args.repeats == 1 else "  x this per round (min-max)"
    print(f"{'engine':<{width}}{wall_head:>9}{'s/run':>8}{'peak MB':>9}{'x this':>8}  same table{spread}")
    for i, (name, wall, peak, _) in enumerate(results):
        same = "yes" if all(accuracy_rows(r[i][3]) == accuracy_rows(r[0][3]) for r in rounds) else "NO"
        ratios = [r[i][1] / r[0][1] for r in rounds]
        per_round = "" if args.repeats == 1 else (
            f"  {' '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}, "
            f"{min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
        row = f"{name:<{width}}{wall / 60:>8.2f}m{wall / n_runs:>8.2f}{peak:>9.0f}{wall / base:>8.2f}  {same:<10}"
        print(f"{row}{per_round}".rstrip())
    print(results[0][3])


def accuracy_rows(table: str) -> list[list[str]]:
    """The report's (method, mean, std) rows, in order: what two engines must agree on."""
    return [line.split()[:3] for line in table.splitlines() if line.startswith("  ") and "method" not in line]


if __name__ == "__main__":
    main()

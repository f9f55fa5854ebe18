"""An Optuna sweep through the CLI, MLflow logging included, into a throwaway store, journal and
seed-stage cache: the wall time and the peak resident memory of the process tree; with
``--reference REF`` the same command on another checkout's ``altrack`` (``git archive REV
altrack | tar -x -C REF``), in interleaved rounds, and whether both gave every trial the same
value (the trials' params come from the same sampler seed, so they must).

    python benchmarks/bench_sweep.py --reference REF [--spec sweeps/coreset_mnist.yaml] [--trials 4] [--repeats 2]

A trial of ``coreset_mnist.yaml`` is 3 seeds at k = 2000: its seed models, then its final models,
train as one stack each (``SeedStageCache.get_many``, ``run_methods``), where a6cf675..fd69e07
trained them one seed at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import data_dir, tree_rss_mb

ENTRY = "import sys; sys.path.insert(0, sys.argv.pop(1)); from altrack.cli import main; sys.exit(main())"
TRIAL = re.compile(r"^trial (\d+): .* -> \w+ ([0-9.]+)", re.MULTILINE)


def run(root: Path, spec: str, trials: int, seed: int) -> tuple[float, float, dict[int, str]]:
    """(wall seconds, peak MB, {trial number: value as printed}) of one sweep from ``root``."""
    work = Path(tempfile.mkdtemp(prefix="altrack-bench-sweep-"))
    env = {**os.environ, "ALTRACK_DATA_DIR": data_dir(), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "ALTRACK_CACHE_DIR": str(work / "cache")}  # fmt: skip
    text = Path(spec).read_text()
    text = re.sub(r"(?m)^sampler_seed:.*\n?", "", text) + f"\nsampler_seed: {seed}\n"  # both sides: the same trials
    (work / "spec.yaml").write_text(text)
    command = [sys.executable, "-c", ENTRY, str(root), "sweep", str(work / "spec.yaml"), "--n-trials", str(trials),
               "--storage", str(work / "study.journal")]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({root}): {err[-2000:]}")
    return wall, peak, {int(n): value for n, value in TRIAL.findall(out + err)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default="sweeps/coreset_mnist.yaml")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--reference", action="append", default=[],
                        help="folder holding another checkout's altrack package (repeatable)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of all sides (median, range)")
    args = parser.parse_args()
    if args.repeats < 1 or args.trials < 1:
        parser.error("--repeats and --trials must be at least 1")
    print(f"{args.spec}, {args.trials} trials, sampler seed {args.sampler_seed}, --workers 1")
    sides = [("this tree", Path(__file__).resolve().parents[1])]
    sides += [(Path(ref).name if len(args.reference) > 1 else "reference", Path(ref).resolve())
              for ref in args.reference]  # fmt: skip
    rounds = []
    for round_ in range(args.repeats):
        rounds.append([(name, *run(root, args.spec, args.trials, args.sampler_seed)) for name, root in sides])
        print(f"round {round_ + 1}: " + "  ".join(f"{name} {wall:.1f}s" for name, wall, *_ in rounds[-1]), flush=True)
    base = statistics.median(r[0][1] for r in rounds)
    print(f"{'engine':<12}{'median':>9}{'s/trial':>9}{'peak MB':>9}{'x this':>8}  same values  x this per round")
    for i, (name, _) in enumerate(sides):
        wall = statistics.median(r[i][1] for r in rounds)
        same = "yes" if all(r[i][3] == rounds[0][0][3] for r in rounds) else "NO"
        ratios = " ".join(f"{r[i][1] / r[0][1]:.2f}" for r in rounds)
        print(f"{name:<12}{wall:>8.1f}s{wall / args.trials:>9.2f}{max(r[i][2] for r in rounds):>9.0f}"
              f"{wall / base:>8.2f}  {same:<11}  {ratios}")  # fmt: skip
    print("trial values:", ", ".join(f"{n}: {v}" for n, v in sorted(rounds[0][0][3].items())))


if __name__ == "__main__":
    main()

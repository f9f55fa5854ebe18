"""An Optuna sweep through the CLI, MLflow logging included, into a throwaway store, journal and
seed-stage cache: the wall time and the peak resident memory of the process tree; with
``--reference REF`` the same command on another checkout's ``altrack`` (``git archive REV
altrack | tar -x -C REF``), in interleaved rounds, and whether both gave every trial the same
value, read from its journal (the trials' params come from the same sampler seed, so they must;
against a reference before fb79337, which seeded the sampler per process rather than per trial,
the proposals differ and the values with them).

    python benchmarks/bench_sweep.py --reference REF [--spec sweeps/coreset_mnist.yaml] [--trials 4] [--repeats 2]

A trial of ``coreset_mnist.yaml`` is 3 seeds at k = 2000: its seed models, then its final models,
train as one stack each (``SeedStageCache.get_many``, ``run_methods``), where fd69e07 and
earlier trained them one seed at a time.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import optuna
from _common import data_dir, timed_cli


def run(root: Path, spec: str, trials: int, seed: int) -> tuple[float, float, dict[int, float]]:
    """(wall seconds, peak MB, {trial number: value}) of one sweep from ``root``; the values
    are read from the study's journal, at full precision, and the work folder is deleted."""
    with tempfile.TemporaryDirectory(prefix="altrack-bench-sweep-") as tmp:
        work = Path(tmp)
        env = {"ALTRACK_DATA_DIR": data_dir(), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
               "ALTRACK_CACHE_DIR": str(work / "cache")}  # fmt: skip
        text = re.sub(r"(?m)^sampler_seed:.*\n?", "", Path(spec).read_text())
        (work / "spec.yaml").write_text(f"{text}\nsampler_seed: {seed}\n")  # both sides: the same trials
        journal = work / "study.journal"
        arguments = ["sweep", str(work / "spec.yaml"), "--n-trials", str(trials), "--storage", str(journal)]
        wall, peak, _, _ = timed_cli(root, arguments, work, env)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        [name] = optuna.get_all_study_names(storage)
        values = {t.number: t.value for t in optuna.load_study(study_name=name, storage=storage).trials
                  if t.state == optuna.trial.TrialState.COMPLETE}  # fmt: skip
    if len(values) < trials:
        sys.exit(f"the sweep from {root} completed {len(values)} of {trials} trials")
    return wall, peak, values


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
    print("trial values:", ", ".join(f"{n}: {v:.6f}" for n, v in sorted(rounds[0][0][3].items())))


if __name__ == "__main__":
    main()

"""The results page beside the paper's table: ``altrack report --paper`` writes docs/reproduction.md.

Every number on the page comes from MLflow runs, and the page lists the parent runs it read.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from altrack import report
from altrack.catalog import dataset_rank
from altrack.errors import AltrackError
from altrack.results import ResultRow
from altrack.settings import is_paper_setting, label_knobs
from altrack.tracking.query import experiment_ids, get_run, row_of, rows_from_mlflow, search, setting_of
from altrack.tracking.tags import (
    BASELINE_PARAM,
    COMMAND_TAG,
    DISTANCE_SHARE_METRIC,
    KIND_GRID,
    KIND_PROTOCOL,
    KIND_SWEEP,
    KIND_SWEEP_PROTOCOL,
    KIND_TAG,
    KIND_TRIAL,
    LAM_USED_PARAM,
    MLFLOW_PARENT_RUN_ID,
    N_COMPLETE_METRIC,
    RUNS_FINISHED_TAG,
    SEEDS_PARAM,
    SEEDS_PER_TRIAL_PARAM,
    STUDY_TAG,
    TRIAL_COMPLETE,
    TRIAL_STATE_TAG,
    VAL_ACCURACY_METRIC,
)

# arXiv 2402.17327 v1, §5.2.2: test accuracy at k = 2000, averaged over 100 runs.
PAPER_K2000 = {
    "random": {"mnist": 0.9130, "fashion_mnist": 0.8091, "cifar10": 0.4587},
    "kcenter": {"mnist": 0.9134, "fashion_mnist": 0.7692, "cifar10": 0.4491},
    "coreset": {"mnist": 0.9203, "fashion_mnist": 0.8140, "cifar10": 0.4590},
    "coreset-grad": {"mnist": 0.9207, "fashion_mnist": 0.8107, "cifar10": 0.4598},
}
PAPER_NAMES = {
    "random": "uniform (`random`)",
    "kcenter": "k-center [SS18] (`kcenter`)",
    "coreset": "Algorithm 1, loss-based (`coreset`)",
    "coreset-grad": "Algorithm 1, gradient-based (`coreset-grad`)",
}
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
TABLE_K = 2000


def _cell(values: np.ndarray | None) -> str:
    if values is None or len(values) == 0:
        return "—"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.4f} ± {std:.4f} ({len(values)})"


def k2000_table(stats: dict, datasets: Sequence[str]) -> list[str]:
    header = (
        "| method | " + " | ".join(f"{DATASET_NAMES[d]} paper | {DATASET_NAMES[d]} altrack" for d in datasets) + " |"
    )
    lines = [header, "|" + " --- |" * (1 + 2 * len(datasets))]
    for method in report.method_order(m for _, k, m in stats if k == TABLE_K):
        name = PAPER_NAMES.get(method, f"`{method}`")
        cells = []
        for dataset in datasets:
            paper = PAPER_K2000.get(method, {}).get(dataset)
            cells += [f"{paper:.4f}" if paper is not None else "—", _cell(stats.get((dataset, TABLE_K, method)))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def budget_table(stats: dict, datasets: Sequence[str]) -> list[str]:
    """Every (dataset, k) the runs cover, one row each, a column per method: the numbers behind
    the learning curves, for the budgets beside the paper's table."""
    methods = report.method_order({m for _, _, m in stats})
    lines = ["| dataset | k | " + " | ".join(f"`{m}`" for m in methods) + " |", "|" + " --- |" * (2 + len(methods))]
    for dataset in datasets:
        for budget in sorted({k for d, k, _ in stats if d == dataset}):
            cells = [_cell(stats.get((dataset, budget, m))) for m in methods]
            lines.append(f"| {DATASET_NAMES[dataset]} | {budget} | " + " | ".join(cells) + " |")
    return lines


def paper_ranking(methods: Iterable[str], dataset: str) -> list[str]:
    """``methods`` (of the paper's table) best first by the paper's k = 2000 figure on ``dataset``."""
    return sorted(methods, key=lambda m: -PAPER_K2000[m][dataset])


def ordering_checks(stats: dict, datasets: Sequence[str], rows: Sequence[ResultRow] = ()) -> list[str]:
    """Per dataset: the paper's ordering of its four methods against altrack's, each gap to the
    paper's figure in units of altrack's std and, given ``rows``, every pair of the paper's ordering
    tested on altrack's runs (``pair_verdicts``)."""
    pairs = pair_verdicts(rows, datasets)
    lines = []
    for dataset in datasets:
        ours = {m: stats[(dataset, TABLE_K, m)] for m in PAPER_K2000 if (dataset, TABLE_K, m) in stats}
        if len(ours) < 2:
            continue
        paper_order = paper_ranking(ours, dataset)
        our_order = sorted(ours, key=lambda m: -ours[m].mean())
        same = "the same" if paper_order == our_order else "different"
        lines.append(f"- **{DATASET_NAMES[dataset]}**: paper {' > '.join(paper_order)}; "
                     f"altrack {' > '.join(our_order)} ({same}).")  # fmt: skip
        gaps = []
        for method, values in ours.items():
            std = values.std(ddof=1) if len(values) > 1 else float("nan")
            gap = values.mean() - PAPER_K2000[method][dataset]
            gaps.append(f"{method} {gap:+.4f} ({gap / std:+.1f} std)" if std > 0 else f"{method} {gap:+.4f}")
        lines.append(f"  Gap to the paper's figure: {'; '.join(gaps)}.")
        verdicts = [t for t in pairs if t["dataset"] == dataset]
        if verdicts:
            lines.append("  The paper's pairs on altrack's runs: " + "; ".join(_verdict(t) for t in verdicts) + ".")
    if pairs:
        lines += ["", f"Each pair is the paper's higher method minus its lower one at k = {TABLE_K}, paired by seed "
                  "(two-sided paired t-test); *holds* and *reversed* are significant after Holm's correction over "
                  f"all the pairs above ({len(pairs)} tests, α = 0.05, a family of its own: the tables below "
                  "correct over theirs), *open* is not shown either way (not: shown equal)."]  # fmt: skip
    return lines


def pair_verdicts(rows: Sequence[ResultRow], datasets: Sequence[str]) -> list[dict]:
    """Every pair (a, b) the paper ranks a > b at k = 2000, as ``report.paired_difference`` of
    a - b over altrack's seeds, Holm-corrected as one family across datasets."""
    by_seed = report.accuracy_by_seed([r for r in rows if r.budget == TABLE_K], "dataset", "method")
    tests = []
    for dataset in datasets:
        ranked = paper_ranking([m for m in PAPER_K2000 if (dataset, m) in by_seed], dataset)
        for i, high in enumerate(ranked):
            for low in ranked[i + 1 :]:
                test = report.paired_difference(by_seed[(dataset, high)], by_seed[(dataset, low)])
                if test is not None:
                    tests.append({"dataset": dataset, "high": high, "low": low, **test})
    return report.mark_holm(tests)


def _verdict(test: dict) -> str:
    word = "open" if not test["significant"] else "holds" if test["mean_diff"] > 0 else "**reversed**"
    return f"{test['high']} > {test['low']} {word} ({test['mean_diff']:+.4f}, Holm p {test['holm_p']:.2g})"


Labels = dict[str, Callable[[dict], object]]
METHOD_VS: Labels = {"dataset": lambda t: t["dataset"], "k": lambda t: t["budget"],
                     "method": lambda t: t["method"], "vs": lambda t: t["vs"]}  # fmt: skip
COMPARISON: Labels = {"dataset": lambda t: DATASET_NAMES.get(t["dataset"], t["dataset"]),
                      "k": lambda t: t["budget"], "comparison": lambda t: t["comparison"]}  # fmt: skip


def _tests_table(tests: Sequence[dict], labels: Labels = METHOD_VS) -> list[str]:
    """Paired tests as a markdown table: the ``labels`` columns, then n, the difference and its p-values."""
    numbers = ["n", "mean diff", "95% CI", "paired t-test p", "Wilcoxon p", "Holm p"]
    lines = ["| " + " | ".join([*labels, *numbers]) + " |",
             "|" + " --- |" * len(labels) + " ---: | ---: | --- | ---: | ---: | ---: |"]  # fmt: skip
    for t in tests:
        mark = " **\\***" if t["significant"] else ""
        ci = f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"
        cells = [str(label(t)) for label in labels.values()]
        lines.append(
            f"| {' | '.join(cells)} | {t['n']} | {t['mean_diff']:+.4f}{mark} "
            f"| {ci} | {t['t_p']:.3g} | {t['wilcoxon_p']:.3g} | {t['holm_p']:.3g} |"
        )
    return lines


def _parent_lines(parent_ids: Sequence[str]) -> tuple[list[str], float]:
    client = MlflowClient()
    lines = ["| parent run | command | runs | wall time |", "| --- | --- | ---: | ---: |"]
    total = 0.0
    for parent_id in parent_ids:
        run = client.get_run(parent_id)
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        total += seconds
        command = run.data.tags.get(COMMAND_TAG, "")
        if command:
            command = "altrack " + " ".join(command.split()[1:])
        elif STUDY_TAG in run.data.tags:
            command = f"altrack sweep (study {run.data.tags[STUDY_TAG]})"
        if run.data.tags.get(KIND_TAG) == KIND_SWEEP:
            count = f"{int(run.data.metrics.get(N_COMPLETE_METRIC, 0))} trials"
        else:
            count = str(int(float(run.data.tags.get(RUNS_FINISHED_TAG, 0))))
        lines.append(f"| `{parent_id}` | `{command or '—'}` | {count} | {seconds / 60:.1f} min |")
    return lines, total


@dataclass(frozen=True)
class SweepSummary:
    """What one ``altrack sweep`` parent found, by mean validation accuracy (rank 1 = best)."""

    parent_id: str
    study: str
    dataset: str
    budget: str
    seeds_per_trial: str
    seeds: list[int]
    n_trials: int
    best_value: float
    best_setting: str
    paper_value: float
    paper_rank: int | None
    other_value: float
    other_setting: str


def sweep_summary(parent_id: str) -> SweepSummary:
    """One ``altrack sweep`` parent's best setting, the best setting other than the paper's, and
    where the paper's setting (trial 0) ranked.

    Settings are read from the protocol runs under each trial, which log every knob, including
    those the spec fixes rather than searches. Raises ``AltrackError`` for a run that is not a
    sweep parent."""
    parent = get_run(parent_id)
    if parent.data.tags.get(KIND_TAG) != KIND_SWEEP:
        raise AltrackError(f"run {parent_id} is not the parent run of an 'altrack sweep'")
    params, study = parent.data.params, parent.data.tags.get(STUDY_TAG, "")
    experiment = [parent.info.experiment_id]
    # the study is matched here, not in the query: a name is the user's and may hold a quote
    trials = [t for t in search(experiment, f"tags.`{KIND_TAG}` = '{KIND_TRIAL}' and tags.`{TRIAL_STATE_TAG}` = "
                                            f"'{TRIAL_COMPLETE}'") if t.data.tags.get(STUDY_TAG) == study]  # fmt: skip
    setting_by_trial = {}
    for run in search(experiment, f"tags.`{KIND_TAG}` = '{KIND_SWEEP_PROTOCOL}'"):
        setting_by_trial[run.data.tags.get(MLFLOW_PARENT_RUN_ID)] = setting_of(run)
    ranked = sorted(
        ((t.data.metrics[VAL_ACCURACY_METRIC], t.data.params.get(BASELINE_PARAM) == "True",
          setting_by_trial[t.info.run_id]) for t in trials if t.info.run_id in setting_by_trial),
        key=lambda trial: -trial[0],
    )  # fmt: skip
    paper = next((i for i, trial in enumerate(ranked) if trial[1]), None)
    other = next((trial for trial in ranked if not trial[1]), None)
    return SweepSummary(
        parent_id=parent_id,
        study=study,
        dataset=params.get("dataset", ""),
        budget=params.get("budget", ""),
        seeds_per_trial=params.get(SEEDS_PER_TRIAL_PARAM, ""),
        seeds=sorted({int(seed) for t in trials for seed in t.data.params.get(SEEDS_PARAM, "").split(",") if seed}),
        n_trials=len(ranked),
        best_value=ranked[0][0] if ranked else float("nan"),
        best_setting=ranked[0][2] if ranked else "",
        paper_value=ranked[paper][0] if paper is not None else float("nan"),
        paper_rank=None if paper is None else 1 + sum(v > ranked[paper][0] for v, _, _ in ranked),
        other_value=other[0] if other else float("nan"),
        other_setting=other[2] if other else "",
    )


def settings_section(
    rows: Sequence[ResultRow], sweeps: Sequence[SweepSummary], used_seeds: Iterable[int] = ()
) -> list[str]:
    """The sweeps' best settings against the paper's on fresh seeds, paired by seed.

    ``used_seeds``: the seeds of the page's other runs; the studies' own come with ``sweeps``."""
    used_seeds = {*used_seeds, *(seed for sw in sweeps for seed in sw.seeds)}
    lines = ["## The sweep's best setting against the paper's (k'/k = k''/k = 0.2, λ auto)", ""]
    if sweeps:
        lines += ["What each Optuna study found, by mean validation accuracy over its seeds. The validation "
                  "split (10% of train) is held out of every seed set and pool, so no model trains on it, and "
                  "the test split is never used for tuning. Rank 1 = best.", "",
                  "| dataset | k | study | trials x seeds | best setting (val) | paper's setting: val, rank "
                  "| best setting other than the paper's (val) |",
                  "| --- | ---: | --- | --- | --- | ---: | --- |"]  # fmt: skip
        for sw in sorted(sweeps, key=lambda sw: dataset_rank(sw.dataset)):
            paper = f"{sw.paper_value:.4f}, {sw.paper_rank} of {sw.n_trials}" if sw.paper_rank else "—"
            lines.append(f"| {DATASET_NAMES.get(sw.dataset, sw.dataset)} | {sw.budget} | `{sw.study}` "
                         f"| {sw.n_trials} x {sw.seeds_per_trial} | `{sw.best_setting}` "
                         f"({sw.best_value:.4f}) | {paper} "
                         f"| `{sw.other_setting}` ({sw.other_value:.4f}) |")  # fmt: skip
        lines.append("")
    groups = report.accuracy_by_seed(rows, "dataset", "budget", "method", "setting")

    def order(key: tuple) -> tuple:  # datasets as elsewhere on the page, the paper's setting first
        dataset, budget, method, setting = key
        return dataset_rank(dataset), budget, method, not is_paper_setting(setting), setting

    if groups:
        seeds = sorted({s for values in groups.values() for s in values})
        reused = sorted(set(seeds) & set(used_seeds))
        fresh = f"{len(reused)} of them also used" if reused else "fresh: none of them used"
        lines += [f"Test accuracy on seeds {seeds[0]}..{seeds[-1]} ({fresh} above or by the studies), mean ± std "
                  "(n). Methods other than the coreset ignore cluster_ratio and λ.", "",
                  "| dataset | k | method | setting | test accuracy |",
                  "| --- | ---: | --- | --- | ---: |"]  # fmt: skip
        for key in sorted(groups, key=order):
            dataset, budget, method, setting = key
            lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | {budget} | `{method}` | `{setting}` "
                         f"| {_cell(np.array(list(groups[key].values())))} |")  # fmt: skip
        lines.append("")
    reference = [r for r in rows if is_paper_setting(r.setting)]
    tests = [{**t, "comparison": f"`{t['method']}`: `{t['setting']}` − the paper's"}
             for t in report.setting_tests(rows)]  # fmt: skip
    tests += [{**t, "comparison": f"`{t['method']}` − `random`, both in the paper's setting"}
              for t in report.paired_tests(reference, comparators=("random",))]  # fmt: skip
    if tests:
        report.mark_holm(tests)
        tests.sort(key=lambda t: (dataset_rank(t["dataset"]), t["budget"]))
        lines += ["Paired differences in test accuracy: each seed runs under both arms and the per-seed "
                  "differences are averaged. With one seed both arms start from the same random streams; a "
                  "different seed_ratio labels a different number of seed points, so the seed models differ. "
                  "**\\*** = significant after Holm's correction over the rows of this table.", "",
                  *_tests_table(tests, COMPARISON)]  # fmt: skip
        lines.append("")
    return lines


@dataclass(frozen=True)
class AblationRun:
    """One coreset run of the lam ablation: its row, the lam it used and the distance term's share."""

    row: ResultRow
    lam_used: float
    distance_share: float


def ablation_runs(parent_ids: Sequence[str]) -> list[AblationRun]:
    """The protocol runs under ``parent_ids`` with what the ablation reports of each."""
    runs = []
    for parent_id in parent_ids:
        experiment = [get_run(parent_id).info.experiment_id]
        query = f"tags.`{KIND_TAG}` = '{KIND_PROTOCOL}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'"
        for run in search(experiment, query):
            row = row_of(run)
            if row is not None and row.finished:
                metrics = run.data.metrics  # runs logged before 2026-11-26 say selection_distance_share
                share = metrics.get(DISTANCE_SHARE_METRIC, metrics.get("selection_distance_share", float("nan")))
                runs.append(AblationRun(row, float(run.data.params.get(LAM_USED_PARAM, "nan")), share))
    return runs


def _lam_of(setting: str) -> str:
    return label_knobs(setting)["lam"]


def ablation_section(runs: Sequence[AblationRun]) -> list[str]:
    """The lam ablation: coreset under each lam against lam = 0 and against random, paired by seed,
    with the lam used and the share of the sampling mass the distance term carries.

    It covers the (dataset, k) where some coreset run used a lam other than ``auto``: a grid's
    parent can then serve as the ablation's ``auto`` and ``random`` arms without its other
    budgets repeating the paired comparisons of the page's own tables."""
    ablated = {(r.row.dataset, r.row.budget) for r in runs
               if r.row.method == "coreset" and _lam_of(r.row.setting) != "auto"}  # fmt: skip
    runs = [r for r in runs if (r.row.dataset, r.row.budget) in ablated]
    coreset = [r for r in runs if r.row.method == "coreset"]
    if not coreset:
        return []
    by_seed = report.accuracy_by_seed([r.row for r in runs], "dataset", "budget", "method", "setting")
    random = {(d, k): v for (d, k, m, _), v in by_seed.items() if m == "random"}
    groups: dict[tuple, list[AblationRun]] = {}
    for r in coreset:
        groups.setdefault((r.row.dataset, r.row.budget, _lam_of(r.row.setting)), []).append(r)
    order = ["0", "auto", "auto*10", "lemma8"]
    lam_key = {lam: (order.index(lam) if lam in order else len(order), lam) for _, _, lam in groups}
    tests = []
    for (dataset, budget, lam), members in groups.items():
        ours = {r.row.seed: r.row.test_accuracy for r in members}
        zero = {r.row.seed: r.row.test_accuracy for r in groups.get((dataset, budget, "0"), [])}
        for vs, base in (("λ = 0", zero), ("random", random.get((dataset, budget), {}))):
            test = report.paired_difference(ours, base) if lam != "0" or vs == "random" else None
            if test is not None:
                tests.append({"dataset": dataset, "budget": budget, "lam": lam, "vs": vs, **test})
    report.mark_holm(tests)
    lines = ["## λ ablation: what the distance term does", "",
             "`coreset` under λ = 0, `auto`, 10 × `auto` and `lemma8` (see the README's *Algorithm 1*), same "
             "seeds, seed sets and seed models as `random`. *λ used* is the median over runs of the logged "
             "`lam_used`; *distance share* is the mean share of the sampling mass Σℓ̃ carried by the λ·‖e − c_e‖² "
             "term. Differences are paired by seed; **\\*** = significant after Holm's correction over the "
             "rows of the second table.", "",
             "| dataset | k | λ | test accuracy | λ used | distance share |",
             "| --- | ---: | --- | ---: | ---: | ---: |"]
    for (dataset, budget, lam), members in sorted(groups.items(), key=lambda g: (dataset_rank(g[0][0]), g[0][1],
                                                                                lam_key[g[0][2]])):  # fmt: skip
        accs = np.array([r.row.test_accuracy for r in members])
        lam_used = float(np.median([r.lam_used for r in members]))
        share = float(np.mean([r.distance_share for r in members]))
        lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | {budget} | `{lam}` | {_cell(accs)} | {lam_used:.3g} "
                     f"| {share:.1%} |")  # fmt: skip
    for (dataset, budget), values in sorted(random.items(), key=lambda g: (dataset_rank(g[0][0]), g[0][1])):
        lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | {budget} | `random` | "
                     f"{_cell(np.array(list(values.values())))} | — | — |")  # fmt: skip
    tests.sort(key=lambda t: (dataset_rank(t["dataset"]), t["budget"], lam_key[t["lam"]], t["vs"]))
    for t in tests:
        t["comparison"] = f"`coreset` λ = `{t['lam']}` − {t['vs']}"
    return [*lines, "", *_tests_table(tests, COMPARISON), ""]


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, GPU {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")  # fmt: skip


def write_page(
    rows: Sequence[ResultRow],
    parent_ids: Sequence[str],
    docs: str | Path,
    notes: str | None = None,
    setting_rows: Sequence[ResultRow] = (),
    sweeps: Sequence[SweepSummary] = (),
    ablation: Sequence[AblationRun] = (),
) -> Path:
    """docs/reproduction.md with its pngs beside it.

    ``setting_rows`` (runs of other settings on fresh seeds) and ``sweeps`` (``sweep_summary``
    of each study) feed their own section only, so they never mix into the paper's table."""
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    stats = report.summarise(rows)
    datasets = [d for d in DATASET_NAMES if any(key[0] == d for key in stats)]
    curves = report.plot_learning_curves(rows, docs / "reproduction_curves.png")
    k2000_rows = [r for r in rows if r.budget == TABLE_K]
    bars = report.plot_results(k2000_rows, docs / "reproduction_k2000.png") if k2000_rows else None
    tests = report.paired_tests(rows)
    parents, wall = _parent_lines(parent_ids)
    failed = [r for r in rows if not r.finished]
    lines = [
        "# Reproducing §5.2.2 of Axiotis et al. (ICML 2024)",
        "",
        "*Data-Efficient Learning via Clustering-Based Sensitivity Sampling*, arXiv 2402.17327 v1: the",
        "classification experiment, reproduced with altrack. Generated by `altrack report --paper` on",
        f"{dt.date.today().isoformat()} from the MLflow parent runs listed under *How it was made*;",
        "every number below is computed from their child runs.",
        "",
        f"## k = {TABLE_K}: test accuracy, the paper's table beside altrack's",
        "",
        "The paper averages 100 runs; altrack cells are mean ± sample std over seeds (number of seeds).",
        "The paper's table has no margin, entropy or least-confidence column; its figures do.",
        "",
        *k2000_table(stats, datasets),
        "",
    ]
    if bars is not None:
        lines += [f"![k={TABLE_K} bars]({bars.name})", ""]
    lines += ["## Does the paper's ordering hold?", "", *ordering_checks(stats, datasets, rows), ""]
    key_tests = [t for t in tests if t["budget"] == TABLE_K and t["method"] in ("coreset", "coreset-grad")]
    if key_tests:
        lines += [f"Algorithm 1 against the baselines at k = {TABLE_K}, paired over seeds "
                  "(shared seed set and seed model); **\\*** = significant after Holm's correction over",
                  "every comparison in *All paired comparisons*:", "", *_tests_table(key_tests), ""]  # fmt: skip
    if setting_rows or sweeps:
        lines += settings_section(setting_rows, sweeps, used_seeds={r.seed for r in rows})
    lines += ablation_section(ablation)
    if notes:
        lines += [notes.strip(), ""]
    if curves is not None:
        lines += ["## Learning curves", "", "Accuracy against k, mean ± 1 std bands, one line per method.", "",
                  f"![learning curves]({curves.name})", ""]  # fmt: skip
    if len({k for _, k, _ in stats}) > 1:
        lines += ["Every budget, mean ± sample std (number of seeds):", "", *budget_table(stats, datasets), ""]
    if tests:
        lines += ["## All paired comparisons", "",
                  "Each method against `random` and against `kcenter`, per dataset and k, paired over the seeds "
                  "both finished: mean difference, t 95% CI, paired t-test and Wilcoxon signed-rank p-values, and "
                  "the Holm-adjusted t-test p.", "", "<details><summary>table</summary>", "",
                  *_tests_table(tests), "", "</details>", ""]  # fmt: skip
    if failed:
        lines += [f"{len(failed)} run(s) failed and are left out of every mean above.", ""]
    n_finished = len({r.run_id for r in [*rows, *setting_rows, *(a.row for a in ablation)] if r.finished})
    lines += ["## How it was made", "", f"- Hardware: {hardware()}.",
              f"- Wall time: {wall / 60:.1f} min over {len(parent_ids)} parent run(s); {n_finished} finished "
              "protocol runs (sweep trials not counted).", "", *parents, ""]  # fmt: skip
    page = docs / "reproduction.md"
    page.write_text("\n".join(lines))
    return page


def paper_page(
    parent_ids: Sequence[str],
    experiment: str | None,
    docs: str,
    notes: str | None,
    setting_ids: Sequence[str] = (),
    sweep_ids: Sequence[str] = (),
    ablation_ids: Sequence[str] = (),
) -> Path:
    """``altrack report --paper``: docs/reproduction.md from the protocol runs of the given parents
    (or a whole experiment), with the runs of ``setting_ids`` compared setting against setting and
    the studies of ``sweep_ids``, and the lam ablation of ``ablation_ids``. Raises ``AltrackError``
    for unknown ids or no protocol runs."""

    def rows_of(parents: Sequence[str]) -> list[ResultRow]:  # a resumed parent also lists its predecessor's runs
        return list({row.run_id: row for parent in parents for row in rows_from_mlflow(parent)}.values())

    sweeps = [sweep_summary(sweep_id) for sweep_id in sweep_ids]  # a wrong id fails before any other read
    if parent_ids:
        rows = rows_of(parent_ids)
    else:  # an experiment gathers every grid: the page's tables are of the paper's setting, the rest apart
        rows, _ = report.separate_settings([r for r in rows_from_mlflow(experiment=experiment)
                                            if is_paper_setting(r.setting)])  # fmt: skip
        ids = experiment_ids(experiment)
        parent_ids = [r.info.run_id for r in search(ids, f"tags.`{KIND_TAG}` = '{KIND_GRID}'")]
    if not rows:
        raise AltrackError("no altrack protocol runs found for those runs")
    setting_rows = rows_of(setting_ids)
    ablation = ablation_runs(ablation_ids)
    parents = list(dict.fromkeys([*parent_ids, *setting_ids, *sweep_ids, *ablation_ids]))  # each once
    return write_page(rows, parents, docs, notes, setting_rows=setting_rows, sweeps=sweeps, ablation=ablation)

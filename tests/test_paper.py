"""The results page's ordering verdicts (altrack/paper.py), on rows made up here: no runs needed."""

from __future__ import annotations

import numpy as np

from altrack import report
from altrack.paper import budget_table, ordering_checks, pair_verdicts
from altrack.results import ResultRow

# MNIST in the paper: coreset-grad > coreset > kcenter > random. Here coreset-grad and coreset tie,
# kcenter sits clearly below random (the paper's kcenter > random reversed), coreset is clearly above both.
# Fashion-MNIST in the paper: coreset > coreset-grad > random > kcenter; here coreset-grad - random is
# built to have t = 2.3 exactly over 30 seeds (p = 0.029): significant alone, not after Holm's correction.
SHIFTS = {"mnist": {"coreset-grad": 0.010, "coreset": 0.010, "kcenter": -0.010, "random": 0.0},
          "fashion_mnist": {"coreset": 0.02, "random": 0.0, "kcenter": -0.02}}  # fmt: skip
N_SEEDS = 30


def _rows():
    rng = np.random.default_rng(3)
    z = rng.normal(size=N_SEEDS)
    z = (z - z.mean()) / z.std(ddof=1)  # exactly mean 0, sd 1
    small = 2.3 * 0.004 / np.sqrt(N_SEEDS) + 0.004 * z  # per-seed coreset-grad - random, t = 2.3
    rows = []
    for dataset, shifts in SHIFTS.items():
        for seed in range(N_SEEDS):
            base = 0.85 + rng.normal(scale=0.004)
            accs = {method: base + shift + rng.normal(scale=0.002) for method, shift in shifts.items()}
            if dataset == "fashion_mnist":
                accs["coreset-grad"] = accs["random"] + small[seed]
            for method, acc in accs.items():
                rows.append(ResultRow(dataset, method, 2000, seed, "FINISHED", acc, f"{dataset}-{method}-{seed}"))
                # another budget and a failed run: neither may enter the k=2000 pairs
                rows.append(ResultRow(dataset, method, 1000, seed, "FINISHED", 0.5, f"{dataset}-{method}-{seed}-1k"))
            rows.append(ResultRow(dataset, "random", 2000, N_SEEDS + seed, "FAILED", float("nan"), f"x{seed}"))
    return rows


def test_each_pair_of_the_papers_ordering_is_tested_and_holm_corrected_across_datasets():
    verdicts = pair_verdicts(_rows(), ["mnist", "fashion_mnist"])
    tests = {(t["dataset"], t["high"], t["low"]): t for t in verdicts}
    assert len(tests) == 12  # every pair of the paper's four methods per dataset, its higher one first
    assert all(t["n"] == N_SEEDS for t in verdicts)  # k=2000 and finished runs only
    assert tests[("mnist", "coreset-grad", "coreset")]["significant"] is False  # a tie stays open
    reversed_pair = tests[("mnist", "kcenter", "random")]
    assert reversed_pair["significant"] and reversed_pair["mean_diff"] < 0
    assert tests[("fashion_mnist", "coreset", "random")]["significant"]
    small = tests[("fashion_mnist", "coreset-grad", "random")]
    assert 0.025 < small["t_p"] < 0.05 and not small["significant"]  # significant alone, not after Holm
    raw = [t["t_p"] for t in verdicts]
    np.testing.assert_allclose([t["holm_p"] for t in verdicts], report.holm(raw))  # one family of 12


def test_the_ordering_lines_say_which_pairs_hold_are_reversed_or_open():
    rows = _rows()
    text = "\n".join(ordering_checks(report.summarise(rows), ["mnist", "fashion_mnist"], rows))
    mnist, fashion = text.split("**Fashion-MNIST**")
    assert "coreset > random holds" in mnist and "kcenter > random **reversed**" in mnist
    assert "coreset-grad > coreset open" in mnist
    assert "coreset-grad > random open" in fashion and "random > kcenter holds" in fashion
    assert "Holm's correction over all the pairs above (12 tests" in text


def test_the_budget_table_has_a_row_per_dataset_and_budget_and_leaves_failed_runs_out():
    stats = report.summarise(_rows())
    table = budget_table(stats, ["mnist", "fashion_mnist"])
    assert table[0] == "| dataset | k | `coreset` | `coreset-grad` | `kcenter` | `random` |"
    assert [line.split(" | ")[:2] for line in table[2:]] == [
        ["| MNIST", "1000"], ["| MNIST", "2000"], ["| Fashion-MNIST", "1000"], ["| Fashion-MNIST", "2000"]]  # fmt: skip
    random_2000 = np.array([r.test_accuracy for r in _rows() if r.budget == 2000 and r.method == "random"
                            and r.dataset == "mnist" and r.finished])  # fmt: skip
    assert f"{random_2000.mean():.4f} ± {random_2000.std(ddof=1):.4f} ({N_SEEDS})" in table[3]
    assert "0.5000 ± 0.0000 (30)" in table[2]

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
from scipy import stats

from altrack import report
from altrack.results import ResultRow


def _rows(n_seeds=6, gap=0.02, noise=0.005, budgets=(1000, 2000)):
    rng = np.random.default_rng(0)
    rows = []
    for budget in budgets:
        for seed in range(n_seeds):
            base = 0.8 + rng.normal(scale=0.01)
            for method, shift in (("coreset", gap), ("kcenter", 0.0), ("random", 0.0)):
                acc = base + shift + rng.normal(scale=noise)
                rows.append(ResultRow(dataset="mnist", method=method, budget=budget, seed=seed, status="FINISHED",
                                 test_accuracy=acc, run_id=f"{method}{seed}", error=""))  # fmt: skip
    return rows


def test_holm_matches_the_textbook_example():
    # p = (0.01, 0.04, 0.03) -> sorted 0.01*3, 0.03*2, 0.04*1 -> monotone (0.03, 0.06, 0.06)
    np.testing.assert_allclose(report.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_paired_tests_agree_with_scipy_and_flag_a_real_gap():
    rows = _rows()
    tests = report.paired_tests(rows)
    pairs = {(t["budget"], t["method"], t["vs"]) for t in tests}
    assert (1000, "coreset", "random") in pairs and (1000, "kcenter", "random") in pairs
    assert (1000, "random", "kcenter") not in pairs  # already tested the other way round
    test = next(t for t in tests if (t["budget"], t["method"], t["vs"]) == (1000, "coreset", "random"))
    ours = [r.test_accuracy for r in rows if r.budget == 1000 and r.method == "coreset"]
    base = [r.test_accuracy for r in rows if r.budget == 1000 and r.method == "random"]
    assert test["mean_diff"] == pytest.approx(np.mean(np.subtract(ours, base)))
    assert test["t_p"] == pytest.approx(stats.ttest_rel(ours, base).pvalue)
    assert test["wilcoxon_p"] == pytest.approx(stats.wilcoxon(np.subtract(ours, base)).pvalue)
    assert test["ci_low"] < test["mean_diff"] < test["ci_high"]
    assert test["significant"]
    null = next(t for t in tests if (t["budget"], t["method"], t["vs"]) == (1000, "kcenter", "random"))
    assert not null["significant"]


def test_failed_runs_are_listed_and_left_out_of_the_means(tmp_path):
    rows = _rows(budgets=(1000,))
    rows.append(ResultRow(dataset="mnist", method="coreset", budget=1000, seed=99, status="FAILED",
                     test_accuracy=float("nan"), run_id="x", error="training loss became nan"))  # fmt: skip
    text = report.format_table(rows)
    assert "coreset" in text and "nan" not in text.split("failed")[0]
    assert "1 run(s) failed and are left out of the means" in text and "seed=99" in text


def test_vs_random_pairs_the_seeds_both_methods_finished():
    """Over an experiment, methods may have run on different seeds: "vs random" is the paired
    tests' mean difference over the shared seeds, not a difference of means over other seed sets."""
    rows = [r for r in _rows(budgets=(1000,)) if not (r.method == "random" and r.seed >= 3)]
    rows += [ResultRow(dataset="mnist", method="random", budget=1000, seed=seed, status="FINISHED",
                       test_accuracy=0.5, run_id=f"extra{seed}", error="") for seed in (10, 11)]  # fmt: skip
    line = next(line for line in report.format_table(rows).splitlines() if line.strip().startswith("coreset"))
    acc = {(r.method, r.seed): r.test_accuracy for r in rows}
    paired = np.mean([acc[("coreset", s)] - acc[("random", s)] for s in range(3)])
    assert line.split()[-1] == f"{paired:+.4f}"
    [test] = [t for t in report.paired_tests(rows) if (t["method"], t["vs"]) == ("coreset", "random")]
    assert f"{test['mean_diff']:+.4f}" == line.split()[-1]


def test_report_files_include_learning_curves_for_several_budgets(tmp_path):
    paths = report.write_report(_rows(), tmp_path)
    names = {p.name for p in paths}
    assert {report.PNG_NAME, report.TXT_NAME, report.CSV_NAME, report.CURVES_NAME} <= names
    assert "paired comparisons" in (tmp_path / report.TXT_NAME).read_text()
    single = report.write_report(_rows(budgets=(1000,)), tmp_path / "single")
    assert report.CURVES_NAME not in {p.name for p in single}


def _selection_case(seed: int, scale: float, n_selected: int, zeros: int):
    rng = np.random.default_rng(seed)
    losses = (rng.exponential(scale, 6000) ** 3).astype(np.float32)
    losses[:zeros] = 0.0  # zero losses sit at the smallest positive one
    pool = np.arange(20, 6000)
    return losses, rng.integers(0, 10, 6000), pool, rng.choice(pool, n_selected, replace=False)


def test_a_selection_figure_redrawn_for_another_run_is_the_one_a_fresh_figure_draws(tmp_path):
    """plot_selection keeps its figure, and a raster of each half (axes, ticks, labels) per set of
    limits, for the next run: nothing of an earlier run (limits, legend counts, bars) may show in
    a later one's plot, whether both halves are new, both kept, or one of each."""
    first, second = _selection_case(1, 0.05, 300, 40), _selection_case(0, 2.0, 900, 0)  # the first peaks higher
    losses_only = (first[0], *second[1:])  # the loss panel's limits differ from second's, the class panel's not
    runs = [("first", first), ("second", second), ("first", first), ("mixed", losses_only), ("second", second)]
    kept = report._SelectionFigure(10)
    drawn = []
    for name, case in runs:
        kept.draw(*case, f"{name} run", tmp_path / "kept.png")
        drawn.append(mpimg.imread(tmp_path / "kept.png"))
        report._SelectionFigure(10).draw(*case, f"{name} run", tmp_path / "fresh.png")
        assert np.array_equal(drawn[-1], mpimg.imread(tmp_path / "fresh.png")), name
    assert drawn[0].shape == (380, 1000, 3) and not np.array_equal(drawn[0], drawn[1])
    assert {key[0] for key in kept.backgrounds} == {"left", "right"} and len(kept.backgrounds) == 5
    tallest_step = max(float(np.max(stairs.get_data().values)) for stairs in kept.stairs)
    tallest_bar = max(bar.get_height() for bars in kept.bars for bar in bars)
    # round limits that hold the data: y from a ladder 1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8 per decade
    assert kept.left.get_ylim()[0] == 0.0 and tallest_step <= kept.left.get_ylim()[1] < 1.34 * tallest_step
    assert kept.right.get_ylim()[0] == 0.0 and tallest_bar <= kept.right.get_ylim()[1] < 1.34 * tallest_bar
    positive = second[0][second[0] > 0]
    low, high = kept.left.get_xlim()
    assert low <= positive.min() < 10 * low and high / 2.5 < second[0].max() <= high  # a decade; 1, 2, 5


def test_a_selection_figure_draws_a_seed_model_with_no_loss_at_all(tmp_path):
    losses, labels, pool, selected = _selection_case(2, 1.0, 100, 6000)  # every loss is zero
    report._SelectionFigure(10).draw(losses, labels, pool, selected, "perfect", tmp_path / "zero.png")
    assert mpimg.imread(tmp_path / "zero.png").shape == (380, 1000, 3)  # opaque: RGB


def test_nice_rounds_to_the_ladder():
    assert report._nice(0.0123, up=True) == pytest.approx(0.015)
    assert report._nice(0.0123, up=False) == pytest.approx(0.012)
    assert report._nice(0.1, up=True) == pytest.approx(0.1) and report._nice(0.1, up=False) == pytest.approx(0.1)
    assert report._nice(7.9e-6, up=False) == pytest.approx(6e-6) and report._nice(8.1, up=True) == pytest.approx(10)


def _row(method, seed, acc, setting="seed_ratio=0.2 cluster_ratio=0.2 lam=auto"):
    return ResultRow(dataset="mnist", method=method, budget=100, seed=seed, status="FINISHED", test_accuracy=acc,
                     run_id=f"{method}-{seed}-{acc}", setting=setting)  # fmt: skip


def test_separate_settings_names_each_setting_and_says_what_it_leaves_out():
    """Rows of two grids in one experiment: the cluster ratio splits coreset only (random does
    not read it), lr splits random too, which then has no comparisons: the notes say so, and a
    seed counted twice under one setting with two accuracies is counted once and said."""
    base = "seed_ratio=0.2 cluster_ratio=0.2 lam=auto"
    other = base.replace("0.2 lam", "0.3 lam")
    rows = [_row("coreset", 0, 0.90, base), _row("coreset", 0, 0.91, other),
            _row("random", 0, 0.88, base), _row("random", 0, 0.88, other)]
    kept, notes = report.separate_settings(rows)
    assert sorted(r.method for r in kept) == ["coreset (cluster_ratio=0.2)", "coreset (cluster_ratio=0.3)", "random"]
    assert notes == []  # random twice, the same computation and accuracy: no note
    kept, notes = report.separate_settings([*rows, _row("random", 0, 0.50, setting=base + " lr=10")])
    assert {r.method for r in kept} >= {"random (lr=0.001)", "random (lr=10)"}
    assert any("random ran under several settings" in note for note in notes)
    kept, notes = report.separate_settings([_row("margin", 0, 0.9), _row("margin", 0, 0.8)])
    assert len(kept) == 1 and "1 run left out" in notes[0]

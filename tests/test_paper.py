"""The results page's ordering verdicts (altrack/paper.py), on rows made up here: no runs needed."""

from __future__ import annotations

import numpy as np

from altrack import report
from altrack.paper import ordering_checks, pair_verdicts
from altrack.results import ResultRow

# MNIST in the paper: coreset-grad > coreset > kcenter > random. Here coreset-grad and coreset tie,
# kcenter sits clearly below random (the paper's kcenter > random reversed), coreset is clearly above both.
SHIFTS = {"coreset-grad": 0.010, "coreset": 0.010, "kcenter": -0.010, "random": 0.0}


def _rows(n_seeds=30):
    rng = np.random.default_rng(3)
    rows = []
    for seed in range(n_seeds):
        base = 0.91 + rng.normal(scale=0.004)
        for method, shift in SHIFTS.items():
            rows.append(ResultRow("mnist", method, 2000, seed, "FINISHED", base + shift + rng.normal(scale=0.002),
                                  f"{method}-{seed}"))  # fmt: skip
    return rows


def test_each_pair_of_the_papers_ordering_is_tested_and_holm_corrected():
    tests = {(t["high"], t["low"]): t for t in pair_verdicts(_rows(), ["mnist"])}
    assert len(tests) == 6  # every pair of the paper's four methods, the paper's higher one first
    assert tests[("coreset-grad", "coreset")]["significant"] is False  # a tie stays open
    assert tests[("kcenter", "random")]["significant"] and tests[("kcenter", "random")]["mean_diff"] < 0
    assert tests[("coreset", "random")]["significant"] and tests[("coreset", "random")]["mean_diff"] > 0
    raw = sorted(t["t_p"] for t in tests.values())
    assert sorted(t["holm_p"] for t in tests.values()) == list(report.holm(raw))  # one family


def test_the_ordering_lines_say_which_pairs_hold_are_reversed_or_open():
    rows = _rows()
    text = "\n".join(ordering_checks(report.summarise(rows), ["mnist"], rows))
    assert "coreset > random holds" in text
    assert "kcenter > random **reversed**" in text
    assert "coreset-grad > coreset open" in text
    assert "Holm's correction over all the pairs above (6 tests" in text

"""Tables, plots and statistics from plain result rows (no MLflow here).

Rows are ``altrack.results.ResultRow``s. Failed runs are listed, never averaged.
"""

from __future__ import annotations

import csv
import itertools
import os
import shutil
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from altrack.catalog import DATASETS, applies, dataset_rank  # noqa: E402
from altrack.results import ROW_FIELDS, ResultRow  # noqa: E402
from altrack.selection import available_methods  # noqa: E402
from altrack.settings import label_knobs, paper_counterpart  # noqa: E402

PNG_NAME = "active_learning_results.png"
TXT_NAME = "active_learning_results.txt"
CSV_NAME = "active_learning_results.csv"
BASELINE = "random"

_PALETTE = {
    "coreset": "#d62728",
    "coreset-grad": "#ff7f0e",
    "kcenter": "#1f77b4",
    "margin": "#2ca02c",
    "entropy": "#9467bd",
    "least-confidence": "#8c564b",
    "random": "#7f7f7f",
}


def counted(n: int, noun: str) -> str:
    """``1 run``, ``3 runs``: what the CLI says of its counts."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def method_order(methods: Iterable[str]) -> list[str]:
    known = list(available_methods())
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


def separate_settings(rows: Sequence[ResultRow]) -> tuple[list[ResultRow], list[str]]:
    """The rows of runs made under several settings (an experiment that gathers many grids), as
    a report can count them: a method run under two settings of the knobs it reads becomes two
    methods, named by the knobs that differ (``coreset (cluster_ratio=0.3)``), where its seeds
    would otherwise be pooled and a seed run twice counted once. A seed that still appears twice
    (the same setting on another device or torch version, or runs logged before labels named
    every knob) is counted once, the first row kept, and returns a note saying so, unless both
    gave the same accuracy. The rows of one grid come back as they are, with no notes."""

    def knobs(row: ResultRow) -> dict[str, str]:  # every knob its method reads, as its label has it
        return {name: value for name, value in label_knobs(row.setting).items() if applies(name, row.method)}

    labels: dict[tuple, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        labels[(row.dataset, row.budget, row.method)].append(knobs(row))
    varying = {group: [name for name in found[0] if len({g[name] for g in found}) > 1]
               for group, found in labels.items()}  # fmt: skip
    out: list[ResultRow] = []
    first: dict[tuple, ResultRow] = {}
    twice: list[ResultRow] = []
    for row in rows:
        names = varying[(row.dataset, row.budget, row.method)]
        if names:
            own = knobs(row)
            row = replace(row, method=f"{row.method} ({' '.join(f'{n}={own[n]}' for n in names)})")
        if row.finished:
            key = (row.dataset, row.budget, row.method, row.seed)
            if key in first:
                if first[key].test_accuracy != row.test_accuracy:
                    twice.append(row)
                continue
            first[key] = row
        out.append(row)
    notes = []
    split = sorted({(d, k, m) for (d, k, m), names in varying.items() if names and m in (BASELINE, *COMPARATORS)})
    for dataset, budget, method in split:
        notes.append(f"{dataset} k={budget}: {method} ran under several settings, so the rows there have no "
                     f"'vs {method}' and no paired tests against it; report one setting's grids with --run-id.")
    if twice:
        example = twice[0]
        notes.append(f"{counted(len(twice), 'run')} left out: the same dataset, k, method, setting and seed as a "
                     f"counted run, with another accuracy (another device or torch version?), e.g. {example.run_id} "
                     f"({example.dataset} {example.method} k={example.budget} seed={example.seed}); report a grid "
                     "alone with --run-id.")  # fmt: skip
    return out, notes


def summarise(rows: Sequence[ResultRow]) -> dict[tuple[str, int, str], np.ndarray]:
    """(dataset, budget, method) -> accuracies of finished runs, ordered by seed."""
    return {
        key: np.array([acc for _, acc in sorted(by_seed.items())])
        for key, by_seed in accuracy_by_seed(rows, "dataset", "budget", "method").items()
    }


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _std_text(values: np.ndarray) -> str:
    """The table's std: a dash for one seed, where there is no spread to speak of."""
    return f"{values.std(ddof=1):.4f}" if len(values) > 1 else "–"


def format_table(rows: Sequence[ResultRow], resumed: int = 0, notes: Sequence[str] = ()) -> str:
    """The grid's accuracy table; ``resumed`` counts the rows reused from earlier invocations.
    "vs random" is the mean paired difference over the seeds both finished, the paired tests'
    figure: over an experiment whose methods ran on different seeds, a difference of means would
    compare other seed sets."""
    stats = summarise(rows)
    by_seed = accuracy_by_seed(rows, "dataset", "budget", "method")
    lines = ["altrack: test accuracy, mean ± std over seeds (n = finished runs; vs random = the mean paired "
             "difference over the seeds both finished)", ""]
    width = max([18, *(len(m) + 2 for _, _, m in stats)])  # a setting's name (coreset (lr=0.01)) fits
    for dataset, budget in sorted({(d, k) for d, k, _ in stats}, key=lambda pair: (dataset_rank(pair[0]), pair)):
        lines.append(f"{dataset}  k={budget}")
        lines.append(f"  {'method':<{width}}{'mean':>8}{'std':>8}{'n':>4}{'vs random':>11}")
        base = by_seed.get((dataset, budget, BASELINE))
        for method in method_order(m for d, k, m in stats if (d, k) == (dataset, budget)):
            acc = stats[(dataset, budget, method)]
            diff = paired_diffs(by_seed[(dataset, budget, method)], base) if base and method != BASELINE else None
            delta = f"{diff.mean():+.4f}" if diff is not None and len(diff) else ""
            lines.append(f"  {method:<{width}}{acc.mean():>8.4f}{_std_text(acc):>8}{len(acc):>4}{delta:>11}")
        lines.append("")
    failed = [r for r in rows if not r.finished]
    if failed:
        lines.append(f"{len(failed)} run(s) failed and are left out of the means:")
        for r in failed:
            lines.append(f"  {r.dataset} {r.method} k={r.budget} seed={r.seed}: {r.error or r.status}")
    if resumed:
        if resumed == len(rows):
            which = "The run was" if resumed == 1 else f"All {resumed} runs were"
        else:
            which = f"{resumed} of the {len(rows)} runs {'was' if resumed == 1 else 'were'}"
        lines.append(f"{which} reused from earlier or concurrent invocations (--no-resume reruns them).")
    lines.extend(notes)
    return "\n".join(lines).rstrip() + "\n"


def ci95(values: np.ndarray) -> float:
    """Half-width of the 95% t confidence interval of the mean; NaN for fewer than 2 values."""
    if len(values) < 2:
        return float("nan")
    from scipy import stats as st  # lazy: a third of a second, in every worker, for the report's figures alone

    return float(st.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def plot_results(rows: Sequence[ResultRow], path: Path) -> Path:
    """One panel per (dataset, k), a row per dataset: a dot per method at its mean with its 95%
    confidence interval, every seed's accuracy as a faint point behind it, and random's interval
    as a band across the panel. Dots, not bars: the axis can then zoom on the data without a
    0.004 difference looking large, and the interval says how much a difference means (none is
    drawn from one seed, and the title says n)."""
    stats = summarise(rows)
    datasets = sorted({d for d, _, _ in stats})
    budgets = sorted({k for _, k, _ in stats})
    if not datasets:
        raise ValueError("no finished runs to plot")
    single = len(budgets) == 1  # one budget: the datasets side by side in one row
    shape = (1, len(datasets)) if single else (len(datasets), len(budgets))
    fig, grid = plt.subplots(*shape, figsize=(4.2 * shape[1] + 1, 4.2 * shape[0]), squeeze=False)
    for (row, dataset), (col, budget) in itertools.product(enumerate(datasets), enumerate(budgets)):
        ax = grid[0][row] if single else grid[row][col]
        if (dataset, budget) not in {(d, k) for d, k, _ in stats}:
            ax.set_visible(False)
            continue
        methods = method_order(m for d, k, m in stats if (d, k) == (dataset, budget))
        base = stats.get((dataset, budget, BASELINE))
        if base is not None and len(base) > 1:
            half = ci95(base)
            ax.axhspan(base.mean() - half, base.mean() + half, color="#7f7f7f", alpha=0.15, lw=0,
                       label="random, 95% CI")  # fmt: skip
        for i, method in enumerate(methods):
            acc = stats[(dataset, budget, method)]
            color = _PALETTE.get(method.split(" (")[0], "#17becf")
            jitter = np.linspace(-0.12, 0.12, len(acc)) if len(acc) > 1 else np.zeros(1)
            ax.scatter(i + jitter, acc, s=8, color=color, alpha=0.35, lw=0)
            half = ci95(acc)
            ax.errorbar(i, acc.mean(), yerr=None if np.isnan(half) else half, fmt="o", color=color, ms=6,
                        capsize=4, mec="black", mew=0.5)  # fmt: skip
            ax.annotate(f"{acc.mean():.4f}", (i, acc.mean()), xytext=(7, 0), textcoords="offset points",
                        va="center", fontsize=7)  # fmt: skip
        if base is not None and len(base) > 1:
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.2)
        n = sorted({len(stats[(dataset, budget, m)]) for m in methods})
        seeds = counted(n[0], "seed") if len(n) == 1 else f"{n[0]}-{n[-1]} seeds"
        shown = "mean, 95% CI" if n[-1] > 1 else "one seed: no interval"
        ax.set_title(f"{dataset}, k={budget} ({seeds}; {shown})", fontsize=10)
        ax.set_ylabel("test accuracy")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_rows_csv(rows: Sequence[ResultRow] | Sequence[dict], path: Path) -> Path:
    """Result rows (``ROW_FIELDS``) or plain dicts (every key in first-seen order) as csv."""
    rows = [row.as_dict() if isinstance(row, ResultRow) else row for row in rows]
    columns = list(dict.fromkeys(k for row in rows for k in row)) if rows else list(ROW_FIELDS)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_report(rows: Sequence[ResultRow], out_dir: str | Path, resumed: int = 0,
                 notes: Sequence[str] = ()) -> list[Path]:  # fmt: skip
    """The png, txt (table and paired tests, then ``notes``) and csv of a grid, plus learning
    curves when it has several budgets, written into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    txt = out / TXT_NAME
    paired = format_paired(paired_tests(rows))
    txt.write_text(format_table(rows, resumed, notes) + ("\n" + paired if paired else ""))
    paths = [txt, write_rows_csv(rows, out / CSV_NAME)]
    if summarise(rows):
        paths.insert(0, plot_results(rows, out / PNG_NAME))
        curves = plot_learning_curves(rows, out / CURVES_NAME)
        if curves is not None:
            paths.insert(1, curves)
    return paths


def install(paths: Sequence[Path], out: Path) -> list[Path]:
    """Copy finished files into ``out``, each whole or not at all (a temp file, then a rename): a
    full disk leaves no empty or half-written report behind. Raises ``OSError``."""
    out.mkdir(parents=True, exist_ok=True)
    installed = []
    for path in paths:
        target = out / path.name
        partial = out / f".{path.name}.partial"
        try:
            shutil.copyfile(path, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        installed.append(target)
    return installed


_PLAIN_POWERS = FuncFormatter(lambda value, _: f"{value:g}")
_NICE_STEPS = np.array([1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0])
_ONE_TWO_FIVE = np.array([1.0, 2.0, 5.0, 10.0])
_DECADES = np.array([1.0, 10.0])


def _nice(value: float, up: bool, steps: np.ndarray = _NICE_STEPS) -> float:
    """``value`` rounded up (or down) to the next of ``steps`` x a power of ten: axis limits from
    a short ladder, so runs of a grid share their axes (and, in ``_SelectionFigure``, their
    rendered background)."""
    exponent = np.floor(np.log10(value))
    mantissa = value / 10.0**exponent
    index = np.searchsorted(steps, mantissa * (1 - 1e-9), side="left") if up else (
        np.searchsorted(steps, mantissa * (1 + 1e-9), side="right") - 1)  # fmt: skip
    return float(steps[index] * 10.0**exponent)


class _SelectionFigure:
    """``plot_selection``'s figure, built once per process and redrawn with each run's data.

    One is written per protocol run (7,000 in the paper's grid), and a full draw of two axes
    with their ticks and texts cost about 60 ms, most of it text. So the axes' limits come from a
    short ladder of round values (``_nice``): runs of a grid mostly share them, and with them
    every tick, label and title, which are rendered once per set of limits and kept as a raster
    (matplotlib's blitting). A run draws only its own artists over that raster (the steps, the
    bars, the legend with its counts, the suptitle) and writes the buffer; the legend sits
    between the suptitle and the axes, so no data is drawn over it or under it.
    The PNG is the one a fresh figure draws (tests/test_report.py), whatever was drawn before.
    Shared by the process's threads, so drawing holds a lock (altrack's own workers are
    processes; a caller's may not be)."""

    BINS = 50
    GREY, RED = "#7f7f7f", "#d62728"
    KEPT_BACKGROUNDS = 64  # halves of 0.76 MB each

    def __init__(self, num_classes: int) -> None:
        self.fig = Figure(figsize=(10, 3.8), dpi=100, facecolor="white")  # opaque whatever the rcParams: saved as RGB
        self.canvas = FigureCanvasAgg(self.fig)
        self.left, self.right = self.fig.subplots(1, 2)
        self.fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.80, wspace=0.25)
        left, right = self.left, self.right
        edges = np.logspace(-2, 0, self.BINS + 1)
        self.stairs = [left.stairs(np.zeros(self.BINS), edges, fill=True, alpha=0.45, color=color, label=label)
                       for color, label in ((self.GREY, "pool"), (self.RED, "selected"))]  # fmt: skip
        left.set_xscale("log")
        left.xaxis.set_minor_locator(NullLocator())  # hundreds of minor ticks cost most of the drawing
        left.xaxis.set_major_formatter(_PLAIN_POWERS)  # "0.01", not mathtext's 10^-2: a third of the rest
        left.set_xlabel("seed-model cross-entropy (log scale)")
        left.set_ylabel("share of points per bin")
        left.set_title("loss of the pool vs the selection", fontsize=10)
        classes = np.arange(num_classes)
        self.bars = [right.bar(classes - 0.2, np.zeros(num_classes), width=0.4, color=self.GREY, label="pool"),
                     right.bar(classes + 0.2, np.zeros(num_classes), width=0.4, color=self.RED, label="selected")]
        right.set_xticks(classes)
        right.set_xlim(-0.6, num_classes - 0.4)
        right.set_xlabel("class")
        right.set_ylabel("share")
        right.set_title("class balance", fontsize=10)
        # one legend for both panels, between the suptitle and the axes: over no data
        self.legend = self.fig.legend(handles=self.stairs, loc="upper center", bbox_to_anchor=(0.5, 0.935), ncol=2,
                                      fontsize=9, frameon=False)  # fmt: skip
        self.title = self.fig.suptitle("", fontsize=11)
        self.own = [*self.stairs, *(bar for bars in self.bars for bar in bars), self.legend, self.title]
        for artist in self.own:
            artist.set_animated(True)
        self.backgrounds: dict[tuple, object] = {}

    def draw(self, seed_losses: np.ndarray, labels: np.ndarray, pool: np.ndarray, selected: np.ndarray,
             title: str, path: Path) -> Path:  # fmt: skip
        positive = seed_losses[seed_losses > 0]
        # the low end is a sparse tail: a whole decade; the high end 1, 2 or 5 x a power of ten
        low = _nice(float(positive.min()) if len(positive) else 1e-8, up=False, steps=_DECADES)
        high = max(_nice(max(float(seed_losses.max()), low), up=True, steps=_ONE_TWO_FIVE), low * 10)
        edges = np.logspace(np.log10(low), np.log10(high), self.BINS + 1)
        parts = (pool, selected)
        for stairs, text, part, label in zip(self.stairs, self.legend.get_texts(), parts, ("pool", "selected"),
                                             strict=True):  # fmt: skip
            counts, _ = np.histogram(np.clip(seed_losses[part], low, high), bins=edges)
            stairs.set_data(counts / max(len(part), 1), edges)
            text.set_text(f"{label} ({len(part):,})")
        num_classes = len(self.bars[0])
        for bars, part in zip(self.bars, parts, strict=True):
            shares = np.bincount(labels[part], minlength=num_classes) / max(len(part), 1)
            for bar, share in zip(bars, shares, strict=True):
                bar.set_height(share)
        tallest_step = max(float(stairs.get_data().values.max()) for stairs in self.stairs)
        tallest_bar = max(bar.get_height() for bars in self.bars for bar in bars)
        limits = (low, high, _nice(max(tallest_step, 1e-3), up=True), _nice(max(tallest_bar, 1e-3), up=True))
        self.title.set_text(title)
        self._background(limits)
        for artist in self.own:
            self.fig.draw_artist(artist)
        # RGB: the figure is opaque, and without the constant alpha channel PIL encodes it in two
        # thirds of the time (21 against 34 ms), and the file is a tenth smaller
        PIL.Image.fromarray(np.asarray(self.canvas.get_renderer().buffer_rgba())[..., :3]).save(path, format="png")
        return path

    def _background(self, limits: tuple[float, float, float, float]) -> None:
        """Set the axes to these limits (the run's artists are drawn through them) and restore
        the raster of everything else, rendering (and keeping) it first if no run had them.

        Each half of the figure holds one axes with its ticks and labels, so each is kept under
        its own axes' limits: the loss panel's under (low, high, top), the class panel's under
        its top alone, and a run reuses each half that an earlier run drew. Only a half no run
        drew is rendered, the other axes hidden meanwhile: a render costs about its axes' share."""
        low, high, left_top, right_top = limits
        self.left.set_xlim(low, high)
        self.left.set_ylim(0.0, left_top)
        self.right.set_ylim(0.0, right_top)
        keys = (("left", low, high, left_top), ("right", right_top))
        regions = [self.backgrounds.get(key) for key in keys]  # read before a new half may evict one
        if None in regions:
            hidden = [axes for axes, region in zip((self.left, self.right), regions, strict=True) if region is not None]
            for axes in hidden:
                axes.set_visible(False)
            try:
                self.canvas.draw()  # animated artists are left out
            finally:
                for axes in hidden:
                    axes.set_visible(True)
            width, height = self.fig.bbox.width, self.fig.bbox.height
            halves = (Bbox.from_extents(0, 0, width / 2, height), Bbox.from_extents(width / 2, 0, width, height))
            for key, half, region in zip(keys, halves, regions, strict=True):
                if region is not None:
                    continue
                if len(self.backgrounds) >= self.KEPT_BACKGROUNDS:
                    self.backgrounds.pop(next(iter(self.backgrounds)))
                self.backgrounds[key] = self.canvas.copy_from_bbox(half)
        for region in regions:
            if region is not None:
                self.canvas.restore_region(region)


_SELECTION_FIGURES: dict[int, _SelectionFigure] = {}
_SELECTION_LOCK = threading.Lock()


def plot_selection(
    seed_losses: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    selected: np.ndarray,
    title: str,
    path: Path,
    num_classes: int = 10,
) -> Path:
    """Where the selection sits in M's loss distribution, and its class balance against the pool.

    Drawn as two step outlines and two bar sets with a fixed layout, on a figure kept for the
    next run (``_SelectionFigure``): one of these is written per protocol run, so it must cost a
    few hundredths of a second, not the half second ``hist`` and ``tight_layout`` take. The log
    axis spans the losses that occur (zero losses sit at the smallest positive one), not a fixed
    floor. ``seed_losses`` and ``labels`` (n_train,); ``pool`` and ``selected`` index them."""
    with _SELECTION_LOCK:
        figure = _SELECTION_FIGURES.get(num_classes)
        if figure is None:
            figure = _SELECTION_FIGURES[num_classes] = _SelectionFigure(num_classes)
        return figure.draw(seed_losses, labels, pool, selected, title, path)


CURVES_NAME = "learning_curves.png"
COMPARATORS = ("random", "kcenter")


def plot_learning_curves(rows: Sequence[ResultRow], path: Path) -> Path | None:
    """Accuracy against k per dataset, mean ± 1 std bands, one line per method (needs 2+ budgets)."""
    stats = summarise(rows)
    datasets = [d for d in DATASETS if len({k for dd, k, _ in stats if dd == d}) >= 2]  # a curve needs 2 points
    if not datasets:
        return None
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.8 * len(datasets), 4.4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method in method_order(m for d, _, m in stats if d == dataset):
            budgets = sorted(k for d, k, m in stats if d == dataset and m == method)
            means = np.array([stats[(dataset, k, method)].mean() for k in budgets])
            stds = np.array([_std(stats[(dataset, k, method)]) for k in budgets])
            color = _PALETTE.get(method.split(" (")[0], "#17becf")
            style = "--" if method == BASELINE else "-"
            ax.plot(budgets, means, style, marker="o", ms=3.5, color=color, label=method, lw=1.6)
            ax.fill_between(budgets, means - stds, means + stds, color=color, alpha=0.12, lw=0)
        n = max(len(v) for (d, _, _), v in stats.items() if d == dataset)
        ax.set_title(f"{dataset} (mean ± 1 std, up to {n} seeds)", fontsize=10)
        ax.set_xlabel("label budget k")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")  # "lower right" hid the low single-budget points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in input order."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def paired_diffs(ours: dict[int, float], base: dict[int, float]) -> np.ndarray:
    """ours - base for each seed both have, in seed order: (n,)."""
    return np.array([ours[s] - base[s] for s in sorted(set(ours) & set(base))], dtype=np.float64)


def paired_difference(ours: dict[int, float], base: dict[int, float]) -> dict | None:
    """ours - base over the seeds both have: mean, t 95% CI, paired t-test and Wilcoxon p."""
    diff = paired_diffs(ours, base)
    if len(diff) < 2:
        return None
    from scipy import stats as st  # lazy, as in ci95

    seeds = sorted(set(ours) & set(base))
    mean = float(diff.mean())
    sem = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    half = float(st.t.ppf(0.975, len(diff) - 1) * sem) if sem > 0 else 0.0
    t_p = float(st.ttest_rel([ours[s] for s in seeds], [base[s] for s in seeds]).pvalue) if sem > 0 else 1.0
    w_p = float(st.wilcoxon(diff).pvalue) if np.any(diff != 0) else 1.0
    return {"n": len(seeds), "mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half,
            "t_p": t_p, "wilcoxon_p": w_p}  # fmt: skip


def mark_holm(tests: list[dict], alpha: float = 0.05) -> list[dict]:
    """Holm-adjust the t-test p of ``tests`` as one family, in place."""
    if tests:
        for test, adjusted in zip(tests, holm([t["t_p"] for t in tests]), strict=True):
            test["holm_p"] = float(adjusted)
            test["significant"] = bool(adjusted < alpha)
    return tests


def accuracy_by_seed(rows: Sequence[ResultRow], *key_fields: str) -> dict[tuple, dict[int, float]]:
    """Finished runs grouped by ``key_fields``: key -> {seed: test accuracy}, ready for pairing."""
    by_seed: dict[tuple, dict[int, float]] = defaultdict(dict)
    for row in rows:
        if row.finished:
            by_seed[tuple(getattr(row, f) for f in key_fields)][row.seed] = float(row.test_accuracy)
    return by_seed


def paired_tests(
    rows: Sequence[ResultRow], comparators: Sequence[str] = COMPARATORS, alpha: float = 0.05
) -> list[dict]:
    """Each method against each comparator per (dataset, k), paired over the seeds both finished.

    Mean difference with a t 95% CI, paired t-test and Wilcoxon signed-rank p-values, and the
    Holm-adjusted t-test p over every comparison in the table.
    """
    by_seed = accuracy_by_seed(rows, "dataset", "budget", "method")
    tests = []
    for dataset, budget in sorted({(d, k) for d, k, _ in by_seed}, key=lambda pair: (dataset_rank(pair[0]), pair)):
        methods = method_order(m for d, k, m in by_seed if (d, k) == (dataset, budget))
        for comparator in comparators:
            base = by_seed.get((dataset, budget, comparator))
            if base is None:
                continue
            for method in methods:
                if method == comparator or method in comparators[: comparators.index(comparator)]:
                    continue  # itself, or a pair already tested the other way round
                test = paired_difference(by_seed[(dataset, budget, method)], base)
                if test is not None:
                    tests.append({"dataset": dataset, "budget": budget, "method": method, "vs": comparator, **test})
    return mark_holm(tests, alpha)


def setting_tests(rows: Sequence[ResultRow], alpha: float = 0.05) -> list[dict]:
    """Each setting against the paper's (0.2 / 0.2, lam auto) under the same other knobs
    (``paper_counterpart``) per (dataset, k, method), paired over seeds: a tuned setting must
    beat the paper's on seeds it was not tuned on."""
    by_seed = accuracy_by_seed(rows, "dataset", "budget", "method", "setting")
    tests = []
    for dataset, budget, method, setting in sorted(by_seed):
        reference = paper_counterpart(setting)
        base = by_seed.get((dataset, budget, method, reference))
        if setting == reference or base is None:
            continue
        test = paired_difference(by_seed[(dataset, budget, method, setting)], base)
        if test is not None:
            tests.append({"dataset": dataset, "budget": budget, "method": method, "setting": setting,
                          "vs": reference, **test})  # fmt: skip
    return mark_holm(tests, alpha)


def format_paired(tests: Sequence[dict]) -> str:
    if not tests:
        return ""
    lines = [
        "paired comparisons over the seeds both finished (difference in test accuracy; * = significant after Holm's "
        f"correction over the {counted(len(tests), 'comparison')} below, alpha 0.05)",
        f"  {'dataset':<14}{'k':>6}  {'method':<17}{'vs':<9}{'n':>3}{'mean diff':>11}{'95% CI':>21}"
        f"{'t p':>9}{'wilcoxon p':>12}{'holm p':>9}",
    ]
    for t in tests:
        ci = f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"
        mark = " *" if t["significant"] else ""
        lines.append(
            f"  {t['dataset']:<14}{t['budget']:>6}  {t['method']:<17}{t['vs']:<9}{t['n']:>3}{t['mean_diff']:>+11.4f}"
            f"{ci:>21}{t['t_p']:>9.3g}{t['wilcoxon_p']:>12.3g}{t['holm_p']:>9.3g}{mark}"
        )
    return "\n".join(lines) + "\n"

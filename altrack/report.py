"""Tables, plots and statistics from plain result rows (no MLflow here).

A row is a dict with at least dataset, method, budget, seed, status and test_accuracy.
Failed runs are listed, never averaged.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from altrack.selection import available_methods  # noqa: E402

PNG_NAME = "active_learning_results.png"
TXT_NAME = "active_learning_results.txt"
CSV_NAME = "active_learning_results.csv"
BASELINE = "random"
ROW_FIELDS = ("dataset", "method", "budget", "seed", "status", "test_accuracy", "run_id", "error")

_PALETTE = {
    "coreset": "#d62728",
    "coreset-grad": "#ff7f0e",
    "kcenter": "#1f77b4",
    "margin": "#2ca02c",
    "entropy": "#9467bd",
    "least-confidence": "#8c564b",
    "random": "#7f7f7f",
}


def method_order(methods: Iterable[str]) -> list[str]:
    known = list(available_methods())
    return sorted(set(methods), key=lambda m: (known.index(m) if m in known else len(known), m))


def summarise(rows: Sequence[dict]) -> dict[tuple[str, int, str], np.ndarray]:
    """(dataset, budget, method) -> accuracies of finished runs, ordered by seed."""
    groups: dict[tuple[str, int, str], list[tuple[int, float]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "FINISHED":
            groups[(row["dataset"], int(row["budget"]), row["method"])].append(
                (int(row["seed"]), float(row["test_accuracy"]))
            )
    return {key: np.array([acc for _, acc in sorted(vals)]) for key, vals in groups.items()}


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def format_table(rows: Sequence[dict]) -> str:
    stats = summarise(rows)
    lines = ["altrack: test accuracy, mean ± std over seeds (n = finished runs)", ""]
    for dataset, budget in sorted({(d, k) for d, k, _ in stats}):
        lines.append(f"{dataset}  k={budget}")
        lines.append(f"  {'method':<18}{'mean':>8}{'std':>8}{'n':>4}{'vs random':>11}")
        base = stats.get((dataset, budget, BASELINE))
        for method in method_order(m for d, k, m in stats if (d, k) == (dataset, budget)):
            acc = stats[(dataset, budget, method)]
            delta = f"{acc.mean() - base.mean():+.4f}" if base is not None and method != BASELINE else ""
            lines.append(f"  {method:<18}{acc.mean():>8.4f}{_std(acc):>8.4f}{len(acc):>4}{delta:>11}")
        lines.append("")
    failed = [r for r in rows if r["status"] != "FINISHED"]
    if failed:
        lines.append(f"{len(failed)} run(s) failed and are left out of the means:")
        for r in failed:
            reason = r.get("error") or r["status"]
            lines.append(f"  {r['dataset']} {r['method']} k={r['budget']} seed={r['seed']}: {reason}")
    return "\n".join(lines).rstrip() + "\n"


def plot_results(rows: Sequence[dict], path: Path) -> Path:
    """One panel per (dataset, k): a bar per method, mean ± std, with random as a band and a bar."""
    stats = summarise(rows)
    panels = sorted({(d, k) for d, k, _ in stats})
    if not panels:
        raise ValueError("no finished runs to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4.2), squeeze=False)
    for ax, (dataset, budget) in zip(axes[0], panels, strict=True):
        methods = method_order(m for d, k, m in stats if (d, k) == (dataset, budget))
        means = [stats[(dataset, budget, m)].mean() for m in methods]
        stds = [_std(stats[(dataset, budget, m)]) for m in methods]
        colors = [_PALETTE.get(m, "#17becf") for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, color=colors, capsize=4, edgecolor="black", linewidth=0.5)
        base = stats.get((dataset, budget, BASELINE))
        if base is not None:
            ax.axhspan(base.mean() - _std(base), base.mean() + _std(base), color="#7f7f7f", alpha=0.15, lw=0)
            ax.axhline(base.mean(), color="#7f7f7f", ls="--", lw=1, label=f"random {base.mean():.4f}")
            ax.legend(loc="lower right", fontsize=8)
        for i, (mean, std) in enumerate(zip(means, stds, strict=True)):
            ax.text(i, mean + std, f"{mean:.3f}", ha="center", va="bottom", fontsize=7)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        high = max(m + s for m, s in zip(means, stds, strict=True))
        pad = max(0.01, 0.25 * (high - low))
        ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        n = len(stats[(dataset, budget, methods[0])])
        ax.set_title(f"{dataset}, k={budget} (n={n} seeds)", fontsize=10)
        ax.set_ylabel("test accuracy")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_rows_csv(rows: Sequence[dict], path: Path, fieldnames: Sequence[str] | None = None) -> Path:
    """Rows as csv; columns are ``fieldnames``, else every key in first-seen order."""
    columns = list(fieldnames) if fieldnames else list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_study(study, folder: Path) -> list[Path]:
    """Optuna's matplotlib plots (no plotly needed). A plot that needs more trials is skipped."""
    import warnings

    from optuna.visualization import matplotlib as optuna_plots

    params = sorted({name for t in study.get_trials(deepcopy=False) for name in t.params})
    ratios = [p for p in ("cluster_ratio", "seed_ratio") if p in params]
    plots = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study),
        "slice.png": lambda: optuna_plots.plot_slice(study, params=params),
    }
    if len(ratios) == 2:
        plots["contour.png"] = lambda: optuna_plots.plot_contour(study, params=ratios)
    written = []
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                axes = draw()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue
        figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        panels = axes.size if isinstance(axes, np.ndarray) else 1
        figure.set_size_inches(max(6.5, 4.8 * panels + 1.5), 4.8)
        figure.savefig(folder / name, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(folder / name)
    return written


def write_report(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """The png, txt and csv of a grid, written into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    txt = out / TXT_NAME
    txt.write_text(format_table(rows))
    paths = [txt, write_rows_csv(rows, out / CSV_NAME, ROW_FIELDS)]
    if summarise(rows):
        paths.insert(0, plot_results(rows, out / PNG_NAME))
    return paths


def plot_selection(
    seed_losses: np.ndarray,
    labels: np.ndarray,
    pool: np.ndarray,
    selected: np.ndarray,
    title: str,
    path: Path,
    num_classes: int = 10,
) -> Path:
    """Where the selection sits in M's loss distribution, and its class balance against the pool."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    floor = max(float(seed_losses[seed_losses > 0].min(initial=1e-8)), 1e-8)
    bins = np.logspace(np.log10(floor), np.log10(max(float(seed_losses.max()), floor * 10)), 50)
    left.hist(np.maximum(seed_losses[pool], floor), bins=bins, density=True, alpha=0.5, color="#7f7f7f", label="pool")
    left.hist(
        np.maximum(seed_losses[selected], floor), bins=bins, density=True, alpha=0.6, color="#d62728", label="selected"
    )
    left.set_xscale("log")
    left.set_xlabel("seed-model cross-entropy (log scale)")
    left.set_ylabel("density")
    left.legend(fontsize=8)
    left.set_title("loss of the pool vs the selection", fontsize=10)
    classes = np.arange(num_classes)
    pool_share = np.bincount(labels[pool], minlength=num_classes) / max(len(pool), 1)
    sel_share = np.bincount(labels[selected], minlength=num_classes) / max(len(selected), 1)
    right.bar(classes - 0.2, pool_share, width=0.4, color="#7f7f7f", label="pool")
    right.bar(classes + 0.2, sel_share, width=0.4, color="#d62728", label="selected")
    right.set_xticks(classes)
    right.set_xlabel("class")
    right.set_ylabel("share")
    right.legend(fontsize=8)
    right.set_title("class balance", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

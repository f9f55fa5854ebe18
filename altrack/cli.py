"""The ``altrack`` command: a thin click shell over ``altrack.tracking`` and friends.

Every user error ends as one line on stderr and a non-zero exit, with no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from mlflow.exceptions import MlflowException

from altrack.config import CORESET_SPACES, DEVICES, GridConfig, Settings, parse_lam, writable_dir_target
from altrack.errors import AltrackError, ConfigError, first_line

ALL = "all"


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _methods(value: str) -> tuple[str, ...]:
    from altrack.selection import available_methods

    return available_methods() if value == ALL else _split(value)


def _budgets(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split(value))
    except ValueError:
        raise click.BadParameter(f"budgets must be integers, got {value!r}", param_hint="--budget") from None


def _lam(value: str) -> float | None:
    try:
        return parse_lam(value)
    except ConfigError:
        raise click.BadParameter(f"must be 'auto' or a number, got {value!r}", param_hint="--lam") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="altrack")
def cli() -> None:
    """Data selection and active learning experiments, tracked in MLflow."""


@cli.command()
@click.option("--datasets", default="mnist", show_default=True, help="Comma list: mnist, fashion_mnist, cifar10.")
@click.option("--methods", default=ALL, show_default=True, help="Comma list of selection methods, or 'all'.")
@click.option("--budget", "budgets", default="2000", show_default=True, help="Label budget k, or a comma list.")
@click.option("--runs", default=1, show_default=True, help="Seeds per (dataset, k): seed, seed+1, ...")
@click.option("--seed", default=0, show_default=True, help="First seed.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed-ratio", default=0.2, show_default=True, help="k'/k, the random seed set.")
@click.option("--cluster-ratio", default=0.2, show_default=True, help="k''/k, the coreset's k-means clusters.")
@click.option("--lam", default="auto", show_default=True, help="Coreset Holder constant: a float or 'auto'.")
@click.option("--coreset-space", type=click.Choice(CORESET_SPACES), default="embedding", show_default=True)
@click.option("--weighted/--unweighted", default=False, show_default=True, help="Retrain with coreset weights.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--data-dir", default=None, help="Dataset folder [default: $ALTRACK_DATA_DIR or ~/.cache/altrack/data].")
@click.option("--out", default="results", show_default=True, help="Folder for the png, txt and csv report.")
@click.option("--experiment", default=None, help="MLflow experiment [default: altrack].")
@click.option(
    "--log-models/--no-log-models",
    default=True,
    show_default=True,
    envvar="ALTRACK_LOG_MODELS",
    help="Log seed and final models as MLflow models [env: ALTRACK_LOG_MODELS].",
)
@click.option("--fail-fast", is_flag=True, help="Stop the grid at the first failed run.")
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Skip runs this experiment already finished with the same config hash.",
)
@click.option("--workers", default=1, show_default=True, help="Processes running (dataset, k, seed) groups.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(**opts: object) -> None:
    """Run the §5.2.2 protocol over datasets x budgets x seeds x methods."""
    cfg = GridConfig(
        datasets=_split(str(opts["datasets"])),
        methods=_methods(str(opts["methods"])),
        budgets=_budgets(str(opts["budgets"])),
        runs=int(opts["runs"]),  # type: ignore[arg-type]
        seed=int(opts["seed"]),  # type: ignore[arg-type]
        settings=Settings(
            epochs=int(opts["epochs"]),  # type: ignore[arg-type]
            batch_size=int(opts["batch_size"]),  # type: ignore[arg-type]
            lr=float(opts["lr"]),  # type: ignore[arg-type]
            seed_ratio=float(opts["seed_ratio"]),  # type: ignore[arg-type]
            cluster_ratio=float(opts["cluster_ratio"]),  # type: ignore[arg-type]
            lam=_lam(str(opts["lam"])),
            coreset_space=str(opts["coreset_space"]),
            weighted=bool(opts["weighted"]),
        ),
        device=str(opts["device"]),
        data_dir=str(opts["data_dir"]) if opts["data_dir"] else None,
        out=str(opts["out"]),
        experiment=str(opts["experiment"]) if opts["experiment"] else None,
        log_models=bool(opts["log_models"]),
        fail_fast=bool(opts["fail_fast"]),
        workers=int(opts["workers"]),  # type: ignore[arg-type]
        resume=bool(opts["resume"]),
    )
    from altrack import report, tracking

    outcome = tracking.run_grid(cfg, progress=not opts["quiet"])
    click.echo(report.format_table(outcome.rows), nl=False)
    click.echo(f"report: {cfg.out}/")
    click.echo(f"MLflow parent run: {outcome.parent_run_id}")


@cli.command("report")
@click.option("--run-id", "run_ids", multiple=True, help="A parent run of 'altrack run' (repeatable).")
@click.option("--experiment", default=None, help="Every altrack run in this experiment.")
@click.option("--out", default="results", show_default=True)
@click.option("--paper", is_flag=True, help="Write the results page beside the paper's table (docs/reproduction.md).")
@click.option("--docs", default="docs", show_default=True, help="Folder of the --paper page and its pngs.")
@click.option(
    "--notes", type=click.Path(exists=True, dir_okay=False), default=None, help="Markdown inserted into the page."
)
@click.option(
    "--setting-run-id",
    "setting_ids",
    multiple=True,
    help="--paper: a parent run of 'altrack run' on fresh seeds whose settings the page compares with the "
    "paper's 0.2/0.2, paired by seed (repeatable).",
)
@click.option(
    "--sweep-run-id", "sweep_ids", multiple=True, help="--paper: a parent run of 'altrack sweep' (repeatable)."
)
def report_cmd(
    run_ids: tuple[str, ...],
    experiment: str | None,
    out: str,
    paper: bool,
    docs: str,
    notes,
    setting_ids: tuple[str, ...],
    sweep_ids: tuple[str, ...],
) -> None:
    """Rebuild the png and txt from the MLflow runs of parent runs or an experiment."""
    from altrack import tracking

    run_ids = tuple(r for r in run_ids if r)
    if not run_ids and not experiment:
        raise click.UsageError("give --run-id or --experiment")
    for folder, option in ((out, "--out"), (docs, "--docs")):
        if not writable_dir_target(Path(folder)):
            raise AltrackError(f"{option} {folder!r} is not a writable directory")
    if (setting_ids or sweep_ids) and not paper:
        raise click.UsageError("--setting-run-id and --sweep-run-id need --paper")
    if paper:
        text = Path(notes).read_text() if notes else None
        page = tracking.paper_page(run_ids, experiment or None, docs, text, setting_ids, sweep_ids)
        click.echo(f"wrote {page}")
        return
    if len(run_ids) > 1:
        raise click.UsageError("several --run-id values need --paper")
    paths = tracking.rebuild_report(run_ids[0] if run_ids else None, experiment or None, out)
    click.echo(paths[-1].parent.joinpath("active_learning_results.txt").read_text(), nl=False)
    click.echo(f"report in {out}/")


@cli.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@click.option(
    "--n-trials", type=int, default=None, help="Total COMPLETE trials of the study; 0 or unset: the spec's n_trials."
)
@click.option("--storage", default=None, help="Optuna storage URL or journal file [default: altrack-optuna.journal].")
@click.option("--study-name", default=None, help="[default: the spec's study_name]")
@click.option("--workers", default=1, show_default=True, help="Processes on this machine sharing the storage.")
@click.option("--experiment", default=None, help="MLflow experiment [default: the spec's, else altrack].")
@click.option("--data-dir", default=None, help="Dataset folder [default: $ALTRACK_DATA_DIR or ~/.cache/altrack/data].")
@click.option(
    "--cache-dir", default=None, help="Seed-model cache [default: $ALTRACK_CACHE_DIR or ~/.cache/altrack/seed-stages]."
)
def sweep(spec_path: str, n_trials, storage, study_name, workers, experiment, data_dir, cache_dir) -> None:
    """Optuna study over cluster_ratio, seed_ratio and lam; resumes when re-run."""
    from altrack import sweep as sweeps

    spec = sweeps.load_spec(spec_path)
    outcome = sweeps.run_sweep(
        spec,
        n_trials=n_trials or None,
        storage=storage or None,
        study_name=study_name or None,
        workers=workers,
        experiment=experiment or None,
        cache_dir=cache_dir or None,
        data_dir=data_dir or None,
    )
    click.echo(sweeps.describe(outcome))


@cli.command()
@click.argument("run_id")
@click.option("--data-dir", default=None, help="Dataset folder [default: $ALTRACK_DATA_DIR or ~/.cache/altrack/data].")
@click.option("--device", type=click.Choice(DEVICES), default=None, help="[default: the run's device]")
def replay(run_id: str, data_dir: str | None, device: str | None) -> None:
    """Retrain a run's final model from its logged config and selected indices, and compare."""
    from altrack import tracking

    outcome = tracking.replay(run_id, data_dir or None, device)
    verdict = "equal" if outcome.equal else "NOT equal"
    click.echo(
        f"logged test accuracy {outcome.logged_accuracy:.6f}, replayed {outcome.replayed_accuracy:.6f}: {verdict}"
    )
    click.echo(f"MLflow replay run: {outcome.replay_run_id} (tag altrack.replay_of={run_id})")
    if not outcome.equal:
        raise AltrackError("the replayed accuracy differs (another device, torch version or MKL mode?)")


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for bad input, 1 for failures; errors are one line."""
    try:
        cli.main(args=argv, prog_name="altrack", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("altrack: aborted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"altrack: error: {exc.format_message()}", err=True)
        return 2
    except ConfigError as exc:  # bad input
        click.echo(f"altrack: error: {exc}", err=True)
        return 2
    except AltrackError as exc:
        click.echo(f"altrack: error: {exc}", err=True)
        return 1
    except MlflowException as exc:  # e.g. a deleted experiment, an unknown run
        click.echo(f"altrack: error: MLflow: {first_line(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("altrack: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

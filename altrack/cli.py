"""The ``altrack`` command: a thin click shell over ``grid``, ``sweep``, ``replay`` and ``paper``.

Every user error ends as one line on stderr and a non-zero exit, with no traceback. Only click
and the light ``settings`` module load up front; each command imports its engine (torch, MLflow,
Optuna) when it runs, so ``--help`` and refusals of bad options stay quick.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from altrack.catalog import METHODS
from altrack.errors import AltrackError, ConfigError, first_line
from altrack.redaction import redact
from altrack.settings import CORESET_SPACES, DEVICES, SETTINGS_RULES, Settings, parse_lam

ALL = "all"
DATA_HELP = "Dataset folder [default: $ALTRACK_DATA_DIR or ~/.cache/altrack/data]."


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _methods(value: str) -> tuple[str, ...]:
    """The methods of ``--methods``: ``all`` stands for every method, alone or in a list
    (``all,random`` is every method once); other names are checked by ``GridConfig``."""
    parts = _split(value)
    if ALL not in parts:
        return parts
    return (*METHODS, *(part for part in parts if part != ALL and part not in METHODS))


def _budgets(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _split(value))
    except ValueError:
        raise click.BadParameter(f"budgets must be integers, got {value!r}", param_hint="--budget") from None


def _lam(ctx: click.Context, param: click.Parameter, value: str) -> float | str:
    try:
        return parse_lam(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("lam "), param_hint="--lam") from None


def _blank_is_none(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``mlflow run`` passes unset string parameters as ''."""
    return value or None


def data_dir_option(f: Callable) -> Callable:
    return click.option("--data-dir", default=None, callback=_blank_is_none, help=DATA_HELP)(f)


def experiment_option(help: str) -> Callable[[Callable], Callable]:
    return click.option("--experiment", default=None, callback=_blank_is_none, help=help)


def device_option(default: str | None, help: str | None = None) -> Callable[[Callable], Callable]:
    return click.option(
        "--device", type=click.Choice(DEVICES), default=default, show_default=default is not None, help=help
    )


SLURM_FLAGS = ("partition", "time_limit", "cpus_per_task", "gpus_per_task", "mem_gb", "array_parallelism",
               "blocks_per_task", "slurm_log_dir", "sbatch", "shared_filesystem")  # fmt: skip


def slurm_options(command: str) -> Callable[[Callable], Callable]:
    """``--executor`` and the Slurm knobs of ``command`` (``run`` or ``sweep``; altrack.slurm):
    ``--blocks-per-task`` is ``run``'s alone, ``--shared-filesystem`` ``sweep``'s alone."""
    only = {"--blocks-per-task": "run", "--shared-filesystem": "sweep"}
    options = {  # flag: click.option's arguments
        "--executor": dict(type=click.Choice(("local", "slurm")), default="local", show_default=True,
             help="local: processes on this machine; slurm: Slurm jobs through submitit."),
        "--executor-config": dict(type=click.Path(dir_okay=False), default=None,
             help="YAML file of the Slurm settings below, named as the flags (time_limit for "
                  "--time-limit; log_dir for --slurm-log-dir); flags override it."),
        "--partition": dict(default=None, help="Slurm partition [default: the cluster's]."),
        "--time-limit": dict(type=int, default=None, help="Minutes per Slurm job [default: 60]."),
        "--cpus-per-task": dict(type=int, default=None, help="Cores per Slurm job [default: 2]."),
        "--gpus-per-task": dict(type=int, default=None, help="GPUs per Slurm job [default: 0]."),
        "--mem-gb": dict(type=float, default=None, help="Memory per Slurm job [default: 8]."),
        "--array-parallelism": dict(type=int, default=None,
             help="Slurm array tasks running at once [default: 32]."),
        "--blocks-per-task": dict(type=int, default=None,
             help="(dataset, k, seeds) blocks per Slurm array task [default: 1]."),
        "--slurm-log-dir": dict(default=None,
             help="Job scripts and logs, on a shared disk [default: slurm-logs]."),
        "--sbatch": dict(multiple=True, metavar="NAME=VALUE", help="Extra sbatch option (repeatable)."),
        "--shared-filesystem": dict(is_flag=True, default=None,
             help="The storage file is on a disk every node sees (journal or SQLite on Slurm)."),
    }  # fmt: skip

    def decorate(f: Callable) -> Callable:
        for flag, arguments in reversed(options.items()):
            if only.get(flag, command) == command:
                f = click.option(flag, **arguments)(f)
        return f

    return decorate


def _slurm_config(opts: dict, executor: str) -> object:
    """The ``SlurmConfig`` from ``--executor-config`` and the Slurm flags, popped from ``opts``.
    Slurm settings without ``--executor slurm`` are refused rather than silently ignored."""
    from altrack.slurm import load_slurm_config  # lazy: keeps --help quick

    path = opts.pop("executor_config")
    values = {name: opts.pop(name, None) for name in SLURM_FLAGS}  # a flag the command lacks: unset
    values["log_dir"] = values.pop("slurm_log_dir")
    given = [name for name, value in values.items() if value not in (None, ())]
    if executor != "slurm" and (given or path):
        flag = "slurm_log_dir" if given and given[0] == "log_dir" else (given[0] if given else "")
        option = "--executor-config" if path else "--" + flag.replace("_", "-")
        raise click.UsageError(f"{option} needs --executor slurm")
    return load_slurm_config(path, values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="altrack")
def cli() -> None:
    """Data selection and active learning experiments, tracked in MLflow."""


@cli.command()
@click.option("--datasets", default="mnist", show_default=True, help="Comma list: mnist, fashion_mnist, cifar10.")
@click.option("--methods", default=ALL, show_default=True, help="Comma list of selection methods, or 'all'.")
@click.option("--budget", "budgets", default="2000", show_default=True, callback=_budgets,
              help="Label budget k, or a comma list.")  # fmt: skip
@click.option("--runs", type=int, default=1, show_default=True, help="Seeds per (dataset, k): seed, seed+1, ...")
@click.option("--seed", type=int, default=0, show_default=True, help="First seed.")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed-ratio", type=float, default=0.2, show_default=True, help="k'/k, the random seed set.")
@click.option("--cluster-ratio", type=float, default=0.2, show_default=True,
              help="k''/k, the coreset's k-means clusters.")  # fmt: skip
@click.option("--lam", default="auto", show_default=True, callback=_lam,
              help="Coreset Holder constant: auto, lemma8, auto*F, lemma8*F or a number.")  # fmt: skip
@click.option("--coreset-space", type=click.Choice(CORESET_SPACES), default="embedding", show_default=True)
@click.option("--weighted/--unweighted", default=False, show_default=True, help="Retrain with coreset weights.")
@device_option("auto")
@data_dir_option
@click.option("--out", default="results", show_default=True, help="Folder for the png, txt and csv report.")
@experiment_option("MLflow experiment [default: altrack].")
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
@click.option("--workers", type=int, default=1, show_default=True, help="Processes running (dataset, k, seed) groups.")
@click.option("--stack", type=int, default=0, show_default=True,
              help="Models trained together at most (0: 64 on a GPU, CifarNet 35; 16 on a CPU, CifarNet 1). "
                   "On CUDA every stack is padded to this width (lowered only by --memory-cap), which a run's "
                   "bits depend on: it is logged as stack_width and is part of the resume key.")  # fmt: skip
@click.option("--memory-cap", type=float, default=None,
              help="GiB the stacked models may take; on CUDA it lowers the width, and so the bits [default: "
                   "on a CPU a quarter of the available memory, a Slurm job's or container's cgroup limit counted; "
                   "on CUDA none, a card too small refused].")  # fmt: skip
@click.option("--system-metrics", is_flag=True,
              help="MLflow samples CPU, memory (and GPU) use into the parent run (needs psutil).")  # fmt: skip
@slurm_options("run")
@click.option("--detach", is_flag=True, help="slurm: submit, print the parent run id and return.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(datasets: str, methods: str, quiet: bool, **opts: object) -> None:
    """Run the §5.2.2 protocol over datasets x budgets x seeds x methods."""
    from altrack.config import GridConfig  # lazy, and light: bad input is refused before torch loads

    settings = Settings(**{name: opts.pop(name) for name in SETTINGS_RULES})  # type: ignore[arg-type]
    slurm = _slurm_config(opts, str(opts["executor"]))
    cfg = GridConfig(datasets=_split(datasets), methods=_methods(methods), settings=settings, slurm=slurm, **opts)  # type: ignore[arg-type]
    from altrack.data import load_in_background  # lazy: torch, matplotlib and MLflow load only for a real run

    # the datasets load while MLflow imports; a process that hands blocks to workers does not keep them
    loading = load_in_background(cfg.datasets, cfg.data_dir, cfg.device) if cfg.trains_here else None
    from altrack import report  # lazy, as above: MLflow's import (3-4 s) while the datasets load
    from altrack.grid import run_grid

    if loading is not None:
        loading.join()
    _settle_imports()
    outcome = run_grid(cfg, progress=not quiet, say=click.echo)
    if cfg.detach:
        click.echo(f"MLflow parent run: {outcome.parent_run_id}")
        return
    click.echo(report.format_table(outcome.rows, outcome.resumed), nl=False)
    click.echo(f"report: {cfg.out}/")
    click.echo(f"MLflow parent run: {outcome.parent_run_id}")


@cli.command("report")
@click.option("--run-id", "run_ids", multiple=True, help="A parent run of 'altrack run' (repeatable).")
@experiment_option("Every altrack run in this experiment.")
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
@click.option("--ablation-run-id", "ablation_ids", multiple=True,
              help="--paper: a parent run of 'altrack run' of coreset under one lam (repeatable).")  # fmt: skip
def report_cmd(
    run_ids: tuple[str, ...],
    experiment: str | None,
    out: str,
    paper: bool,
    docs: str,
    notes: str | None,
    setting_ids: tuple[str, ...],
    sweep_ids: tuple[str, ...],
    ablation_ids: tuple[str, ...],
) -> None:
    """Rebuild the png and txt from the MLflow runs of parent runs or an experiment."""
    from altrack.config import writable_dir_target  # lazy: the config imports torch

    run_ids = tuple(r for r in run_ids if r)
    if not run_ids and not experiment:
        raise click.UsageError("give --run-id or --experiment")
    if run_ids and experiment:  # a run's own experiment is known; another would be ignored
        raise click.UsageError("give --run-id or --experiment, not both")
    for folder, option in ((out, "--out"), (docs, "--docs")):
        if not writable_dir_target(Path(folder)):
            raise ConfigError(f"{option} {folder!r} is not a writable directory")  # bad input: 2, as run's
    if (setting_ids or sweep_ids or ablation_ids) and not paper:
        raise click.UsageError("--setting-run-id, --sweep-run-id and --ablation-run-id need --paper")
    from altrack.tracking.runs import check_tracking_store  # lazy: MLflow

    check_tracking_store(existing=True)  # in seconds, where MLflow would retry a server for minutes
    if paper:
        from altrack.paper import paper_page  # lazy: MLflow

        text = Path(notes).read_text() if notes else None
        page = paper_page(run_ids, experiment, docs, text, setting_ids, sweep_ids, ablation_ids)
        click.echo(f"wrote {page}")
        return
    if len(run_ids) > 1:
        raise click.UsageError("several --run-id values need --paper")
    from altrack.grid import rebuild_report  # lazy: MLflow

    paths = rebuild_report(run_ids[0] if run_ids else None, experiment, out)
    click.echo(paths[-1].parent.joinpath("active_learning_results.txt").read_text(), nl=False)
    click.echo(f"report in {out}/")


@cli.command()
@click.argument("spec_path", metavar="SPEC.yaml")
@click.option(
    "--n-trials", type=int, default=None, help="Total COMPLETE trials of the study; 0 or unset: the spec's n_trials."
)
@click.option("--storage", default=None, callback=_blank_is_none,
              help="Optuna storage URL or journal file [default: altrack-optuna.journal].")  # fmt: skip
@click.option("--study-name", default=None, callback=_blank_is_none, help="[default: the spec's study_name]")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes sharing the storage: on this machine, or Slurm jobs with --executor slurm.")  # fmt: skip
@experiment_option("MLflow experiment [default: the spec's, else altrack].")
@data_dir_option
@click.option("--cache-dir", default=None, callback=_blank_is_none,
              help="Seed-model cache [default: $ALTRACK_CACHE_DIR or ~/.cache/altrack/seed-stages].")  # fmt: skip
@click.option("--new-study", is_flag=True,
              help="The study name exists with another spec: go on in NAME-2 (-3, ...), the first made from "
                   "this spec, else a new one.")  # fmt: skip
@slurm_options("sweep")
def sweep(
    spec_path: str,
    n_trials: int | None,
    storage: str | None,
    study_name: str | None,
    workers: int,
    experiment: str | None,
    data_dir: str | None,
    cache_dir: str | None,
    new_study: bool,
    executor: str,
    **opts: object,
) -> None:
    """Optuna study over cluster_ratio, seed_ratio and lam; resumes when re-run."""
    slurm = _slurm_config(opts, executor)
    from altrack.sweep.spec import load_spec  # lazy, and light: a bad spec is refused before torch loads

    spec = load_spec(spec_path)
    from altrack.sweep.run import describe, run_sweep  # lazy: Optuna, MLflow and torch

    _settle_imports()
    outcome = run_sweep(
        spec,
        n_trials=n_trials or None,
        storage=storage,
        study_name=study_name,
        workers=workers,
        experiment=experiment,
        cache_dir=cache_dir,
        data_dir=data_dir,
        slurm=slurm if executor == "slurm" else None,
        new_study=new_study,
    )
    click.echo(describe(outcome))


@cli.command()
@click.argument("run_id")
@data_dir_option
@device_option(None, "[default: the run's device]")
def replay(run_id: str, data_dir: str | None, device: str | None) -> None:
    """Retrain a run's final model from its logged config and selected indices, and compare."""
    from altrack.replay import replay as replay_run  # lazy: MLflow and torch

    outcome = replay_run(run_id, data_dir, device)
    verdict = "equal" if outcome.equal else "NOT equal"
    click.echo(
        f"logged test accuracy {outcome.logged_accuracy:.6f}, replayed {outcome.replayed_accuracy:.6f}: {verdict}"
    )
    click.echo(f"MLflow replay run: {outcome.replay_run_id} (tag altrack.replay_of={run_id})")
    if not outcome.equal:
        raise AltrackError("the replayed accuracy differs (another device, torch version or MKL mode?)")


@cli.group()
def cache() -> None:
    """The seed-stage cache of sweeps: its size, and clearing it."""


CACHE_DIR_OPTION = click.option("--cache-dir", default=None, callback=_blank_is_none,
                                help="[default: $ALTRACK_CACHE_DIR or ~/.cache/altrack/seed-stages]")  # fmt: skip


def _cache_folder(cache_dir: str | None) -> Path:
    """The cache folder of ``--cache-dir``, else ``$ALTRACK_CACHE_DIR`` or the default; a file
    there is refused (``ConfigError``) rather than reported as an empty cache."""
    from altrack.cache import default_cache_dir  # lazy: torch

    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    if folder.exists() and not folder.is_dir():
        env = "$ALTRACK_CACHE_DIR" if os.environ.get("ALTRACK_CACHE_DIR") else "the cache"
        source = "--cache-dir" if cache_dir else env
        raise ConfigError(f"{source} {str(folder)!r} is a file, not a folder")
    return folder


@cache.command("info")
@CACHE_DIR_OPTION
def cache_info_cmd(cache_dir: str | None) -> None:
    """Where the cache is, how many seed stages it holds, their size and the cap."""
    from altrack.cache import cache_info, max_bytes  # lazy: torch

    folder = _cache_folder(cache_dir)
    n, size = cache_info(folder)
    click.echo(f"{folder}: {n} seed stages, {size / 1e9:.2f} GB of {max_bytes() / 1e9:.2f} GB "
               "(ALTRACK_CACHE_MAX_GB; least recently used go first)")  # fmt: skip


@cache.command("clear")
@CACHE_DIR_OPTION
def cache_clear_cmd(cache_dir: str | None) -> None:
    """Delete every cached seed stage (sweeps retrain them when needed)."""
    from altrack.cache import clear  # lazy: torch

    folder = _cache_folder(cache_dir)
    click.echo(f"{folder}: removed {clear(folder)} seed stages")


def _mlflow_error(exc: BaseException) -> bool:
    """Whether ``exc`` is MLflow's, without importing MLflow when it was never loaded."""
    module = sys.modules.get("mlflow.exceptions")
    return module is not None and isinstance(exc, module.MlflowException)


def _settle_imports() -> None:
    """Leave the objects of the modules imported so far (torch, MLflow, matplotlib: about 350,000)
    out of the garbage collector's passes from now on (``gc.freeze``). They live until the
    process ends, yet every full collection walked them again (1.3 s over eight in the README's
    main job) and so did the collections at exit (about 2 s after the last line was printed, on
    the 2-core Xeon). Whatever is made later is collected as before. Once per process, after a
    collection: a later freeze would also keep whatever a caller holds then (tests call ``main``
    many times in one process), and cyclic garbage among it would never be freed."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 for bad input, 1 for failures; errors are one line."""
    # MLflow's own chatter: a progress bar per artifact download, and a "View run at URL" line per
    # run on a server (the URL may carry credentials); altrack prints the parent run id itself.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    try:
        cli.main(args=argv, prog_name="altrack", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `altrack`, `altrack cache`: the help, not an "error"
        click.echo(exc.format_message(), err=True)
        return 2
    except click.exceptions.Abort as exc:  # click turns Ctrl-C into Abort
        click.echo("altrack: interrupted" if isinstance(exc.__cause__, KeyboardInterrupt) else "altrack: aborted",
                   err=True)  # fmt: skip
        return 130
    except click.ClickException as exc:
        click.echo(f"altrack: error: {redact(exc.format_message())}", err=True)
        return 2
    except ConfigError as exc:  # bad input
        click.echo(f"altrack: error: {redact(str(exc))}", err=True)
        return 2
    except AltrackError as exc:
        click.echo(f"altrack: error: {redact(str(exc))}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("altrack: interrupted", err=True)
        return 130
    except Exception as exc:
        if not _mlflow_error(exc):  # e.g. a deleted experiment, an unknown run
            raise
        click.echo(f"altrack: error: MLflow: {redact(first_line(exc))}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

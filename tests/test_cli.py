"""The CLI as a user meets it: one-line errors with nothing written, and a real run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from altrack.cli import main

TINY = ["--budget", "100", "--epochs", "1", "--device", "cpu", "--no-log-models", "--quiet"]


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_refused(code, err, expected, cwd: Path):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("altrack: error:"), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not any(cwd.iterdir()), f"something was written: {list(cwd.iterdir())}"


BAD_INPUT = [
    (["--datasets", "imagenet"], "unknown dataset 'imagenet'"),
    (["--methods", "badge"], "unknown method 'badge'"),
    (["--budget", "0"], "budget k must be >= 1"),
    (["--budget", "60001"], "larger than the mnist train split"),
    (["--budget", "abc"], "budgets must be integers"),
    (["--seed-ratio", "1.5"], "seed_ratio must be in (0, 1)"),
    (["--cluster-ratio", "0"], "cluster_ratio must be in (0, 1)"),
    (["--seed-ratio", "0.6", "--cluster-ratio", "0.5"], "seed_ratio + cluster_ratio must be < 1"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "0"], "batch size must be >= 1"),
    (["--lam", "big"], "--lam: must be 'auto', 'lemma8', 'auto*F', 'lemma8*F' (0 < F <= 1e12) or a number in"),
    (["--lam", "1e308"], "--lam: must be"),
    (["--lam", "auto*1e300"], "--lam: must be"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--runs", "1000000000000"], "runs in one invocation"),
    (["--lam", "-1"], "--lam: must be"),
    (["--lam", "nan"], "--lam: must be"),
    (["--lam", "inf"], "--lam: must be"),
    (["--lam", "lemma9"], "--lam: must be"),
    (["--lam", "auto*0"], "--lam: must be"),
    (["--runs", "x"], "'x' is not a valid integer"),
    (["--data-dir", "/nonexistent/x"], "data folder /nonexistent/x does not exist"),
    (["--partition", "gpu"], "--partition needs --executor slurm"),
    (["--methods", "all,badge"], "unknown method 'badge'"),
    (["--methods", "margin,random,margin"], "method 'margin' is listed twice"),
    (["--shared-filesystem"], "No such option '--shared-filesystem'"),
    pytest.param(["--device", "cuda"], "--device cuda: this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    pytest.param(["--device", "mps"], "--device mps: this machine has no MPS device",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    (["--memory-cap", "0"], "memory_cap must be a positive number of GiB, got 0.0"),
    (["--memory-cap", "nan"], "memory_cap must be a positive number of GiB, got nan"),
    (["--stack", "-1"], "stack must be >= 0, got -1"),
]


@pytest.mark.parametrize(
    ("args", "expected"), BAD_INPUT, ids=["=".join(getattr(a, "values", a)[0][:2]) for a in BAD_INPUT]
)
def test_bad_input_is_one_line_and_writes_nothing(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _run_cli(["run", *args], capsys)
    _assert_refused(code, err, expected, tmp_path)


def test_a_memory_cap_that_cannot_hold_one_model_is_one_line(data_dir, capsys, tmp_path, monkeypatch):
    """Refused once the data says what a model takes, before the store or a run is made."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _run_cli(["run", "--memory-cap", "0.001", "--data-dir", str(data_dir)], capsys)
    _assert_refused(code, err, "memory cap 1.0 MiB cannot hold one mnist model (about", tmp_path)


REPORT_BAD_INPUT = [
    (["--setting-run-id", "abc"], "give --run-id or --experiment"),
    (["--run-id", "abc", "--sweep-run-id", "def"], "--sweep-run-id and --ablation-run-id need --paper"),
    (["--run-id", "abc", "--experiment", "def"], "give --run-id or --experiment, not both"),
    (["--experiment", "x", "--out", "/dev/null/x"], "--out '/dev/null/x' is not a writable directory"),
]


@pytest.mark.parametrize(("args", "expected"), REPORT_BAD_INPUT,
                         ids=["no-run-id", "sweep-without-paper", "both", "out"])  # fmt: skip
def test_bad_report_input_is_one_line_and_writes_nothing(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _run_cli(["report", *args], capsys)
    _assert_refused(code, err, expected, tmp_path)


def test_all_in_a_list_of_methods_is_every_method_once():
    from altrack.catalog import METHODS
    from altrack.cli import _methods

    assert _methods("all") == METHODS == _methods("all,random") == _methods("random, all")
    assert _methods("all,badge") == (*METHODS, "badge")  # left for GridConfig to refuse
    assert _methods("margin,random") == ("margin", "random")


def test_each_command_lists_only_its_own_slurm_flags(capsys):
    """``--blocks-per-task`` splits a grid's blocks, ``--shared-filesystem`` is about a sweep's
    storage file: each command offers the one it reads (a sweep given blocks is refused)."""
    assert main(["run", "--help"]) == 0
    run_help = capsys.readouterr().out
    assert main(["sweep", "--help"]) == 0
    sweep_help = capsys.readouterr().out
    assert "--blocks-per-task" in run_help and "--shared-filesystem" not in run_help
    assert "--shared-filesystem" in sweep_help and "--blocks-per-task" not in sweep_help
    code, _, err = _run_cli(["sweep", "x.yaml", "--blocks-per-task", "2"], capsys)
    assert code == 2 and "No such option '--blocks-per-task'" in err


@pytest.mark.parametrize("where", ["flag", "env"])
def test_cache_commands_refuse_a_file_for_the_folder(where, capsys, tmp_path, monkeypatch):
    """A file where the cache folder should be is named, not reported as an empty cache."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    args = ["--cache-dir", str(blocker)] if where == "flag" else []
    if where == "env":
        monkeypatch.setenv("ALTRACK_CACHE_DIR", str(blocker))
    for command in ("info", "clear"):
        code, out, err = _run_cli(["cache", command, *args], capsys)
        assert code == 2 and not out, err
        source = "--cache-dir" if where == "flag" else "$ALTRACK_CACHE_DIR"
        assert err.strip() == f"altrack: error: {source} {str(blocker)!r} is a file, not a folder"
    assert blocker.read_text() == "a file, not a folder"


def test_a_data_folder_that_is_a_file_is_named_so(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "README.md").write_text("a file")
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, _, err = _run_cli(["run", "--data-dir", str(tmp_path / "README.md"), *TINY], capsys)
    _assert_refused(code, err, f"data folder {tmp_path / 'README.md'} is a file, not a folder", work)


@pytest.mark.parametrize("args", [[], ["cache"]], ids=["altrack", "altrack-cache"])
def test_a_group_without_its_command_prints_its_help_not_an_error(args, capsys):
    code, out, err = _run_cli(args, capsys)
    assert code == 2 and not out and err.startswith("Usage: altrack") and "error" not in err


def test_unwritable_out_is_refused(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")
    monkeypatch.chdir(work)
    code, _, err = _run_cli(["run", "--out", str(tmp_path / "blocker" / "results")], capsys)
    _assert_refused(code, err, "is not a writable directory", work)


def test_progress_written_to_a_log_is_a_few_lines_without_cursor_moves(data_dir, mlflow_store, capsys):
    """A run written to a file (``nohup``, a batch job) keeps its runs bar, updated now and then,
    and leaves out the nested epochs bar, whose cursor moves read as ``[A`` escapes there."""
    args = [a for a in TINY if a != "--quiet"]
    code, _, err = _run_cli(["run", "--data-dir", str(data_dir), "--methods", "random,kcenter", "--runs", "2", *args],
                            capsys)  # fmt: skip
    assert code == 0, err
    assert "runs: 100%" in err and "\x1b[A" not in err and "ep/s" not in err and "s/ep" not in err


def test_missing_data_offline_says_where_the_files_go(capsys, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "nodata").mkdir()  # an empty folder; one that does not exist is refused (BAD_INPUT)
    code, _, err = _run_cli(["run", "--data-dir", str(tmp_path / "nodata"), *TINY], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "MNIST/raw/" in err and "train-images-idx3-ubyte.gz" in err and "--data-dir" in err
    assert not any(work.iterdir())
    assert not any((tmp_path / "nodata").iterdir())  # no empty MNIST/raw left behind by the failed download


def test_corrupt_archive_names_the_file_and_its_md5(data_dir, capsys, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir / "MNIST" / "raw", broken / "MNIST" / "raw", ignore=shutil.ignore_patterns("*ubyte"))
    archive = broken / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:100])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = _run_cli(["run", "--data-dir", str(broken), *TINY], capsys)
    assert code == 1
    assert str(archive) in err and "ec29112dd5afa0611ce80d1b7f02629c" in err
    assert not any(work.iterdir())


def test_run_and_report_commands(data_dir, mlflow_store, capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = _run_cli(
        ["run", "--methods", "margin,random", "--runs", "2", "--data-dir", str(data_dir), "--out", str(out), *TINY],
        capsys,
    )
    assert code == 0
    assert "margin" in stdout and (out / "active_learning_results.png").exists()
    assert stdout.strip().splitlines()[-1].startswith("MLflow parent run: ")
    parent_id = stdout.strip().splitlines()[-1].split()[-1]
    assert MlflowClient().get_run(parent_id).info.status == "FINISHED"

    code, stdout, _ = _run_cli(["report", "--run-id", parent_id, "--out", str(tmp_path / "again")], capsys)
    assert code == 0
    again = tmp_path / "again" / "active_learning_results.txt"
    assert (out / "active_learning_results.txt").read_text() == again.read_text()
    code, _, err = _run_cli(["report", "--run-id", "nope"], capsys)
    assert code == 1 and "no MLflow run with id 'nope'" in err
    code, _, err = _run_cli(["replay", parent_id], capsys)  # the parent, not one of its runs
    assert code == 1 and f"run {parent_id} is a grid's parent: give one of its runs" in err


@pytest.mark.parametrize("args", [["report", "--run-id", "abc"], ["report", "--experiment", "x"], ["replay", "abc"]],
                         ids=["report-run", "report-experiment", "replay"])  # fmt: skip
def test_commands_that_read_runs_never_create_a_store(args, capsys, tmp_path, monkeypatch):
    """Run from a folder without the grid's mlflow.db, a report or a replay created an empty store
    there, then said the run was unknown."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # as a new process: MLflow's default store
    code, _, err = _run_cli(args, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert "no MLflow store at sqlite:" in err and f"{tmp_path / 'mlflow.db'} does not exist" in err
    assert not any(tmp_path.iterdir())


def test_report_of_an_experiment_keeps_each_setting_apart(data_dir, mlflow_store, capsys, tmp_path):
    """Two grids of one experiment under two cluster ratios, then a third under another lr: the
    experiment's report counted one coreset run per seed (the other dropped, unsaid) and pooled
    the lr grid's seeds with the others. Each setting of the knobs a method reads is now a row
    of its own; random, which reads no cluster ratio, stays one row."""
    base = ["run", "--methods", "coreset,random", "--data-dir", str(data_dir), "--experiment", "mixed", *TINY]
    for extra in (["--cluster-ratio", "0.2"], ["--cluster-ratio", "0.3"]):
        assert _run_cli([*base, *extra, "--out", str(tmp_path / "grid")], capsys)[0] == 0
    code, stdout, _ = _run_cli(["report", "--experiment", "mixed", "--out", str(tmp_path / "all")], capsys)
    assert code == 0
    rows = {line.split()[0] + (" " + line.split()[1] if "(" in line else ""): line.split()
            for line in stdout.splitlines() if line.startswith("  ") and "method" not in line}
    assert set(rows) == {"coreset (cluster_ratio=0.2)", "coreset (cluster_ratio=0.3)", "random"}, stdout
    assert rows["random"][-1] == "1"  # one seed: the two grids' random runs are one computation

    assert _run_cli([*base, "--lr", "0.01", "--out", str(tmp_path / "grid")], capsys)[0] == 0
    code, stdout, _ = _run_cli(["report", "--experiment", "mixed", "--out", str(tmp_path / "all")], capsys)
    assert code == 0 and "random (lr=0.01)" in stdout and "random (lr=0.001)" in stdout, stdout


def test_a_store_mlflow_cannot_use_is_named_so(capsys, tmp_path, monkeypatch):
    """A scheme MLflow has no store for is not "unreachable": it cannot be used, and MLflow says why."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    mlflow.set_tracking_uri("bogus://x")
    try:
        code, _, err = _run_cli(["report", "--experiment", "x"], capsys)
    finally:
        mlflow.set_tracking_uri(None)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("altrack: error: MLflow tracking store bogus://x cannot be used: ")
    assert "unreachable" not in err
    assert not any(tmp_path.iterdir())


def test_a_long_error_is_cut_at_a_word_and_says_so():
    from altrack.errors import first_line

    words = " ".join(["word"] * 60)  # 299 characters: a space at every fifth
    assert first_line(ValueError(words), limit=200) == " ".join(["word"] * 40) + " …"  # the cut on a space
    assert first_line(ValueError(words), limit=202) == " ".join(["word"] * 40) + " …"  # inside a word
    assert first_line(ValueError("short\nsecond line")) == "short" and first_line(ValueError()) == "ValueError"


def test_console_script_has_no_traceback_on_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "altrack", "run", "--methods", "badge"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("altrack: error: unknown method 'badge'")
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())

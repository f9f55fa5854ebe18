from __future__ import annotations

import importlib.util
import io
import logging
import re
import socket
import subprocess
import textwrap
import time

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from optuna.trial import TrialState

from altrack.cli import main
from altrack.errors import AltrackError, ConfigError
from altrack.liveness import worker_id
from altrack.paper import sweep_summary
from altrack.replay import replay
from altrack.sweep import describe, load_spec, open_storage, run_sweep
from altrack.sweep import run as sweep_run
from altrack.sweep.spec import MLFLOW_PARAM_CHARS
from altrack.sweep.study import enqueue_retry, make_sampler, retry_stopped_workers
from altrack.sweep.worker import quiet_optuna
from altrack.tracking.runs import INTERRUPTED
from altrack.tracking.tags import BASELINE_ATTR, INTERRUPTED_ATTR, RETRY_OF_ATTR, RUN_ATTR, WORKER_ATTR

TINY_SPEC = """\
study_name: tiny
dataset: mnist
method: coreset
budget: 100
epochs: 1
seeds_per_trial: 1
n_trials: 3
sampler: random
search_space:
  cluster_ratio: {low: 0.1, high: 0.3}
  seed_ratio: {low: 0.1, high: 0.3}
"""


def _spec(tmp_path, text=TINY_SPEC, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TINY_SPEC + "colour: blue\n", "unknown key 'colour'"),
        (TINY_SPEC.replace("high: 0.3}\n  seed", "high: 0.05}\n  seed"), "search_space.cluster_ratio: low (0.1)"),
        (TINY_SPEC.replace("method: coreset", "method: badge"), "unknown method 'badge'"),
        (TINY_SPEC.replace("sampler: random", "sampler: cmaes"), "unknown sampler 'cmaes'"),
        (TINY_SPEC + "  momentum: {low: 0.1, high: 0.9}\n", "unknown key 'search_space.momentum'"),
        (TINY_SPEC.replace("{low: 0.1, high: 0.3}\n  seed", "{low: 0.1, hi: 0.3}\n  seed"),
         "unknown key 'search_space.cluster_ratio.hi'"),
        (TINY_SPEC.replace("high: 0.3}\n", "high: 0.9}\n"), "seed_ratio + cluster_ratio can reach"),
        (TINY_SPEC.replace("budget: 100", "budget: 59000"), "budget 59000 exceeds the 54000 train points"),
        ("study_name: [unclosed\n", "not valid YAML"),
        ("- a list\n", "a spec must be a YAML mapping"),
        (TINY_SPEC.replace("dataset: mnist\n", ""), "missing key 'dataset'"),
        (TINY_SPEC + "sampler_seed: -1\n", "sampler_seed must be >= 0, got -1"),
        (TINY_SPEC + "experiment: 5\n", "experiment must be a string, got 5"),
        (TINY_SPEC + "log_models: 'no'\n", "log_models must be true or false"),
        (TINY_SPEC + "1: 2\n", "every key must be a string"),
        (TINY_SPEC + "budget: 200\n", "key 'budget' is given twice"),
        (TINY_SPEC + "weighted: true\n", ""),
        (TINY_SPEC.replace("method: coreset", "method: random"),
         "method random does not read cluster_ratio; search it with coreset or coreset-grad"),
        (TINY_SPEC.replace("sampler: random", "sampler: grid").replace("{low: 0.1, high: 0.3}", "{choices: [0.2]}"),
         "n_trials 3 exceeds the grid's 1 points and the paper's baseline trial"),
        (TINY_SPEC.replace("sampler: random", "sampler: grid").replace("{low: 0.1, high: 0.3}\n  seed",
                                                                        "{choices: [0.1, 0.3]}\n  seed")
         .replace("seed_ratio: {low: 0.1, high: 0.3}", "seed_ratio: {choices: [0.1]}"),
         "n_trials 3 exceeds the grid's 2 points: the grid sampler would repeat points"),  # no baseline trial
        (TINY_SPEC.replace("{low: 0.1, high: 0.3}\n  seed", "{choices: [0.1, 0.1]}\n  seed"), "choices must differ"),
        (TINY_SPEC + "lr: 1" + "0" * 400 + "\n", "lr must be a finite number > 0, got inf"),
        (TINY_SPEC.replace("seeds_per_trial: 1", "seeds_per_trial: 1500"),
         "a trial's seeds take 6389 characters, beyond the 6000 of an MLflow param"),
        (TINY_SPEC.replace("high: 0.3}\n  seed", "high: 1" + "0" * 400 + "}\n  seed"), "bound inf is outside (0, 1)"),
    ],
    ids=lambda value: value if len(value) < 40 else None,
)  # fmt: skip
def test_bad_specs_are_refused_naming_the_key(tmp_path, text, message):
    if not message:  # a knob every grid has works in a sweep too
        assert load_spec(_spec(tmp_path, text)).settings.weighted is True
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(_spec(tmp_path, text))


def test_the_seeds_param_bound_is_mlflows():
    """A trial logs its seeds as one param; the spec refuses a list MLflow would refuse later."""
    assert MLFLOW_PARAM_CHARS == MAX_PARAM_VAL_LENGTH


@pytest.mark.parametrize(
    ("space", "fixed", "point"),
    [("cluster_ratio: {low: 0.1, high: 0.3}\n  seed_ratio: {low: 0.1, high: 0.3}", "",
      {"cluster_ratio": 0.2, "seed_ratio": 0.2}),
     ("cluster_ratio: {low: 0.3, high: 0.5}", "", None),  # the paper's 0.2 is outside the range
     ("cluster_ratio: {choices: [0.1, 0.3]}", "", None),
     ("cluster_ratio: {low: 0.1, high: 0.3}", "seed_ratio: 0.3\n", None),  # fixed off the paper's
     ("lam: {low: 0.0, high: 2.0}", "", {})],  # lam 'auto', apart; the ratios the spec's defaults
)  # fmt: skip
def test_the_baseline_trial_is_the_papers_setting_or_none(tmp_path, space, fixed, point):
    """A study runs the paper's setting first only where its space holds it: a partial point
    was labelled the baseline while its other ratios were sampled."""
    text = TINY_SPEC.split("search_space:")[0] + fixed + "search_space:\n  " + space + "\n"
    assert load_spec(_spec(tmp_path, text)).paper_point() == point


def test_n_trials_given_on_the_command_line_is_held_to_the_grid_too(tmp_path):
    grid = (TINY_SPEC.replace("sampler: random", "sampler: grid").replace("{low: 0.1, high: 0.3}\n  seed",
                                                                          "{choices: [0.1, 0.2]}\n  seed")
            .replace("seed_ratio: {low: 0.1, high: 0.3}", "seed_ratio: {choices: [0.2]}"))  # 3 trials: fine
    with pytest.raises(ConfigError, match="n_trials 5 exceeds the grid's 2 points and the paper's baseline"):
        run_sweep(load_spec(_spec(tmp_path, grid)), n_trials=5, storage=str(tmp_path / "study.journal"))
    assert not (tmp_path / "study.journal").exists()


def test_a_retry_keeps_the_point_of_a_trial_stopped_before_it_drew_one():
    """A trial stopped before its first suggest has no params: its retry keeps the point it was
    given (the baseline's enqueued ratios, the grid sampler's grid id), as Optuna's own retry
    does; the grid's was refused for want of params, the baseline's sampled as if anything."""
    quiet_optuna()
    grid = optuna.create_study(sampler=optuna.samplers.GridSampler({"cluster_ratio": [0.1, 0.3]}, seed=0))
    stopped = grid.ask()
    enqueue_retry(grid, stopped)
    grid.tell(stopped, state=TrialState.FAIL)
    retry = grid.ask()
    value = retry.suggest_categorical("cluster_ratio", [0.1, 0.3])  # Optuna refused this without the grid id
    assert grid.trials[retry.number].system_attrs["grid_id"] == grid.trials[stopped.number].system_attrs["grid_id"]
    assert retry.user_attrs[RETRY_OF_ATTR] == stopped.number
    grid.tell(retry, 0.5)
    assert grid.ask().suggest_categorical("cluster_ratio", [0.1, 0.3]) != value  # the other point, not a repeat
    study = optuna.create_study()
    study.enqueue_trial({"cluster_ratio": 0.2}, user_attrs={BASELINE_ATTR: True})
    stopped = study.ask()
    enqueue_retry(study, stopped)
    study.tell(stopped, state=TrialState.FAIL)
    retry = study.ask()
    assert retry.suggest_float("cluster_ratio", 0.1, 0.3) == 0.2 and retry.user_attrs[BASELINE_ATTR]


def test_a_binary_or_bottomless_spec_is_refused_in_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="cannot read spec: not a text file"):
        load_spec(binary)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_spec(_spec(tmp_path, "study_name: " + "[" * 20000 + "]" * 20000 + "\n"))
    pairs = zip("abcdefgh", "bcdefghi", strict=True)
    levels = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in pairs)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + levels
    with pytest.raises(ConfigError, match=r"line 2\): aliases \(\*name\) are not allowed"):  # billion laughs
        load_spec(_spec(tmp_path, bomb + "study_name: *i\n"))


def test_bad_spec_on_the_cli_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path, TINY_SPEC + "colour: blue\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"altrack: error: {spec}: unknown key 'colour'"]
    assert not any(work.iterdir())


def test_a_deleted_experiment_is_refused_before_the_study_is_written(data_dir, mlflow_store, tmp_path):
    """MLflow refuses to log to a deleted experiment: the sweep says so before it creates its
    study (it had written the study and its baseline trial, then failed on the parent run)."""
    client = MlflowClient()
    client.delete_experiment(client.create_experiment(f"{mlflow_store}-gone"))
    storage = tmp_path / "study.journal"
    with pytest.raises(ConfigError, match=f"experiment '{mlflow_store}-gone' is deleted: restore it"):
        run_sweep(load_spec(_spec(tmp_path)), workers=1, storage=str(storage), data_dir=str(data_dir),
                  experiment=f"{mlflow_store}-gone")  # fmt: skip
    assert not storage.exists()


def test_the_shipped_specs_are_valid():
    for name in ("quick", "coreset_mnist", "coreset_fashion_mnist", "coreset_cifar10"):
        spec = load_spec(f"sweeps/{name}.yaml")
        assert {p.name for p in spec.search_space} >= {"cluster_ratio", "seed_ratio"}


def _trial_runs(parent_id):
    client = MlflowClient()
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_two_workers_finish_exactly_n_trials_and_resume(data_dir, mlflow_store, tmp_path, monkeypatch):
    # a name with a quote: the results page's summary of the study matched it in a search query
    spec = load_spec(_spec(tmp_path, TINY_SPEC.replace("study_name: tiny", "study_name: \"tiny's\"")))
    storage = str(tmp_path / "study.journal")
    common = dict(storage=storage, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    # an experiment given beside another in MLFLOW_EXPERIMENT_NAME (the fixture's): the spawned
    # workers log to the given one, under the parent
    outcome = run_sweep(spec, n_trials=3, workers=2, experiment=f"{mlflow_store}-given", **common)

    study = optuna.load_study(study_name=spec.study_name, storage=open_storage(storage))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    numbers = [t.number for t in study.trials]
    assert len(complete) == 3 == outcome.n_complete
    assert len(numbers) == len(set(numbers))
    baseline = study.trials[0]
    assert baseline.user_attrs[BASELINE_ATTR] and baseline.params == {"cluster_ratio": 0.2, "seed_ratio": 0.2}

    client = MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.tags["optuna.study"] == spec.study_name and "best_value" in parent.data.metrics
    files = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "optimization_history.png", "validation_indices.npy", "spec.yaml"} <= files
    trials = [r for r in _trial_runs(outcome.parent_run_id) if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == sorted(t.number for t in complete)
    for run in trials:
        assert {"objective", "val_accuracy", "test_accuracy", "per_seed/val_accuracy"} <= set(run.data.metrics)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "per_seed/val_accuracy")]
        assert steps == list(range(len(spec.seeds)))
        assert len(_trial_runs(run.info.run_id)) == 1  # the protocol run nests under its trial

    # resume in what a new process would be (no experiment set, none in the environment): the
    # trials still go to the parent's experiment, nested under it
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    again = run_sweep(spec, n_trials=4, workers=1, **common)  # one more, not four more
    assert len([r for r in _trial_runs(again.parent_run_id) if r.info.status == "FINISHED"]) == 4
    assert again.n_complete == 4
    study = optuna.load_study(study_name=spec.study_name, storage=open_storage(storage))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4

    summary = sweep_summary(again.parent_run_id)  # what the results page reports of a study
    values = {t.number: t.value for t in study.get_trials(states=(TrialState.COMPLETE,))}
    assert summary.n_trials == 4 and summary.best_value == again.best_value == max(values.values())
    assert summary.paper_value == values[0]
    assert summary.paper_rank == 1 + sum(v > values[0] for v in values.values())

    finished = run_sweep(spec, n_trials=4, workers=1, **common)  # nothing left: says so, opens no run
    assert finished.nothing_to_do and finished.parent_run_id == "" and "nothing to do: 4/4" in describe(finished)
    assert "best val_accuracy" in describe(finished)
    assert study.metric_names == ["val_accuracy"]
    sweeps = client.search_runs([parent.info.experiment_id], "tags.`altrack.kind` = 'sweep'")
    assert [r.info.run_id for r in sweeps] == [outcome.parent_run_id] == [again.parent_run_id]  # resumed in place

    # Ctrl-C after the last trial, before the summary (here: as the summary starts): the parent
    # ends KILLED; the same command writes the summary into it and ends it FINISHED, starting no
    # worker. It said "nothing to do" and left the parent KILLED without its summary
    def interrupted(study):
        raise KeyboardInterrupt

    publish = sweep_run.publish_sweep
    monkeypatch.setattr(sweep_run, "publish_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, n_trials=5, workers=1, **common)
    stopped = client.get_run(again.parent_run_id)
    assert stopped.info.status == "KILLED" and stopped.data.metrics["n_complete"] == 4
    monkeypatch.setattr(sweep_run, "publish_sweep", publish)
    summarised = run_sweep(spec, n_trials=5, workers=1, **common)
    assert not summarised.nothing_to_do and summarised.parent_run_id == again.parent_run_id
    closed = client.get_run(again.parent_run_id)
    assert closed.info.status == "FINISHED" and "altrack.error" not in closed.data.tags
    assert closed.data.metrics["n_complete"] == 5 and summarised.n_complete == 5
    assert run_sweep(spec, n_trials=5, workers=1, **common).nothing_to_do  # and then it has nothing to do

    # a summary that failed (or a worker's exit while another finished the study): the parent ends
    # FAILED without it, and the same command writes it (it said "nothing to do" for ever)
    def broken(study):
        raise RuntimeError("the store went away")

    monkeypatch.setattr(sweep_run, "publish_sweep", broken)
    with pytest.raises(RuntimeError, match="the store went away"):
        run_sweep(spec, n_trials=6, workers=1, **common)
    assert client.get_run(again.parent_run_id).info.status == "FAILED"
    monkeypatch.setattr(sweep_run, "publish_sweep", publish)
    rewritten = run_sweep(spec, n_trials=6, workers=1, **common)
    assert not rewritten.nothing_to_do and rewritten.n_complete == 6
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    ("url", "message"),
    [("redis://localhost/0", "Optuna storage redis://localhost/0: not a database URL this install can open"),
     ("mysql://bob:S3cret@127.0.0.1/x", "mysql://bob:***@127.0.0.1/x: not a database URL this install can open"),
     ("://bob:S3cret@x", "the Optuna storage URL does not parse"),
     ("NOTES", "Optuna storage NOTES: this file is not an Optuna journal")],
    ids=["scheme", "driver", "unparsable", "not-a-journal"],
)
def test_a_storage_optuna_cannot_open_is_refused_in_one_line(url, message, tmp_path, monkeypatch):
    """Checked before anything is written (a sweep's store and journal come after): a scheme or
    a driver SQLAlchemy lacks, a URL that does not parse (its password never echoed), and a file
    that is not a journal gave tracebacks from deep in Optuna."""
    from altrack.sweep.study import check_storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTES").write_text("# not a journal\n")
    if url.startswith("mysql") and importlib.util.find_spec("MySQLdb") is not None:
        pytest.skip("this install has the MySQL driver")
    with pytest.raises(ConfigError) as caught:
        check_storage(url)
    assert message in str(caught.value) and "S3cret" not in str(caught.value)
    assert check_storage(str(tmp_path / "new.journal")) and (tmp_path / "NOTES").read_text() == "# not a journal\n"


def test_a_resumed_study_whose_best_moved_finishes_in_its_parent(data_dir, mlflow_store, tmp_path, capsys):
    """A resume goes on in the earlier parent, where the best setting was logged already. As
    params, a new best was refused by MLflow ("Changing param values is not allowed") and left
    the parent FAILED with the old best; as metrics it moves on, one step per invocation."""
    spec = load_spec(_spec(tmp_path))
    common = dict(storage=str(tmp_path / "study.journal"), data_dir=str(data_dir), cache_dir=str(tmp_path / "c"))
    first = run_sweep(spec, n_trials=1, workers=1, **common)  # the paper's setting alone
    study = optuna.load_study(study_name="tiny", storage=open_storage(common["storage"]))
    better = {"cluster_ratio": 0.25, "seed_ratio": 0.15}  # a trial of another process, better than any here
    study.add_trial(optuna.trial.create_trial(params=better, distributions=study.trials[0].distributions, value=1.0))
    again = run_sweep(spec, n_trials=3, workers=2, **common)
    assert again.parent_run_id == first.parent_run_id and again.best_params == better
    client = MlflowClient()
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    metrics = parent.data.metrics
    assert metrics["best_value"] == 1.0 and metrics["n_complete"] == 3 and metrics["n_trials"] == 3
    assert {metrics["best_cluster_ratio"], metrics["best_seed_ratio"]} == {0.25, 0.15} and metrics["workers"] == 2
    history = client.get_metric_history(first.parent_run_id, "best_cluster_ratio")
    assert sorted((m.step, m.value) for m in history) == [(1, first.best_params["cluster_ratio"]), (3, 0.25)]
    assert main(["report", "--run-id", first.parent_run_id, "--out", str(tmp_path / "r")]) == 1  # not a grid's
    assert f"run {first.parent_run_id} is a sweep's parent" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_second_process_on_a_study_never_proposes_what_the_first_did(tmp_path, sampler):
    """Each invocation (a resume, a worker, another machine) makes its own sampler from the spec.
    Seeded once per process, the second proposed the first's params again, trial for trial; seeded
    per trial, every proposal is new, and a trial's proposal is the same however the trials were
    split between processes."""
    spec = load_spec(_spec(tmp_path, TINY_SPEC.replace("sampler: random", f"sampler: {sampler}")))

    def propose(storage: str, splits: list[int]) -> list[dict]:
        params = []
        for n in splits:  # one process per split, each with a sampler of its own
            study = optuna.load_study(study_name="s", storage=open_storage(storage), sampler=make_sampler(spec))
            for _ in range(n):
                trial = study.ask()
                params.append({name: p.suggest(trial) for name, p in spec.space().items()})
                study.tell(trial, float(len(params)))
        return params

    stories = []
    for name, splits in (("a", [2, 2]), ("b", [1, 1, 1, 1]), ("c", [4])):
        storage = str(tmp_path / f"{name}.journal")
        optuna.create_study(study_name="s", storage=open_storage(storage), direction="maximize")
        stories.append(propose(storage, splits))
    assert len({tuple(p.values()) for p in stories[0]}) == 4
    assert stories[0] == stories[1] == stories[2]  # (TPE draws at random for its first 10 trials)


def test_a_grid_study_split_between_processes_covers_its_grid(tmp_path):
    """The grid is seeded alike in every process: its trials' grid ids index one shuffled order,
    so three processes taking two trials each try all six points once."""
    text = TINY_SPEC.replace("sampler: random", "sampler: grid").replace(
        "cluster_ratio: {low: 0.1, high: 0.3}", "cluster_ratio: {choices: [0.1, 0.2, 0.3]}"
    ).replace("seed_ratio: {low: 0.1, high: 0.3}", "seed_ratio: {choices: [0.1, 0.2]}")
    spec = load_spec(_spec(tmp_path, text))
    storage = str(tmp_path / "grid.journal")
    optuna.create_study(study_name="g", storage=open_storage(storage), direction="maximize")
    seen = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(tuple(p.suggest(trial) for p in spec.space().values()))
        return 0.0

    for _ in range(3):  # (the grid stops the study once it is covered: only inside optimize)
        study = optuna.load_study(study_name="g", storage=open_storage(storage), sampler=make_sampler(spec))
        study.optimize(objective, n_trials=2)
    assert sorted(seen) == [(c, s) for c in (0.1, 0.2, 0.3) for s in (0.1, 0.2)]


def test_a_trials_seeds_train_together_and_each_gives_the_run_it_gives_alone(data_dir, mlflow_store, tmp_path):
    """A trial trains its seeds' models in one stack (seed models, then final models): seed 0's
    run in a two-seed trial is the one a one-seed trial gives, selection and accuracy, and
    ``altrack replay`` retrains it to the same accuracy."""

    def seed_zero(seeds_per_trial):
        text = TINY_SPEC.replace("seeds_per_trial: 1", f"seeds_per_trial: {seeds_per_trial}")
        spec = load_spec(_spec(tmp_path, text.replace("study_name: tiny", f"study_name: tiny{seeds_per_trial}"),
                               name=f"spec{seeds_per_trial}.yaml"))  # fmt: skip
        outcome = run_sweep(spec, n_trials=1, storage=str(tmp_path / f"study{seeds_per_trial}.journal"),
                            data_dir=str(data_dir), cache_dir=str(tmp_path / f"cache{seeds_per_trial}"))  # fmt: skip
        [trial] = _trial_runs(outcome.parent_run_id)
        runs = {int(r.data.params["seed"]): r for r in _trial_runs(trial.info.run_id)}
        assert sorted(runs) == list(range(seeds_per_trial))
        run = runs[0]
        folder = str(tmp_path / f"dl{seeds_per_trial}")
        picked = np.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=folder,
                                                             artifact_path="selected_indices.npy"))  # fmt: skip
        history = MlflowClient().get_metric_history(trial.info.run_id, "per_seed/val_accuracy")
        return picked, run.data.metrics["test_accuracy"], [m.value for m in history if m.step == 0], run.info.run_id

    alone, beside = seed_zero(1), seed_zero(2)
    assert np.array_equal(alone[0], beside[0])
    assert alone[1:3] == beside[1:3]
    replayed = replay(beside[3], data_dir=str(data_dir))  # a trial's run replays as a grid's does
    assert replayed.equal and replayed.replayed_accuracy == beside[1]


def test_a_trial_whose_models_diverge_fails_with_the_reason_and_logs_what_trained(data_dir, mlflow_store, tmp_path):
    spec = load_spec(_spec(tmp_path, TINY_SPEC.replace("seeds_per_trial: 1", "seeds_per_trial: 2") + "lr: 1.0e+30\n"))
    started = int(time.time() * 1000)  # the store is the session's: this test's runs started since
    with pytest.raises(AltrackError, match="trials failed"):
        run_sweep(spec, n_trials=1, storage=str(tmp_path / "study.journal"), data_dir=str(data_dir),
                  cache_dir=str(tmp_path / "cache"))  # fmt: skip
    study = optuna.load_study(study_name="tiny", storage=open_storage(str(tmp_path / "study.journal")))
    assert {t.state for t in study.trials} == {TrialState.FAIL}
    # the seed models trained and each seed's final model failed: both seeds' runs are logged
    mine = f"attributes.run_name LIKE 'trial0-%' AND attributes.start_time >= {started}"
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=mine)
    assert sorted(r.info.run_name for r in runs) == ["trial0-mnist-coreset-k100-s0", "trial0-mnist-coreset-k100-s1"]
    assert {r.info.status for r in runs} == {"FAILED"}


SPACE = {"cluster_ratio": optuna.distributions.FloatDistribution(0.1, 0.3),
         "seed_ratio": optuna.distributions.FloatDistribution(0.1, 0.3)}  # fmt: skip


def _dead_pid_and_orphan_run(experiment: str) -> tuple[int, str]:
    """A pid whose process has exited, and an MLflow run left RUNNING: what a dead worker leaves."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="orphan") as orphan:
        pass
    MlflowClient().update_run(orphan.info.run_id, status="RUNNING")
    return dead.pid, orphan.info.run_id


def test_trials_stopped_by_ctrl_c_do_not_count_toward_the_failure_limit(data_dir, mlflow_store, tmp_path):
    """A study interrupted four times (each stopped trial FAIL, marked interrupted) still runs on
    its fifth start; counted as failures, they made it give up (``max(3, n_trials)``)."""
    spec = load_spec(_spec(tmp_path))
    storage = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="tiny", storage=open_storage(storage), direction="maximize")
    for _ in range(4):
        trial = study.ask(SPACE)
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
    outcome = run_sweep(spec, n_trials=1, storage=storage, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    assert outcome.n_complete == 1


def test_the_trials_of_workers_stopped_by_ctrl_c_are_retried_at_once(mlflow_store, tmp_path):
    """What the sweep does after it stops its workers on Ctrl-C: their RUNNING trials fail, marked
    interrupted, their points wait in the queue, and their MLflow runs end KILLED, saying why;
    another owner's trial is left alone. Before, they stayed RUNNING until the next invocation."""
    study = optuna.create_study(study_name="tiny", storage=open_storage(str(tmp_path / "s.journal")))
    stopped, run_id = _dead_pid_and_orphan_run(mlflow_store)
    mine, other = study.ask(SPACE), study.ask(SPACE)
    mine.set_user_attr(WORKER_ATTR, worker_id(stopped))
    mine.set_user_attr(RUN_ATTR, run_id)
    other.set_user_attr(WORKER_ATTR, "elsewhere:1:1")

    assert retry_stopped_workers(study, {worker_id(stopped)}) == 1
    first, second, retry = study.get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs[INTERRUPTED_ATTR]
    assert second.state == TrialState.RUNNING
    assert retry.state == TrialState.WAITING and retry.user_attrs[RETRY_OF_ATTR] == 0
    assert retry.params == first.params  # its point, as Optuna's own retry keeps it
    killed = MlflowClient().get_run(run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["altrack.error"] == INTERRUPTED


def test_a_dead_workers_trial_is_failed_retried_and_its_run_killed(data_dir, mlflow_store, tmp_path):
    spec = load_spec(_spec(tmp_path))
    storage = str(tmp_path / "study.journal")
    study = optuna.create_study(study_name="tiny", storage=open_storage(storage), direction="maximize")
    dead, orphan = _dead_pid_and_orphan_run(mlflow_store)
    trial = study.ask(SPACE)
    trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{dead}")  # an owner written before pid namespaces
    trial.set_user_attr(RUN_ATTR, orphan)
    lost_params = dict(trial.params)

    run_sweep(spec, n_trials=1, storage=storage, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"))
    study = optuna.load_study(study_name="tiny", storage=open_storage(storage))
    assert study.trials[0].state == TrialState.FAIL
    retries = [t for t in study.trials if t.user_attrs.get("altrack.retry_of") == 0]
    assert len(retries) == 1 and retries[0].params == lost_params
    assert MlflowClient().get_run(orphan).info.status == "KILLED"


def test_a_trial_stopped_by_ctrl_c_leaves_no_optuna_lines_where_other_failures_stay():
    """Ctrl-C: Optuna's traceback and its "Trial N failed with value None." both go (the CLI says
    "interrupted", and the trial is re-queued); a trial that really failed is still reported.
    Read from Optuna's own handler, where the filter sits."""
    quiet_optuna()
    handlers = [h for h in logging.getLogger("optuna").handlers if isinstance(h, logging.StreamHandler)]
    written = io.StringIO()
    streams = [h.setStream(written) for h in handlers]
    study = optuna.create_study()

    def stopped(trial):
        raise KeyboardInterrupt

    def broken(trial):
        raise ValueError("broken")

    try:
        with pytest.raises(KeyboardInterrupt):
            study.optimize(stopped, n_trials=1)
        study.optimize(broken, n_trials=1, catch=(ValueError,))
    finally:
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)
    err = written.getvalue()
    assert "Trial 0" not in err and "KeyboardInterrupt" not in err
    assert "Trial 1 failed with parameters" in err and "Trial 1 failed with value None." in err

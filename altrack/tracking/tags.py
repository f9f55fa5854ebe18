"""Every name altrack writes to MLflow and Optuna, spelled once (as ``mlflow.utils.mlflow_tags``).

Tags are strings on runs; Optuna user attributes live on trials. Run kinds tell a grid's
protocol runs from a sweep's, which train on a pool without the validation split and must never
be mistaken for grid runs by a resume or a report.
"""

from __future__ import annotations

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: F401  (re-exported)

KIND_TAG = "altrack.kind"
KIND_GRID = "grid"
KIND_PROTOCOL = "protocol"
KIND_SWEEP = "sweep"
KIND_TRIAL = "trial"
KIND_SWEEP_PROTOCOL = "sweep-protocol"
KIND_REPLAY = "replay"

WORKER_TAG = "altrack.worker"  # host:pidns:pid of the process that owns a RUNNING run (altrack.liveness)
HEARTBEAT_TAG = "altrack.heartbeat"  # when the owner of a RUNNING parent last said it was alive (epoch s)
HASH_TAG = "altrack.config_hash"
SETTING_TAG = "altrack.setting"  # the Settings label a report groups a run by (its params omit what its method ignores)
GROUP_TAG = "altrack.group"  # the config hash of a run's (dataset, k, seed) group: claims are found by it
TICKET_TAG = "altrack.claim_ticket"  # a claim's place in line for its config hash (tracking.runs.claim_runs)
ERROR_TAG = "altrack.error"
COMMAND_TAG = "altrack.command"  # the command line that made a parent run, for the results page
RESUMED_TAG = "altrack.resumed_runs"
RUNS_FINISHED_TAG = "altrack.runs_finished"
RUNS_FAILED_TAG = "altrack.runs_failed"
REPLAY_OF_TAG = "altrack.replay_of"
RERUN_TAG = "altrack.rerun"  # the command that does a run alone, with the same result
SEED_MODEL_RUN_TAG = "altrack.seed_model_run"  # the run that holds this run's seed model M
VERSION_TAG = "altrack.version"
SLURM_JOB_TAG = "slurm.job_id"  # the Slurm (array) job that ran a run or that a parent submitted
SLURM_ARRAY_TASK_TAG = "slurm.array_task_id"
SLURM_RESTART_TAG = "slurm.restart_count"  # how often Slurm had requeued the task that claimed the run
DETACHED_TAG = "altrack.detached"  # a parent whose Slurm tasks were submitted with --detach
EXPECTED_RUNS_TAG = "altrack.expected_runs"

STUDY_TAG = "optuna.study"
STORAGE_TAG = "optuna.storage"
TRIAL_NUMBER_TAG = "optuna.trial_number"
TRIAL_STATE_TAG = "optuna.state"
BEST_TRIAL_TAG = "optuna.best_trial"

# Optuna trial user attributes
WORKER_ATTR = "altrack.worker"
RUN_ATTR = "altrack.mlflow_run_id"
BASELINE_ATTR = "altrack.paper_baseline"
RETRY_OF_ATTR = "altrack.retry_of"
INTERRUPTED_ATTR = "altrack.interrupted"  # trial attribute: it failed to Ctrl-C, not to its own fault
TEST_ACCURACY_ATTR = "test_accuracy"
PARENT_ATTR = "altrack.mlflow_parent_run_id"  # study attribute: the sweep's MLflow parent run
SPEC_ATTR = "altrack.spec"  # study attribute: the spec fingerprint its trials were made from
HEARTBEAT_ATTR = "altrack.heartbeat"  # trial attribute: when its worker last said it was alive (epoch s)

# Metrics of a protocol run: the accuracies at the top, the rest grouped by prefix so that the
# MLflow UI draws each group in a section of its own (loss/, time/, selection/, per_seed/)
TEST_ACCURACY_METRIC = "test_accuracy"
VAL_ACCURACY_METRIC = "val_accuracy"
SEED_TEST_ACCURACY_METRIC = "seed_test_accuracy"  # the seed model M's
TRAIN_LOSS_METRIC = "loss/train"  # the final model's, one step per epoch
SEED_TRAIN_LOSS_METRIC = "loss/seed_train"  # the seed model M's, one step per epoch
TEST_LOSS_METRIC = "loss/test"
TIME_PREFIX = "time/"  # time/selection_seconds, time/seed_train_seconds, time/final_train_seconds
SELECTION_PREFIX = "selection/"  # the selector's own figures: selection/distance_share, ...
DISTANCE_SHARE_METRIC = SELECTION_PREFIX + "distance_share"  # the coreset's info["distance_share"]
LOGGED_TEST_ACCURACY_METRIC = "logged_test_accuracy"  # a replay's: the accuracy the replayed run logged
REPLAY_EQUAL_METRIC = "replay_equal"  # a replay's: 1.0 when it got that accuracy
PROGRESS_METRIC = "progress/runs_done"  # a grid parent's share of its runs done (finished, failed or reused)
SLURM_PROGRESS_METRIC = "progress/slurm_tasks_done"  # a Slurm grid parent's tasks ended
# a sweep's: its parent's count of complete trials (the summary a resume checks for), a trial's
# objective (the mean validation accuracy over its seeds), and its seeds' figures, a step per seed
N_COMPLETE_METRIC = "n_complete"
OBJECTIVE_METRIC = "objective"
PER_SEED_PREFIX = "per_seed/"
SEED_CACHE_HITS_METRIC = "seed_cache_hits"

# Params a report reads back (besides the RunKey's and the Settings')
LAM_USED_PARAM = "lam_used"  # a coreset run's lam (the median over its centre points)
TORCH_VERSION_KEY = "torch_version"  # a run's param, and its lineage tag
BASELINE_PARAM = "paper_baseline"  # a trial run's: whether its point is the paper's setting
SEEDS_PARAM = "seeds"  # a trial run's seeds, comma-separated
SEEDS_PER_TRIAL_PARAM = "seeds_per_trial"  # a sweep parent's
TRIAL_COMPLETE = "COMPLETE"  # TRIAL_STATE_TAG of a trial run whose trial completed

RESUMED_RUNS_CSV = "resumed_runs.csv"
DEFAULT_EXPERIMENT = "altrack"

from __future__ import annotations

import re

import pytest

from altrack.config import GridConfig
from altrack.errors import ConfigError
from altrack.grid import slow_warnings
from altrack.settings import Settings
from altrack.slurm import load_slurm_config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch size"),
        ({"lr": 0.0}, "lr"),
        ({"seed_ratio": 0.0}, "seed_ratio"),
        ({"seed_ratio": 1.0}, "seed_ratio"),
        ({"cluster_ratio": 1.5}, "cluster_ratio"),
        ({"seed_ratio": 0.5, "cluster_ratio": 0.5}, "seed_ratio + cluster_ratio"),
        ({"lam": -1.0}, "lam"),
        ({"coreset_space": "pixels"}, "coreset_space"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ("imagenet",)}, "unknown dataset 'imagenet'"),
        ({"methods": ("badge",)}, "unknown method 'badge'"),
        ({"budgets": (0,)}, "budget k must be >= 1"),
        ({"budgets": (-5,)}, "budget k must be >= 1"),
        ({"budgets": (60001,)}, "larger than the mnist train split"),
        ({"datasets": ("cifar10",), "budgets": (50001,)}, "larger than the cifar10 train split"),
        ({"budgets": (2,)}, "empty seed set"),
        ({"runs": 0}, "runs"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_grids_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GridConfig(out=None, **kwargs)


def test_out_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not a writable directory"):
        GridConfig(out=str(blocker / "results"))


def test_paper_defaults():
    settings = Settings()
    assert (settings.epochs, settings.batch_size, settings.lr) == (10, 32, 1e-3)
    assert settings.n_seed(2000) == 400 and settings.n_clusters(2000) == 400
    assert GridConfig(out=None).budgets == (2000,)


def test_budget_equal_to_the_train_split_is_allowed():
    GridConfig(budgets=(60000,), out=None)


def test_a_grid_that_will_take_long_says_so_first():
    assert slow_warnings(GridConfig(datasets=("mnist",), methods=("coreset",), budgets=(2000,))) == []
    [warning] = slow_warnings(GridConfig(datasets=("mnist",), methods=("coreset", "random"), budgets=(2000, 50000)))
    assert "k''=10000" in warning and "k=50000" in warning
    assert slow_warnings(GridConfig(datasets=("mnist",), methods=("random",), budgets=(50000,))) == []


def test_only_a_single_local_process_trains_the_blocks_itself():
    """It keeps the datasets it loads (and loads them while MLflow imports); workers and Slurm tasks load their own."""
    assert GridConfig(out=None).trains_here
    assert not GridConfig(out=None, workers=2).trains_here
    assert not GridConfig(out=None, executor="slurm").trains_here


@pytest.mark.parametrize(
    ("text", "message"),
    [("sbatch: [1]\n", "sbatch options must be NAME=VALUE"),
     ("sbatch: [[a, b, c]]\n", "sbatch options must be NAME=VALUE"),
     ("mem_gb: 1" + "0" * 400 + "\n", "--mem-gb (mem_gb) must be a positive number of GiB, got inf")],
)  # fmt: skip
def test_a_bad_executor_file_is_one_line(tmp_path, text, message):
    """An executor file's values are refused as the flags are: a ConfigError, not a TypeError or
    an OverflowError's traceback."""
    path = tmp_path / "slurm.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_slurm_config(str(path), {})

from __future__ import annotations

import numpy as np
import pytest

from altrack.config import GridConfig
from altrack.data import Dataset, load_dataset
from altrack.protocol import iterate_grid, run_method, train_seed_stage
from altrack.selection import available_methods
from altrack.settings import RunKey, Settings

TINY = Settings(epochs=2, batch_size=32)


def _grid(data_dir, **kw) -> GridConfig:
    base = dict(datasets=("mnist",), methods=available_methods(), budgets=(100,), runs=1, settings=TINY)
    base.update(kw)
    return GridConfig(data_dir=str(data_dir), out=None, device="cpu", **base)


def test_mnist_loads_as_normalised_tensors(data_dir):
    data = load_dataset("mnist", data_dir)
    assert tuple(data.x_train.shape) == (60000, 1, 28, 28) and tuple(data.y_test.shape) == (10000,)
    assert abs(float(data.x_train.mean())) < 0.01 and abs(float(data.x_train.std()) - 1) < 0.01


def test_every_method_shares_one_seed_set_and_is_deterministic(data_dir):
    first = list(iterate_grid(_grid(data_dir), progress=False))
    second = list(iterate_grid(_grid(data_dir, methods=("coreset", "random")), progress=False))
    assert [r.status for r in first] == ["FINISHED"] * 7
    seeds = {tuple(r.stage.seed_indices) for r in first}
    assert len(seeds) == 1 and len(next(iter(seeds))) == 20
    assert len({id(r.stage) for r in first}) == 1  # the seed model is trained once
    for result in first:
        assert len(result.selected_indices) == 100
        assert len(np.unique(result.selected_indices)) == 100
        assert 0.15 < result.test_accuracy <= 1.0  # chance is 0.1
    again = {r.key.method: r for r in second}
    for method in ("coreset", "random"):
        before = next(r for r in first if r.key.method == method)
        np.testing.assert_array_equal(before.selected_indices, again[method].selected_indices)
        assert before.test_accuracy == again[method].test_accuracy


def test_different_seeds_give_different_seed_sets(data_dir):
    results = list(iterate_grid(_grid(data_dir, methods=("random",), runs=2), progress=False))
    assert [r.key.seed for r in results] == [0, 1]
    assert not np.array_equal(results[0].stage.seed_indices, results[1].stage.seed_indices)


def test_skip_leaves_finished_keys_out(data_dir):
    cfg = _grid(data_dir, methods=("margin", "random"))
    results = list(iterate_grid(cfg, skip=frozenset({RunKey("mnist", "margin", 100, 0)}), progress=False))
    assert [r.key.method for r in results] == ["random"]


def test_diverging_training_fails_the_run_with_a_reason(data_dir):
    cfg = _grid(data_dir, methods=("random",), settings=Settings(epochs=2, lr=1e30))
    [result] = list(iterate_grid(cfg, progress=False))
    assert result.status == "FAILED"
    assert "loss became" in result.error


def test_weighted_retraining_uses_the_coreset_weights(data_dir):
    plain = list(iterate_grid(_grid(data_dir, methods=("coreset",), settings=Settings(epochs=1)), progress=False))
    cfg = _grid(data_dir, methods=("coreset",), settings=Settings(epochs=1, weighted=True))
    [weighted] = list(iterate_grid(cfg, progress=False))
    assert weighted.status == "FINISHED"
    np.testing.assert_array_equal(plain[0].selected_indices, weighted.selected_indices)  # same selection
    assert weighted.final_epoch_losses != plain[0].final_epoch_losses  # different training


@pytest.fixture(scope="module")
def cifar_slice(data_dir) -> Dataset:
    """The CNN path on a small CIFAR-10 slice: the full split is too slow for the suite."""
    full = load_dataset("cifar10", data_dir)
    return Dataset("cifar10", full.x_train[:1500], full.y_train[:1500], full.x_test[:500], full.y_test[:500])


def test_cifar_cnn_path_runs_every_method(cifar_slice):
    assert cifar_slice.x_train.shape[1:] == (3, 32, 32)
    settings = Settings(epochs=1)
    stage = train_seed_stage(cifar_slice, 100, 0, settings)
    assert stage.embeddings.shape == (1500, 256)
    for method in available_methods():
        result = run_method(cifar_slice, stage, method, settings)
        assert result.status == "FINISHED", result.error
        assert len(np.unique(result.selected_indices)) == 100
        assert len(result.final_epoch_losses) == 1 and np.isfinite(result.test_loss)
        assert result.final_model.head.in_features == 256


def test_two_workers_give_exactly_the_results_of_one(data_dir):
    # the workers run one thread each, this process two. A batch of 12 leaves the seed model (20
    # examples) a last batch of 8 rows and the final models (100) one of 4, fewer than the head's
    # 10 outputs: on an AMD EPYC MKL's GEMM took other bits there at 2 threads (altrack.threads)
    cfg = _grid(data_dir, methods=("coreset", "kcenter", "margin", "random"), runs=2,
                settings=Settings(epochs=2, batch_size=12))  # fmt: skip
    serial = {r.key: r for r in iterate_grid(cfg, progress=False)}
    parallel = {r.key: r for r in iterate_grid(cfg, progress=False, workers=2)}
    assert serial.keys() == parallel.keys() and len(serial) == 8
    for key, result in serial.items():
        np.testing.assert_array_equal(result.selected_indices, parallel[key].selected_indices)
        assert result.test_accuracy == parallel[key].test_accuracy
        assert result.final_epoch_losses == parallel[key].final_epoch_losses  # the models' bits, near enough
        assert result.test_loss == parallel[key].test_loss

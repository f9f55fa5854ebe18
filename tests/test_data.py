from __future__ import annotations

import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import _shared_data

from altrack.data import (
    _TORCHVISION_CLASS,
    MNIST_ARCHIVES,
    _load_cached,
    load_arrays,
    load_dataset,
    load_in_background,
    read_idx_gz,
    release_datasets,
    resolve_device,
)
from altrack.errors import DataError


def test_mnist_reads_the_archives_in_place_without_writing(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    shutil.copytree(_shared_data() / "FashionMNIST" / "raw", raw, ignore=shutil.ignore_patterns("*ubyte"))
    before = sorted(p.name for p in raw.iterdir())
    raw.chmod(0o555)  # read-only (root ignores the bits, so the listing below is the real check)
    x_train, y_train, x_test, y_test = load_arrays("fashion_mnist", tmp_path)
    raw.chmod(0o755)
    assert sorted(p.name for p in raw.iterdir()) == before and len(before) == 4
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert np.bincount(y_train).tolist() == [6000] * 10 and y_test.shape == (10000,)


def test_the_carried_archive_table_is_torchvisions():
    torchvision = pytest.importorskip("torchvision")
    for name, archives in MNIST_ARCHIVES.items():
        cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
        assert cls.__name__ == _TORCHVISION_CLASS[name]
        assert [(url.rsplit("/", 1)[-1], md5) for url, md5 in cls.resources] == list(archives)


def test_archives_on_disk_load_without_importing_torchvision(data_dir):
    """torchvision costs 1.5-2 s to import in every process that loads data: only a download needs it."""
    code = ("import sys; from altrack.data import load_arrays; "
            f"load_arrays('mnist', {str(data_dir)!r}); print('torchvision' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_datasets_loaded_in_background_are_the_ones_load_dataset_returns(data_dir):
    release_datasets()
    load_in_background(["mnist"], data_dir, "auto").join()
    assert _load_cached.cache_info().currsize == 1
    hits = _load_cached.cache_info().hits
    data = load_dataset("mnist", data_dir, str(resolve_device("auto")))
    assert _load_cached.cache_info().hits == hits + 1 and data.x_train.shape == (60000, 1, 28, 28)
    release_datasets()


def test_a_background_load_leaves_bad_input_and_downloads_to_the_callers_own_load(tmp_path, monkeypatch):
    """Nothing raised on the thread, nothing cached, nothing written (torchvision's download would
    make MNIST/raw/): ``run_grid`` refuses bad input in its order, and downloads once, itself."""
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    release_datasets()
    cases = [(["mnist"], tmp_path, "cpu"), (["mnist"], tmp_path / "missing", "cpu"),
             (["no-such-dataset"], tmp_path, "cpu"), (["mnist"], tmp_path, "no-such-device")]  # fmt: skip
    for names, folder, device in cases:
        load_in_background(names, folder, device).join()
    assert raised == [] and _load_cached.cache_info().currsize == 0 and list(tmp_path.iterdir()) == []


def test_cifar10_is_left_to_the_callers_own_load(data_dir):
    release_datasets()
    load_in_background(["cifar10"], data_dir, "cpu").join()
    assert _load_cached.cache_info().currsize == 0


def test_a_corrupt_idx_archive_is_a_data_error(tmp_path):
    archive = tmp_path / "train-images-idx3-ubyte.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00" + bytes(40))  # a gzip header, then no deflate stream
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx_gz(archive)


def test_cifar10_loads_from_the_offline_npz_format(data_dir):
    x_train, y_train, x_test, y_test = load_arrays("cifar10", data_dir)
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]


def test_truncated_npz_names_the_file_and_the_expected_shape(data_dir, tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    shutil.copy(data_dir / "cifar10" / "cifar10_test.npz", folder / "cifar10_test.npz")
    train = folder / "cifar10_train.npz"
    train.write_bytes((data_dir / "cifar10" / "cifar10_train.npz").read_bytes()[:5000])
    with pytest.raises(DataError, match=r"cifar10_train\.npz is truncated or corrupt.*\(N, 32, 32, 3\)"):
        load_arrays("cifar10", tmp_path)


def test_npz_with_the_wrong_shape_is_refused(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    for split, n in (("train", 50000), ("test", 10)):
        np.savez(folder / f"cifar10_{split}.npz", x=np.zeros((n, 32, 32, 3), np.uint8), y=np.zeros(n, np.int64))
    with pytest.raises(DataError, match=r"expected an array of shape \(10000, 32, 32, 3\), found \(10, 32, 32, 3\)"):
        load_arrays("cifar10", tmp_path)

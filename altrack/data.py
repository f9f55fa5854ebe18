"""Datasets as whole tensors on the device: no DataLoader and no per-sample Python.

MNIST and Fashion-MNIST go through torchvision (which downloads when online and reuses
verified archives when offline). CIFAR-10 loads torchvision's pickled batches when they are
complete, else the lossless ``cifar10/cifar10_{train,test}.npz`` arrays (``x`` uint8 NHWC,
``y`` int64), a supported offline format.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import threading
import zlib
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from altrack.catalog import DATASETS, DatasetSpec  # noqa: F401  (re-exported)
from altrack.errors import ConfigError, DataError, first_line

_TORCHVISION_CLASS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
# torchvision's archives (file name, md5) of each class's ``resources``, carried here so that
# archives already on disk are checked and read without importing torchvision (1.5-2 s in every
# process that loads a dataset: each worker, each Slurm task); tests compare them with torchvision's
MNIST_ARCHIVES = {
    "mnist": (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
              ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
              ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion_mnist": (("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
                      ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
                      ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
                      ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")),
}  # fmt: skip
CIFAR_NPZ = {"train": "cifar10_train.npz", "test": "cifar10_test.npz"}
CIFAR_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


@dataclass(frozen=True)
class Dataset:
    """Normalised float images and int64 labels, both splits, on one device."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    digest: str = ""  # sha256 of the raw arrays: which data a result came from

    @property
    def spec(self) -> DatasetSpec:
        return DATASETS[self.name]

    @property
    def nbytes(self) -> int:
        """Bytes its four tensors hold: what a process that loads it holds on top of its code."""
        return sum(t.nbytes for t in (self.x_train, self.y_train, self.x_test, self.y_test))


def user_folder(env_var: str, name: str) -> Path:
    """``$env_var`` if set, else ``$XDG_CACHE_HOME/altrack/name`` (``~/.cache/altrack/name``)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "altrack" / name


def default_data_dir() -> Path:
    return user_folder("ALTRACK_DATA_DIR", "data")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda, else mps, else cpu; an explicit device must exist (``ConfigError`` if not).

    Call once per entry point and pass the result down; it has no side effects
    (``set_determinism`` is the explicit call that sets the backend flags).
    """
    kind = device.split(":")[0]
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False)")
    if kind == "mps" and not _mps_available():
        raise ConfigError("--device mps: this machine has no MPS device (torch.backends.mps.is_available() is False)")
    return torch.device(device)


def set_determinism(device: torch.device | str) -> None:
    """Same seed, same bits: cuDNN's fastest kernels are not deterministic, so pick the others."""
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False  # the paper's numbers are fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.use_deterministic_algorithms(True, warn_only=True)  # e.g. k-means' index_add_


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx_gz(path: Path) -> np.ndarray:
    """An IDX array from a gzipped file, read in place (so a read-only data folder works). One
    ``gzip.decompress`` call: from Python 3.11 zlib inflates the whole member without the
    interpreter's lock, where ``GzipFile.read`` loops in Python over small chunks and, beside a
    thread that imports (``cli.run`` loads the datasets while MLflow is imported), waits for
    that lock at each one."""
    try:
        raw = gzip.decompress(path.read_bytes())
        zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
        if zero != b"\x00\x00" or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
    except (OSError, ValueError, EOFError, IndexError, zlib.error) as exc:
        raise DataError(f"{path} is truncated or corrupt: {exc}") from exc


def _mnist_archives(name: str, root: Path) -> list[tuple[Path, str]]:
    """Where torchvision keeps ``name``'s four archives under ``root``, with their md5."""
    raw = root / _TORCHVISION_CLASS[name] / "raw"
    return [(raw / filename, md5) for filename, md5 in MNIST_ARCHIVES[name]]


def _on_disk(archives: list[tuple[Path, str]]) -> bool:
    """Whether every archive of ``_mnist_archives`` is there (else torchvision downloads them)."""
    return all(path.exists() for path, _ in archives)


def _load_mnist_like(name: str, root: Path) -> tuple[np.ndarray, ...]:
    """The four official archives, md5-checked; torchvision downloads them when they are absent."""
    archives = _mnist_archives(name, root)
    if not _on_disk(archives):
        import torchvision  # lazy: only a download needs it, and it costs 1.5-2 s to import

        where = f"{archives[0][0].parent}/ ({', '.join(path.name for path, _ in archives)})"
        made = [folder for folder in (archives[0][0].parent, *archives[0][0].parent.parents) if not folder.exists()]
        try:
            getattr(torchvision.datasets, _TORCHVISION_CLASS[name])(str(root), train=True, download=True)
        except Exception as exc:  # torchvision raises many types; the user needs the location
            for folder in made:  # the empty folders torchvision made before it failed
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise DataError(
                f"cannot load {name} from {root}: {first_line(exc)} Offline, put the files in {where}, "
                "or give --data-dir (or ALTRACK_DATA_DIR) a folder that has them"
            ) from exc
    for path, md5 in archives:
        actual = _md5(path)
        if actual != md5:
            raise DataError(f"{path} is corrupt: md5 {actual}, expected {md5}; replace or delete it")
    train_x, train_y, test_x, test_y = (read_idx_gz(path) for path, _ in archives)
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64)


def _check_arrays(name: str, source: str, arrays: tuple[np.ndarray, ...]) -> None:
    spec = DATASETS[name]
    c, h, w = spec.image_shape
    pixel_shape = (h, w) if c == 1 else (h, w, c)
    expected = [(spec.n_train, *pixel_shape), (spec.n_train,), (spec.n_test, *pixel_shape), (spec.n_test,)]
    for array, shape in zip(arrays, expected, strict=True):
        if tuple(array.shape) != shape:
            raise DataError(f"{source}: expected an array of shape {shape}, found {tuple(array.shape)}")
    for labels in (arrays[1], arrays[3]):
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise DataError(f"{source}: labels outside 0..{spec.num_classes - 1}")


def _load_cifar_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return np.asarray(archive["x"]), np.asarray(archive["y"]).astype(np.int64)
    except Exception as exc:
        raise DataError(
            f"{path} is truncated or corrupt ({type(exc).__name__}); expected an npz with x uint8 "
            f"(N, 32, 32, 3) and y int64 (N,)"
        ) from exc


def _load_cifar10(root: Path) -> tuple[tuple[np.ndarray, ...], str]:
    import torchvision  # lazy: only archives need it, and it costs a second to import

    batches = root / "cifar-10-batches-py"
    if all((batches / name).exists() for name in CIFAR_BATCHES):
        try:
            train = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
            test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
        except Exception as exc:
            raise DataError(f"{batches} is corrupt (torchvision's md5 check failed): {exc}") from exc
        arrays = (train.data, np.asarray(train.targets), test.data, np.asarray(test.targets))
        return arrays, str(batches)
    for folder in (root / "cifar10", root):
        train_npz, test_npz = folder / CIFAR_NPZ["train"], folder / CIFAR_NPZ["test"]
        if train_npz.exists() and test_npz.exists():
            return (*_load_cifar_npz(train_npz), *_load_cifar_npz(test_npz)), str(folder)
    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        test = torchvision.datasets.CIFAR10(str(root), train=False, download=True)
    except Exception as exc:
        raise DataError(
            f"cannot load cifar10 from {root}: {first_line(exc)}. Offline, put torchvision's cifar-10-batches-py/ "
            f"or {CIFAR_NPZ['train']} and {CIFAR_NPZ['test']} in {root / 'cifar10'}"
        ) from exc
    return (train.data, np.asarray(train.targets), test.data, np.asarray(test.targets)), str(root)


def load_arrays(name: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, ...]:
    """uint8 images (N, H, W[, C]) and int64 labels for both splits, shape-checked."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}")
    root = resolve_data_dir(data_dir)
    if name == "cifar10":
        arrays, source = _load_cifar10(root)
    else:
        arrays, source = _load_mnist_like(name, root), str(root / _TORCHVISION_CLASS[name])
    _check_arrays(name, source, arrays)
    return arrays


def _to_tensor(name: str, images: np.ndarray, device: torch.device) -> torch.Tensor:
    spec = DATASETS[name]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device, dtype=torch.float32)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    x = x.div_(255.0).sub_(mean).div_(std)  # in place: no split-sized temporaries
    if spec.image_shape[0] > 1:  # convolutions run faster in NHWC on CPU and GPU
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def arrays_digest(arrays: tuple[np.ndarray, ...]) -> str:
    """sha256 over the arrays' shapes, dtypes and bytes (0.1 s for MNIST)."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(array.data)
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: str, device: str) -> Dataset:
    x_train, y_train, x_test, y_test = load_arrays(name, root)
    dev = torch.device(device)
    return Dataset(
        digest=arrays_digest((x_train, y_train, x_test, y_test)),
        name=name,
        x_train=_to_tensor(name, x_train, dev),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)).to(dev),
        x_test=_to_tensor(name, x_test, dev),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)).to(dev),
    )


def load_in_background(names: Sequence[str], data_dir: str | os.PathLike | None, device: str) -> threading.Thread:
    """Start loading the MNIST-like datasets of ``names`` whose archives are on disk into this
    process's cache on a thread, for a caller with other work first: ``cli.run`` imports MLflow
    meanwhile, 3-4 s holding the interpreter's lock, while reading archives is mostly zlib,
    sha256 and torch, which release it (from Python 3.11; ``read_idx_gz``): about a second off
    the main job's start on the 2-core Xeon. Not a download (torchvision's, on the main thread
    as before, once) nor CIFAR-10 (torchvision imported on a second thread; npz files gain
    little). Join the thread before loading the same names (the cache does not merge concurrent
    loads). ``device`` as the user gave it ('auto' too). Errors are dropped here: the caller's
    own ``load_dataset`` raises them again, in their place among its checks."""
    root = resolve_data_dir(data_dir)
    on_disk = [name for name in names if name in MNIST_ARCHIVES and _on_disk(_mnist_archives(name, root))]

    def load() -> None:
        with suppress(Exception):
            resolved = str(resolve_device(device))
            for name in on_disk:
                load_dataset(name, data_dir, resolved)

    thread = threading.Thread(target=load, name="altrack-data", daemon=True)
    thread.start()
    return thread


def release_datasets() -> None:
    """Drop the per-process dataset cache (a parent whose workers hold their own copies)."""
    _load_cached.cache_clear()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, device: str = "cpu") -> Dataset:
    """Both splits of ``name`` on ``device`` (a resolved device, not 'auto'), loaded once per
    process; callers must treat the tensors as read-only. Raises ``DataError``."""
    folder = resolve_data_dir(data_dir)
    explicit = bool(data_dir) or bool(os.environ.get("ALTRACK_DATA_DIR"))
    if explicit and folder.exists() and not folder.is_dir():
        raise ConfigError(f"data folder {folder} is a file, not a folder: give --data-dir (or ALTRACK_DATA_DIR) the "
                          "folder that holds the datasets")  # fmt: skip
    if explicit and not folder.is_dir():  # torchvision would leave empty MNIST/raw folders behind
        raise ConfigError(f"data folder {folder} does not exist: create it (altrack downloads into it when online) "
                        "or leave --data-dir and ALTRACK_DATA_DIR unset for ~/.cache/altrack/data")  # fmt: skip
    return _load_cached(name, str(folder.resolve()), str(torch.device(device)))

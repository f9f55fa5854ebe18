"""On-disk cache of seed stages (seed set, seed model M and M's outputs).

Trials that differ only in selection settings (cluster_ratio, lam, ...) share a seed stage, so a
sweep trains each M once. Entries are keyed by a hash of everything that determines them,
written atomically (temp file, then rename) and read with ``torch.load(weights_only=True)``;
an unreadable entry is rebuilt, never trusted.

The folder is capped (``ALTRACK_CACHE_MAX_GB``, default 4 GB; an MNIST stage is about 34 MB, a
CIFAR-10 one about 30 MB): a hit marks its entry used, and after each call that writes, the least
recently used entries go until the folder fits, never one that call read or wrote: a sweep
trial's seeds stay together even under a cap smaller than they are (the folder is then over it
until the next write). ``altrack cache info`` and ``altrack cache clear``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Collection, Sequence
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

from altrack.data import Dataset, user_folder
from altrack.errors import TrainingDiverged
from altrack.protocol import SeedStage, fresh_model, train_seed_stages
from altrack.provenance import code_version
from altrack.settings import Settings

FORMAT = 3  # 2: stages carry the train labels; keys name the code and the data. 3: a CPU's fused Adam
_ARRAYS = ("seed_indices", "pool_indices", "labels", "probs", "embeddings", "ce_loss", "grad_loss")


DEFAULT_MAX_GB = 4.0


def default_cache_dir() -> Path:
    return user_folder("ALTRACK_CACHE_DIR", "seed-stages")


def max_bytes() -> int:
    """The cache's size cap: ``ALTRACK_CACHE_MAX_GB`` (GB), default 4."""
    try:
        gb = float(os.environ.get("ALTRACK_CACHE_MAX_GB", DEFAULT_MAX_GB))
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(max(gb, 0.0) * 1e9)


KEY_CHARS = 24  # hex digits of a stage key: an entry is KEY.pt, its temp file .KEY.pt.XXXX.tmp
_ENTRY = re.compile(rf"[0-9a-f]{{{KEY_CHARS}}}\.pt")
_TEMP = re.compile(rf"\.[0-9a-f]{{{KEY_CHARS}}}\.pt\..+\.tmp")


def _listed(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """(entry, its stat), least recently used first: the files named as the cache names them,
    never another ``.pt`` a user keeps in the folder. An entry another process (a sweep worker
    sharing the folder) deletes between the listing and its stat is left out, not an error."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if _ENTRY.fullmatch(path.name):
            with suppress(FileNotFoundError):
                found.append((path, path.stat()))
    return sorted(found, key=lambda item: item[1].st_mtime)


def entries(folder: Path) -> list[Path]:
    """The cache's entries, least recently used first (eviction and ``clear`` delete them)."""
    return [path for path, _ in _listed(folder)]


def evict(folder: Path, cap: int, keep: Collection[Path] = ()) -> int:
    """Delete least recently used entries until the folder holds at most ``cap`` bytes, or until
    only ``keep`` (the entries in use: just written or read) is left. Returns how many went."""
    found = _listed(folder)
    total = sum(stat.st_size for _, stat in found)
    removed = 0
    for path, stat in found:
        if total <= cap:
            break
        if path in keep:
            continue
        total -= stat.st_size
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def cache_info(folder: Path) -> tuple[int, int]:
    """(entries, bytes) in the cache folder."""
    found = _listed(folder)
    return len(found), sum(stat.st_size for _, stat in found)


def clear(folder: Path) -> int:
    """Delete every entry (and stray temp files); returns how many entries went."""
    found = entries(folder)
    temps = [p for p in folder.iterdir() if _TEMP.fullmatch(p.name)] if folder.is_dir() else []
    for path in [*found, *temps]:
        path.unlink(missing_ok=True)
    return len(found)


def stage_key(data: Dataset, budget: int, seed: int, settings: Settings, holdout: np.ndarray | None) -> str:
    """Hash of every input of ``train_seed_stage``; selection-only settings are left out."""
    payload = {
        "format": FORMAT,
        **code_version(),
        "dataset": data.name,
        "data": data.digest,
        "n_train": int(data.x_train.shape[0]),
        "device": data.x_train.device.type,
        "budget": budget,
        "seed": seed,
        "n_seed": settings.n_seed(budget),
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "holdout": None if holdout is None else hashlib.sha256(np.ascontiguousarray(holdout).tobytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:KEY_CHARS]


def _to_payload(stage: SeedStage) -> dict:
    payload = {name: torch.from_numpy(np.ascontiguousarray(getattr(stage, name))) for name in _ARRAYS}
    payload.update(
        dataset=stage.dataset,
        budget=stage.budget,
        seed=stage.seed,
        state_dict={k: v.cpu() for k, v in stage.model.state_dict().items()},
        epoch_losses=list(stage.epoch_losses),
        test_accuracy=stage.test_accuracy,
        seconds=stage.seconds,
    )
    return payload


def _from_payload(payload: dict, data: Dataset) -> SeedStage:
    device = data.x_train.device
    model = fresh_model(data.name, device, 0)
    model.load_state_dict(payload["state_dict"])
    return SeedStage(
        dataset=payload["dataset"],
        budget=int(payload["budget"]),
        seed=int(payload["seed"]),
        model=model,
        epoch_losses=[float(v) for v in payload["epoch_losses"]],
        test_accuracy=float(payload["test_accuracy"]),
        seconds=float(payload["seconds"]),
        **{name: payload[name].numpy() for name in _ARRAYS},
    )


def atomic_torch_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SeedStageCache:
    """get-or-train for seed stages; ``hits`` and ``misses`` count what happened."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.pt"

    def load(self, key: str, data: Dataset) -> SeedStage | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return _from_payload(torch.load(path, map_location="cpu", weights_only=True), data)
        except Exception:  # truncated or foreign file: rebuild it
            path.unlink(missing_ok=True)
            return None

    def get(
        self,
        data: Dataset,
        budget: int,
        seed: int,
        settings: Settings,
        holdout: np.ndarray | None = None,
    ) -> SeedStage:
        """One seed's stage (``get_many``); raises ``TrainingDiverged`` if its M diverged."""
        [stage] = self.get_many(data, budget, [seed], settings, holdout)
        if isinstance(stage, str):
            raise TrainingDiverged(stage)
        return stage

    def get_many(
        self,
        data: Dataset,
        budget: int,
        seeds: Sequence[int],
        settings: Settings,
        holdout: np.ndarray | None = None,
    ) -> list[SeedStage | str]:
        """The stages of ``seeds``, in order: each read from the cache, or trained and written;
        a seed whose M diverged gives its error message instead (and writes nothing). The seeds
        it lacks are trained together (``train_seed_stages``: their Ms in one stack), and a
        model's bits do not depend on its stack mates, so an entry is the one a lone seed would
        have written."""
        keys = [stage_key(data, budget, seed, settings, holdout) for seed in seeds]
        stages: list[SeedStage | str | None] = []
        for key in keys:
            stage = self.load(key, data)
            if stage is not None:
                self.hits += 1
                with suppress(FileNotFoundError):  # another worker may evict it meanwhile: we hold it
                    os.utime(self.path(key))  # used now: the last to be evicted
            stages.append(stage)
        missing = [i for i, stage in enumerate(stages) if stage is None]
        if missing:
            self.misses += len(missing)
            trained = train_seed_stages(data, budget, [seeds[i] for i in missing], settings, holdout=holdout)
            for i, stage in zip(missing, trained, strict=True):
                stages[i] = stage
                if isinstance(stage, SeedStage):
                    atomic_torch_save(_to_payload(stage), self.path(keys[i]))
            evict(self.folder, max_bytes(), keep={self.path(key) for key in keys})  # one scan per call
        return stages  # type: ignore[return-value]  # no None is left

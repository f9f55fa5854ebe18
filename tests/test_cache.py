"""The seed-stage cache: real stages of real MNIST, a size cap that evicts the least recently used,
and the ``altrack cache`` commands."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from altrack.cache import KEY_CHARS, SeedStageCache, cache_info, entries, evict, stage_key
from altrack.cli import main
from altrack.data import load_dataset
from altrack.errors import TrainingDiverged
from altrack.settings import Settings


def test_the_cache_stays_under_its_cap_dropping_the_least_recently_used(data_dir, tmp_path, monkeypatch, capsys):
    data = load_dataset("mnist", str(data_dir))
    settings = Settings(epochs=1)
    cache = SeedStageCache(tmp_path / "cache")
    cache.get(data, 100, 0, settings)
    one_entry = cache_info(tmp_path / "cache")[1]
    monkeypatch.setenv("ALTRACK_CACHE_MAX_GB", str(2.5 * one_entry / 1e9))  # room for two entries
    cache.get(data, 100, 1, settings)
    time.sleep(0.05)
    cache.get(data, 100, 0, settings)  # a hit: seed 0 is now the most recently used
    assert cache.hits == 1
    time.sleep(0.05)
    cache.get(data, 100, 2, settings)  # a third entry: seed 1, the least recently used, goes
    n, size = cache_info(tmp_path / "cache")
    assert n == 2 and size <= 2.5 * one_entry
    kept = {path.name for path in entries(tmp_path / "cache")}
    assert cache.path(_key(cache, data, 100, 1, settings)).name not in kept
    assert cache.path(_key(cache, data, 100, 0, settings)).name in kept

    assert main(["cache", "info", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "2 seed stages" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "removed 2 seed stages" in capsys.readouterr().out
    assert cache_info(tmp_path / "cache") == (0, 0)
    assert os.path.isdir(tmp_path / "cache")


def test_clear_and_eviction_leave_the_users_own_files(data_dir, tmp_path, monkeypatch, capsys):
    """A cache folder that also holds a user's checkpoint: ``clear`` and the size cap delete the
    cache's own entries (KEY.pt, 24 hex digits) and their temp files, never ``model.pt``."""
    data = load_dataset("mnist", data_dir)
    folder = tmp_path / "shared"
    folder.mkdir()
    theirs = [folder / "model.pt", folder / "notes.txt", folder / ".model.pt.x.tmp"]
    for path in theirs:
        path.write_bytes(b"the user's")
    cache = SeedStageCache(folder)
    monkeypatch.setenv("ALTRACK_CACHE_MAX_GB", "0")  # every write evicts all it may
    cache.get(data, 100, 0, Settings(epochs=1))
    assert cache_info(folder)[0] == 1 and all(path.exists() for path in theirs)
    stray = folder / f".{'a' * 24}.pt.123.tmp"
    stray.write_bytes(b"")
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 0
    assert "removed 1 seed stage" in capsys.readouterr().out
    assert all(path.read_bytes() == b"the user's" for path in theirs) and not stray.exists()


def test_an_entry_deleted_while_the_cache_is_listed_is_left_out(tmp_path):
    """Sweep workers share the folder: an entry another deletes between the listing and its stat
    (here a link to nothing, which fails stat the same way) is skipped, not a worker's crash."""
    kept = tmp_path / f"{'a' * KEY_CHARS}.pt"
    kept.write_bytes(b"x" * 10)
    (tmp_path / f"{'b' * KEY_CHARS}.pt").symlink_to(tmp_path / "gone")
    assert entries(tmp_path) == [kept]
    assert cache_info(tmp_path) == (1, 10)
    assert evict(tmp_path, cap=0) == 1 and not kept.exists()


def test_a_call_never_evicts_the_entries_it_wrote_or_read(data_dir, tmp_path, monkeypatch):
    """Under a cap of one and a half entries, a trial's three seeds all stay (each write used to
    evict the entry written before it, so the next trial trained two of them again); the next
    call that writes brings the folder back under the cap, keeping its own entry."""
    data = load_dataset("mnist", str(data_dir))
    settings = Settings(epochs=1)
    cache = SeedStageCache(tmp_path / "cache")
    cache.get(data, 100, 9, settings)
    one_entry = cache_info(tmp_path / "cache")[1]
    for path in entries(tmp_path / "cache"):
        path.unlink()
    monkeypatch.setenv("ALTRACK_CACHE_MAX_GB", str(1.5 * one_entry / 1e9))
    cache.get_many(data, 100, [0, 1, 2], settings)
    assert cache_info(tmp_path / "cache")[0] == 3
    fresh = SeedStageCache(tmp_path / "cache")
    fresh.get_many(data, 100, [2, 0, 1], settings)
    assert (fresh.hits, fresh.misses) == (3, 0)
    fresh.get(data, 100, 3, settings)
    assert {path.name for path in entries(tmp_path / "cache")} == {fresh.path(_key(fresh, data, 100, 3, settings)).name}


def _key(cache, data, budget, seed, settings):
    return stage_key(data, budget, seed, settings, None)


def test_get_many_trains_the_missing_seeds_together_and_writes_what_lone_seeds_would(data_dir, tmp_path):
    """A sweep trial asks for all its seeds at once: the misses' Ms train in one stack, a hit is
    read, and each entry holds the bits a lone ``get`` of that seed writes."""
    data = load_dataset("mnist", str(data_dir))
    settings = Settings(epochs=1)
    alone = SeedStageCache(tmp_path / "alone")
    lone = [alone.get(data, 100, seed, settings) for seed in (0, 1, 2)]
    together = SeedStageCache(tmp_path / "together")
    together.get(data, 100, 1, settings)  # seed 1 is a hit below, seeds 2 and 0 train together
    stages = together.get_many(data, 100, [2, 1, 0], settings)
    assert (together.hits, together.misses) == (1, 3)
    assert [stage.seed for stage in stages] == [2, 1, 0]
    for stage, reference in zip(stages, lone[::-1], strict=True):
        assert np.array_equal(stage.embeddings, reference.embeddings)
        assert np.array_equal(stage.ce_loss, reference.ce_loss)
        for (name, value), (_, expected) in zip(stage.model.state_dict().items(),
                                                reference.model.state_dict().items(), strict=True):  # fmt: skip
            assert torch.equal(value, expected), name
    assert {path.name for path in entries(tmp_path / "together")} == {path.name for path in entries(tmp_path / "alone")}
    again = SeedStageCache(tmp_path / "together").get_many(data, 100, [0, 1, 2], settings)  # all hits now
    assert all(np.array_equal(a.embeddings, b.embeddings) for a, b in zip(again, lone, strict=True))


def test_a_diverged_seed_model_is_its_message_and_writes_nothing(data_dir, tmp_path):
    data = load_dataset("mnist", str(data_dir))
    cache = SeedStageCache(tmp_path / "cache")
    wild = Settings(epochs=3, lr=1e30)
    stages = cache.get_many(data, 200, [0, 1], wild)
    assert all(isinstance(stage, str) and "loss became" in stage for stage in stages)
    assert cache_info(tmp_path / "cache") == (0, 0)
    with pytest.raises(TrainingDiverged, match="loss became"):
        cache.get(data, 200, 0, wild)

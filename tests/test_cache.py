"""The seed-stage cache: real stages of real MNIST, a size cap that evicts the least recently used,
and the ``altrack cache`` commands."""

from __future__ import annotations

import os
import time

from altrack.cache import SeedStageCache, cache_info, entries, stage_key
from altrack.cli import main
from altrack.data import load_dataset
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


def _key(cache, data, budget, seed, settings):
    return stage_key(data, budget, seed, settings, None)

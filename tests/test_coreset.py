"""Algorithm 1 made faithful: lam from labels M never trained on, nearest-centre scoring,
inclusion-probability weights, and sane lam on degenerate pools."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import make_context

from altrack.errors import ConfigError
from altrack.selection import get_selector
from altrack.selection.coreset import (
    _estimate,
    _sq_offsets_on_device,
    assign,
    estimate_lambda,
    sample_without_replacement,
)
from altrack.settings import RunKey, Settings, parse_lam, parse_lam_mode


@pytest.mark.parametrize("lam", ["auto", "lemma8"])
def test_lambda_never_reads_a_seed_points_loss(lam):
    """M trained on its seed points: their losses must not set lam (nor anything else)."""
    ctx = make_context(n_train=400, n_seed=40, budget=120, settings=Settings(lam=lam))
    poisoned = ctx.ce_loss.copy()
    poisoned[ctx.seed_indices] = np.nan
    a = get_selector("coreset").select(ctx)
    b = get_selector("coreset").select(dataclasses.replace(ctx, ce_loss=poisoned, rng=np.random.default_rng(1)))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.info["lam"] == b.info["lam"] and math.isfinite(b.info["lam"]) and b.info["lam"] > 0


def test_each_point_is_scored_against_its_nearest_centre_point():
    centres = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    points = np.array([[6.0, 0.0], [1.0, 1.0], [9.0, 3.0]], dtype=np.float32)
    centre_loss = np.array([1.0, 5.0])
    lam = np.array([0.5, 0.25])  # per centre, as lemma8 gives
    estimate, distance, nearest = _estimate(centre_loss, lam, *assign(points, centres))
    assert nearest.tolist() == [1, 0, 1]  # (6, 0) is 36 from the first centre and 16 from the second
    np.testing.assert_allclose(distance, [0.25 * 16, 0.5 * 2, 0.25 * 10])
    np.testing.assert_allclose(estimate, [5.0 + 4.0, 1.0 + 1.0, 5.0 + 2.5])


def test_the_snap_is_counted_and_the_distance_share_logged():
    result = get_selector("coreset").select(make_context(n_train=400, n_seed=40, budget=120))
    assert 0 <= result.info["snap_moved"] <= 400 - 120
    assert 0.0 <= result.info["distance_share"] <= 1.0
    zero = get_selector("coreset").select(make_context(n_train=400, n_seed=40, budget=120, settings=Settings(lam=0.0)))
    assert zero.info["distance_share"] == 0.0


def test_inverse_inclusion_weights_are_unbiased_against_monte_carlo():
    """E[1{i in S} / q_i] = 1 for every item (Horvitz-Thompson), within 3 standard errors."""
    weights = np.array([5.0, 1.0, 1.0, 0.5, 3.0, 0.2, 2.0])
    size, repeats = 3, 20000
    rng = np.random.default_rng(0)
    total = np.zeros((repeats, len(weights)))
    frequency = np.zeros(len(weights))
    for r in range(repeats):
        drawn, probs, inclusion = sample_without_replacement(weights, size, rng)
        total[r, drawn] = 1.0 / inclusion[drawn]
        frequency[drawn] += 1
    mean, se = total.mean(0), total.std(0, ddof=1) / math.sqrt(repeats)
    assert np.all(np.abs(mean - 1.0) < 3 * se), (mean, se)
    # the with-replacement weight 1/(s p) is not that: s p of the heaviest item exceeds 1
    assert size * probs[0] > 1 > frequency[0] / repeats


def test_drawing_the_whole_pool_includes_everything_for_sure():
    drawn, _, inclusion = sample_without_replacement(np.array([1.0, 2.0, 3.0]), 3, np.random.default_rng(0))
    assert sorted(drawn.tolist()) == [0, 1, 2] and inclusion.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["auto", "lemma8"])
def test_lambda_is_finite_and_sane_on_degenerate_centres(mode):
    m = parse_lam_mode(mode)
    one = np.ones((5, 3))
    assert estimate_lambda(m, one, np.arange(5.0), 100).tolist() == [0.0] * 5  # one distinct embedding
    twins = np.repeat([[0.0, 0.0], [3.0, 4.0]], 3, axis=0)
    lam = estimate_lambda(m, twins, np.repeat([1.0, 2.0], 3), 100)
    assert np.isfinite(lam).all() and (lam >= 0).all()
    assert estimate_lambda(m, np.random.default_rng(0).normal(size=(8, 3)), np.full(8, 0.7), 100).max() == 0.0
    assert estimate_lambda(m, np.zeros((1, 3)), np.ones(1), 100).tolist() == [0.0]  # a single centre


def test_lambda_is_exact_far_from_the_origin():
    """Twenty distinct embeddings far from 0: float32's ||x||^2 - 2x.c + ||c||^2 is noise there
    (it once gave lam = 1.45e6); the exact float64 differences give the true ratio."""
    rng = np.random.default_rng(0)
    points = (1000.0 + rng.normal(scale=1e-2, size=(20, 4))).astype(np.float32)
    loss = rng.uniform(size=20)
    lam = estimate_lambda(parse_lam_mode("auto"), points, loss, 100)[0]
    x = points.astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.argmin(1)
    expected = np.median(np.abs(loss - loss[nearest]) / d[np.arange(20), nearest])
    assert lam == pytest.approx(expected, rel=1e-6)


def test_lemma8_and_scaled_modes():
    centres = np.random.default_rng(1).normal(size=(30, 2))
    loss = np.random.default_rng(2).uniform(size=30)
    auto = estimate_lambda(parse_lam_mode("auto"), centres, loss, 1000)
    np.testing.assert_allclose(estimate_lambda(parse_lam_mode("auto*10"), centres, loss, 1000), 10 * auto)
    lemma8 = estimate_lambda(parse_lam_mode("lemma8"), centres, loss, 1000)
    assert lemma8.shape == (30,) and np.median(lemma8) > auto[0]  # a max over 10 neighbours, times log n


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "lemma9", "auto*0", "auto*x", True])
def test_bad_lambdas_are_refused(bad):
    with pytest.raises(ConfigError, match="lam must be"):
        Settings(lam=bad)


def test_lambda_forms_are_canonical():
    assert [parse_lam(v) for v in ("AUTO", " lemma8", "auto*10", "auto*1", "0.5", None)] == [
        "auto", "lemma8", "auto*10", "auto", 0.5, "auto"
    ]
    assert Settings.from_params(Settings(lam="lemma8*2").as_params()) == Settings(lam="lemma8*2")


def test_the_resume_key_changes_with_each_of_its_inputs():
    key, settings = RunKey("mnist", "coreset", 2000, 0), Settings()
    base = {"altrack": "0.1.0", "git_commit": "abc", "torch": "2.14.1", "device": "cpu", "data": "d1"}
    hashes = {key.config_hash(settings, base)}
    for name, other in [("altrack", "0.2.0"), ("git_commit", "abd"), ("torch", "2.15.0"), ("device", "cuda"),
                        ("data", "d2")]:  # fmt: skip
        hashes.add(key.config_hash(settings, {**base, name: other}))
    hashes.add(key.config_hash(Settings(lam="lemma8"), base))
    assert len(hashes) == 7


def test_the_device_path_of_the_pool_distances_is_the_cpu_path_up_to_rounding():
    rng = np.random.default_rng(3)
    points = (rng.normal(size=(500, 16)) * 40 + 1000).astype(np.float32)  # far from the origin
    centres = points[rng.choice(500, 7, replace=False)]
    nearest_centre, cpu = assign(points, centres)
    device = _sq_offsets_on_device(*(torch.from_numpy(a) for a in (points, centres, nearest_centre)))
    np.testing.assert_allclose(device, cpu, rtol=1e-12)
    assert (cpu > 0).sum() == 493  # the 7 centre rows themselves are at 0


class _CountingCoreset(type(get_selector("coreset-grad"))):
    """coreset-grad whose k-means counts its calls (the real k-means, run)."""

    calls = 0

    @staticmethod
    def cluster(points, k, seed, device="cpu"):
        _CountingCoreset.calls += 1
        return type(get_selector("coreset")).cluster(points, k, seed, device)


def test_both_variants_read_one_clustering_of_the_stage_and_alone_compute_the_same():
    """In the embedding space the loss and gradient variants cluster the same points: a stage
    clusters once, with its shared seed, and a variant run alone (a fresh ``shared``) picks what
    it picks beside the other."""
    ctx = make_context(n_train=500, n_seed=40, budget=150)
    loss_based = get_selector("coreset").select(ctx)
    assert len(ctx.shared) == 1
    beside = get_selector("coreset-grad").select(dataclasses.replace(ctx, rng=np.random.default_rng(7)))
    assert len(ctx.shared) == 1  # read, not computed again
    alone = get_selector("coreset-grad").select(dataclasses.replace(ctx, rng=np.random.default_rng(7), shared={}))
    np.testing.assert_array_equal(beside.indices, alone.indices)
    np.testing.assert_array_equal(beside.weights, alone.weights)
    # the clustering's time counts in the run that read it too, so a method's time does not depend on company
    assert loss_based.shared_seconds == alone.shared_seconds == 0.0 < beside.shared_seconds
    centres = loss_based.roles == "centre"
    np.testing.assert_array_equal(loss_based.indices[centres], beside.indices[beside.roles == "centre"])
    assert not np.array_equal(loss_based.indices[~centres], beside.indices[~centres])  # their own losses and draws
    other_seed = get_selector("coreset").select(dataclasses.replace(ctx, shared_seed=ctx.shared_seed + 1))
    assert not np.array_equal(other_seed.indices[centres], loss_based.indices[centres])
    assert len(ctx.shared) == 2  # another seed: its own entry, even in the same dict
    _CountingCoreset.calls = 0
    _CountingCoreset().select(ctx)  # another k-means function: its own entry
    _CountingCoreset().select(dataclasses.replace(ctx, rng=np.random.default_rng(3)))
    assert _CountingCoreset.calls == 1 and len(ctx.shared) == 3
    loss_space = dataclasses.replace(ctx, settings=Settings(coreset_space="loss"), shared={})
    get_selector("coreset").select(loss_space)
    get_selector("coreset-grad").select(loss_space)
    assert len(loss_space.shared) == 2  # clustered on each variant's own loss: nothing to share

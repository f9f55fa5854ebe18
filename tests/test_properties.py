"""Property tests over random probability matrices, embeddings, budgets and ratios."""

from __future__ import annotations

import numpy as np
from conftest import make_context
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from altrack.selection import available_methods, get_selector
from altrack.settings import Settings

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    n_train = draw(st.integers(20, 120))
    seed_ratio = draw(st.floats(0.05, 0.6))
    cluster_ratio = draw(st.floats(0.05, 0.94 - seed_ratio))
    budget = draw(st.integers(2, n_train))
    n_seed = int(round(seed_ratio * budget))
    if not 1 <= n_seed < budget:
        n_seed = 1
    dim = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    kind = draw(st.sampled_from(["random", "duplicates", "zero-loss"]))
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n_train, dim)).astype(np.float32)
    ce_loss = None
    if kind == "duplicates":
        embeddings = np.repeat(embeddings[: max(1, n_train // 5)], 5, axis=0)[:n_train]
        embeddings = np.concatenate([embeddings, np.zeros((n_train - len(embeddings), dim), np.float32)])
    elif kind == "zero-loss":
        ce_loss = np.zeros(n_train)
    space = draw(st.sampled_from(["embedding", "loss"]))
    lam = draw(st.one_of(st.none(), st.floats(0, 10)))
    return dict(
        n_train=n_train, n_seed=n_seed, budget=budget, dim=dim, seed=seed, embeddings=embeddings, ce_loss=ce_loss,
        settings=Settings(seed_ratio=seed_ratio, cluster_ratio=cluster_ratio, lam=lam, coreset_space=space),
    )  # fmt: skip


def _check(method, problem):
    ctx = make_context(**problem)
    result = get_selector(method).select(ctx)
    chosen = result.indices
    assert len(chosen) == ctx.budget - len(ctx.seed_indices)
    assert len(np.unique(chosen)) == len(chosen)
    assert not np.isin(chosen, ctx.seed_indices).any()
    assert np.isin(chosen, ctx.pool_indices).all()
    if method.startswith("coreset"):
        sampled = result.roles == "sampled"
        assert np.isfinite(result.probabilities[sampled]).all() and (result.probabilities[sampled] > 0).all()
        assert np.isfinite(result.weights).all()
        n_centres = (result.roles == "centre").sum()
        assert n_centres == ctx.settings.n_clusters(ctx.budget, len(chosen))
        if len(ctx.pool_indices) > n_centres:  # a distribution over the non-centre pool exists
            assert abs(result.info["probability_sum"] - 1.0) < 1e-9
    again = get_selector(method).select(make_context(**problem)).indices
    np.testing.assert_array_equal(chosen, again)


@PROPERTY_SETTINGS
@given(problems(), st.sampled_from(available_methods()))
def test_every_method_keeps_its_invariants(problem, method):
    _check(method, problem)


def test_named_edge_cases():
    rng = np.random.default_rng(0)
    base = dict(n_train=40, dim=3, seed=1)
    # k'' larger than the pool it could fill: the centres take every pick, nothing is sampled.
    large_k2 = dict(base, n_seed=36, budget=40, settings=Settings(seed_ratio=0.9, cluster_ratio=0.09))
    # all losses zero: the estimates are all zero and the draw is uniform.
    zero = dict(base, n_seed=4, budget=20, ce_loss=np.zeros(40), settings=Settings(lam=0.0))
    # duplicate embeddings: every point sits on one of two locations.
    dup = dict(base, n_seed=4, budget=20, embeddings=np.repeat(rng.normal(size=(2, 3)), 20, 0).astype(np.float32))
    # a budget equal to the whole train split: every method selects the whole pool.
    whole = dict(base, n_seed=8, budget=40)
    for problem in (large_k2, zero, dup, whole):
        for method in available_methods():
            _check(method, problem)
    ctx = make_context(**whole)
    assert sorted(get_selector("coreset").select(ctx).indices.tolist()) == ctx.pool_indices.tolist()

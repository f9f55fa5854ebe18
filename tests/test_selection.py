from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_context, torch_threads
from sklearn.cluster import KMeans

from altrack.data import load_dataset
from altrack.protocol import train_seed_stage
from altrack.selection import available_methods, get_selector
from altrack.selection import kcenter as kcenter_module
from altrack.selection import kmeans as kmeans_module
from altrack.selection.coreset import estimate_lambda, sample_without_replacement
from altrack.selection.geometry import StepLoop, nearest, nearest_distinct, padded_steps, row_argmin, row_min
from altrack.selection.kcenter import _kcenter_on_device, kcenter_greedy, row_dots
from altrack.selection.kmeans import _plusplus_on_device, kmeans, kmeans_plusplus, lloyd
from altrack.settings import Settings, parse_lam_mode

ALL_METHODS = available_methods()


def test_registry_has_the_seven_methods():
    assert set(ALL_METHODS) == {
        "coreset", "coreset-grad", "kcenter", "margin", "entropy", "least-confidence", "random"
    }  # fmt: skip


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_picks_exactly_k_minus_kprime_distinct_pool_points(method):
    ctx = make_context()
    result = get_selector(method).select(ctx)
    chosen = result.indices
    assert len(chosen) == ctx.n_select == 60
    assert len(np.unique(chosen)) == len(chosen)
    assert not np.intersect1d(chosen, ctx.seed_indices).size
    assert np.isin(chosen, ctx.pool_indices).all()
    assert chosen.dtype == np.int64


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_is_deterministic_for_a_fixed_seed(method):
    first = get_selector(method).select(make_context(seed=3)).indices
    second = get_selector(method).select(make_context(seed=3)).indices
    np.testing.assert_array_equal(first, second)


# Toy matrices: row 0 is confident, row 1 is torn between two classes, row 2 is uniform.
TOY = np.array([[0.97, 0.01, 0.01, 0.01], [0.49, 0.49, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25]])


def test_margin_prefers_the_smallest_top1_minus_top2():
    scores = get_selector("margin").score(TOY)
    np.testing.assert_allclose(scores, [0.96, 0.0, 0.0])
    ctx = make_context(n_train=3, n_seed=0, budget=1, probs=TOY, embeddings=np.eye(3, dtype=np.float32))
    assert get_selector("margin").select(ctx).indices.tolist() == [1]  # tie with row 2 -> lower index


def test_entropy_prefers_the_largest_entropy():
    ctx = make_context(n_train=3, n_seed=0, budget=2, probs=TOY, embeddings=np.eye(3, dtype=np.float32))
    assert get_selector("entropy").select(ctx).indices.tolist() == [2, 1]


def test_least_confidence_prefers_the_smallest_max_probability():
    ctx = make_context(n_train=3, n_seed=0, budget=2, probs=TOY, embeddings=np.eye(3, dtype=np.float32))
    assert get_selector("least-confidence").select(ctx).indices.tolist() == [2, 1]


def test_score_ties_break_by_the_lower_index():
    probs = np.tile([0.5, 0.5, 0.0, 0.0], (6, 1))
    ctx = make_context(n_train=6, n_seed=1, budget=4, probs=probs, embeddings=np.eye(6, dtype=np.float32))
    pool = ctx.pool_indices
    for method in ("margin", "entropy", "least-confidence"):
        assert get_selector(method).select(ctx).indices.tolist() == pool[:3].tolist()


def test_kcenter_takes_the_farthest_point_from_the_seed_set_first():
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0]])
    centres = torch.tensor([[0.0]])
    assert kcenter_greedy(points, centres, 3) == [2, 3, 1]


def test_kcenter_never_repeats_a_point_with_duplicate_embeddings():
    points = torch.zeros(5, 2)
    assert kcenter_greedy(points, torch.zeros(1, 2), 5) == [0, 1, 2, 3, 4]


def test_kmeans_inertia_within_one_percent_of_sklearn():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5, size=(12, 8))
    x = (centres[rng.integers(12, size=3000)] + rng.normal(size=(3000, 8))).astype(np.float32)
    ours = kmeans(x, 12, seed=0)
    theirs = KMeans(12, n_init=1, random_state=0).fit(x)
    assert ours.inertia <= theirs.inertia_ * 1.01
    assert np.bincount(ours.labels, minlength=12).min() > 0


@pytest.mark.parametrize("inertia_tol", [0.0, 7e-4, 0.5])  # the shift rule, the default, the first iteration
def test_kmeans_labels_and_inertia_are_those_of_its_centres_whichever_rule_stopped_it(inertia_tol):
    """On a host the assignment of an iteration the inertia rule dropped is reused, not recomputed:
    it must be the one the returned centres give."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2000, 6)) + rng.integers(0, 4, size=(2000, 1)) * 3).astype(np.float32)
    result = kmeans(x, 9, seed=2, inertia_tol=inertia_tol, warm_start_per_cluster=None)
    labels, dists = nearest(torch.from_numpy(x), torch.from_numpy(result.centres))
    np.testing.assert_array_equal(result.labels, labels.numpy())
    assert result.inertia == float(dists.double().sum())


def test_lloyd_gives_an_empty_cluster_the_farthest_point():
    """A centre nobody is nearest to takes the point farthest from its own centre; without that
    it would fall to the origin and the run would end elsewhere."""
    x = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    centres, _ = lloyd(x, torch.tensor([[0.0], [10.0], [100.0]]), max_iter=10, tol=0.0)
    assert sorted(centres.flatten().tolist()) == [0.5, 10.0, 12.0]
    # the shift counts the moved empty centre: measured without it, Lloyd would stop after one step
    centres, n_iter = lloyd(torch.tensor([[-1.0], [1.0], [10.0]]), torch.tensor([[0.0], [10.0], [0.0]]), 10, 0.0)
    assert centres.flatten().tolist() == [1.0, 10.0, -1.0] and n_iter == 3


def test_nearest_distinct_never_reuses_a_point():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    c = torch.tensor([[0.1], [0.2], [2.9]])  # both first centres are nearest to row 0
    assert nearest_distinct(x, c).tolist() == [0, 1, 3]


def test_coreset_includes_centres_and_probabilities_sum_to_one():
    settings = Settings(seed_ratio=0.25, cluster_ratio=0.25)
    ctx = make_context(n_train=400, n_seed=20, budget=80, settings=settings)
    result = get_selector("coreset").select(ctx)
    roles = result.roles.tolist()
    n_clusters = settings.n_clusters(80)
    assert roles.count("centre") == n_clusters == 20
    assert roles.count("sampled") == ctx.n_select - n_clusters == 40
    sampled = result.roles == "sampled"
    assert np.all(result.probabilities[sampled] > 0)
    assert np.all(result.weights[sampled] >= 1.0)  # 1 / inclusion probability (tests/test_coreset.py)
    assert result.info["probability_sum"] == pytest.approx(1.0)
    assert result.info["lam_mode"] == "auto" and result.info["lam"] >= 0


def test_coreset_with_fixed_lambda_zero_samples_by_centre_loss():
    """lam = 0: l~(e) = l(c_i), so points in a zero-loss cluster are never drawn first."""
    emb = np.concatenate([np.zeros((100, 2)), np.full((100, 2), 10.0)]).astype(np.float32)
    emb += np.random.default_rng(0).normal(scale=0.01, size=emb.shape).astype(np.float32)
    loss = np.concatenate([np.zeros(100), np.ones(100)])
    ctx = make_context(
        n_train=200, n_seed=9, budget=30, embeddings=emb, ce_loss=loss,
        settings=Settings(seed_ratio=0.3, cluster_ratio=0.1, lam=0.0),
    )  # fmt: skip
    result = get_selector("coreset").select(ctx)
    sampled = result.indices[result.roles == "sampled"]
    assert len(sampled) == 30 - 9 - 3
    assert (sampled >= 100).all()


def test_coreset_grad_samples_by_the_gradient_loss():
    """CE says cluster B matters, the gradient norm says A: each variant follows its own loss."""
    emb = np.concatenate([np.zeros((100, 2)), np.full((100, 2), 10.0)]).astype(np.float32)
    emb += np.random.default_rng(0).normal(scale=0.01, size=emb.shape).astype(np.float32)
    settings = Settings(seed_ratio=0.3, cluster_ratio=0.1, lam=0.0)
    ctx = make_context(n_train=200, n_seed=9, budget=30, embeddings=emb, settings=settings,
                       ce_loss=np.concatenate([np.zeros(100), np.ones(100)]))  # fmt: skip
    ctx = dataclasses.replace(ctx, grad_loss=np.concatenate([np.ones(100), np.zeros(100)]))
    for method, cluster in (("coreset", "B"), ("coreset-grad", "A")):
        result = get_selector(method).select(ctx)
        sampled = result.indices[result.roles == "sampled"]
        assert (sampled >= 100).all() if cluster == "B" else (sampled < 100).all(), method


def test_coreset_loss_space_clusters_the_losses():
    loss = np.concatenate([np.zeros(150), np.full(150, 5.0)])
    ctx = make_context(n_train=300, n_seed=10, budget=12, ce_loss=loss,
                       settings=Settings(seed_ratio=0.8, cluster_ratio=0.15, coreset_space="loss"))  # fmt: skip
    centres = get_selector("coreset").select(ctx).indices[:2]
    assert sorted(loss[centres].tolist()) == [0.0, 5.0]  # one centre per loss level, whatever the embeddings


def test_estimate_lambda_auto_is_the_median_ratio_to_the_nearest_other_centre():
    centres = np.array([[0.0], [1.0], [3.0], [7.0]])
    loss = np.array([0.0, 1.0, 9.0, 9.0])
    lam = estimate_lambda(parse_lam_mode("auto"), centres, loss, n_pool=100)
    # nearest other centre: 0->1 (1/1), 1->0 (1/1), 3->1 (8/4), 7->3 (0/16)
    np.testing.assert_allclose(lam, np.median([1.0, 1.0, 2.0, 0.0]))


def test_sampling_all_zero_weights_is_uniform_and_distinct():
    positions, probs, _ = sample_without_replacement(np.zeros(10), 10, np.random.default_rng(0))
    assert sorted(positions.tolist()) == list(range(10))
    np.testing.assert_allclose(probs, 0.1)


def _gemv(points, p):
    return points @ p


def _plain_kcenter(points, centres, n, dots=row_dots):
    """The greedy without pruning: one product with every point per pick, by ``dots``: the pruned
    loop's ``row_dots``, or ``_gemv``, the GEMV of a6cf675's greedy and of the GPU's loop."""
    x_sq = (points * points).sum(1)
    _, min_d = nearest(points, centres) if len(centres) else (None, torch.full_like(x_sq, float("inf")))
    chosen = []
    for _ in range(n):
        j = int(torch.argmax(min_d))
        chosen.append(j)
        torch.minimum(min_d, (x_sq - 2.0 * dots(points, points[j]) + x_sq[j]).clamp_(min=0.0), out=min_d)
        min_d[chosen] = -1.0
    return chosen


def _greedy_walk(points, centres, picks):
    """For each pick in turn: (the pick, every point's float64 squared distance to its nearest
    centre, the taken mask, the largest distance among untaken points), all as they stand before
    the pick: what a farthest-point check reads. The two arrays are updated in place, so once the
    walk is exhausted they hold the state after the last pick."""
    x64 = points.numpy().astype(np.float64)
    nearest_sq = ((x64[:, None, :] - centres.numpy().astype(np.float64)[None]) ** 2).sum(-1).min(1)
    taken = np.zeros(len(x64), dtype=bool)
    for j in picks:
        yield j, nearest_sq, taken, nearest_sq[~taken].max()
        taken[j] = True
        np.minimum(nearest_sq, ((x64 - x64[j]) ** 2).sum(1), out=nearest_sq)


def _kcenter_case(case):
    rng = np.random.default_rng(len(case))
    x = rng.normal(size=(2000, 12)).astype(np.float32) * 3
    if case.startswith("wider-than-projection"):  # 40 dims: the projection bound keeps 12, so it truly bounds
        x = (x @ rng.normal(size=(12, 40)) + 0.1 * rng.normal(size=(2000, 40))).astype(np.float32)
    if case == "duplicates":
        x[:1000] = x[0]
    if case.startswith("far-from-origin"):  # squared norms 3e6, squared distances ~100: the largest margin
        x = x + np.float32(500)
    if case.endswith("in-one-dimension"):  # the bound's rounding, not the distance's, is then the larger
        x = x[:, :1] * np.float32(100)
    points = torch.from_numpy(x)
    m = 0 if case.endswith("no-seeds") else 25  # none: the first pick measures every row
    return points[m:], points[:m]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["spread", "duplicates", "no-seeds", "wider-than-projection",
                                  "wider-than-projection-no-seeds", "far-from-origin", "spread-in-one-dimension",
                                  "far-from-origin-in-one-dimension"])  # fmt: skip
def test_pruned_kcenter_picks_exactly_what_the_plain_greedy_picks(case, threads):
    """Far from the origin too, where squared norms are 3e4 times the squared distances: the
    bounds' margins hold there, and the measured points round as they do in the full pass."""
    points, centres = _kcenter_case(case)
    with torch_threads(threads):
        assert kcenter_greedy(points, centres, 400) == _plain_kcenter(points, centres, 400)


@pytest.mark.parametrize("case", ["spread", "duplicates", "no-seeds", "wider-than-projection"])
def test_the_gpus_kcenter_loop_picks_what_the_plain_greedy_picks_by_gemv(case):
    """The GPU's loop (a CUDA graph there, the same kernels), run here on a CPU."""
    points, centres = _kcenter_case(case)
    assert _kcenter_on_device(points, centres, 400) == _plain_kcenter(points, centres, 400, _gemv)


def test_row_dots_round_each_row_as_it_would_alone():
    """Whatever the batch around a row and the thread count: MKL's GEMV does not (on an Intel
    Xeon a row of a 90-row batch rounded an ulp away from the same row of the full product, and
    a 500-row batch differently at one thread and at two), and k-center's picks followed it."""
    rng = np.random.default_rng(11)
    points = torch.from_numpy(rng.normal(size=(20000, 128)).astype(np.float32))
    p = points[7]
    whole = row_dots(points, p)
    assert torch.equal(torch.stack([row_dots(points[i : i + 1], p)[0] for i in range(300)]), whole[:300])
    for threads in (1, 2):
        with torch_threads(threads):
            for size in (1, 5, 17, 90, 500, 3000):
                rows = torch.from_numpy(np.sort(rng.choice(len(points), size, replace=False)))
                assert torch.equal(row_dots(points.index_select(0, rows), p), whole[rows]), (threads, size)


def test_the_pruned_kcenter_measures_every_pick_through_row_dots(monkeypatch):
    """The guard that holds on any CPU: one where a GEMV happens to round rows alike would pass
    the thread-count test below with a GEMV back in the loop."""
    batches = []

    def spy(rows, p):
        batches.append(rows.shape[0])
        return row_dots(rows, p)

    monkeypatch.setattr(kcenter_module, "row_dots", spy)
    points, centres = _kcenter_case("spread")
    assert kcenter_greedy(points, centres, 50) == _plain_kcenter(points, centres, 50)
    assert len(batches) == 50


def test_pruned_kcenter_measures_a_point_its_bound_rounds_onto_the_threshold():
    """One dimension, far from the origin, where the bound's test rounds by more than the distance's
    margin (8 eps d of the largest squared norm): row 3's projected distance to pick 1 is 82.9
    against a threshold of 118, yet its test, summed in float32, came to exactly 0 (a review found
    the case). The greedy moves row 3 from 84 to 80, where it ties row 2 and loses to the lower
    row; left unmeasured, it stayed at 84 and was taken third."""
    f = np.float32
    far = f(5964.325)
    points = torch.from_numpy(np.array([[f(-5940.9126)], [f(-5922.762)], [f(5972.88)], [f(-5931.8657)]]
                                       + [[far]] * 337, dtype=np.float32))  # fmt: skip
    centres = torch.from_numpy(np.array([[far]], dtype=np.float32))
    assert _plain_kcenter(points, centres, 4) == [0, 1, 2, 3]
    assert kcenter_greedy(points, centres, 4) == [0, 1, 2, 3]


def test_kcenter_picks_on_a_real_pool_do_not_depend_on_the_thread_count(data_dir):
    """A Fashion-MNIST seed model's embeddings tie within an ulp or exactly several times per run,
    so a rounding that followed the thread count (a GEMV's) gave a grid with ``--workers 2``
    other k-center picks than with one worker (seed 0 at k = 3000: accuracy 0.8029 against
    0.7993; the picks parted at the 2,231st of 2,600)."""
    data = load_dataset("fashion_mnist", data_dir)
    stage = train_seed_stage(data, 3000, 0, Settings())
    pool = torch.from_numpy(np.ascontiguousarray(stage.embeddings[stage.pool_indices], dtype=np.float32))
    seeds = torch.from_numpy(np.ascontiguousarray(stage.embeddings[stage.seed_indices], dtype=np.float32))
    picks = {}
    for threads in (1, 2):
        with torch_threads(threads):
            picks[threads] = kcenter_greedy(pool, seeds, 2600)
    assert picks[1] == picks[2]


def test_pruned_kcenter_far_from_the_origin_parts_from_a_gemv_greedy_only_at_a_rounding_tie():
    """Far from the origin float32 resolves squared distances only to about 0.2% (||x||^2 - 2 x.c +
    ||c||^2 with squared norms 3e4 times the squared distances), and a GEMV (a6cf675's greedy, the
    GPU's loop) rounds a row otherwise than ``row_dots`` does: the two greedies may then part.
    They must agree until two points tie within that rounding, and every pruned pick must be a
    farthest untaken point up to it (float64 distances), which a bound that ruled out a point the
    new centre moves would break."""
    points, centres = _kcenter_case("far-from-origin")
    pruned, plain = kcenter_greedy(points, centres, 400), _plain_kcenter(points, centres, 400, _gemv)
    assert len(set(pruned)) == 400
    assert _kcenter_on_device(points, centres, 400) == plain
    top = float((points * points).sum(1).max())
    # eight ulps of the largest squared norm (about 2.9): what the expansion's roundings come to in
    # practice; the worst case, 4 d eps of it, would be 17, a fifth of the squared distances
    tol = 8 * torch.finfo(torch.float32).eps * top
    parted = False
    for step, theirs in zip(_greedy_walk(points, centres, pruned), plain, strict=True):
        ours, nearest_sq, _, farthest = step
        assert nearest_sq[ours] >= farthest - tol, (ours, nearest_sq[ours], farthest)
        if not parted and ours != theirs:  # the first parting: a tie within rounding, nothing more
            assert abs(nearest_sq[ours] - nearest_sq[theirs]) <= tol, (ours, theirs)
            parted = True
    _, nearest_sq, taken, _ = step  # the walk's live arrays, now as they stand after the last pick
    assert tol < 0.1 * np.median(nearest_sq[~taken])  # far tighter than the squared distances it separates


def test_pruned_kcenter_takes_the_lower_twin_when_duplicates_tie():
    """Duplicated pairs tie to the last bit: ``row_dots`` rounds twins alike wherever they sit in
    a batch, so the lower row is taken, as in the plain greedy (a GEMV may round twins in one
    batch apart); each pick a farthest untaken point (float64 distances, up to float32
    rounding), never a taken one."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1500, 20)).astype(np.float32)
    x[1::2] = x[::2]
    points, centres = torch.from_numpy(x), torch.from_numpy(rng.normal(size=(10, 20)).astype(np.float32))
    picks = kcenter_greedy(points, centres, 500)
    assert picks == _plain_kcenter(points, centres, 500)
    assert len(set(picks)) == 500
    for j, nearest_sq, _, farthest in _greedy_walk(points, centres, picks):
        assert nearest_sq[j] >= farthest * (1 - 1e-5), (j, nearest_sq[j], farthest)


def test_kcenter_refuses_more_picks_than_points():
    with pytest.raises(ValueError, match="5 picks but only 4 points"):
        kcenter_greedy(torch.zeros(4, 2), torch.zeros(1, 2), 5)


@pytest.mark.parametrize("case", ["spread", "all-but-three-coincide"])
def test_kmeans_plusplus_for_a_gpu_picks_what_the_cpu_loop_picks(case):
    """The GPU's k-means++ (no host round trip per centre) run here on a CPU: the same centres,
    the degenerate case (every point on a centre) included. Where CI has no GPU, this is the path
    a GPU runs, checked against the CPU's."""
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(600, 16)).astype(np.float32))
    if case != "spread":
        x[3:] = 0.0
    for k in (1, 2, 40):
        cpu = kmeans_plusplus(x, k, torch.Generator().manual_seed(k))
        assert torch.equal(_plusplus_on_device(x, k, torch.Generator().manual_seed(k)), cpu)


def test_cluster_sums_for_a_gpu_match_the_cpus_up_to_rounding():
    """A GPU sums clusters as one-hot GEMMs in fixed blocks (same bits each time); a CPU with
    index_add_. Small blocks here, so that the blocking is exercised."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(5000, 8)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 37, size=5000))
    expected = torch.zeros(37, 8).index_add_(0, labels, x)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kmeans_module, "ONE_HOT_ELEMENTS", 37 * 300)
        got, _ = kmeans_module._sums_by_matmul(x, labels, 37)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_the_padded_rounds_a_gpu_runs_past_the_last_step_change_nothing(monkeypatch):
    """On CUDA the greedy loops run whole rounds of graph steps, so up to GRAPH_STEPS - 1 steps
    past the last one; here, on a CPU, the loops are made to run those padded steps too: the
    buffers hold them and the picks are unchanged."""
    def padded(loop, n):
        for _ in range(padded_steps(n)):
            loop.step()

    x = torch.from_numpy(np.random.default_rng(5).normal(size=(300, 6)).astype(np.float32))
    plain = {n: _kcenter_on_device(x[5:], x[:5], n) for n in (0, 1, 64, 65, 200)}
    centres = {k: kmeans_plusplus(x, k, torch.Generator().manual_seed(k)) for k in (1, 2, 65, 130)}
    monkeypatch.setattr(StepLoop, "run", padded)
    for n, picks in plain.items():
        assert _kcenter_on_device(x[5:], x[:5], n) == picks
    for k, expected in centres.items():
        assert torch.equal(_plusplus_on_device(x, k, torch.Generator().manual_seed(k)), expected)


def test_a_greedy_loop_reused_for_another_pool_of_its_shape_starts_clean():
    """The device loops keep their buffers (and on CUDA their captured graph) per shape: a second
    pool of that shape, then the first again, give what fresh buffers give."""
    rng = np.random.default_rng(8)
    a, b = (torch.from_numpy(rng.normal(size=(400, 6)).astype(np.float32)) for _ in range(2))
    first = _kcenter_on_device(a[5:], a[:5], 70), _plusplus_on_device(a, 40, torch.Generator().manual_seed(1))
    other = _kcenter_on_device(b[5:], b[:5], 70), _plusplus_on_device(b, 40, torch.Generator().manual_seed(2))
    again = _kcenter_on_device(a[5:], a[:5], 70), _plusplus_on_device(a, 40, torch.Generator().manual_seed(1))
    assert first[0] == again[0] != other[0] and torch.equal(first[1], again[1])
    assert first[0] == kcenter_greedy(a[5:], a[:5], 70)
    assert torch.equal(first[1], kmeans_plusplus(a, 40, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(("case", "max_iter", "inertia_tol"), [("spread", 300, 3e-4), ("spread", 300, 0.0),
                                                               ("spread", 3, 0.0), ("empty", 300, 0.0)])  # fmt: skip
def test_lloyd_with_its_stopping_rules_on_the_device_gives_the_hosts_centres(case, max_iter, inertia_tol):
    """On CUDA Lloyd checks its stopping rules on the device, a round of iterations at a time, and
    hands an iteration that empties a cluster to the host: the same centres and count as ``lloyd``
    (here both on a CPU). Run twice: the loop's buffers are reused."""
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.normal(size=(500, 4)).astype(np.float32))
    start = x[:30].clone()
    if case == "empty":  # far-away starting centres that no point is nearest to
        start[:3] = 1e3
    tol_abs = 1e-4 * float(x.var(0).mean())
    expected = lloyd(x, start, max_iter, 1e-4, inertia_tol)
    for _ in range(2):
        centres, n_iter = kmeans_module._lloyd_on_device(x, start, max_iter, tol_abs, inertia_tol)
        assert n_iter == expected[1] and torch.equal(centres, expected[0])


def test_row_min_gives_torchs_min_with_its_first_index_among_ties():
    """``nearest`` takes each row's minimum from amin and its index from numpy's argmin (torch's
    indexed min is a scalar loop on a CPU): the same values and indices as ``min(1)``, the first
    of equal minima included (exact ties, signed zeros, infinities, NaNs; float64, a transposed block)."""
    rng = np.random.default_rng(6)
    blocks = [torch.from_numpy(rng.normal(size=(300, 77)).astype(np.float32)),
              torch.from_numpy(rng.integers(0, 4, size=(300, 77)).astype(np.float32)),  # many exact ties
              torch.tensor([[0.0, -0.0, 1.0], [-0.0, 0.0, 0.0], [np.inf, np.inf, np.inf], [2.0, -np.inf, -np.inf],
                            [1.0, np.nan, 0.0], [np.nan, np.nan, 2.0]]),
              torch.from_numpy(rng.normal(size=(77, 300))).T]  # float64, not contiguous
    for block in blocks:
        values, indices = row_min(block)
        expected = block.min(1)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(indices, expected.indices)
        assert torch.equal(row_argmin(block), block.argmin(1))


def test_cluster_sizes_from_the_one_hot_blocks_are_bincounts():
    """CUDA's Lloyd counts clusters from the one-hot GEMM's blocks (bincount reads its size on the
    host, which a graph cannot): exact integers, in any blocking."""
    labels = torch.from_numpy(np.random.default_rng(4).integers(0, 37, size=5000))
    x = torch.ones(5000, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kmeans_module, "ONE_HOT_ELEMENTS", 37 * 300)
        _, counts = kmeans_module._sums_by_matmul(x, labels, 40)
    assert torch.equal(counts, torch.bincount(labels, minlength=40))


def test_lloyd_with_no_iterations_returns_its_start_on_the_host_and_the_device():
    x = torch.from_numpy(np.random.default_rng(2).normal(size=(50, 3)).astype(np.float32))
    for centres, n_iter in (lloyd(x, x[:4], 0, 1e-4), kmeans_module._lloyd_on_device(x, x[:4], 0, 1e-6, 0.0)):
        assert n_iter == 0 and torch.equal(centres, x[:4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs, one-hot counts)")
def test_on_cuda_lloyds_graph_rounds_give_the_per_iteration_loops_centres():
    """CUDA's branch of the device Lloyd (graph replays, the empty-cluster hand-off) against the
    host loop on the same GPU."""
    x = torch.randn(3000, 32, generator=torch.Generator().manual_seed(0)).cuda()
    start = x[:30].clone()
    start[:3] = 1e3  # clusters that start empty
    tol_abs = 1e-4 * float(x.var(0).mean())
    centres, n_iter = kmeans_module._lloyd_on_host(x, start, 300, tol_abs, 3e-4)
    got, got_iter = kmeans_module._lloyd_on_device(x, start, 300, tol_abs, 3e-4)
    assert got_iter == n_iter and torch.equal(got, centres)

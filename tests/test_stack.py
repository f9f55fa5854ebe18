"""Stacked training: each model trains as it would alone, whatever shares its stack, its block
or its worker; selections and accuracies do not depend on how the grid groups work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from altrack.catalog import METHODS
from altrack.config import GridConfig
from altrack.data import load_dataset
from altrack.errors import ConfigError
from altrack.models import build_model
from altrack.protocol import (
    RunResult,
    check_stacks,
    fresh_model,
    iterate_grid,
    outputs_of,
    run_identity,
    stack_limit,
    stack_width,
    stream_seed,
)
from altrack.provenance import STACK_WIDTH
from altrack.settings import RunKey, Settings
from altrack.stack import StackedNet, infer_stacked, model_bytes, train_stacked
from altrack.tracking.runs import rerun_command, run_params
from altrack.train import forward_all, mean_loss, train


def _train_both(data, n_models, n, epochs=2, weighted=False):
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(len(data.y_train), n, replace=False)) for _ in range(n_models)]
    weights = [rng.uniform(0.5, 2.0, size=n) for _ in range(n_models)] if weighted else None
    singles = []
    for i, row in enumerate(rows):
        model = fresh_model(data.name, "cpu", stream_seed(i, 4))
        idx = torch.from_numpy(row)
        losses = train(model, data.x_train[idx], data.y_train[idx], epochs=epochs, batch_size=32, lr=1e-3,
                       generator=torch.Generator().manual_seed(stream_seed(i, 5)),
                       weights=None if weights is None else torch.from_numpy(weights[i]).float())  # fmt: skip
        singles.append((model, losses))

    def stacked(ids):
        out = train_stacked(
            [fresh_model(data.name, "cpu", stream_seed(i, 4)) for i in ids], data.x_train, data.y_train,
            torch.from_numpy(np.stack([rows[i] for i in ids])), epochs=epochs, batch_size=32, lr=1e-3,
            generators=[torch.Generator().manual_seed(stream_seed(i, 5)) for i in ids],
            weights=None if weights is None else torch.from_numpy(np.stack([weights[i] for i in ids])).float(),
        )  # fmt: skip
        return out

    return singles, stacked


def _params(model):
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize(("weighted", "n"), [(False, 100), (True, 100), (True, 103)])
def test_stacked_mlps_match_one_at_a_time_and_each_other_bit_for_bit(data_dir, weighted, n):
    """n = 103 ends each epoch on a batch of 7, whose mean's 1/7 is not exact in binary."""
    data = load_dataset("mnist", data_dir)
    singles, stacked = _train_both(data, 3, n, weighted=weighted)
    three, alone = stacked([0, 1, 2]), stacked([1])
    for a, b in zip(_params(three.models[1]), _params(alone.models[0]), strict=True):
        assert torch.equal(a, b)  # grouping invariance: the same bits alone or in a stack
    assert three.losses[1] == alone.losses[0]
    for (model, losses), twin, twin_losses in zip(singles, three.models, three.losses, strict=True):
        for a, b in zip(_params(model), _params(twin), strict=True):
            assert torch.equal(a, b)  # the nn.Module reference path, bit for bit on a CPU
        assert losses == twin_losses


def test_a_stacked_cifarnet_matches_one_at_a_time(data_dir):
    data = load_dataset("cifar10", data_dir)
    data = type(data)(data.name, data.x_train[:600], data.y_train[:600], data.x_test[:10], data.y_test[:10])
    singles, stacked = _train_both(data, 2, 64, epochs=1)
    two = stacked([0, 1])
    # a grouped convolution sums in another order than N plain ones, and Adam turns a rounding
    # difference in a near-zero gradient into a step of up to lr (with two threads, 7 of 1,728
    # first-layer weights differ by up to 5e-5): compare what the models compute, and their losses
    with torch.no_grad():
        alone = [model(data.x_test) for model, _ in singles]
        together = [twin(data.x_test) for twin in two.models]
    for i in range(2):
        torch.testing.assert_close(alone[i], together[i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(singles[i][1], two.losses[i], rtol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-2)  # two models, not one twice
    # a stack of one, as a CPU trains CifarNets: the model's bits, though the stack pools before its
    # ReLUs (max commutes with a monotone ReLU, in values and in the gradient's route)
    one = stacked([0])
    [model], [losses] = one.models, one.losses
    assert all(torch.equal(a, b) for a, b in zip(_params(singles[0][0]), _params(model), strict=True))
    assert losses == singles[0][1]


def test_a_diverged_model_fails_alone(data_dir):
    data = load_dataset("mnist", data_dir)
    rows = torch.from_numpy(np.stack([np.arange(64), np.arange(64, 128)]))
    models = [fresh_model("mnist", "cpu", i) for i in range(2)]
    with torch.no_grad():
        models[0].head.weight.fill_(float("nan"))
    out = train_stacked(models, data.x_train, data.y_train, rows, epochs=1, batch_size=32, lr=1e-3,
                        generators=[torch.Generator().manual_seed(i) for i in range(2)])  # fmt: skip
    assert out.diverged[0].startswith("training loss became nan") and out.diverged[1] is None
    assert all(torch.isfinite(p).all() for p in out.models[1].parameters())


def _grid(data_dir, **kw):
    base = dict(datasets=("mnist",), methods=("coreset", "coreset-grad", "random", "margin"), budgets=(100,), runs=1,
                settings=Settings(epochs=1), out=None, data_dir=str(data_dir), device="cpu")  # fmt: skip
    return GridConfig(**{**base, **kw})


def test_a_run_does_not_depend_on_its_block_its_stack_or_its_company(data_dir):
    # coreset-grad alone computes the clustering that beside coreset it reads
    alone = {r.key: r for method in ("coreset", "coreset-grad")
             for r in iterate_grid(_grid(data_dir, methods=(method,)), progress=False)}  # fmt: skip
    # one method alone against all seven, one seed alone against four, a stack against stacks of one
    crowd = {r.key: r for r in iterate_grid(_grid(data_dir, runs=4, methods=METHODS), progress=False)}
    narrow = {r.key: r for r in iterate_grid(_grid(data_dir, runs=4, stack=1), progress=False)}
    assert len(alone) == 2 and len(crowd) == 4 * len(METHODS) == 28 and len(narrow) == 16
    for key, result in [*alone.items(), *narrow.items()]:
        for other in (crowd[key], narrow[key]):
            np.testing.assert_array_equal(result.selected_indices, other.selected_indices)
            assert result.test_accuracy == other.test_accuracy
            assert result.final_epoch_losses == other.final_epoch_losses


def test_stacks_stay_within_the_memory_cap():
    cpu = torch.device("cpu")
    assert stack_limit("mnist", cpu, requested=1000, memory_cap=8 << 20) == (8 << 20) // _need("mnist")
    assert stack_limit("mnist", cpu, requested=5, memory_cap=1 << 40) == 5
    assert stack_limit("cifar10", cpu, requested=50, memory_cap=1 << 40) == 1  # convolutions: one at a time on CPU
    with pytest.raises(ConfigError, match="cannot hold one mnist model"):
        stack_limit("mnist", cpu, memory_cap=1 << 10)


# 128 stacked MLPs in a fresh process after a warm-up stack of one (torch's and MKL's first-use
# buffers); the kernel's peak RSS is reset first (/proc/self/clear_refs), as loading the data
# may peak higher than the stack; prints the peak's growth over the RSS before
_LARGE_STACK = """
import re, sys
from pathlib import Path
import altrack  # noqa: F401 - before torch, as in the CLI
import torch
from altrack.data import load_dataset
from altrack.protocol import fresh_model
from altrack.stack import train_stacked

data = load_dataset("mnist", sys.argv[1])

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

def stack(n):
    rows = torch.stack([torch.randperm(60000, generator=torch.Generator().manual_seed(i))[:500] for i in range(n)])
    return train_stacked([fresh_model("mnist", "cpu", i) for i in range(n)], data.x_train, data.y_train, rows,
                         epochs=1, batch_size=32, lr=1e-3,
                         generators=[torch.Generator().manual_seed(i) for i in range(n)])

stack(1)
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the RSS now
before = status("VmRSS")
trained = stack(128)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_a_large_stack_takes_no_more_memory_than_the_cap_plans_for(data_dir):
    """A cap holds only as far as ``model_bytes`` bounds what a stacked model takes: 128 MLPs
    training together (their parameters, gradients, Adam state, batches and the trained models
    handed back) grow the peak RSS by less than 128 planned models (about 0.83 of it on this project's VM)."""
    done = subprocess.run([sys.executable, "-c", _LARGE_STACK, str(data_dir)], capture_output=True, text=True,
                          timeout=300, check=True)  # fmt: skip
    grown, planned = int(done.stdout), 128 * _need("mnist")
    assert 0 < grown <= planned, (grown, planned)


def test_a_cuda_runs_padded_width_is_part_of_its_identity_params_and_rerun_command():
    # the width follows from the config alone (no card is asked), so a Slurm launcher without a GPU,
    # its tasks and a replay on another card agree, and this runs without a GPU
    cuda, cpu, settings = torch.device("cuda"), torch.device("cpu"), Settings()
    assert stack_width("cifar10", cuda) == 35 and stack_width("mnist", cuda) == 64
    assert stack_width("mnist", cuda, requested=16) == 16
    assert stack_width("mnist", cuda, requested=64, memory_cap=3 * _need("mnist")) == 3  # an explicit cap lowers it
    assert stack_width("mnist", cuda, requested=10**9) == 10**9  # not fitted to a card: refused instead
    check_stacks("mnist", cuda, stack=10**9, gpu_here=False)  # by a launcher only where its card is here
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="pass a smaller --stack"):
            check_stacks("mnist", cuda, stack=10**9)
    assert stack_width("mnist", cpu, requested=16) is None  # a CPU's stacks are not padded
    key = RunKey("mnist", "coreset", 2000, 0)
    hashes = {stack: key.config_hash(settings, run_identity("mnist", "d", cuda, settings, stack)) for stack in (8, 16)}
    assert hashes[8] != hashes[16]  # a grid resumed with another --stack reruns its CUDA runs
    on_cpu = [run_identity("mnist", "d", cpu, settings, stack) for stack in (8, 16)]
    assert on_cpu[0] == on_cpu[1] and STACK_WIDTH not in on_cpu[0]  # and reuses its CPU runs
    ident = run_identity("mnist", "d", cuda, settings, 16)
    result = RunResult(key, settings, "cuda:0", ident)
    assert run_params(result)[STACK_WIDTH] == "16"
    assert rerun_command(result).endswith("--device cuda --stack 16")
    assert STACK_WIDTH not in run_params(RunResult(key, settings, "cpu", on_cpu[0]))
    assert "--stack" not in rerun_command(RunResult(key, settings, "cpu", on_cpu[0]))


def _need(dataset):
    return model_bytes(build_model(dataset), 32, (1, 28, 28))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs, cuBLAS)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("width", [None, 5])
@pytest.mark.parametrize(("dataset", "n", "weighted"), [("mnist", 100, True), ("mnist", 96, False),
                                                       ("cifar10", 100, False)])  # fmt: skip
def test_buffered_and_replayed_steps_give_the_plain_steps_bits(data_dir, device, width, dataset, n, weighted):
    """``graphs=True`` steps full batches through fixed buffers (on CUDA one recorded graph,
    replayed), ``graphs=False`` through slices: the same bits, with weights and without, with a
    short last batch and without, per-model GEMMs or a padded stack's batched ones."""
    data = load_dataset(dataset, data_dir, device)
    rows = torch.stack([torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(i))[:n]
                        for i in range(3)]).to(device)  # fmt: skip
    weights = torch.rand(3, n, generator=torch.Generator().manual_seed(9)).add(0.5).to(device) if weighted else None

    def run(graphs):
        return train_stacked([fresh_model(dataset, device, stream_seed(i, 4)) for i in range(3)], data.x_train,
                             data.y_train, rows, epochs=2, batch_size=32, lr=1e-3, weights=weights,
                             generators=[torch.Generator().manual_seed(i) for i in range(3)],
                             graphs=graphs, width=width)  # fmt: skip

    plain, buffered = run(False), run(True)
    assert plain.losses == buffered.losses
    for a, b in zip(plain.models, buffered.models, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


def _company(data, device, n_models, n, width):
    """``run(ids)``: the models ``ids`` of ``n_models`` trained in one stack of ``width``."""
    rows = torch.stack([torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(i))[:n]
                        for i in range(n_models)]).to(device)  # fmt: skip

    def run(ids):
        return train_stacked([fresh_model(data.name, device, stream_seed(i, 4)) for i in ids], data.x_train,
                             data.y_train, rows[ids], epochs=2, batch_size=32, lr=1e-3, width=width,
                             generators=[torch.Generator().manual_seed(i) for i in ids])  # fmt: skip

    return run


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(_params(a), _params(b), strict=True))


@pytest.mark.parametrize(("dataset", "n_models", "width"), [("mnist", 7, 9), ("cifar10", 3, 4)])
def test_a_padded_stack_gives_a_model_the_same_bits_in_any_company_and_place(data_dir, dataset, n_models, width):
    """Batched GEMMs (im2col for the convolutions) over a stack padded to a fixed width: a model's
    bits do not depend on its stack mates or its place in the stack."""
    data = load_dataset(dataset, data_dir)
    if dataset == "cifar10":
        data = type(data)(data.name, data.x_train[:600], data.y_train[:600], data.x_test[:10], data.y_test[:10])
    run = _company(data, "cpu", n_models, 64, width)
    many, alone, reversed_ = run(list(range(n_models))), run([1]), run(list(range(n_models))[::-1])
    assert many.losses[1] == alone.losses[0] == reversed_.losses[n_models - 2]
    assert _same(many.models[1], alone.models[0]) and _same(many.models[1], reversed_.models[n_models - 2])
    with pytest.raises(ValueError, match="width 2 cannot hold 3 models"):
        _company(data, "cpu", 3, 64, 2)([0, 1, 2])


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_batched_gemms_give_each_model_its_own_gradient(dataset):
    """The padded path's forward and backward against the per-model one, within float rounding
    (trained parameters drift further apart: Adam moves an element by about lr whatever the
    size of its gradient, so a gradient at rounding level can go either way)."""
    models = [fresh_model(dataset, "cpu", stream_seed(i, 4)) for i in range(3)]
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    x, y = torch.rand(3, 32, *shape, generator=torch.Generator().manual_seed(0)), torch.arange(96).view(3, 32) % 10
    grads = []
    for batched in (False, True):
        net = StackedNet(models, batched=batched)
        mean_loss(net.forward(x), y, None).sum().backward()
        stacked = [torch.stack([leaf.grad for leaf in leaves]) if net.per_model else p.grad
                   for p, leaves in zip(net.params, net.leaves, strict=True)]  # fmt: skip
        grads.append([net.model_layout(slot, g) for slot, g in zip(net.slots, stacked, strict=True)])
    for exact, batched in zip(*grads, strict=True):
        torch.testing.assert_close(batched, exact, rtol=0, atol=1e-5 * float(exact.abs().max()))


@pytest.mark.parametrize("batched", [False, True])
def test_a_stack_exports_its_models_unchanged(batched):
    """The batched path keeps a convolution's weight in its patches' (C_out, kh, kw, C) order and
    hands it back in the model's own."""
    models = [fresh_model("cifar10", "cpu", stream_seed(i, 4)) for i in range(2)]
    for model, twin in zip(models, StackedNet(models, batched=batched).export(models), strict=True):
        assert _same(model, twin)
        assert all(p.stride() == q.stride() for p, q in zip(_params(model), _params(twin), strict=True))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_stacked_inference_gives_a_model_the_same_outputs_in_any_company(data_dir, dataset):
    """A padded stack's forward pass (CUDA's evaluation and seed-model outputs): a model's logits
    and embeddings do not depend on its stack mates, a short last chunk included, and agree with
    the model alone to float rounding; ``outputs_of`` without a width is the model alone."""
    data = load_dataset(dataset, data_dir)
    x = data.x_test[:300]  # chunks of 4 x 32 rows: two full and a short one
    models = [fresh_model(dataset, "cpu", stream_seed(i, 4)) for i in range(3)]
    logits, embeddings = infer_stacked(models, x, width=4, batch_size=32)
    alone_logits, alone_embeddings = infer_stacked(models[1:2], x, width=4, batch_size=32)
    assert torch.equal(logits[1], alone_logits[0]) and torch.equal(embeddings[1], alone_embeddings[0])
    for i, model in enumerate(models):
        single = forward_all(model, x)
        torch.testing.assert_close(logits[i], single.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(embeddings[i], single.embeddings, rtol=1e-4, atol=1e-5)
    padded = list(outputs_of(models, x, 4, 32))
    assert len(padded) == 3 and all(torch.equal(out.logits, logits[i]) for i, out in enumerate(padded))
    assert all(torch.equal(out.logits, forward_all(m, x).logits) for out, m in zip(outputs_of(models, x, None, 32),
                                                                                   models, strict=True))  # fmt: skip
    with pytest.raises(ValueError, match="width 2 cannot hold 3 models"):
        infer_stacked(models, x, width=2, batch_size=32)


@needs_cuda
@pytest.mark.parametrize(("dataset", "width"), [("mnist", None), ("mnist", 64), ("cifar10", 35)])
def test_on_cuda_a_model_has_the_same_bits_alone_or_stacked(data_dir, dataset, width):
    """One addmm per model (``width=None``), or batched GEMMs over a stack padded to a fixed width:
    cuBLAS picks its kernels by the batch count, which the width fixes."""
    data = load_dataset(dataset, data_dir, "cuda")
    run = _company(data, "cuda", 35, 200, width)
    many, alone = run(list(range(35))), run([3])
    assert many.losses[3] == alone.losses[0]
    assert _same(many.models[3], alone.models[0])


def test_the_batched_path_refuses_layers_it_does_not_implement():
    class Strided(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten())
            self.head = nn.Linear(4 * 15 * 15, 10)

    StackedNet([Strided()])  # the exact path runs any stride
    with pytest.raises(TypeError, match="batched stacked training does not support Conv2d"):
        StackedNet([Strided()], batched=True)

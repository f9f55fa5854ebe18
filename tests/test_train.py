"""altrack.train's Adam: torch's update; the elementwise path gives the same bits in any blocking and
memory layout, the fused one (a CPU's) the same bits for a model alone and stacked."""

import pytest
import torch
from conftest import torch_threads

from altrack.train import Adam

SHAPES = [(3, 40, 50), (4, 3, 3, 3), (7,), ()]


def _params_and_grads(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """A stacked linear weight larger than a block, a channels-last conv weight whose gradients
    arrive contiguous (another layout), a bias and a scalar; three steps of gradients each, with
    signed zeros and subnormals among them."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    params[1] = params[1].contiguous(memory_format=torch.channels_last)
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
    odd = torch.tensor([0.0, -0.0, 1e-40, -1e-40])
    grads[0][0].view(-1)[:4] = odd
    grads[1][2][:4] = odd
    return params, grads


def _literal(params: list[torch.Tensor], grads: list[list[torch.Tensor]], lr: float) -> list[torch.Tensor]:
    """The update as it was written before it was blocked, one whole tensor per op."""
    params = [p.clone(memory_format=torch.preserve_format) for p in params]
    ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for steps, step in enumerate(grads, start=1):
        step_size = lr / (1 - 0.9**steps)
        bias_correction2_sqrt = (1 - 0.999**steps) ** 0.5
        for p, m, v, g in zip(params, ms, vs, step, strict=True):
            m.mul_(0.9).add_(g * (1 - 0.9))
            v.mul_(0.999).add_(g * g * (1 - 0.999))
            denom = (v.sqrt() / bias_correction2_sqrt).add_(1e-8)
            p.sub_(m / denom * step_size)
    return params


def _run(block: int, reference: bool = False) -> list[torch.Tensor]:
    params, grads = _params_and_grads(0)
    params = [p.clone(memory_format=torch.preserve_format).requires_grad_(True) for p in params]
    if reference:
        optimizer = torch.optim.Adam(params, lr=1e-2, foreach=False)
    else:
        optimizer = type("BlockedAdam", (Adam,), {"CPU_BLOCK": block})(params, 1e-2, fused=False)
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("block", [1, 37, 1000, 1 << 30])
def test_adam_gives_the_literal_updates_bits_in_any_blocking(block):
    params, grads = _params_and_grads(0)
    for a, b in zip(_literal(params, grads, 1e-2), _run(block), strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
        assert torch.equal(torch.signbit(a), torch.signbit(b))


def test_adam_is_torchs_adam():
    for a, b in zip(_run(37), _run(0, reference=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = [not torch.equal(a, p) for a, p in zip(_run(37), _params_and_grads(0)[0], strict=True)]
    assert all(moved)


def test_adam_follows_a_swapped_storage_and_steps_a_slice():
    params, grads = _params_and_grads(1)
    base = torch.randn(7, 12)
    sliced = base[:, :5]  # strides that flatten in no order
    optimizer = Adam([params[0].requires_grad_(True), sliced], 1e-2, fused=False)
    params[0].data = params[0].detach().clone() * 2  # new storage after the plan was made
    expected = _literal([params[0].detach(), sliced.clone()], [[grads[0][0], torch.ones(7, 5)]], 1e-2)
    params[0].grad, sliced.grad = grads[0][0].clone(), torch.ones(7, 5)
    beside = base[:, 5:].clone()
    optimizer.step()
    assert torch.equal(params[0].detach(), expected[0]) and torch.equal(sliced, expected[1])
    assert torch.equal(base[:, 5:], beside)  # what lies beside the slice is untouched


def test_adam_reading_its_schedule_from_a_table_gives_the_same_bits():
    """``schedule=S``: each step's bias corrections come from a table through a step counter (what
    a replayed CUDA graph needs); on a CPU that is the plain update bit for bit, so a table off by
    one step, or a counter that does not move, would show."""
    params, grads = _params_and_grads(2)
    plain = [p.clone(memory_format=torch.preserve_format).requires_grad_(True) for p in params]
    tabled = [p.clone(memory_format=torch.preserve_format).requires_grad_(True) for p in params]
    a, b = Adam(plain, 1e-2, fused=False), Adam(tabled, 1e-2, schedule=len(grads), fused=False)
    for step in grads:
        for p, q, grad in zip(plain, tabled, step, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(plain, tabled, strict=True))
    assert int(b._step) == len(grads)


def _fused_run(params: list[torch.Tensor], grads: list[list[torch.Tensor]], **kwargs) -> list[torch.Tensor]:
    params = [p.clone().requires_grad_(True) for p in params]
    optimizer = Adam(params, 1e-2, **kwargs)
    for step in grads:
        for p, grad in zip(params, step, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    return [p.detach() for p in params]


def test_the_fused_path_is_torchs_fused_adam_bit_for_bit():
    params, grads = _params_and_grads(3)
    params = [p.contiguous() for p in params]
    ours = _fused_run(params, grads)
    reference = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.Adam(reference, lr=1e-2, fused=True)
    for step in grads:
        for p, grad in zip(reference, step, strict=True):
            p.grad = grad.clone()
        optimizer.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(ours, reference, strict=True))
    assert all(not torch.equal(a, p) for a, p in zip(ours, params, strict=True))


SIZES = [(8, 51), (5, 300), (3, 217), (9, 102), (7, 100_352)]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stacked_parameter_gets_each_models_bits_alone(threads):
    """The fused kernel rounds its vector and scalar lanes differently, so a stacked tensor
    updated whole gives some elements other bits than their model alone (with AVX-512, one of
    these sizes did: the control below); ``stacked=True`` hands it each model's slice as a tensor
    of its own, as a CPU's exact path hands it each model's leaves."""
    whole_differs = False
    for models, size in SIZES:
        g = torch.Generator().manual_seed(size)
        stack = torch.randn(models, size, generator=g)
        grads = [[torch.randn(models, size, generator=g) * 10.0**-e] for e in range(0, 9, 2)]
        with torch_threads(threads):
            together = _fused_run([stack], grads, stacked=True)[0]
            whole = _fused_run([stack], grads)[0]
        for i in range(models):
            alone = _fused_run([stack[i]], [[step[0][i].contiguous()] for step in grads])[0]
            assert torch.equal(together[i], alone)
            whole_differs |= not torch.equal(whole[i], alone)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert whole_differs  # else the test above could not have failed here


def test_the_fused_path_is_refused_off_a_cpu_and_steps_what_it_cannot_take_elementwise():
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU only"):
            Adam([torch.zeros(3, device="cuda")], 1e-2, fused=True)
    params, grads = _params_and_grads(4)  # params[1] is channels-last: not contiguous
    fused = _fused_run(params, grads)
    plain = _fused_run(params, grads, fused=False)
    assert torch.equal(fused[1], plain[1])
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-7)

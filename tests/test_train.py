"""altrack.train's plain Adam: torch's update, the same bits in any blocking and memory layout."""

import pytest
import torch

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
        optimizer = type("BlockedAdam", (Adam,), {"CPU_BLOCK": block})(params, 1e-2)
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
    optimizer = Adam([params[0].requires_grad_(True), sliced], 1e-2)
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
    a, b = Adam(plain, 1e-2), Adam(tabled, 1e-2, schedule=len(grads))
    for step in grads:
        for p, q, grad in zip(plain, tabled, step, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
        assert all(torch.equal(p, q) for p, q in zip(plain, tabled, strict=True))
    assert int(b._step) == len(grads)

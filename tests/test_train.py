"""altrack.train's plain Adam: torch's update, the same bits in any blocking and memory layout."""

import pytest
import torch

from altrack.train import Adam


def _params_and_grads(seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """A stacked linear weight larger than a block, a channels-last conv weight whose gradients
    arrive contiguous (another layout), a bias and a scalar; three steps of gradients each."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 40, 50), (4, 3, 3, 3), (7,), ()]
    params = [torch.randn(s, generator=g) for s in shapes]
    params[1] = params[1].contiguous(memory_format=torch.channels_last)
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads


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


@pytest.mark.parametrize("block", [1, 37, 1000])
def test_adam_gives_the_same_bits_in_any_blocking(block):
    whole = _run(1 << 30)
    for a, b in zip(whole, _run(block), strict=True):
        assert torch.equal(a, b)


def test_adam_is_torchs_adam():
    for a, b in zip(_run(37), _run(0, reference=True), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    moved = [not torch.equal(a, p) for a, p in zip(_run(37), _params_and_grads(0)[0], strict=True)]
    assert all(moved)

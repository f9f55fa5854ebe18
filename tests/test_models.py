"""altrack.models: the paper's two architectures train to the same bits at any thread count, so
that ``--workers N`` (fewer threads per process) and a Slurm task's cores change no run's result."""

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_threads

from altrack.models import Conv2d, build_model, conv2d

# rows of a batch: the head's short batches (fewer rows than its 10 outputs) and full ones
MLP_ROWS = [*range(1, 20), 32, 64, 128]
CIFAR_ROWS = [1, 3, 8, 32]


def _step_at(threads: int, dataset: str, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """A fresh model's logits on ``x`` and every parameter's gradient of its loss, at ``threads``."""
    torch.manual_seed(0)
    model = build_model(dataset)
    with torch_threads(threads):
        logits = model(x)
        F.cross_entropy(logits, y).backward()
    return [logits.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize(("dataset", "rows"), [("mnist", MLP_ROWS), ("cifar10", CIFAR_ROWS)])
def test_a_training_step_takes_the_same_bits_at_one_and_two_threads(dataset, rows):
    # on a 2-core AMD EPYC, before altrack.threads: the MLP's logits on 2 to 9 rows (MKL's GEMM
    # of fewer rows than outputs) and CifarNet's convolution weight gradients on any batch
    # (oneDNN's) differed between 1 and 2 threads
    g = torch.Generator().manual_seed(1)
    shape = (3, 32, 32) if dataset == "cifar10" else (1, 28, 28)
    for n in rows:
        x = torch.randn(n, *shape, generator=g)
        if dataset == "cifar10":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (n,), generator=g)
        one, two = _step_at(1, dataset, x, y), _step_at(2, dataset, x, y)
        for i, (a, b) in enumerate(zip(one, two, strict=True)):
            assert torch.equal(a, b), f"{dataset}: {n} rows, tensor {i} (0: logits, then gradients)"


def test_conv2d_is_f_conv2d_with_its_gradients_and_refuses_what_its_backward_cannot_take():
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(s, generator=g, requires_grad=True) for s in [(2, 4, 9, 9), (6, 2, 3, 3), (6,)])
    native = [F.conv2d(x, w, b, 2, 1, 1, 2)]  # F.conv2d's int arguments
    native += torch.autograd.grad(native[0].square().sum(), (x, w, b))
    ours = [conv2d(x, w, b, 2, 1, 1, 2)]
    ours += torch.autograd.grad(ours[0].square().sum(), (x, w, b))
    for a, c in zip(native, ours, strict=True):
        torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="numeric zero padding"):
        Conv2d(3, 4, 3, padding="same")
    with pytest.raises(ValueError, match="numeric zero padding"):
        Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="numeric padding"):
        conv2d(x, w, b, padding="valid")

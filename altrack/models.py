"""The paper's two architectures, split into ``body`` (the embedding) and ``head`` (last linear).

The embedding used by k-center, k-means and the gradient loss is the input to the last
linear layer: 128-d for the MLP, 256-d for CifarNet.
"""

from __future__ import annotations

import torch
from torch import nn

from altrack.catalog import DATASETS


class MLP(nn.Module):
    """784 -> 128 (ReLU) -> 10, the paper's MNIST / Fashion-MNIST model."""

    def __init__(self, in_features: int = 784, hidden: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CifarNet(nn.Module):
    """DISTIL's CifarNet: three unpadded 3x3 convs (64, 128, 256) with ReLU and 2x2 max-pool,
    then 1024 -> 128 -> 256 -> 10."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256 * 2 * 2, 128), nn.ReLU(),
            nn.Linear(128, 256), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(dataset: str, device: torch.device | str = "cpu") -> nn.Module:
    """A freshly initialised model for ``dataset``; seed the torch RNG before calling."""
    spec = DATASETS[dataset]
    if spec.image_shape[0] == 1:
        c, h, w = spec.image_shape
        model: nn.Module = MLP(c * h * w, 128, spec.num_classes)
    else:
        model = CifarNet(spec.num_classes).to(memory_format=torch.channels_last)
    return model.to(device)

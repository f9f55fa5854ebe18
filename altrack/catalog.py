"""What altrack can run, as plain facts: the datasets and the selection methods' names.

A leaf with no torch, so the CLI and the configs check a dataset or a method name in a fraction
of a second (``altrack run --datasets imagenet`` is refused before torch loads). The selection
registry must hold exactly ``METHODS`` (tests/test_layout.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    n_train: int
    n_test: int
    image_shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", 60000, 10000, (1, 28, 28), (0.1307,), (0.3081,)),
    "fashion_mnist": DatasetSpec("fashion_mnist", 60000, 10000, (1, 28, 28), (0.2860,), (0.3530,)),
    "cifar10": DatasetSpec("cifar10", 50000, 10000, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


# the selection methods, in the order reports list them (altrack.selection registers the classes)
METHODS = ("coreset", "coreset-grad", "kcenter", "margin", "entropy", "least-confidence", "random")

# the Settings fields only Algorithm 1 reads: logged on the coreset methods' runs alone, so the UI
# never plots a random run against a lam it did not use (the config hash still covers them all)
CORESET_SETTINGS = ("cluster_ratio", "lam", "coreset_space", "weighted")
CORESET_METHODS = ("coreset", "coreset-grad")


def dataset_rank(dataset: str) -> int:
    """Where ``dataset`` goes in reports and pages: the catalog's order (mnist, fashion_mnist,
    cifar10), an unknown name last."""
    return list(DATASETS).index(dataset) if dataset in DATASETS else len(DATASETS)


def applies(setting: str, method: str) -> bool:
    """Whether ``method`` reads the Settings field ``setting``."""
    return setting not in CORESET_SETTINGS or method in CORESET_METHODS

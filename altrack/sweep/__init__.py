"""Optuna sweeps around the paper's fixed settings, one module per concern.

- ``spec``: the YAML spec and its checks.       - ``study``: storage, sampler, recovery.
- ``worker``: the trial objective.               - ``run``: ``run_sweep`` and its publishing.

The names below load on first use (PEP 562), so that reading and refusing a spec
(``altrack.sweep.spec``) costs no Optuna, MLflow or torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "SweepOutcome": "run",
    "describe": "run",
    "run_sweep": "run",
    "SweepSpec": "spec",
    "load_spec": "spec",
    "open_storage": "study",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'altrack.sweep' has no attribute {name!r}")
    return getattr(importlib.import_module(f"altrack.sweep.{_HOMES[name]}"), name)

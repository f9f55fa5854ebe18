"""Optuna sweeps around the paper's fixed settings, one module per concern.

- ``spec``: the YAML spec and its checks.       - ``study``: storage, sampler, recovery.
- ``worker``: the trial objective.               - ``run``: ``run_sweep`` and its publishing.
"""

from altrack.sweep.run import SweepOutcome, describe, run_sweep
from altrack.sweep.spec import SweepSpec, load_spec
from altrack.sweep.study import open_storage

__all__ = ["SweepOutcome", "SweepSpec", "describe", "load_spec", "open_storage", "run_sweep"]

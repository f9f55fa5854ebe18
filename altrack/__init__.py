"""altrack: experiment-tracked data selection and active learning.

Reproduces the classification experiment of Axiotis et al., "Data-Efficient Learning via
Clustering-Based Sensitivity Sampling" (ICML 2024, §5.2.2) and sweeps around it.
"""

import os

# MKL's strict conditional numerical reproducibility: matrix products give the same bits whatever
# the thread count, so `altrack run --workers N` selects exactly what `--workers 1` does. It must be
# set before torch loads MKL; a user who imports torch first keeps MKL's default.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA

# part of a run's identity (resume keys, the stage cache): 0.2.0 changed CPU training bits (fused Adam) and
# the coreset's clustering (one per stage, shared by its two variants); 0.2.1 k-center's picks at near ties
# (its candidates' distances by per-row sums, kcenter.row_dots)
__version__ = "0.2.1"

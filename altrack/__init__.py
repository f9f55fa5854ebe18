"""altrack: experiment-tracked data selection and active learning.

Reproduces the classification experiment of Axiotis et al., "Data-Efficient Learning via
Clustering-Based Sensitivity Sampling" (ICML 2024, §5.2.2) and sweeps around it.
"""

import os

# MKL's strict conditional numerical reproducibility: matrix products give the same bits whatever
# the thread count (on Intel's AVX2 and AVX-512 code paths; the products it leaves out run on one
# thread, altrack.threads), so `altrack run --workers N` selects exactly what `--workers 1` does.
# It must be set before torch loads MKL; a user who imports torch first keeps MKL's default.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS on CUDA
# libgomp's idle threads spin 300,000 times before they sleep. Beside any other busy process (a
# second job, a test run) torch's spinning thread is preempted and holds up every parallel region:
# the README's main job took 143 s instead of 22 on the 2-core Xeon beside one busy Python process,
# 30 s with a spin of 1,000, and as long as before alone (docs/speed.md). A user's own
# GOMP_SPINCOUNT or OMP_WAIT_POLICY is kept, as is the spin of a torch loaded before altrack.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# part of a run's identity (resume keys, the stage cache): 0.2.0 changed CPU training bits (fused Adam) and
# the coreset's clustering (one per stage, shared by its two variants); 0.2.1 k-center's picks at near ties
# (its candidates' distances by per-row sums, kcenter.row_dots); 0.2.2 CPU training's bits where they
# depended on the thread count: a linear layer's forward GEMM of fewer rows than outputs and convolution
# weight gradients run on one thread (altrack.threads)
__version__ = "0.2.2"

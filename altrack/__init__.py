"""altrack: experiment-tracked data selection and active learning.

Reproduces the classification experiment of Axiotis et al., "Data-Efficient Learning via
Clustering-Based Sensitivity Sampling" (ICML 2024, §5.2.2) and sweeps around it.
"""

__version__ = "0.1.0"

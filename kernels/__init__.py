"""Merged matmuls: y = x·(W0 + Σ_e w_e Δ_e)ᵀ without forming a weight per sample.

Importing this needs neither a GPU nor triton. Today every call runs the torch reference; the
Triton kernels plug in behind the same three functions.
"""

from moe_merge.kernels.reference import lowrank_merged_linear, merge_weights_into, merged_linear

__all__ = ["merged_linear", "lowrank_merged_linear", "merge_weights_into"]

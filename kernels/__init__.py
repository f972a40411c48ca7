"""Fused merged-matmul Triton kernels (issue 4). Empty in this release; importing it needs neither
a GPU nor triton, and it installs as `moe_merge.kernels`, never as a bare `kernels`."""

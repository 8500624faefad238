"""Triton kernels of sparse-engine and their plain-PyTorch reference twins.

They import nothing else of the package (the bottom floor). ``reference`` imports without
Triton; the kernel modules need Triton and are imported lazily by ``sparse_engine.backend``.
"""

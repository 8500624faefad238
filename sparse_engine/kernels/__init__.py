"""Triton kernels of sparse-engine and their plain-PyTorch reference twins.

Installed as ``sparse_engine.kernels``. ``reference`` imports without Triton; the kernel
modules need Triton and are imported lazily by ``sparse_engine.backend``.
"""

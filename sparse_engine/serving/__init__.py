"""Serving many sparse experts on one base model in one batch.

* ``library.AdapterLibrary``: the registry; adapters packed per layer (``pool``), checked
  against the model before anything changes, registered and unregistered at run time; a
  registration streams the adapter in checked pieces (``source``), never a dense ΔW.
* ``layer.MultiAdapterLinear``: what a served ``nn.Linear`` becomes; the base GEMM once, then
  each row's delta through ``sparse_engine/kernels/multi_adapter.py`` (Triton) or its reference twin.
* ``plan``: a batch's per-row assignment and the segment plans the kernels read.
* ``routed.evaluate_routed``: Rouge-L with each request sent to its own expert.

Inference only (no autograd through the deltas). docs/serving.md has the details.
"""
from sparse_engine.serving.layer import MultiAdapterLinear
from sparse_engine.serving.library import AdapterInfo, AdapterLibrary
from sparse_engine.serving.routed import evaluate_routed

__all__ = ["AdapterInfo", "AdapterLibrary", "MultiAdapterLinear", "evaluate_routed"]

"""sparse-engine: sparse adapters for LLMs (Arnob et al., 2025).

Train task experts with Algorithm 1 (MCS mask, updated every ``update_interval`` steps
during the first epoch, then frozen), element- or block-sparse, on any Hugging Face causal
LM; save, load, merge and serve them.
"""
from sparse_engine.config import SparseAdapterConfig

__version__ = "0.1.0"

_LAZY = {
    "attach": "sparse_engine.model",
    "detach": "sparse_engine.model",
    "merge_and_unload": "sparse_engine.model",
    "adapter_layers": "sparse_engine.model",
    "save_adapter": "sparse_engine.io",
    "load_adapter": "sparse_engine.io",
    "SparseAdapterLinear": "sparse_engine.layers",
    "SparseDelta": "sparse_engine.formats",
    "BlockSparseDelta": "sparse_engine.formats",
    "train_expert": "sparse_engine.training",
    "TrainingConfig": "sparse_engine.training",
    "SparseAdapterCallback": "sparse_engine.training",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_engine' has no attribute {name!r}")


__all__ = ["SparseAdapterConfig", *_LAZY]

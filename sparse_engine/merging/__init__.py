"""Merging task experts: the paper's Eq. 4 and the standard baselines, sparse-native.

* ``expert``: :class:`Expert` (parameter name → sparse, block, low-rank or dense delta) and
  its constructors from models; ``files``: expert files (``save_expert`` / ``load_expert``,
  which also reads adapter files).
* ``parts``: the shared pieces (an expert's layer as stored entries, trimming, DARE,
  Breadcrumbs, TIES's sign election); ``methods``: one small function per method and the
  table of :data:`METHODS` with their defaults.
* ``driver``: :func:`merge_experts` / :func:`iter_merged_layers`, one layer at a time, never
  densifying a sparse expert; ``result``: :class:`MergeResult`, :func:`save_merged` (a sparse
  merge as an adapter file through ``io.write_adapter``), :func:`apply_merged`.

Every public name is importable from here. Methods, memory bound, PEFT equivalences: docs/merging.md.
"""
from sparse_engine.merging.driver import OUTPUTS, MixedMergeWarning, iter_merged_layers, merge_experts
from sparse_engine.merging.expert import (
    Delta,
    Expert,
    LowRankDelta,
    expert_from_full_model,
    expert_from_lora_model,
    expert_from_sparse_model,
)
from sparse_engine.merging.files import (
    EXPERT_FORMAT_VERSION,
    EXPERT_METADATA_KEY,
    expert_from_adapter_file,
    load_expert,
    save_expert,
)
from sparse_engine.merging.methods import ALIASES, DEFAULTS, METHODS, resolve_params
from sparse_engine.merging.parts import BASES, SIGN_METHODS
from sparse_engine.merging.result import MergeResult, apply_merged, mask_result, save_merged

__all__ = [
    "METHODS",
    "ALIASES",
    "DEFAULTS",
    "SIGN_METHODS",
    "BASES",
    "OUTPUTS",
    "EXPERT_FORMAT_VERSION",
    "EXPERT_METADATA_KEY",
    "Delta",
    "LowRankDelta",
    "Expert",
    "MergeResult",
    "MixedMergeWarning",
    "merge_experts",
    "iter_merged_layers",
    "resolve_params",
    "expert_from_adapter_file",
    "expert_from_sparse_model",
    "expert_from_lora_model",
    "expert_from_full_model",
    "load_expert",
    "save_expert",
    "save_merged",
    "apply_merged",
    "mask_result",
]

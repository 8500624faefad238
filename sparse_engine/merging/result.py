"""A merge's result and what is done with it: written (a sparse merge as an adapter file
through ``io.write_adapter``, any other as an expert file), added to a model's weights, or
restricted to one expert's mask."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import write_adapter
from sparse_engine.merging.expert import Delta, Expert, delta_type, dense_of, plain_base_fingerprint, targets_of
from sparse_engine.merging.files import layer_shape, save_expert
from sparse_engine.merging.parts import check_finite
from sparse_engine.model import adapter_layers


@dataclass
class MergeResult:
    """A merge: parameter name → merged delta (sparse on the union of masks, or dense)."""

    method: str
    params: dict
    layers: dict[str, Delta]
    experts: list[str]
    base_model: str | None = None
    base_fingerprint: str | None = None
    config: dict | None = None
    stats: dict = field(default_factory=dict)
    target_modules: list[str] | None = None  # the layers the base fingerprint was taken from

    @property
    def is_sparse(self) -> bool:
        return all(isinstance(d, (SparseDelta, BlockSparseDelta)) for d in self.layers.values())

    @property
    def writes_adapter(self) -> bool:
        """Whether :func:`save_merged` writes an adapter file (else an expert file)."""
        return self.is_sparse and self.config is not None

    @property
    def output_kind(self) -> str:
        """What :func:`save_merged` writes, and why a merge is dense where the experts mixed kinds."""
        if self.writes_adapter:
            return "sparse adapter (union of masks)"
        mixed = self.stats.get("mixed_layers")
        if mixed:
            return f"dense expert file: {mixed} layer(s) mix sparse and dense experts"
        return "dense expert file" if not self.is_sparse else "expert file (sparse layers)"

    def dense(self, pname: str) -> torch.Tensor:
        return dense_of(self.layers[pname])

    def as_expert(self, name: str = "merged") -> Expert:
        meta = {"merge": {"method": self.method, "params": self.params, "experts": self.experts}}
        if self.target_modules:
            meta["target_modules"] = list(self.target_modules)
        return Expert(name=name, kind="merged", layers=self.layers, base_model=self.base_model,
                      base_fingerprint=self.base_fingerprint, config=self.config, meta=meta)


def save_merged(result: MergeResult, path) -> Path:
    """Write a merge: a sparse one as an adapter file (``load_adapter`` loads it on the base
    model), a dense one as an expert file (``load_expert`` / :func:`apply_merged`)."""
    path = Path(path)
    extra = {"merge": {"method": result.method, "params": result.params, "experts": result.experts}}
    if result.writes_adapter:
        deltas = {pname[: -len(".weight")]: delta for pname, delta in result.layers.items()}
        return write_adapter(path, deltas, config=result.config, base_model=result.base_model,
                             base_fingerprint=result.base_fingerprint, extra=extra)
    return save_expert(result.as_expert(path.stem), path, extra=extra)


def apply_merged(model: nn.Module, merged: MergeResult | Expert, *, scale: float = 1.0, check_base: bool = True,
                 safe_merge: bool = True) -> nn.Module:
    """Add a merge (or any expert) to ``model``'s weights in place: W ← W + scale·ΔW.

    ``model`` is a plain base model (no adapters attached). Checked first: every layer
    exists with the right shape and (``check_base``) the base fingerprint matches.
    """
    if adapter_layers(model):
        raise ValueError("apply_merged needs a plain model; this one has sparse adapters attached (detach() first)")
    params = dict(model.named_parameters())
    for pname in merged.layers.keys():
        if pname not in params:
            raise ValueError(f"the model has no parameter {pname} (the merge does not fit this model)")
        shape = layer_shape(merged.layers, pname)
        if tuple(params[pname].shape) != shape:
            raise ValueError(f"parameter {pname} is {tuple(params[pname].shape)} in the model, {shape} in the merge")
    fp = merged.base_fingerprint
    if check_base and fp:
        targets = merged.target_modules if isinstance(merged, MergeResult) else targets_of(merged)
        try:
            mine = plain_base_fingerprint(model, targets)
        except ValueError:
            mine = None
        if mine != fp:
            raise ValueError(f"the merge was made for another base model ({merged.base_model!r}, fingerprint {fp}); "
                             f"this model's fingerprint is {mine}. Pass check_base=False to apply it anyway.")
    with torch.no_grad():
        for pname in merged.layers.keys():
            p = params[pname]
            delta = merged.layers[pname]
            if isinstance(delta, SparseDelta):
                vals = delta.values.to(device=p.device, dtype=torch.float32) * scale
                if safe_merge:
                    check_finite(vals, f"layer {pname}")
                flat = p.data.view(-1)
                flat.index_add_(0, delta.indices.to(p.device).long(), vals.to(p.dtype))
            else:
                d = dense_of(delta).to(p.device) * scale
                if safe_merge:
                    check_finite(d, f"layer {pname}")
                p.data.add_(d.view(p.shape).to(p.dtype))
    return model


def mask_result(merged: MergeResult, expert: Expert) -> MergeResult:
    """M_i ⊙ ΔW_m: the merge restricted to one expert's mask (the paper's Fig. 5 "masked" model)."""
    layers = {}
    for pname, delta in merged.layers.items():
        if pname not in expert.layers:
            continue
        mine = expert.layers[pname]
        if not isinstance(mine, (SparseDelta, BlockSparseDelta)):
            raise ValueError(f"mask_result needs a sparse expert; {expert.name!r} layer {pname} is {delta_type(mine)}")
        mask = mine.mask()
        layers[pname] = SparseDelta.from_dense(dense_of(delta).view(mask.shape), mask)
    return MergeResult(method=merged.method, params={**merged.params, "masked_by": expert.name}, layers=layers,
                       experts=merged.experts, base_model=merged.base_model, base_fingerprint=merged.base_fingerprint,
                       config=merged.config, stats={"layers": len(layers)}, target_modules=merged.target_modules)

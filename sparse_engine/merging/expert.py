"""The expert model: a task expert maps parameter names to deltas (sparse, block-sparse,
low-rank or dense), with the base model it was trained on; built here from models."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from sparse_engine.config import DEFAULT_TARGET_MODULES
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import adapter_tensors, base_fingerprint, base_model_id, weights_fingerprint
from sparse_engine.model import adapter_config, find_target_linears

DELTA_TYPES = ("sparse", "block", "lowrank", "dense")
SPARSE_TYPES = ("sparse", "block")  # stored on a mask: a merge of only these can stay sparse


@dataclass(frozen=True)
class LowRankDelta:
    """ΔW = scale · B @ A of a (d_out, d_in) weight: ``A`` [r, d_in], ``B`` [d_out, r]."""

    shape: tuple[int, int]
    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LowRankDelta: A must be [r, d_in] and B [d_out, r], got {tuple(self.A.shape)}, "
                             f"{tuple(self.B.shape)}")
        if (self.B.shape[0], self.A.shape[1]) != self.shape:
            raise ValueError(f"LowRankDelta: B @ A is {(self.B.shape[0], self.A.shape[1])}, not {self.shape}")
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"LowRankDelta: scale must be finite, got {self.scale}")

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def to_dense(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * float(self.scale)


Delta = SparseDelta | BlockSparseDelta | LowRankDelta | torch.Tensor


def delta_type(delta: Delta) -> str:
    """One of :data:`DELTA_TYPES`."""
    if isinstance(delta, SparseDelta):
        return "sparse"
    if isinstance(delta, BlockSparseDelta):
        return "block"
    if isinstance(delta, LowRankDelta):
        return "lowrank"
    if isinstance(delta, torch.Tensor):
        return "dense"
    raise TypeError(f"unsupported delta type {type(delta).__name__}")


def dense_of(delta: Delta) -> torch.Tensor:
    if isinstance(delta, torch.Tensor):
        return delta.detach().float()
    return delta.to_dense().float()


@dataclass
class Expert:
    """A task expert: parameter name → delta, plus what it was trained on.

    ``kind``: ``sparse`` / ``block`` / ``lora`` / ``full`` / ``merged`` (informational).
    ``base_fingerprint``: :func:`sparse_engine.io.base_fingerprint` of the base model
    (experts with different fingerprints refuse to merge).
    """

    name: str
    kind: str
    layers: Mapping[str, Delta]
    base_model: str | None = None
    base_fingerprint: str | None = None
    config: dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise ValueError(f"expert {self.name!r}: layers must be a mapping of parameter name -> delta")

    def layer_names(self) -> list[str]:
        return list(self.layers.keys())


def targets_of(expert: Expert) -> list[str] | None:
    """The target modules an expert's base fingerprint was taken from, where it says."""
    targets = (expert.config or {}).get("target_modules") or expert.meta.get("target_modules")
    return list(targets) if targets else None


def plain_base_fingerprint(model: nn.Module, target_modules=None) -> str:
    """The fingerprint an adapter trained on ``model`` (a plain base model) would carry."""
    return base_fingerprint(model, find_target_linears(model, tuple(target_modules or DEFAULT_TARGET_MODULES)))


def sparse_kind(deltas) -> str:
    """``block`` when every delta is block-sparse, else ``sparse``."""
    return "block" if {isinstance(d, BlockSparseDelta) for d in deltas} == {True} else "sparse"


# ======================================================================= constructors
def expert_from_sparse_model(model: nn.Module, name: str) -> Expert:
    """The sparse adapters attached to ``model`` as an expert (no copy of the base)."""
    deltas = adapter_tensors(model)
    return Expert(name=name, kind=sparse_kind(deltas.values()),
                  layers={f"{layer}.weight": d for layer, d in deltas.items()},
                  base_model=base_model_id(model), base_fingerprint=base_fingerprint(model),
                  config=adapter_config(model).to_dict())


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def expert_from_lora_model(peft_model: nn.Module, name: str, *, adapter_name: str = "default",
                           base_model: nn.Module | None = None) -> Expert:
    """A LoRA expert (factors kept, ΔW = scale·B·A materialised when merged) from a PEFT model.

    ``base_model``: the plain base it was trained from, for the fingerprint; without it
    the fingerprint is taken from the LoRA layers' frozen base weights.
    """
    layers: dict[str, LowRankDelta] = {}
    base_weights = []
    targets = set()
    for mod_name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        if getattr(module, "fan_in_fan_out", False):
            raise ValueError(f"{mod_name}: fan_in_fan_out LoRA layers are not supported")
        A = module.lora_A[adapter_name].weight.detach().float().cpu().clone()
        B = module.lora_B[adapter_name].weight.detach().float().cpu().clone()
        scale = float(module.scaling[adapter_name])
        clean = _strip_peft_prefix(mod_name)
        layers[f"{clean}.weight"] = LowRankDelta((B.shape[0], A.shape[1]), A, B, scale)
        base_weights.append((clean, module.base_layer.weight))
        targets.add(clean.rsplit(".", 1)[-1])
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no LoRA layers named {adapter_name!r}")
    if base_model is not None:
        fp, model_id = plain_base_fingerprint(base_model, sorted(targets)), base_model_id(base_model)
    else:
        fp = weights_fingerprint(base_weights)
        inner = getattr(getattr(peft_model, "base_model", None), "model", peft_model)
        model_id = base_model_id(inner)
    return Expert(name=name, kind="lora", layers=layers, base_model=model_id, base_fingerprint=fp,
                  meta={"target_modules": sorted(targets), "rank": next(iter(layers.values())).rank})


def expert_from_full_model(finetuned: nn.Module, base_model: nn.Module, name: str, *, target_modules=None,
                           only: Sequence[str] | None = None) -> Expert:
    """A full fine-tuning expert: task vectors τ = W_ft − W of every parameter (or of ``only``).

    ``target_modules`` only decides which layers the base fingerprint is taken from
    (default: the sparse adapters' default targets, so sparse, LoRA and full experts of
    one base agree).
    """
    base_params = dict(base_model.named_parameters())
    layers: dict[str, torch.Tensor] = {}
    for pname, p in finetuned.named_parameters():
        if only is not None and pname not in only:
            continue
        if pname not in base_params:
            raise ValueError(f"parameter {pname} of the fine-tuned model is not in the base model")
        b = base_params[pname]
        if b.shape != p.shape:
            raise ValueError(f"parameter {pname}: fine-tuned {tuple(p.shape)} vs base {tuple(b.shape)}")
        layers[pname] = (p.detach().float() - b.detach().float()).cpu()
    return Expert(name=name, kind="full", layers=layers, base_model=base_model_id(base_model),
                  base_fingerprint=plain_base_fingerprint(base_model, target_modules))

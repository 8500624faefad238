"""Merging task experts: the paper's Eq. 4 and the standard baselines, sparse-native.

An :class:`Expert` maps parameter names to deltas (:class:`~sparse_engine.formats.SparseDelta`,
:class:`~sparse_engine.formats.BlockSparseDelta`, :class:`LowRankDelta` or a dense tensor).
:func:`merge_experts` (or :func:`iter_merged_layers`, layer by layer) merges any number of them
with one of :data:`METHODS`, one parameter at a time and without densifying a sparse expert;
the :class:`MergeResult` is sparse on the union of the masks when every expert is sparse, dense
otherwise. :func:`save_merged` writes it, :func:`apply_merged` adds it to a model's weights.
Each method's definition and normalisation, the memory bound, the PEFT equivalences and the
checks on bad input: docs/merging.md.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import atomic_save, weights_fingerprint

__all__ = [
    "METHODS",
    "DEFAULTS",
    "LowRankDelta",
    "Expert",
    "MergeResult",
    "merge_experts",
    "iter_merged_layers",
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

METHODS = (
    "overlap_average",
    "average",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "magnitude_prune",
)
ALIASES = {"eq4": "overlap_average", "sparse_average": "overlap_average", "ta": "task_arithmetic",
           "dare": "dare_linear", "uniform": "average"}
# Hyper-parameters of each method and their defaults (our choices; see docs/merging.md).
DEFAULTS = {
    "overlap_average": {},
    "average": {},
    "task_arithmetic": {"lam": 0.3},
    "magnitude_prune": {"lam": 1.0, "density": 0.2},
    "ties": {"lam": 1.0, "density": 0.2, "sign": "total"},
    "dare_linear": {"lam": 0.3, "drop_rate": 0.9, "rescale": True},
    "dare_ties": {"lam": 1.0, "drop_rate": 0.9, "rescale": True, "sign": "total"},
    "breadcrumbs": {"lam": 0.3, "beta": 0.85, "gamma": 0.01},
}
SIGN_METHODS = ("total", "frequency")
BASES = ("tensor", "stored")
OUTPUTS = ("auto", "sparse", "dense")
EXPERT_FORMAT_VERSION = 1
EXPERT_METADATA_KEY = "sparse_engine_expert"


# ============================================================================ containers
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


def _delta_shape(delta: Delta) -> tuple[int, ...]:
    return tuple(delta.shape)


def _delta_type(delta: Delta) -> str:
    if isinstance(delta, SparseDelta):
        return "sparse"
    if isinstance(delta, BlockSparseDelta):
        return "block"
    if isinstance(delta, LowRankDelta):
        return "lowrank"
    if isinstance(delta, torch.Tensor):
        return "dense"
    raise TypeError(f"unsupported delta type {type(delta).__name__}")


def _dense_of(delta: Delta) -> torch.Tensor:
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


# ======================================================================= fingerprints
def _plain_base_fingerprint(model: nn.Module, target_modules=None) -> str:
    """The fingerprint an adapter trained on ``model`` (a plain base model) would carry."""
    from sparse_engine.config import DEFAULT_TARGET_MODULES
    from sparse_engine.io import base_fingerprint
    from sparse_engine.model import find_target_linears

    return base_fingerprint(model, find_target_linears(model, tuple(target_modules or DEFAULT_TARGET_MODULES)))


def _model_id(model: nn.Module) -> str:
    from sparse_engine.io import base_model_id

    return base_model_id(model)


# ======================================================================= constructors
def expert_from_adapter_file(path, name: str | None = None) -> Expert:
    """A sparse (element or block) expert from an adapter file written by ``save_adapter``."""
    from sparse_engine.io import read_adapter

    meta, deltas = read_adapter(path)
    kinds = {"block" if isinstance(d, BlockSparseDelta) else "sparse" for d in deltas.values()}
    extra = meta.get("extra") or {}
    return Expert(
        name=name or extra.get("task") or Path(path).stem,
        kind="block" if kinds == {"block"} else "sparse",
        layers={f"{layer}.weight": delta for layer, delta in deltas.items()},
        base_model=meta.get("base_model"),
        base_fingerprint=meta.get("base_fingerprint"),
        config=meta.get("config"),
        meta={"file": str(path), **extra},
    )


def expert_from_sparse_model(model: nn.Module, name: str) -> Expert:
    """The sparse adapters attached to ``model`` as an expert (no copy of the base)."""
    from sparse_engine.io import adapter_tensors, base_fingerprint
    from sparse_engine.model import adapter_config

    deltas = adapter_tensors(model)
    kinds = {"block" if isinstance(d, BlockSparseDelta) else "sparse" for d in deltas.values()}
    return Expert(name=name, kind="block" if kinds == {"block"} else "sparse",
                  layers={f"{layer}.weight": d for layer, d in deltas.items()},
                  base_model=_model_id(model), base_fingerprint=base_fingerprint(model),
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
        fp, model_id = _plain_base_fingerprint(base_model, sorted(targets)), _model_id(base_model)
    else:
        fp = weights_fingerprint(base_weights)
        inner = getattr(getattr(peft_model, "base_model", None), "model", peft_model)
        model_id = _model_id(inner)
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
    return Expert(name=name, kind="full", layers=layers, base_model=_model_id(base_model),
                  base_fingerprint=_plain_base_fingerprint(base_model, target_modules))


# ========================================================================= expert files
def save_expert(expert: Expert, path, *, extra: dict | None = None) -> Path:
    """Write any expert (dense, low-rank or sparse layers) to one safetensors file, atomically.

    Sparse experts are better kept as adapter files (``save_adapter``); this format holds
    every kind so LoRA and full fine-tune experts and dense merges can be merged later.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for pname, delta in expert.layers.items():
        kind = _delta_type(delta)
        entry = {"type": kind, "shape": list(_delta_shape(delta))}
        if kind == "dense":
            tensors[pname] = delta.detach().contiguous().cpu()
        elif kind == "lowrank":
            tensors[f"{pname}.lora_A"] = delta.A.detach().contiguous().cpu()
            tensors[f"{pname}.lora_B"] = delta.B.detach().contiguous().cpu()
            entry["scale"] = float(delta.scale)
        elif kind == "sparse":
            tensors[f"{pname}.values"] = delta.values.detach().contiguous().cpu()
            tensors[f"{pname}.indices"] = delta.indices.contiguous().cpu()
        else:
            tensors[f"{pname}.blocks"] = delta.blocks.detach().contiguous().cpu()
            tensors[f"{pname}.block_indices"] = delta.block_indices.contiguous().cpu()
        layers[pname] = entry
    meta = {
        "format_version": EXPERT_FORMAT_VERSION,
        "name": expert.name,
        "kind": expert.kind,
        "base_model": expert.base_model,
        "base_fingerprint": expert.base_fingerprint,
        "config": expert.config,
        "layers": layers,
        "extra": {**expert.meta, **(extra or {})},
    }
    atomic_save(tensors, {EXPERT_METADATA_KEY: json.dumps(meta)}, path)
    return path


class _FileLayers(Mapping):
    """Layers of an expert file, read from disk one layer at a time (never all at once)."""

    def __init__(self, path: Path, layers: dict[str, dict]):
        self.path = path
        self._layers = layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self):
        return iter(self._layers)

    def __contains__(self, pname) -> bool:  # Mapping's default reads the layer from disk
        return pname in self._layers

    def __getitem__(self, pname: str) -> Delta:
        from safetensors import safe_open

        entry = self._layers[pname]
        kind, shape = entry["type"], tuple(entry["shape"])
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if kind == "dense":
                    t = f.get_tensor(pname)
                    if tuple(t.shape) != shape:
                        raise ValueError(f"tensor is {tuple(t.shape)}, metadata says {shape}")
                    return t
                if kind == "lowrank":
                    return LowRankDelta(shape, f.get_tensor(f"{pname}.lora_A"), f.get_tensor(f"{pname}.lora_B"),
                                        float(entry["scale"]))
                if kind == "sparse":
                    return SparseDelta(shape, f.get_tensor(f"{pname}.values"), f.get_tensor(f"{pname}.indices"))
                if kind == "block":
                    return BlockSparseDelta(shape, f.get_tensor(f"{pname}.blocks"),
                                            f.get_tensor(f"{pname}.block_indices"))
        except ValueError as exc:
            raise ValueError(f"{self.path}: layer {pname}: {exc}") from exc
        except Exception as exc:  # missing tensor, truncated file
            raise ValueError(f"{self.path}: cannot read layer {pname} ({exc})") from exc
        raise ValueError(f"{self.path}: layer {pname} has unknown type {kind!r}")


def load_expert(path, name: str | None = None) -> Expert:
    """An expert from an adapter file (``save_adapter``) or an expert file (``save_expert``).

    Expert files are read lazily, one layer at a time, when merged.
    """
    from safetensors import safe_open

    from sparse_engine.io import METADATA_KEY

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expert file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if METADATA_KEY in metadata:
        return expert_from_adapter_file(path, name)
    raw = metadata.get(EXPERT_METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is neither a sparse-engine adapter file nor an expert file")
    meta = json.loads(raw)
    if meta.get("format_version") != EXPERT_FORMAT_VERSION:
        raise ValueError(f"{path}: expert format version {meta.get('format_version')} is not supported")
    for pname, entry in meta["layers"].items():
        needed = {"dense": [pname], "lowrank": [f"{pname}.lora_A", f"{pname}.lora_B"],
                  "sparse": [f"{pname}.values", f"{pname}.indices"],
                  "block": [f"{pname}.blocks", f"{pname}.block_indices"]}.get(entry.get("type"))
        if needed is None or not set(needed) <= keys:
            raise ValueError(f"{path}: tensors of layer {pname} are missing or of unknown type")
    extra = meta.get("extra") or {}
    return Expert(name=name or meta.get("name") or path.stem, kind=meta.get("kind", "full"),
                  layers=_FileLayers(path, meta["layers"]), base_model=meta.get("base_model"),
                  base_fingerprint=meta.get("base_fingerprint"), config=meta.get("config"),
                  meta={"file": str(path), **extra})


# ============================================================================== parts
@dataclass
class _Part:
    """One expert's delta of one layer, flattened: ``idx`` None means dense (all entries stored)."""

    values: torch.Tensor  # fp32 [n]
    idx: torch.Tensor | None  # int32/int64 sorted flat indices, or None
    numel: int

    @property
    def count(self) -> int:
        return self.values.numel()


def _part_of(delta: Delta, device) -> _Part:
    if isinstance(delta, SparseDelta):
        # int32 indices go straight into index_add_ (no int64 copy of every expert's indices)
        return _Part(delta.values.to(device=device, dtype=torch.float32), delta.indices.to(device),
                     delta.shape[0] * delta.shape[1])
    if isinstance(delta, BlockSparseDelta):
        bs = delta.block_size
        n_col = delta.shape[1] // bs
        tiles = delta.block_indices.to(device).long()
        r = torch.arange(bs, device=device)
        rows = (tiles // n_col * bs)[:, None, None] + r[None, :, None]
        cols = (tiles % n_col * bs)[:, None, None] + r[None, None, :]
        flat = (rows * delta.shape[1] + cols).reshape(-1)
        values = delta.blocks.to(device=device, dtype=torch.float32).reshape(-1)
        flat, order = torch.sort(flat)
        if flat.numel() and delta.shape[0] * delta.shape[1] < 2**31:
            flat = flat.to(torch.int32)
        return _Part(values[order], flat, delta.shape[0] * delta.shape[1])
    dense = _dense_of(delta).to(device).reshape(-1)
    return _Part(dense, None, dense.numel())


def _select(part: _Part, keep: torch.Tensor) -> _Part:
    """The entries of ``part`` where the boolean ``keep`` (over its stored entries) is true."""
    positions = keep.nonzero().flatten()
    idx = positions if part.idx is None else part.idx[positions]
    return _Part(part.values[positions], idx, part.numel)


def _desc_rank(values: torch.Tensor) -> torch.Tensor:
    """Rank of each entry by descending |value|, ties broken by lower position (deterministic)."""
    order = torch.sort(values.abs(), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank


def _trim_top(part: _Part, density: float, basis: str) -> _Part:
    """Keep the ``int(density · n)`` entries of largest |value| (n: tensor size or stored count)."""
    if density >= 1.0:
        return part
    n = part.numel if basis == "tensor" else part.count
    k = int(density * n)
    if k >= part.count:
        return part
    return _select(part, _desc_rank(part.values) < k)


def _breadcrumbs(part: _Part, beta: float, gamma: float, basis: str) -> _Part:
    """Drop the ``int(gamma·n)`` largest and ``int(beta·n)`` smallest |values| (n as in ``_trim_top``)."""
    n = part.numel if basis == "tensor" else part.count
    n_top, n_bottom = int(gamma * n), int(beta * n)
    rank = _desc_rank(part.values)
    return _select(part, (rank >= n_top) & (rank < n - n_bottom))


def _dare(part: _Part, drop_rate: float, rescale: bool, generator: torch.Generator) -> _Part:
    if drop_rate <= 0.0:
        return part
    keep = 1.0 - drop_rate
    draws = torch.bernoulli(torch.full((part.count,), keep, dtype=torch.float32), generator=generator)
    values = part.values * draws.to(part.values.device)
    if rescale and keep > 0.0:
        values = values / keep
    return _select(_Part(values, part.idx, part.numel), values != 0)


# ============================================================================== results
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

    def dense(self, pname: str) -> torch.Tensor:
        return _dense_of(self.layers[pname])

    def as_expert(self, name: str = "merged") -> Expert:
        meta = {"merge": {"method": self.method, "params": self.params, "experts": self.experts}}
        if self.target_modules:
            meta["target_modules"] = list(self.target_modules)
        return Expert(name=name, kind="merged", layers=self.layers, base_model=self.base_model,
                      base_fingerprint=self.base_fingerprint, config=self.config, meta=meta)


# ============================================================================ validation
def _canonical_method(method: str) -> str:
    m = ALIASES.get(method, method) if isinstance(method, str) else method
    if m not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {list(METHODS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return m


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def resolve_params(method: str, **overrides) -> dict:
    """The method's hyper-parameters: its defaults updated with the non-None ``overrides``.

    Unknown or irrelevant names raise, so a typo never silently does nothing.
    """
    method = _canonical_method(method)
    params = dict(DEFAULTS[method])
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in params:
            raise ValueError(f"merge method {method!r} takes no parameter {key!r} (it takes {sorted(params) or 'none'})")
        params[key] = value
    for key in ("density", "drop_rate", "beta", "gamma"):
        if key in params:
            params[key] = _fraction(key, params[key])
    if "lam" in params:
        lam = params["lam"]
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise ValueError(f"lam (λ) must be a finite number, got {lam!r}")
        params["lam"] = float(lam)
    if "sign" in params and params["sign"] not in SIGN_METHODS:
        raise ValueError(f"sign must be one of {SIGN_METHODS}, got {params['sign']!r}")
    if "rescale" in params:
        params["rescale"] = bool(params["rescale"])
    if method == "breadcrumbs" and params["beta"] + params["gamma"] > 1.0:
        raise ValueError(f"breadcrumbs: beta + gamma must be <= 1, got {params['beta']} + {params['gamma']}")
    return params


def _check_experts(experts: Sequence[Expert]) -> dict[str, tuple]:
    """Shapes per layer (in first-seen order), after checking the experts belong together."""
    if experts is None or len(experts) == 0:
        raise ValueError("merge: no experts given (empty list)")
    for e in experts:
        if not isinstance(e, Expert):
            raise ValueError(f"merge: expected Expert objects, got {type(e).__name__}")
    ref = next((e for e in experts if e.base_fingerprint), None)
    for e in experts:
        if ref is not None and e.base_fingerprint and e.base_fingerprint != ref.base_fingerprint:
            raise ValueError(
                f"merge: experts were trained on different base models: {ref.name!r} on {ref.base_model!r} "
                f"(fingerprint {ref.base_fingerprint}) and {e.name!r} on {e.base_model!r} "
                f"(fingerprint {e.base_fingerprint}); or on different target_modules of one base (the "
                f"fingerprint covers the adapted layers): {_targets_of(ref)} and {_targets_of(e)}"
            )
    if ref is None or not all(e.base_fingerprint for e in experts):
        # an expert without a fingerprint can only be matched by its base model's id
        ids = {e.base_model for e in experts if e.base_model}
        if len(ids) > 1:
            raise ValueError(f"merge: experts were trained on different base models: {sorted(ids)}")
    shapes: dict[str, tuple] = {}
    owner: dict[str, str] = {}
    for e in experts:
        for pname in e.layers.keys():
            shape = _layer_shape(e.layers, pname)
            if pname in shapes and shapes[pname] != shape:
                raise ValueError(f"merge: layer {pname} is {shapes[pname]} in expert {owner[pname]!r} but "
                                 f"{shape} in expert {e.name!r}; experts must have the same shapes")
            shapes.setdefault(pname, shape)
            owner.setdefault(pname, e.name)
    if not shapes:
        raise ValueError("merge: the experts have no layers")
    return shapes


def _layer_shape(layers: Mapping, pname: str) -> tuple:
    if isinstance(layers, _FileLayers):  # no need to read the tensors for their shape
        return tuple(layers._layers[pname]["shape"])
    return _delta_shape(layers[pname])


def _targets_of(expert: Expert) -> list[str] | None:
    targets = (expert.config or {}).get("target_modules") or expert.meta.get("target_modules")
    return list(targets) if targets else None


def _count_dtype(n: int) -> torch.dtype:
    return torch.uint8 if n < 255 else (torch.int16 if n < 32767 else torch.int32)


_CHUNK = 1 << 22  # elementwise passes over a dense layer go in chunks: small temporaries


def _chunks(n: int):
    for start in range(0, n, _CHUNK):
        yield slice(start, min(n, start + _CHUNK))


def _check_finite(values: torch.Tensor, what: str) -> None:
    flat = values.reshape(-1)
    if flat.numel() and not all(bool(torch.isfinite(flat[c]).all()) for c in _chunks(flat.numel())):
        raise ValueError(f"{what} holds NaN or Inf values; safe_merge refuses to merge it "
                         "(pass safe_merge=False to merge anyway)")


# ================================================================================ merge
def iter_merged_layers(
    experts: Sequence[Expert],
    method: str = "overlap_average",
    *,
    weights: Sequence[float] | None = None,
    basis: str = "tensor",
    output: str = "auto",
    seed: int = 0,
    safe_merge: bool = True,
    device=None,
    layers: Sequence[str] | None = None,
    **params,
) -> Iterator[tuple[str, Delta]]:
    """Merge layer by layer, yielding ``(parameter name, merged delta)``; see :func:`merge_experts`.

    Only one layer's working set is alive at a time (the caller may drop each result).
    """
    method = _canonical_method(method)
    params = resolve_params(method, **params)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    shapes = _check_experts(experts)
    n = len(experts)
    if weights is not None and method in ("average", "overlap_average"):
        raise ValueError(f"{method} takes no per-expert weights (use task_arithmetic with weights)")
    if weights is None:
        weights = [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {n} finite numbers (one per expert), got {weights}")
    names = list(shapes) if layers is None else list(layers)
    unknown = [p for p in names if p not in shapes]
    if unknown:
        raise ValueError(f"merge: layers {unknown[:3]} are in none of the experts")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(int(seed)) if method.startswith("dare") else None
    lam = params.get("lam", 1.0)
    if method == "average":
        w = [1.0 / n] * n
    elif method == "overlap_average":
        w = [1.0] * n
    else:
        w = [lam * x for x in weights]
    cdtype = _count_dtype(n)

    merge_layer = _METHOD_FUNCTIONS[method]
    for pname in names:
        shape = shapes[pname]
        numel = math.prod(shape)
        # Σ_i M_i: Eq. 4's overlap, and the union of masks of a sparse output
        need_masks = method == "overlap_average" or output != "dense"
        ctx = _LayerContext(masks=torch.zeros(numel if need_masks else 0, dtype=cdtype, device=device),
                            basis=basis, cdtype=cdtype, generator=generator)
        seen = {"sparse": True, "block_sizes": set()}

        def parts():
            """Each expert's part of this layer, one at a time (checked, counted in the masks)."""
            for i, e in enumerate(experts):
                if pname not in e.layers:
                    continue
                delta = e.layers[pname]
                seen["block_sizes"].add(delta.block_size if isinstance(delta, BlockSparseDelta) else None)
                seen["sparse"] &= isinstance(delta, (SparseDelta, BlockSparseDelta))
                part = _part_of(delta, device)
                del delta
                if safe_merge:
                    _check_finite(part.values, f"expert {e.name!r}, layer {pname}")
                if need_masks:
                    if part.idx is None:
                        ctx.masks += 1
                    else:
                        ctx.masks.index_add_(0, part.idx, torch.ones(1, dtype=cdtype, device=device).expand(part.count))
                yield i, part

        acc = merge_layer(torch.zeros(numel, dtype=torch.float32, device=device), parts(), w, params, ctx)
        if safe_merge:
            _check_finite(acc, f"the merged layer {pname}")
        as_sparse = output == "sparse" or (output == "auto" and seen["sparse"])
        if not as_sparse:
            yield pname, acc.view(shape)
            continue
        if len(shape) != 2:
            raise ValueError(f"output='sparse' needs 2-D layers; {pname} is {shape}")
        union = ctx.masks.view(shape) > 0
        ctx.masks = None  # the counts are not needed past the union
        dense = acc.view(shape)
        block_sizes = seen["block_sizes"]
        if len(block_sizes) == 1 and None not in block_sizes:
            bs = block_sizes.pop()
            tiles = union.view(shape[0] // bs, bs, shape[1] // bs, bs).any(dim=3).any(dim=1)
            yield pname, BlockSparseDelta.from_dense(dense, tiles, bs)
        else:
            yield pname, SparseDelta.from_dense(dense, union)


# ------------------------------------------------------------ one function per method
# Each takes the layer's zeroed fp32 accumulator, the experts' parts (streamed: one alive at a
# time, except where a method must keep them), the per-expert weights, the resolved
# hyper-parameters and the layer's context; it returns the merged layer (flat).


@dataclass
class _LayerContext:
    masks: torch.Tensor  # Σ_i M_i so far (int), filled while the parts stream
    basis: str
    cdtype: torch.dtype
    generator: torch.Generator | None


def _merge_weighted_sum(acc, parts, w, params, ctx):
    """average (w = 1/n), task arithmetic (w = λ·weight): Σ_i w_i·ΔW_i."""
    for i, part in parts:
        _accumulate(acc, part, w[i])
    return acc


def _merge_overlap_average(acc, parts, w, params, ctx):
    """Eq. 4: Σ_i ΔW_i / max(Σ_i M_i, 1), each entry averaged over the experts that hold it."""
    for _, part in parts:
        _accumulate(acc, part, 1.0)
    for c in _chunks(acc.numel()):
        acc[c].div_(ctx.masks[c].clamp(min=1))
    return acc


def _merge_magnitude_prune(acc, parts, w, params, ctx):
    """Each expert trimmed to its largest |values| (density), then summed with its weight."""
    for i, part in parts:
        _accumulate(acc, _trim_top(part, params["density"], ctx.basis), w[i])
    return acc


def _merge_ties(acc, parts, w, params, ctx):
    """TIES: trim, elect a sign per entry, average the experts that agree with it."""
    kept = [(i, _trim_top(part, params["density"], ctx.basis)) for i, part in parts]
    return _disjoint_merge(acc, kept, w, params["sign"], ctx.cdtype)


def _merge_dare_linear(acc, parts, w, params, ctx):
    """DARE: drop entries at random (rate p), rescale the rest by 1/(1-p), sum with weights."""
    for i, part in parts:
        _accumulate(acc, _dare(part, params["drop_rate"], params["rescale"], ctx.generator), w[i])
    return acc


def _merge_dare_ties(acc, parts, w, params, ctx):
    """DARE's random drop, then TIES's sign election and disjoint mean."""
    kept = [(i, _dare(part, params["drop_rate"], params["rescale"], ctx.generator)) for i, part in parts]
    return _disjoint_merge(acc, kept, w, params["sign"], ctx.cdtype)


def _merge_breadcrumbs(acc, parts, w, params, ctx):
    """Breadcrumbs: drop the smallest (β) and the largest (γ) |values| of each expert, then sum."""
    for i, part in parts:
        _accumulate(acc, _breadcrumbs(part, params["beta"], params["gamma"], ctx.basis), w[i])
    return acc


_METHOD_FUNCTIONS = {
    "overlap_average": _merge_overlap_average,
    "average": _merge_weighted_sum,
    "task_arithmetic": _merge_weighted_sum,
    "ties": _merge_ties,
    "dare_linear": _merge_dare_linear,
    "dare_ties": _merge_dare_ties,
    "breadcrumbs": _merge_breadcrumbs,
    "magnitude_prune": _merge_magnitude_prune,
}
assert set(_METHOD_FUNCTIONS) == set(METHODS)


def _accumulate(acc: torch.Tensor, part: _Part, weight: float) -> None:
    values = part.values if weight == 1.0 else part.values * weight
    if part.idx is None:
        acc.add_(values)
    else:
        acc.index_add_(0, part.idx, values)


def _disjoint_merge(acc: torch.Tensor, kept: list[tuple[int, _Part]], w: list[float], sign: str,
                    cdtype) -> torch.Tensor:
    """TIES's elect-sign + disjoint mean, over trimmed parts; ``acc`` (zeros) is reused."""
    for _, part in kept:  # elect: Σ trimmed ("total") or Σ sign(trimmed) ("frequency")
        _accumulate(acc, part if sign == "total" else _Part(part.values.sign(), part.idx, part.numel), 1.0)
    majority = torch.where(acc >= 0, 1, -1).to(torch.int8)
    acc.zero_()
    agree_count = torch.zeros(acc.numel(), dtype=cdtype, device=acc.device)
    for i, part in kept:
        maj = majority if part.idx is None else majority[part.idx]
        agree = part.values.sign().to(torch.int8) == maj
        sel = _select(part, agree)
        _accumulate(acc, sel, w[i])
        if sel.idx is not None:
            agree_count.index_add_(0, sel.idx, torch.ones(1, dtype=cdtype, device=acc.device).expand(sel.count))
    for c in _chunks(acc.numel()):
        acc[c].div_(agree_count[c].clamp(min=1))
    return acc


def merge_experts(
    experts: Sequence[Expert],
    method: str = "overlap_average",
    *,
    weights: Sequence[float] | None = None,
    basis: str = "tensor",
    output: str = "auto",
    seed: int = 0,
    safe_merge: bool = True,
    device=None,
    **params,
) -> MergeResult:
    """Merge ``experts`` with ``method`` (one of :data:`METHODS`); returns a :class:`MergeResult`.

    ``params``: the method's hyper-parameters (``lam``, ``density``, ``sign``,
    ``drop_rate``, ``rescale``, ``beta``, ``gamma``; defaults in :data:`DEFAULTS`).
    ``weights``: per-expert weights of the weighted methods (w_i = λ·weights_i).
    ``basis``: what ``density``/``beta``/``gamma`` count (``tensor`` or ``stored``).
    ``output``: ``auto`` (sparse when every expert of a layer is sparse), ``sparse`` or
    ``dense``. ``seed``: DARE's generator. ``safe_merge``: refuse NaN/Inf.
    """
    canonical = _canonical_method(method)
    resolved = resolve_params(canonical, **params)
    layers = dict(iter_merged_layers(experts, canonical, weights=weights, basis=basis, output=output, seed=seed,
                                     safe_merge=safe_merge, device=device, **params))
    ref = next((e for e in experts if e.base_fingerprint), experts[0])
    config = _merged_config(experts, layers)
    stats = {"layers": len(layers)}
    if all(isinstance(d, (SparseDelta, BlockSparseDelta)) for d in layers.values()):
        total = sum(math.prod(d.shape) for d in layers.values())
        stats["union_density"] = sum(d.nnz for d in layers.values()) / max(total, 1)
    record = dict(resolved)
    if canonical not in ("average", "overlap_average"):
        record["basis"] = basis
        if weights is not None:
            record["weights"] = [float(x) for x in weights]
    if canonical.startswith("dare"):
        record["seed"] = int(seed)
    return MergeResult(method=canonical, params=record, layers=layers, experts=[e.name for e in experts],
                       base_model=ref.base_model, base_fingerprint=ref.base_fingerprint, config=config, stats=stats,
                       target_modules=_targets_of(ref))


def _merged_config(experts: Sequence[Expert], layers: dict) -> dict | None:
    """The adapter config of a sparse merge (block size of the result, keep ratio = union density)."""
    if not layers or not all(isinstance(d, (SparseDelta, BlockSparseDelta)) and k.endswith(".weight")
                             for k, d in layers.items()):
        return None
    from sparse_engine.config import SparseAdapterConfig

    base = next((dict(e.config) for e in experts if e.config), {})
    targets = []
    for e in experts:
        for t in (e.config or {}).get("target_modules", []):
            if t not in targets:
                targets.append(t)
    if not targets:
        targets = sorted({k[: -len(".weight")].rsplit(".", 1)[-1] for k in layers})
    block = {d.block_size if isinstance(d, BlockSparseDelta) else None for d in layers.values()}
    total = sum(math.prod(d.shape) for d in layers.values())
    units = sum(d.nnz for d in layers.values())
    keep = min(1.0, max(units / max(total, 1), 1.0 / max(total, 1)))
    base.update({"keep_ratio": keep, "block_size": block.pop() if len(block) == 1 else None,
                 "target_modules": targets})
    known = SparseAdapterConfig.__dataclass_fields__
    return SparseAdapterConfig.from_dict({k: v for k, v in base.items() if k in known}).to_dict()


# ============================================================================ outputs
def save_merged(result: MergeResult, path) -> Path:
    """Write a merge: a sparse one as an adapter file (``load_adapter`` loads it on the base
    model), a dense one as an expert file (``load_expert`` / :func:`apply_merged`)."""
    path = Path(path)
    extra = {"merge": {"method": result.method, "params": result.params, "experts": result.experts}}
    if result.is_sparse and result.config is not None:
        from sparse_engine.io import write_adapter

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
    from sparse_engine.model import adapter_layers

    if adapter_layers(model):
        raise ValueError("apply_merged needs a plain model; this one has sparse adapters attached (detach() first)")
    params = dict(model.named_parameters())
    for pname in merged.layers.keys():
        if pname not in params:
            raise ValueError(f"the model has no parameter {pname} (the merge does not fit this model)")
        shape = _layer_shape(merged.layers, pname)
        if tuple(params[pname].shape) != shape:
            raise ValueError(f"parameter {pname} is {tuple(params[pname].shape)} in the model, {shape} in the merge")
    fp = merged.base_fingerprint
    if check_base and fp:
        targets = merged.target_modules if isinstance(merged, MergeResult) else _targets_of(merged)
        try:
            mine = _plain_base_fingerprint(model, targets)
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
                    _check_finite(vals, f"layer {pname}")
                flat = p.data.view(-1)
                flat.index_add_(0, delta.indices.to(p.device).long(), vals.to(p.dtype))
            else:
                d = _dense_of(delta).to(p.device) * scale
                if safe_merge:
                    _check_finite(d, f"layer {pname}")
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
            raise ValueError(f"mask_result needs a sparse expert; {expert.name!r} layer {pname} is {_delta_type(mine)}")
        mask = mine.mask()
        layers[pname] = SparseDelta.from_dense(_dense_of(delta).view(mask.shape), mask)
    return MergeResult(method=merged.method, params={**merged.params, "masked_by": expert.name}, layers=layers,
                       experts=merged.experts, base_model=merged.base_model, base_fingerprint=merged.base_fingerprint,
                       config=merged.config, stats={"layers": len(layers)}, target_modules=merged.target_modules)

"""Expert files: any expert (dense, low-rank or sparse layers) in one safetensors file, read
back lazily one layer at a time; :func:`load_expert` also reads adapter files (``io``)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import METADATA_KEY, atomic_save, read_adapter
from sparse_engine.merging.expert import Delta, Expert, LowRankDelta, delta_type, sparse_kind

EXPERT_FORMAT_VERSION = 1
EXPERT_METADATA_KEY = "sparse_engine_expert"


def _tensor_names(pname: str, kind: str) -> list[str] | None:
    """The file's tensors of one layer of type ``kind`` (None: an unknown type)."""
    return {"dense": [pname], "lowrank": [f"{pname}.lora_A", f"{pname}.lora_B"],
            "sparse": [f"{pname}.values", f"{pname}.indices"],
            "block": [f"{pname}.blocks", f"{pname}.block_indices"]}.get(kind)


def save_expert(expert: Expert, path, *, extra: dict | None = None) -> Path:
    """Write any expert (dense, low-rank or sparse layers) to one safetensors file, atomically.

    Sparse experts are better kept as adapter files (``save_adapter``); this format holds
    every kind so LoRA and full fine-tune experts and dense merges can be merged later.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for pname, delta in expert.layers.items():
        kind = delta_type(delta)
        entry = {"type": kind, "shape": list(delta.shape)}
        if kind == "dense":
            parts = (delta.detach(),)
        elif kind == "lowrank":
            parts = (delta.A.detach(), delta.B.detach())
            entry["scale"] = float(delta.scale)
        elif kind == "sparse":
            parts = (delta.values.detach(), delta.indices)
        else:
            parts = (delta.blocks.detach(), delta.block_indices)
        for tname, t in zip(_tensor_names(pname, kind), parts):
            tensors[tname] = t.contiguous().cpu()
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

    def stored_shape(self, pname: str) -> tuple:
        return tuple(self._layers[pname]["shape"])

    def stored_type(self, pname: str) -> str:
        return self._layers[pname]["type"]

    def __getitem__(self, pname: str) -> Delta:
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


def layer_shape(layers: Mapping, pname: str) -> tuple:
    """A layer's shape; an expert file's from its metadata (no tensor is read)."""
    if isinstance(layers, _FileLayers):
        return layers.stored_shape(pname)
    return tuple(layers[pname].shape)


def layer_type(layers: Mapping, pname: str) -> str:
    """A layer's delta type (one of ``expert.DELTA_TYPES``); an expert file's from its metadata."""
    if isinstance(layers, _FileLayers):
        return layers.stored_type(pname)
    return delta_type(layers[pname])


def expert_from_adapter_file(path, name: str | None = None) -> Expert:
    """A sparse (element or block) expert from an adapter file written by ``save_adapter``."""
    meta, deltas = read_adapter(path)
    extra = meta.get("extra") or {}
    return Expert(
        name=name or extra.get("task") or Path(path).stem,
        kind=sparse_kind(deltas.values()),
        layers={f"{layer}.weight": delta for layer, delta in deltas.items()},
        base_model=meta.get("base_model"),
        base_fingerprint=meta.get("base_fingerprint"),
        config=meta.get("config"),
        meta={"file": str(path), **extra},
    )


def load_expert(path, name: str | None = None) -> Expert:
    """An expert from an adapter file (``save_adapter``) or an expert file (``save_expert``).

    Expert files are read lazily, one layer at a time, when merged.
    """
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
        needed = _tensor_names(pname, entry.get("type"))
        if needed is None or not set(needed) <= keys:
            raise ValueError(f"{path}: tensors of layer {pname} are missing or of unknown type")
    extra = meta.get("extra") or {}
    return Expert(name=name or meta.get("name") or path.stem, kind=meta.get("kind", "full"),
                  layers=_FileLayers(path, meta["layers"]), base_model=meta.get("base_model"),
                  base_fingerprint=meta.get("base_fingerprint"), config=meta.get("config"),
                  meta={"file": str(path), **extra})

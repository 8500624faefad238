"""Adapter files: one safetensors file per adapter, values + indices + metadata.

Tensors per adapted layer ``L`` (the qualified name of the replaced ``nn.Linear``):
``L.values`` fp32 + ``L.indices`` int32 (element-sparse), or ``L.blocks`` fp32 ``[n, B, B]``
+ ``L.block_indices`` int32 (block-sparse). The safetensors metadata key
``sparse_engine`` holds JSON: format version, base model id and fingerprint, the adapter
config, and every layer's shape. Files are written atomically (temp file + rename) and
everything is checked against the model on load.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from sparse_engine._files import atomic_write
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.model import adapter_config, adapter_layers, attach, base_linear

FORMAT_VERSION = 1
METADATA_KEY = "sparse_engine"


def base_model_id(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "") or type(model).__name__)


def weights_fingerprint(named_weights) -> str:
    """Hash of (name, weight) pairs, each weight sampled (≤ 4096 values) and rounded to bf16,
    so fp32 and bf16 copies of one model agree."""
    h = hashlib.sha256()
    for name, weight in named_weights:
        w = weight.detach().reshape(-1)
        sample = w[:: max(1, w.numel() // 4096)][:4096].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model: nn.Module, layer_names=None) -> str:
    """Fingerprint of the base weights of the adapted layers, in model order: the attached
    adapters' (default), or those of ``layer_names``, each a plain ``nn.Linear`` or a wrapper
    holding one (a training adapter, a served layer). Adapter files record it; loading,
    serving and merging compare it with the model's."""
    if layer_names is None:
        return weights_fingerprint((name, layer.base.weight) for name, layer in adapter_layers(model).items())
    wanted = set(layer_names)
    named = []
    for name, module in model.named_modules():
        if name not in wanted:
            continue
        lin = base_linear(module)
        if lin is None:
            raise ValueError(f"layer {name!r} of the model is a {type(module).__name__}, not an nn.Linear")
        named.append((name, lin.weight))
    missing = sorted(wanted - {name for name, _ in named})
    if missing:
        raise ValueError(f"the model has no layer named {missing[:3]}")
    return weights_fingerprint(named)


def atomic_save(tensors: dict, metadata: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def adapter_tensors(model: nn.Module) -> dict[str, SparseDelta | BlockSparseDelta]:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no sparse adapters attached")
    return {name: layer.to_sparse() for name, layer in layers.items()}


def save_adapter(model: nn.Module, path, *, extra_metadata: dict | None = None) -> Path:
    """Write the attached adapter to ``path`` (a ``.safetensors`` file), atomically."""
    return write_adapter(path, adapter_tensors(model), config=adapter_config(model).to_dict(),
                         base_model=base_model_id(model), base_fingerprint=base_fingerprint(model),
                         extra=extra_metadata)


def write_adapter(path, deltas: dict[str, SparseDelta | BlockSparseDelta], *, config: dict, base_model: str | None,
                  base_fingerprint: str | None, extra: dict | None = None) -> Path:
    """The adapter file format, written atomically: ``deltas`` by layer name (the replaced
    ``nn.Linear``'s qualified name) with the metadata ``load_adapter`` checks. The one writer
    of adapter files (trained adapters, and merges of sparse experts)."""
    path = Path(path)
    tensors, shapes = {}, {}
    for name, delta in deltas.items():
        shapes[name] = list(delta.shape)
        if isinstance(delta, BlockSparseDelta):
            tensors[f"{name}.blocks"] = delta.blocks.detach().float().contiguous().cpu()
            tensors[f"{name}.block_indices"] = delta.block_indices.contiguous().cpu()
        else:
            tensors[f"{name}.values"] = delta.values.detach().float().contiguous().cpu()
            tensors[f"{name}.indices"] = delta.indices.contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "config": config,
        "layers": shapes,
        "extra": extra or {},
    }
    atomic_save(tensors, {METADATA_KEY: json.dumps(meta)}, path)
    return path


def read_adapter(path) -> tuple[dict, dict[str, SparseDelta | BlockSparseDelta]]:
    """(metadata, deltas by layer name) from an adapter file, validated; no model needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {exc}") from exc
    if raw_meta is None:
        raise ValueError(f"{path} has no sparse-engine metadata; it is not an adapter file written by save_adapter")
    meta = json.loads(raw_meta)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')} is not supported ({FORMAT_VERSION})")
    deltas = {}
    for name, shape in meta["layers"].items():
        try:
            if f"{name}.blocks" in tensors:
                deltas[name] = BlockSparseDelta(tuple(shape), tensors[f"{name}.blocks"], tensors[f"{name}.block_indices"])
            else:
                deltas[name] = SparseDelta(tuple(shape), tensors[f"{name}.values"], tensors[f"{name}.indices"])
        except KeyError as exc:
            raise ValueError(f"{path}: tensors of layer {name} are missing ({exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name}: {exc}") from exc
    return meta, deltas


def load_adapter(model: nn.Module, path, *, check_base: bool = True) -> nn.Module:
    """Load an adapter file into ``model`` (attaching adapters from the file's config if needed).

    Checked before anything changes: layer names, shapes and kind against the model,
    and (``check_base``) the base model's fingerprint, so an adapter trained on another
    base refuses to load.
    """
    meta, deltas = read_adapter(path)
    file_config = SparseAdapterConfig.from_dict(meta["config"])
    attached_here = False
    if not adapter_layers(model):
        attach(model, file_config)
        attached_here = True
    try:
        layers = adapter_layers(model)
        if set(layers) != set(deltas):
            missing, extra = sorted(set(deltas) - set(layers)), sorted(set(layers) - set(deltas))
            raise ValueError(
                f"{path} does not fit this model: layers only in the file {missing[:3]}, only in the model {extra[:3]}"
            )
        for name, delta in deltas.items():
            if tuple(delta.shape) != layers[name].shape:
                raise ValueError(
                    f"{path} does not fit this model: layer {name} is {tuple(delta.shape)} in the file, "
                    f"{layers[name].shape} in the model"
                )
            if (layers[name].block_size is None) != isinstance(delta, SparseDelta):
                raise ValueError(f"{path}: layer {name} is element/block-sparse in the file but not in the model")
        if check_base and meta.get("base_fingerprint") != base_fingerprint(model):
            raise ValueError(
                f"{path} was trained on another base model ({meta.get('base_model')!r}, fingerprint "
                f"{meta.get('base_fingerprint')}); this model's fingerprint is {base_fingerprint(model)}. "
                "Pass check_base=False to load it anyway."
            )
    except Exception:
        if attached_here:
            from sparse_engine.model import detach

            detach(model)
        raise
    for name, delta in deltas.items():
        layers[name].load_sparse(delta)
    return model

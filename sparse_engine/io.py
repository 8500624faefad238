"""Adapter files: one safetensors file per adapter, values + indices + metadata.

Tensors per adapted layer ``L`` (the qualified name of the replaced ``nn.Linear``):
``L.values`` fp32 + ``L.indices`` int32 (element-sparse), or ``L.blocks`` fp32 ``[n, B, B]``
+ ``L.block_indices`` int32 (block-sparse). The safetensors metadata key
``sparse_engine`` holds JSON: format version, base model id and fingerprint, the adapter
config, and every layer's shape. Files are written atomically (temp file + rename) and
everything is checked against the model on load. Reading puts each tensor straight into its
own memory (no memory map, no second copy) and loads into compact storage: loading costs
the adapter's bytes, never a dense Ŵ.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from sparse_engine._files import atomic_write
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.model import adapter_config, adapter_layers, attach, base_linear, find_target_linears

FORMAT_VERSION = 1
METADATA_KEY = "sparse_engine"
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format's own bound on its JSON header
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
LAYER_TENSORS = {"element": ("values", "indices"), "block": ("blocks", "block_indices")}
"""The two tensors an adapter file stores per layer ``L``: ``L.<values>`` and ``L.<ids>``."""


def layer_tensor_names(layer: str, block: bool) -> tuple[str, str]:
    """(values, ids) tensor names of ``layer`` in an adapter file."""
    return tuple(f"{layer}.{suffix}" for suffix in LAYER_TENSORS["block" if block else "element"])


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
            values, ids = layer_tensor_names(name, block=True)
            tensors[values] = delta.blocks.detach().float().contiguous().cpu()
            tensors[ids] = delta.block_indices.contiguous().cpu()
        else:
            values, ids = layer_tensor_names(name, block=False)
            tensors[values] = delta.values.detach().float().contiguous().cpu()
            tensors[ids] = delta.indices.contiguous().cpu()
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


@dataclass(frozen=True)
class TensorSpan:
    """Where one tensor of a safetensors file lies: its dtype, shape and first byte."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    def read_rows(self, f, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` (of dim 0) from the open binary file ``f``, straight into a
        new tensor."""
        tensor = torch.empty((end - start, *self.shape[1:]), dtype=self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            f.seek(self.offset + start * (nbytes // (end - start)))
            # the tensor's own bytes as a writable buffer (no numpy bridge: its first use costs ~8 MB)
            if f.readinto((ctypes.c_char * nbytes).from_address(tensor.data_ptr())) != nbytes:
                raise ValueError("a tensor is cut short")
        return tensor

    def read(self, f) -> torch.Tensor:
        """The whole tensor from the open binary file ``f``."""
        if not self.shape:  # a scalar: one row of a one-element tensor
            return TensorSpan(self.dtype, (1,), self.offset).read_rows(f, 0, 1).reshape(())
        return self.read_rows(f, 0, self.shape[0])


def read_safetensors_header(path) -> tuple[dict, dict[str, TensorSpan]]:
    """(metadata, where each tensor lies) of a safetensors file, checked: every dtype known and
    every tensor's bytes inside the file. Raises ``ValueError`` on a malformed header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _HEADER_LIMIT):
            raise ValueError(f"its header claims {n} bytes, more than the file holds ({size})")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, spans = 8 + n, {}
    for name, info in header.items():
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name} has dtype {info['dtype']}, not one of {sorted(_DTYPES)}")
        shape, (begin, end) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or end - begin != nbytes or begin < 0 or start + end > size:
            raise ValueError(f"tensor {name} ({info['dtype']} {list(shape)}) does not fit its bytes "
                             f"[{begin}, {end}) of the file's {size - start}")
        spans[name] = TensorSpan(dtype, shape, start + begin)
    return metadata, spans


def read_safetensors(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, each tensor read from the file straight into
    its own CPU memory: no memory map stays resident beside the copy, so reading costs the
    tensors' bytes once. Raises ``ValueError`` on a truncated or malformed file."""
    metadata, spans = read_safetensors_header(path)
    with open(path, "rb") as f:
        return metadata, {name: span.read(f) for name, span in spans.items()}


def read_adapter_header(path) -> tuple[dict, dict[str, TensorSpan]]:
    """(sparse-engine metadata, where each tensor lies) of an adapter file, checked (a readable
    header, our metadata, a supported format version); no tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        metadata, spans = read_safetensors_header(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {exc}") from exc
    raw_meta = metadata.get(METADATA_KEY)
    if raw_meta is None:
        raise ValueError(f"{path} has no sparse-engine metadata; it is not an adapter file written by save_adapter")
    meta = json.loads(raw_meta)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: adapter format version {meta.get('format_version')} is not supported ({FORMAT_VERSION})")
    return meta, spans


def read_adapter(path) -> tuple[dict, dict[str, SparseDelta | BlockSparseDelta]]:
    """(metadata, deltas by layer name) from an adapter file, validated; no model needed."""
    meta, spans = read_adapter_header(path)
    try:
        with open(path, "rb") as f:
            tensors = {name: span.read(f) for name, span in spans.items()}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable adapter file (truncated or corrupt?): {exc}") from exc
    deltas = {}
    for name, shape in meta["layers"].items():
        block = layer_tensor_names(name, block=True)[0] in tensors
        values, ids = layer_tensor_names(name, block)
        try:
            kind = BlockSparseDelta if block else SparseDelta
            deltas[name] = kind(tuple(shape), tensors[values], tensors[ids])
        except KeyError as exc:
            raise ValueError(f"{path}: tensors of layer {name} are missing ({exc})") from exc
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name}: {exc}") from exc
    return meta, deltas


def load_adapter(model: nn.Module, path, *, check_base: bool = True) -> nn.Module:
    """Load an adapter file into ``model`` (attaching adapters from the file's config if needed).

    Checked before anything changes: layer names, shapes and kind against the model,
    and (``check_base``) the base model's fingerprint, so an adapter trained on another
    base refuses to load. The file's entries go straight into compact (fixed-phase) storage.
    """
    meta, deltas = read_adapter(path)
    file_config = SparseAdapterConfig.from_dict(meta["config"])
    layers = adapter_layers(model)
    if layers:
        kinds = {name: (layer.shape, layer.block_size) for name, layer in layers.items()}
    else:
        kinds = {name: ((lin.out_features, lin.in_features), file_config.block_size)
                 for name, lin in find_target_linears(model, file_config.target_modules).items()}
    if set(kinds) != set(deltas):
        missing, extra = sorted(set(deltas) - set(kinds)), sorted(set(kinds) - set(deltas))
        raise ValueError(
            f"{path} does not fit this model: layers only in the file {missing[:3]}, only in the model {extra[:3]}"
        )
    for name, delta in deltas.items():
        shape, block_size = kinds[name]
        if tuple(delta.shape) != tuple(shape):
            raise ValueError(
                f"{path} does not fit this model: layer {name} is {tuple(delta.shape)} in the file, {tuple(shape)} "
                "in the model"
            )
        file_block = delta.block_size if isinstance(delta, BlockSparseDelta) else None
        if file_block != block_size:
            raise ValueError(f"{path}: layer {name} is {_kind(file_block)} in the file but {_kind(block_size)} in "
                             "the model")
    if check_base:
        mine = base_fingerprint(model, list(deltas))
        if meta.get("base_fingerprint") != mine:
            raise ValueError(
                f"{path} was trained on another base model ({meta.get('base_model')!r}, fingerprint "
                f"{meta.get('base_fingerprint')}); this model's fingerprint is {mine}. "
                "Pass check_base=False to load it anyway."
            )
    if not layers:
        attach(model, file_config, initial=deltas)
        return model
    for name, delta in deltas.items():
        layers[name].load_sparse(delta, copy=False)  # the file's fresh tensors: no second copy
    return model


def _kind(block_size: int | None) -> str:
    return "element-sparse" if block_size is None else f"block-sparse (B={block_size})"

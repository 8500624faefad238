"""The streaming merge: experts checked to belong together, then merged one parameter at a
time (:func:`iter_merged_layers`), each expert's part streamed into one fp32 accumulator by
the method's function; :func:`merge_experts` collects the layers into a ``MergeResult``."""
from __future__ import annotations

import math
import warnings
from typing import Iterator, Sequence

import torch

from sparse_engine.config import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.merging.expert import SPARSE_TYPES, Delta, Expert, targets_of
from sparse_engine.merging.files import layer_shape, layer_type
from sparse_engine.merging.methods import REGISTRY, LayerContext, canonical_method, resolve_params
from sparse_engine.merging.parts import BASES, check_finite, count_dtype, count_entries, part_of
from sparse_engine.merging.result import MergeResult

OUTPUTS = ("auto", "sparse", "dense")


class MixedMergeWarning(UserWarning):
    """A merge with ``output="auto"`` whose layers mix sparse and dense experts comes out dense."""


def check_experts(experts: Sequence[Expert]) -> dict[str, tuple]:
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
                f"fingerprint covers the adapted layers): {targets_of(ref)} and {targets_of(e)}"
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
            shape = layer_shape(e.layers, pname)
            if pname in shapes and shapes[pname] != shape:
                raise ValueError(f"merge: layer {pname} is {shapes[pname]} in expert {owner[pname]!r} but "
                                 f"{shape} in expert {e.name!r}; experts must have the same shapes")
            shapes.setdefault(pname, shape)
            owner.setdefault(pname, e.name)
    if not shapes:
        raise ValueError("merge: the experts have no layers")
    return shapes


def mixed_layers(experts: Sequence[Expert], names: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """The layers of ``names`` that some experts hold sparse and others dense or low-rank, with the
    names of the experts on each side (read from the files' metadata: no tensor is loaded)."""
    mixed, sparse, dense = [], {}, {}
    for pname in names:
        kinds = {e.name: layer_type(e.layers, pname) in SPARSE_TYPES for e in experts if pname in e.layers}
        if len(set(kinds.values())) == 2:
            mixed.append(pname)
            for name, is_sparse in kinds.items():
                (sparse if is_sparse else dense)[name] = None
    return mixed, list(sparse), list(dense)


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

    Only one layer's working set is alive at a time (the caller may drop each result). With
    ``output="auto"``, layers that mix sparse and dense experts come out dense: a
    :class:`MixedMergeWarning` says so before the first layer.
    """
    method = canonical_method(method)
    spec = REGISTRY[method]
    params = resolve_params(method, **params)
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    shapes = check_experts(experts)
    n = len(experts)
    if weights is not None and not spec.takes_weights:
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
    if output == "auto":
        mixed, sparse, dense = mixed_layers(experts, names)
        if mixed:
            warnings.warn(
                f"merge: {len(mixed)} layer(s) (e.g. {mixed[0]}) mix sparse experts {sparse} with dense or "
                f"low-rank ones {dense}; a merged layer stays sparse only when all its experts are, so these "
                f"layers come out dense and save_merged writes a dense expert file, not a sparse adapter "
                f"(pass output='dense' to ask for that, or merge the sparse experts alone for a sparse adapter)",
                MixedMergeWarning, stacklevel=2)
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(int(seed)) if spec.draws else None
    w = spec.expert_weights(params.get("lam", 1.0), weights)
    cdtype = count_dtype(n)
    # Σ_i M_i: Eq. 4's overlap, and the union of masks of a sparse output
    need_masks = spec.needs_overlap or output != "dense"

    for pname in names:
        shape = shapes[pname]
        numel = math.prod(shape)
        ctx = LayerContext(masks=torch.zeros(numel if need_masks else 0, dtype=cdtype, device=device),
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
                part = part_of(delta, device)
                del delta
                if safe_merge:
                    check_finite(part.values, f"expert {e.name!r}, layer {pname}")
                if need_masks:
                    count_entries(ctx.masks, part)
                yield i, part

        acc = spec.merge(torch.zeros(numel, dtype=torch.float32, device=device), parts(), w, params, ctx)
        if safe_merge:
            check_finite(acc, f"the merged layer {pname}")
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
    """Merge ``experts`` with ``method`` (one of ``METHODS``); returns a :class:`MergeResult`.

    ``params``: the method's hyper-parameters (``lam``, ``density``, ``sign``,
    ``drop_rate``, ``rescale``, ``beta``, ``gamma``; defaults in ``DEFAULTS``).
    ``weights``: per-expert weights of the weighted methods (w_i = λ·weights_i).
    ``basis``: what ``density``/``beta``/``gamma`` count (``tensor`` or ``stored``).
    ``output``: ``auto`` (sparse when every expert of a layer is sparse; a
    :class:`MixedMergeWarning` when some layers mix sparse and dense experts), ``sparse`` or
    ``dense``. ``seed``: DARE's generator. ``safe_merge``: refuse NaN/Inf.
    """
    canonical = canonical_method(method)
    spec = REGISTRY[canonical]
    resolved = resolve_params(canonical, **params)
    layers = dict(iter_merged_layers(experts, canonical, weights=weights, basis=basis, output=output, seed=seed,
                                     safe_merge=safe_merge, device=device, **params))
    ref = next((e for e in experts if e.base_fingerprint), experts[0])
    config = merged_config(experts, layers)
    stats = {"layers": len(layers)}
    if all(isinstance(d, (SparseDelta, BlockSparseDelta)) for d in layers.values()):
        total = sum(math.prod(d.shape) for d in layers.values())
        stats["union_density"] = sum(d.nnz for d in layers.values()) / max(total, 1)
    if output == "auto":
        mixed = len(mixed_layers(experts, list(layers))[0])
        if mixed:
            stats["mixed_layers"] = mixed
    record = dict(resolved)
    if spec.takes_weights:
        record["basis"] = basis
        if weights is not None:
            record["weights"] = [float(x) for x in weights]
    if spec.draws:
        record["seed"] = int(seed)
    return MergeResult(method=canonical, params=record, layers=layers, experts=[e.name for e in experts],
                       base_model=ref.base_model, base_fingerprint=ref.base_fingerprint, config=config, stats=stats,
                       target_modules=targets_of(ref))


def merged_config(experts: Sequence[Expert], layers: dict) -> dict | None:
    """The adapter config of a sparse merge (block size of the result, keep ratio = union density)."""
    if not layers or not all(isinstance(d, (SparseDelta, BlockSparseDelta)) and k.endswith(".weight")
                             for k, d in layers.items()):
        return None
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

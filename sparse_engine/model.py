"""Attach sparse adapters to any model by module name, and take them off again.

One generic path driven by ``config.target_modules``: every ``nn.Linear`` whose qualified
name equals a target or ends with ``"." + target`` is wrapped in a ``SparseAdapterLinear``.
"""
from __future__ import annotations

import torch.nn as nn

from sparse_engine import distributed
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.layers import SparseAdapterLinear

CONFIG_ATTR = "sparse_adapter_config"


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the qualified ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(model: nn.Module) -> dict[str, SparseAdapterLinear]:
    """Adapter layers by qualified name of the module they replaced, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseAdapterLinear)}


def base_linear(module: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` of a layer: itself, or the one a wrapper holds as ``.base`` (a
    training adapter, a served layer); None for anything else."""
    if isinstance(module, nn.Linear):
        return module
    base = getattr(module, "base", None)
    return base if isinstance(base, nn.Linear) else None


def adapter_buffer_names(model: nn.Module) -> list[str]:
    """Qualified names of the adapters' buffers (DDP must not broadcast them)."""
    return [f"{name}.{buf}" for name in adapter_layers(model) for buf in ("mask", "indices", "delta_dense")]


def find_target_linears(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules named by ``target_modules``. Every name must match at least one
    ``nn.Linear`` (a typo, or GPT-2's ``Conv1D``, is an error, not a silently smaller adapter),
    and no target may share its weight with another parameter (a tied ``lm_head``)."""
    targets = tuple(target_modules)
    modules = dict(model.named_modules())
    found = {name: m for name, m in modules.items() if _matches(name, targets) and isinstance(m, nn.Linear)}
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)})
    for target in targets:
        if any(_matches(name, (target,)) for name in found):
            continue
        others = sorted({type(m).__name__ for name, m in modules.items() if name and _matches(name, (target,))})
        what = f"matches only {others} modules, not nn.Linear" if others else "matches no module"
        raise ValueError(
            f"target_modules entry {target!r} {what} in {type(model).__name__}; its linear layers are named "
            f"{linear_names}"
        )
    owners: dict[int, dict[int, str]] = {}  # parameter -> {owning module: its qualified name}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), {}).setdefault(id(module), f"{mname}.{pname}" if mname else pname)
    for name, linear in found.items():
        shared = [p for m, p in owners.get(id(linear.weight), {}).items() if m != id(linear)]
        if shared:
            raise ValueError(
                f"{name}.weight is tied to {shared[0]} (tie_word_embeddings): a delta on it would also change "
                f"that module; untie the weights first or leave {name.rsplit('.', 1)[-1]!r} out of target_modules"
            )
    return found


def attach(model: nn.Module, config: SparseAdapterConfig | None = None, initial: dict | None = None) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a ``SparseAdapterLinear`` (in place).

    Every other parameter of the model is frozen; the adapters start at Ŵ = 0, M = 1, so
    the model's outputs are unchanged, or, with ``initial`` (a ``SparseDelta`` /
    ``BlockSparseDelta`` for every target, by name), in the fixed phase with those entries,
    taken without a copy and without a dense Ŵ. Returns ``model``.
    """
    config = config or SparseAdapterConfig()
    if adapter_layers(model):
        raise ValueError("the model already has sparse adapters attached; detach() first")
    targets = find_target_linears(model, config.target_modules)
    if initial is not None and set(initial) != set(targets):
        only_given, only_model = sorted(set(initial) - set(targets)), sorted(set(targets) - set(initial))
        raise ValueError(f"initial adapters do not match the target layers: only given {only_given[:3]}, "
                         f"only in the model {only_model[:3]}")
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    # Build every wrapper before touching the model, so a bad layer leaves it unchanged.
    try:
        wrappers = {name: SparseAdapterLinear(lin, config, name, None if initial is None else initial[name])
                    for name, lin in targets.items()}
    except Exception:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, wrapper in wrappers.items():
        replace_module(model, name, wrapper)
    distributed.ignore_adapter_buffers(model, adapter_buffer_names(model))
    model._sparse_requires_grad = frozen
    setattr(model, CONFIG_ATTR, config)
    return model


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("the model has no sparse adapters attached")
    distributed.stop_ignoring(model, adapter_buffer_names(model))
    for name, layer in layers.items():
        replace_module(model, name, layer.to_linear(merge))
    flags = getattr(model, "_sparse_requires_grad", {})
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    for attr in ("_sparse_requires_grad", CONFIG_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove the adapters: the original ``nn.Linear`` modules come back, untouched."""
    return _unwrap(model, merge=False)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace each adapter by a plain ``nn.Linear`` with weight W + ΔW (the base W is not modified)."""
    return _unwrap(model, merge=True)


def adapter_config(model: nn.Module) -> SparseAdapterConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("the model has no sparse adapters attached; call attach(model, config) first")
    return config


def trainable_parameter_count(model: nn.Module) -> int:
    """Trainable scalars: kept adapter entries for sparse adapters, else every parameter requiring grad."""
    layers = adapter_layers(model)
    if layers:
        return sum(layer.trainable_count for layer in layers.values())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""Data-parallel training support: the process group, rank-consistent mask selection and DDP.

The mask of Algorithm 1 must be chosen from the score of the *global* batch, identically on
every rank. Every score is a function of G = ∂L/∂Ŵ (and of Ŵ, the same on every rank), so the
ranks sum what they computed locally before the top-k: the score itself where it is linear in
G (``mcs``), G where it is not (``snip``, ``gm``, ``gd``'s grow score); rank 0's selection is
then broadcast, so the masks are identical by construction. docs/distributed.md has the costs.
"""
from __future__ import annotations

import inspect
import sys
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

AUTO = "auto"
DEFAULT_TIMEOUT = timedelta(minutes=30)

# Scores linear in G: summing the per-rank scores is summing G. The others need G summed first.
LINEAR_SCORES = ("mcs",)


def resolve_group(process_group=AUTO):
    """The group to train over, or None for a single process.

    ``"auto"``: the default group when torch.distributed is initialised with more than one
    rank; ``None``: a single process even under torchrun (each rank trains alone); a group:
    that group (None when it holds one rank)."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != AUTO:
            raise ValueError(f"process_group must be 'auto', None or a ProcessGroup, got {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without one)."""
    return dist.get_rank(group) if group is not None else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if group is not None else 1


def is_main(group=None) -> bool:
    """True on the rank that writes files (rank 0 of the group, or the only process)."""
    return rank(group) == 0


def launched_with_ranks() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(timeout: timedelta = DEFAULT_TIMEOUT):
    """Initialise the default process group from the launcher's environment (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``): NCCL with one GPU per local rank when
    CUDA is there, gloo otherwise. Returns the group, or None for a single process."""
    if not launched_with_ranks():
        return resolve_group(AUTO)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return resolve_group(AUTO)


# ------------------------------------------------------------------------ collectives


def all_reduce_sum_(tensors, group) -> None:
    """Sum each tensor over the ranks, in place (all launched, then all waited for)."""
    handles = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]
    for handle in handles:
        handle.wait()


def any_rank(flag: bool, group) -> bool:
    """True on every rank when ``flag`` is true on at least one: a failure one rank sees
    becomes an error on all of them, instead of the others waiting in the next collective."""
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def broadcast_kept(kept: dict[str, torch.Tensor], names, group) -> dict[str, torch.Tensor]:
    """Rank 0's kept units of every layer in ``names`` (model order), on every rank.

    Two collectives: the per-layer counts (they differ between layers with layer drop), then
    all indices concatenated."""
    device = collective_device(group)
    counts = torch.tensor([int(kept[n].numel()) if n in kept else 0 for n in names], dtype=torch.int64, device=device)
    dist.broadcast(counts, src=dist.get_global_rank(group, 0), group=group)
    if rank(group) == 0:
        flat = torch.cat([kept[n].reshape(-1).to(device=device, dtype=torch.int32) for n in names]) if names else \
            torch.zeros(0, dtype=torch.int32, device=device)
    else:
        flat = torch.empty(int(counts.sum()), dtype=torch.int32, device=device)
    dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
    out, start = {}, 0
    for name, count in zip(names, counts.tolist()):
        target = kept[name].device if name in kept else flat.device
        out[name] = flat[start:start + count].to(target)
        start += count
    return out


def check_same_on_all_ranks(what: str, value, group) -> None:
    """Raise on every rank when ``value`` (a small picklable object) differs between ranks."""
    values = [None] * world_size(group)
    dist.all_gather_object(values, value, group=group)
    diff = first_difference(values)
    if diff is not None:
        raise ValueError(f"{what} differs between ranks ({diff}); every rank must start with the same settings "
                         "and files")


def first_difference(values: list) -> str | None:
    """How the first rank whose value differs from rank 0's differs (dicts key by key), or None."""
    for r, other in enumerate(values):
        if other == values[0]:
            continue
        if isinstance(other, dict) and isinstance(values[0], dict):
            keys = [k for k in dict.fromkeys([*values[0], *other]) if values[0].get(k) != other.get(k)]
            return ", ".join(f"{k}: {values[0].get(k)!r} on rank 0, {other.get(k)!r} on rank {r}" for k in keys)
        return f"{values[0]!r} on rank 0, {other!r} on rank {r}"
    return None


def collective_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------- DDP wrapper

DDP = nn.parallel.DistributedDataParallel


def unwrap(model: nn.Module) -> tuple[nn.Module, DDP | None]:
    """(the module inside, the DDP wrapper or None)."""
    return (model.module, model) if isinstance(model, DDP) else (model, None)


def active_ddp() -> DDP | None:
    """The DDP wrapper whose forward is running now (called from inside the wrapped module's
    forward, e.g. a forward pre-hook), or None. This is how a Trainer callback, which only sees
    the unwrapped model, finds the wrapper it must rebuild at the freeze."""
    getter = getattr(DDP, "_get_active_ddp_module", None)
    return getter() if getter is not None else None


def ignore_adapter_buffers(model: nn.Module, buffer_names) -> None:
    """Tell a DDP built later around ``model`` not to broadcast these buffers from rank 0 at
    every forward: the masks are made identical by the selection itself, and rebroadcasting a
    dense bool mask per layer per step would cost as much as the step's gradients and hide any
    disagreement. (DDP reads this attribute of the module when it is constructed.)"""
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(buffer_names)
    model._ddp_params_and_buffers_to_ignore = sorted(names)


def stop_ignoring(model: nn.Module, buffer_names) -> None:
    """Undo ``ignore_adapter_buffers`` (the adapters were taken off)."""
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) - set(buffer_names)
    if names:
        model._ddp_params_and_buffers_to_ignore = sorted(names)
    elif hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        del model._ddp_params_and_buffers_to_ignore


def wrap(module: nn.Module, group) -> DDP:
    """DDP over ``group`` (one device per rank: the module's CUDA device, or the CPU)."""
    device = next(module.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, process_group=group)


def rebuild(ddp: DDP) -> None:
    """Make an existing DDP wrapper know the module's parameters as they are now.

    The switch to compact storage replaces each adapter's dense Ŵ by a new, smaller parameter;
    the reducer built at construction still holds the old ones (they would never be freed and
    the new ones never reduced). The wrapper is re-initialised in place with its own settings,
    so whoever holds it (the Trainer's loop, accelerate) keeps a working object; the old
    reducer, its buckets and the dense Ŵ are released."""
    training = ddp.training
    settings = dict(
        device_ids=ddp.device_ids, output_device=ddp.output_device, dim=ddp.dim, process_group=ddp.process_group,
        bucket_cap_mb=ddp.bucket_bytes_cap / (1024 * 1024), find_unused_parameters=ddp.find_unused_parameters,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view, static_graph=ddp.static_graph,
    )
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13 renamed it
        settings["forward_sync_buffers"] = ddp.forward_sync_buffers
    else:
        settings["broadcast_buffers"] = ddp.broadcast_buffers
    module = ddp.module
    ddp.reducer = None  # drop the old reducer (and its references to the dense Ŵ) before the new one is built
    DDP.__init__(ddp, module, **settings)
    ddp.train(training)


def refuse_sharded(tensor: torch.Tensor, where: str) -> None:
    """Sparse adapters do not run under FSDP (its sharded parameters cannot be masked, selected
    or compacted per layer); say so at once instead of failing at the first mask update."""
    if _is_dtensor(tensor):
        raise RuntimeError(
            f"{where} is sharded (FSDP / DTensor): sparse adapters support data parallelism with DDP "
            "(torchrun + train_expert, or the Trainer without fsdp); attach them to an unsharded model"
        )


def _is_dtensor(tensor) -> bool:
    # A DTensor exists only once its module was imported; importing it here would pull in
    # sympy and ~40 MB of modules for every model that never meets FSDP.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)

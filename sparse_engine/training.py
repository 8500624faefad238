"""Training: Algorithm 1 for sparse adapters, and plain training for the baselines.

``train_expert`` is one loop for every method: with sparse adapters attached it runs
Algorithm 1 (mask updates every ``update_interval`` optimizer steps during the mask
epochs, then frozen compact storage); with LoRA or full fine-tuning it trains whatever
requires grad. ``SparseAdapterCallback`` gives a Hugging Face ``Trainer`` user the same
mask schedule: ``attach(model, config)``, then ``Trainer(..., callbacks=[SparseAdapterCallback()])``.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparse_engine import distributed
from sparse_engine._files import atomic_write
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.data import IGNORE_INDEX
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import weights_fingerprint
from sparse_engine.layers import FIXED
from sparse_engine.masking import freeze_masks, replace_parameter, update_masks
from sparse_engine.model import (adapter_buffer_names, adapter_config, adapter_layers, attach,
                                 trainable_parameter_count)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


@dataclass
class TrainingConfig:
    """Optimisation settings. Steps count optimizer steps (after gradient accumulation)."""

    epochs: int = 5
    learning_rate: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs checkpoint_dir")


@dataclass
class TrainResult:
    steps: int
    epochs: float
    seconds: float
    trainable_params: int
    mask_updates: int = 0
    active_layers: int | None = None
    losses: list[float] = field(default_factory=list)
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class MaskSchedule:
    """Algorithm 1's schedule over a model with sparse adapters attached.

    ``group``: the data-parallel process group (None for one process); every rank must call
    the schedule at the same steps, with its own share of the batch in ``loss_fn``.
    """

    def __init__(self, model: nn.Module, group=None):
        self.model = model
        self.layers = adapter_layers(model)
        if not self.layers:
            raise ValueError("the model has no sparse adapters attached; call attach(model, config) first")
        self.config: SparseAdapterConfig = adapter_config(model)
        for layer in self.layers.values():
            layer.check_unsharded()
        self.updates = 0
        self.group = group
        self._parameters = self._adapter_parameters()

    def _adapter_parameters(self) -> list[int]:
        return [id(layer.delta) for layer in self.layers.values()]

    def parameters_replaced(self) -> bool:
        """True when an adapter's ``delta`` is another parameter than at the last call (a mask
        update or the freeze changed its storage): a DDP wrapper must then be rebuilt."""
        now = self._adapter_parameters()
        replaced, self._parameters = now != self._parameters, now
        return replaced

    @property
    def frozen(self) -> bool:
        return all(layer.phase == FIXED for layer in self.layers.values())

    def after_optimizer_step(self, global_step: int, epoch: int, loss_fn: Callable[[], torch.Tensor], optimizer) -> bool:
        """Update the masks if this step is a mask step (``epoch`` 0-based). True when it did."""
        if self.frozen or epoch >= self.config.mask_epochs or global_step % self.config.update_interval:
            return False
        update_masks(self.model, self.layers, loss_fn, self.config, optimizer, self.group)
        self.updates += 1
        return True

    def after_epoch(self, epochs_done: int, optimizer, loss_fn: Callable[[], torch.Tensor] | None) -> bool:
        """Freeze the masks once the mask epochs are over. True when it did."""
        if self.frozen or epochs_done < self.config.mask_epochs:
            return False
        self.finish(optimizer, loss_fn)
        return True

    def finish(self, optimizer=None, loss_fn: Callable[[], torch.Tensor] | None = None) -> None:
        """Freeze whatever is still in the search phase.

        A run whose mask epochs held fewer than ``update_interval`` steps never selected a
        mask; it gets one update from ``loss_fn`` first, so exactly k entries are kept.
        """
        if self.frozen:
            return
        if self.updates == 0:
            if loss_fn is None:
                raise RuntimeError("no mask was ever selected and no batch is available to score one")
            update_masks(self.model, self.layers, loss_fn, self.config, optimizer, self.group)
            self.updates += 1
        freeze_masks(self.layers, optimizer)

    def active_layers(self) -> int:
        return sum(1 for layer in self.layers.values() if layer.kept_count > 0)


def _epoch_index(epoch: float) -> int:
    """0-based epoch of a Trainer step from its fractional ``state.epoch`` (1.0 ends epoch 0)."""
    return max(0, math.ceil(epoch - 1e-9) - 1)


def _mask_updates_before(global_step: int, epoch: float | None, config: SparseAdapterConfig) -> int:
    """Mask updates a Trainer run made up to ``global_step`` (the callback's rule: every
    ``update_interval``-th step whose epoch is within the mask epochs), from the resumed
    state's step and fractional epoch."""
    if not epoch:
        return 0
    steps_per_epoch = global_step / epoch
    return sum(
        1 for step in range(config.update_interval, global_step + 1, config.update_interval)
        if _epoch_index(step / steps_per_epoch) < config.mask_epochs
    )


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # The order depends on (seed, epoch) only, so a resumed run sees the same batches.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def build_optimizer(model: nn.Module, config: TrainingConfig) -> torch.optim.AdamW:
    """AdamW; sparse adapter values get no weight decay (it would move entries outside the mask)."""
    adapter_ids = {id(layer.delta) for layer in adapter_layers(model).values()}
    adapters, decayed, plain = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in adapter_ids:
            adapters.append(p)
        elif p.dim() >= 2:
            decayed.append(p)
        else:
            plain.append(p)
    groups = [g for g in (
        {"params": adapters, "weight_decay": 0.0},
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=config.learning_rate)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_expert(
    model: nn.Module,
    train_dataset,
    config: TrainingConfig | None = None,
    *,
    adapter: SparseAdapterConfig | None = None,
    collate_fn: Callable | None = None,
    resume: bool = False,
    process_group=distributed.AUTO,
) -> TrainResult:
    """Train ``model`` on ``train_dataset`` (a sequence of examples, batched by ``collate_fn``).

    ``adapter``: attach sparse adapters with this config first. With adapters attached,
    Algorithm 1 runs; otherwise every parameter requiring grad is trained (LoRA, full
    fine-tuning). ``resume=True`` continues from ``config.checkpoint_dir`` if a checkpoint
    is there: mask, values, optimizer, scheduler, step and data order, exactly.

    ``process_group``: data parallelism. ``"auto"``: over the default process group when
    torch.distributed is initialised with several ranks (torchrun); ``None``: this process
    alone, even under torchrun; or a group. ``model`` may also come wrapped in DDP (its group is
    used). With N ranks ``config.batch_size`` is each rank's micro-batch, and every optimizer
    step sees the examples one process would see with batch N·batch_size, in the same
    (seed, epoch) order: the loss is weighted by label tokens across the ranks and the mask
    scores are summed over them, so the adapter equals that single-process run's. Every rank
    ends with the same adapter; only rank 0 writes checkpoints.
    """
    config = config or TrainingConfig()
    module, ddp = distributed.unwrap(model)
    if ddp is not None:
        if adapter is not None:
            raise ValueError("attach sparse adapters before wrapping the model in DDP (attach(model, config), then "
                             "DDP(model)), or pass the plain model: train_expert wraps it itself")
        group = distributed.resolve_group(ddp.process_group)
    else:
        group = distributed.resolve_group(process_group)
    world, rank = distributed.world_size(group), distributed.rank(group)
    n = len(train_dataset)
    if n == 0:
        raise ValueError("the training dataset is empty")
    if adapter is not None:
        attach(module, adapter)
    collate_fn = collate_fn or _default_collate
    device = next(module.parameters()).device
    schedule = MaskSchedule(module, group) if adapter_layers(module) else None
    optimizer = build_optimizer(module, config)
    global_batch = config.batch_size * world
    batches_per_epoch = math.ceil(n / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "losses": [], "mask_updates": 0}
    settings = run_settings(module, config, world)
    resumed = False
    if resume:
        if not config.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")
        path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
        if path.exists():
            state = load_checkpoint(path, module, optimizer, scheduler, settings)
            resumed = True
    if schedule is not None:
        schedule.updates = state["mask_updates"]
    if group is not None:
        # Every rank must start from the same run; a difference is one error on every rank.
        distributed.check_same_on_all_ranks(
            "the training run (settings, dataset size, adapter state, step)",
            {"settings": settings, "examples": n, "state": _state_fingerprint(module), "step": state["step"]}, group)
        if n % world:
            raise ValueError(f"the training dataset has {n} examples, which {world} ranks cannot share equally; "
                             f"trim it to {n - n % world} (or a multiple of {world}) examples")
        if ddp is None:
            distributed.ignore_adapter_buffers(module, adapter_buffer_names(module))
            ddp = distributed.wrap(module, group)
        elif resumed:  # the checkpoint may have switched adapters to compact storage
            distributed.rebuild(ddp)
    forward_model = ddp if ddp is not None else module

    batch = None
    batch_weight = 1.0

    def last_batch_loss():
        # The score pass of Algorithm 1 re-runs the current (last) micro-batch, on the module
        # itself (no DDP forward: the score pass produces no gradient to reduce). With several
        # ranks each contributes its loss summed over label tokens: the scores then sum to the
        # global batch's (up to a positive factor, which the top-k ignores).
        if batch is None:
            return None
        if group is None:
            return lambda: module(**batch).loss
        return lambda: _weighted(module(**batch), batch_weight)

    start = time.perf_counter()
    was_training = module.training
    forward_model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=config.desc,
               disable=not config.progress or not distributed.is_main(group), dynamic_ncols=True, leave=False)
    try:
        while state["epoch"] < config.epochs and state["step"] < total_steps:
            order = _epoch_order(n, config.seed, state["epoch"])
            starts = list(range(0, n, global_batch))
            b = state["batch_in_epoch"]
            while b < len(starts) and state["step"] < total_steps:
                window = starts[b: b + config.grad_accum]
                total_loss = 0.0
                for j, s in enumerate(window):
                    chunk = order[s: s + global_batch]
                    share = len(chunk) // world  # equal shares: n is a multiple of the world size
                    mine = chunk[rank * share: (rank + 1) * share]
                    batch = _build_batch(train_dataset, mine, collate_fn, device, group)
                    last_micro_batch = j == len(window) - 1
                    sync = contextlib.nullcontext() if ddp is None or last_micro_batch else ddp.no_sync()
                    with sync:
                        outputs = forward_model(**batch)
                        loss, value, batch_weight = _step_loss(outputs, batch, group, world, state["step"] + 1)
                        (loss / len(window)).backward()
                        # the graph's nodes keep its leaves (the dense Ŵ) alive: drop it before a freeze
                        del outputs, loss
                    total_loss += value / len(window)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                b += len(window)
                state["batch_in_epoch"] = b
                state["losses"].append(round(total_loss, 6))
                if schedule is not None and schedule.after_optimizer_step(
                    state["step"], state["epoch"], last_batch_loss(), optimizer
                ):
                    state["mask_updates"] = schedule.updates
                    if ddp is not None and schedule.parameters_replaced():
                        distributed.rebuild(ddp)  # compact storage: DDP must reduce the new parameters
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}", epoch=state["epoch"] + 1)
                if config.checkpoint_every and state["step"] % config.checkpoint_every == 0 \
                        and distributed.is_main(group):
                    save_checkpoint(Path(config.checkpoint_dir) / CHECKPOINT_NAME, module, optimizer, scheduler, state,
                                    settings)
            if b >= len(starts):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if schedule is not None:
                    if schedule.after_epoch(state["epoch"], optimizer, last_batch_loss()) and ddp is not None \
                            and schedule.parameters_replaced():
                        distributed.rebuild(ddp)  # the compact values are new parameters: DDP must reduce them
                    state["mask_updates"] = schedule.updates
    finally:
        bar.close()
    if schedule is not None and not schedule.frozen:
        schedule.finish(optimizer, last_batch_loss())
        state["mask_updates"] = schedule.updates
        if ddp is not None and ddp is model and schedule.parameters_replaced():  # the caller's wrapper stays usable
            distributed.rebuild(ddp)
    if config.checkpoint_dir and distributed.is_main(group):
        save_checkpoint(Path(config.checkpoint_dir) / CHECKPOINT_NAME, module, optimizer, scheduler, state, settings)
    module.train(was_training)
    return TrainResult(
        steps=state["step"],
        epochs=state["epoch"] + state["batch_in_epoch"] / batches_per_epoch,
        seconds=round(time.perf_counter() - start, 3),
        trainable_params=trainable_parameter_count(module),
        mask_updates=state["mask_updates"],
        active_layers=schedule.active_layers() if schedule is not None else None,
        losses=state["losses"],
        world_size=world,
    )


def _build_batch(dataset, indices, collate_fn, device, group) -> dict:
    """This rank's micro-batch. With several ranks a failure here (a bad example, a collate
    error) is agreed on before the forward, whose DDP collectives would otherwise wait for the
    failed rank forever: every rank raises."""
    try:
        batch, error = _to_device(collate_fn([dataset[int(i)] for i in indices]), device), None
    except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
        batch, error = None, exc
    if group is not None and distributed.any_rank(error is not None, group) and error is None:
        raise RuntimeError("another rank failed to build its micro-batch (see its error); stopping on every rank")
    if error is not None:
        raise error
    return batch


def loss_weight(batch: dict) -> int:
    """What a micro-batch's mean loss averages over: its label tokens (causal LM labels, shifted
    by one as the Hugging Face loss does; -100 ignored), or its rows without labels."""
    labels = batch.get("labels")
    if torch.is_tensor(labels):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    first = next(v for v in batch.values() if torch.is_tensor(v))
    return int(first.shape[0])


def _weighted(outputs, weight: float) -> torch.Tensor:
    """``outputs.loss × weight``; a share with no label tokens contributes an exact zero that
    still reaches every parameter (its mean loss is NaN, and DDP expects every gradient)."""
    if weight == 0:
        return outputs.logits.float().sum() * 0.0
    return outputs.loss * weight


def _step_loss(outputs, batch: dict, group, world: int, step: int):
    """(the loss to backpropagate, the micro-batch's global mean loss, this share's weight).

    One process: the model's mean loss. Several ranks: each rank's mean loss is weighted by its
    share of the global batch's label tokens (times ``world``, which DDP's gradient averaging
    divides out), so the reduced gradient is that of the global batch's mean loss, the
    single-process one, even when the ranks' shares hold different numbers of tokens. One
    collective per micro-batch also makes a non-finite loss an error on every rank."""
    loss = outputs.loss
    if group is None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {step}")
        return loss, loss.item(), 1.0
    weight = float(loss_weight(batch))
    value = float(loss.detach()) if weight else 0.0
    bad = weight > 0 and not math.isfinite(value)
    stats = torch.tensor([weight, value * weight if not bad else 0.0, float(bad)], dtype=torch.float64,
                         device=distributed.collective_device(group))
    distributed.all_reduce_sum_([stats], group)
    total, loss_sum, bad_ranks = stats.tolist()
    if bad_ranks or total == 0:
        raise FloatingPointError(f"non-finite training loss at step {step} "
                                 f"({int(bad_ranks)} rank(s) with a non-finite loss, {int(total)} label tokens)")
    return _weighted(outputs, weight * world / total), loss_sum / total, weight


def _state_fingerprint(module: nn.Module) -> dict:
    """What must be equal on every rank before data-parallel training starts: the base weights
    under the adapters, and each adapter's phase, kept units and values (sampled hashes)."""
    layers = adapter_layers(module)
    out = {"trainable": weights_fingerprint((n, p) for n, p in module.named_parameters() if p.requires_grad)}
    if layers:
        out["base"] = weights_fingerprint((n, layer.base.weight) for n, layer in layers.items())
        out["kept"] = {n: (layer.phase, zlib.crc32(layer.kept_units().cpu().numpy().tobytes()))
                       for n, layer in layers.items()}
    return out


def _default_collate(items: list[dict]) -> dict:
    if not items or not isinstance(items[0], dict):
        raise TypeError("train_expert needs collate_fn unless the dataset yields dicts of equal-length tensors")
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


# ------------------------------------------------------------------- checkpoints


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# Settings a resumed run must share with the checkpoint's run (the adapter's and the
# optimiser's); epochs and max_steps may change, to continue a run further.
_RESUME_SETTINGS = ("learning_rate", "batch_size", "grad_accum", "warmup_ratio", "weight_decay", "max_grad_norm",
                    "seed")


def run_settings(model, config: TrainingConfig | None, world_size: int = 1) -> dict:
    """What a checkpoint records of its run, to refuse a resume with other settings. The
    number of data-parallel ranks is one: it sets the global batch and each rank's share."""
    layers = adapter_layers(model)
    return {
        "adapter": adapter_config(model).to_dict() if layers else None,
        "training": None if config is None else {k: getattr(config, k) for k in _RESUME_SETTINGS},
        "world_size": world_size,
    }


def _check_resume_settings(path, saved: dict | None, current: dict) -> None:
    if saved is None:  # a checkpoint from before settings were recorded
        return
    diffs = []
    if saved.get("world_size", 1) != current.get("world_size", 1):
        diffs.append(f"data-parallel ranks: checkpoint {saved.get('world_size', 1)}, now {current.get('world_size', 1)}")
    for part in ("adapter", "training"):
        mine, theirs = current.get(part), saved.get(part)
        if mine is None or theirs is None:
            continue
        diffs += [f"{part}.{k}: checkpoint {theirs.get(k)!r}, now {mine.get(k)!r}"
                  for k in sorted(set(mine) | set(theirs)) if _plain(theirs.get(k)) != _plain(mine.get(k))]
    if diffs:
        raise ValueError(f"checkpoint {path} was written with other settings; resume with the same ones or start "
                         f"afresh: {'; '.join(diffs[:4])}")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def save_checkpoint(path, model, optimizer, scheduler, state: dict, settings: dict | None = None) -> None:
    """Everything a resumed run needs to continue bit-for-bit, written atomically."""
    layers = adapter_layers(model)
    adapter_ids = {id(layer.delta) for layer in layers.values()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "settings": settings,
        "state": dict(state),
        "adapters": {name: _layer_storage(layer) for name, layer in layers.items()},
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and id(p) not in adapter_ids},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    _atomic_torch_save(payload, Path(path))


def _layer_storage(layer) -> dict:
    tensors = {"phase": layer.phase, "storage": layer.storage, "delta": layer.delta.detach().clone()}
    for key in ("mask", "indices", "delta_dense"):
        value = getattr(layer, key)
        tensors[key] = None if value is None else value.clone()
    return tensors


def load_checkpoint(path, model, optimizer, scheduler, settings: dict | None = None) -> dict:
    """Restore a checkpoint written by ``save_checkpoint``; returns the loop state. With
    ``settings`` (``run_settings`` of this run), a checkpoint of other settings is refused."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a sparse-engine checkpoint (format {CHECKPOINT_FORMAT})")
    if settings is not None:
        _check_resume_settings(path, payload.get("settings"), settings)
    layers = adapter_layers(model)
    if set(payload["adapters"]) != set(layers):
        raise ValueError(f"checkpoint {path} was written for other adapter layers than this model's")
    for name, saved in payload["adapters"].items():
        layer = layers[name]
        storage = saved.get("storage") or ("fixed" if saved["phase"] == FIXED else "dense")
        if layer.phase == FIXED and storage != "fixed":
            raise ValueError(f"{name} is already frozen but the checkpoint is from the search phase")
        if storage == "fixed":  # checked as an adapter file's entries are
            kept = saved["indices"]
            (SparseDelta if layer.block_size is None else BlockSparseDelta)(layer.shape, saved["delta"], kept)
        old = layer.delta
        layer.restore(storage, saved)
        if layer.delta is not old:
            replace_parameter(optimizer, old, layer.delta)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in payload["trainable"].items():
            if name not in params:
                raise ValueError(f"checkpoint parameter {name} is not in the model")
            params[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return payload["state"]


# ------------------------------------------------------------- Trainer callback

try:
    from transformers import TrainerCallback as _TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _TrainerCallback = object


class SparseAdapterCallback(_TrainerCallback):
    """Algorithm 1 inside a Hugging Face ``Trainer``.

    ``attach(model, config)``, then ``Trainer(model=model, ..., callbacks=[SparseAdapterCallback()])``.
    The score pass re-runs the last micro-batch the model saw (captured by a forward
    pre-hook) with the mask ignored and uses the model's own loss. Masks freeze at the end
    of ``config.mask_epochs`` epochs (or at the end of training) and switch to compact storage.

    Under torchrun / accelerate (DDP) the scores are summed over the ranks (each weighting its
    micro-batch by its label tokens) and rank 0's selection is installed on every rank; at the
    freeze the Trainer's DDP wrapper is rebuilt in place so that it reduces the compact values
    and lets the dense Ŵ go.
    """

    def __init__(self, loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
                 process_group=distributed.AUTO):
        """``loss_fn(model, inputs)``: the loss of the score pass for a captured micro-batch
        (default: ``model(**inputs).loss``). Needed when the Trainer computes the loss outside
        the model (``label_smoothing_factor``, a custom ``compute_loss``); under data
        parallelism it must be the micro-batch's mean loss. ``process_group``: as in
        ``train_expert`` (default: the launcher's group when there is one)."""
        self.schedule: MaskSchedule | None = None
        self._last_inputs: dict | None = None
        self._hook = None
        self._custom_loss = loss_fn
        self._process_group = process_group
        self._group = None
        self._ddp = None
        self._freeze_pending = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "label_smoothing_factor", 0.0) and self._custom_loss is None:
            raise ValueError(
                "label_smoothing_factor > 0: the Trainer takes the labels away from the model, so the score pass "
                "has no loss; pass SparseAdapterCallback(loss_fn=lambda model, inputs: ...)"
            )
        self._group = distributed.resolve_group(self._process_group)
        self._ddp = None
        self.schedule = MaskSchedule(model, self._group)
        if self._group is not None:  # e.g. another adapter file or keep ratio on one rank
            distributed.check_same_on_all_ranks(
                "the sparse adapters (config, base weights, masks, values)",
                {"config": self.schedule.config.to_dict(), "state": _state_fingerprint(model)}, self._group)
        if state.global_step > 0 and not self.schedule.frozen:
            # resumed from a mask-epoch checkpoint: the callback's own count is gone, the steps are not
            self.schedule.updates = _mask_updates_before(state.global_step, state.epoch, self.schedule.config)
            if state.epoch is not None and state.epoch >= self.schedule.config.mask_epochs - 1e-9:
                # the mask epochs ended with that checkpoint. With several ranks the freeze waits for
                # the first step, where the Trainer's DDP wrapper is known (it must then be rebuilt);
                # a step with the frozen mask in dense storage updates exactly the same entries.
                if self._group is None:
                    self.schedule.finish(optimizer)
                else:
                    self._freeze_pending = True
        if getattr(args, "weight_decay", 0.0) and not self.schedule.config.compact_search:
            warnings.warn(
                "weight_decay > 0 in TrainingArguments also decays sparse-adapter entries outside the mask "
                "(compact_search=False keeps them in the parameter); Algorithm 1 assumes they stay frozen. Use "
                "weight_decay=0, or compact_search=True.",
                stacklevel=2,
            )

        def capture(module, args_, kwargs_):
            if module.training and torch.is_grad_enabled():
                inputs = dict(kwargs_)
                if self._group is not None:
                    # the Trainer's global token count would rescale this rank's loss; the score
                    # pass weights each rank's mean loss itself
                    inputs.pop("num_items_in_batch", None)
                    self._ddp = distributed.active_ddp() or self._ddp
                self._last_inputs = inputs

        self._hook = model.register_forward_pre_hook(capture, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.schedule is None or self._last_inputs is None:
            return
        if self._freeze_pending:
            self._freeze_pending = False
            self._freeze(optimizer, None)
            return
        epoch_index = _epoch_index(state.epoch) if state.epoch is not None else 0
        if self.schedule.after_optimizer_step(state.global_step, epoch_index, self._loss_fn(model), optimizer):
            self._rebuild_ddp()

    def _loss_fn(self, model):
        if model is None or self._last_inputs is None:
            return None
        inputs = self._last_inputs
        if self._custom_loss is not None:
            mean_loss = lambda: self._custom_loss(model, inputs)  # noqa: E731
        else:
            def mean_loss():
                loss = model(**inputs).loss
                if loss is None:
                    raise ValueError(
                        "the model returned no loss for the captured batch (no labels reach the model: a custom "
                        "compute_loss?); pass SparseAdapterCallback(loss_fn=lambda model, inputs: ...)"
                    )
                return loss
        if self._group is None:
            return mean_loss
        weight = loss_weight(inputs)
        return lambda: mean_loss() * weight if weight else _weighted(model(**inputs), 0)

    def _freeze(self, optimizer, loss_fn) -> None:
        """Freeze (``finish``) and, with several ranks, rebuild the Trainer's DDP wrapper."""
        if self.schedule.frozen:
            return
        self.schedule.finish(optimizer, loss_fn)
        self._rebuild_ddp()

    def _rebuild_ddp(self) -> None:
        """After a change of the adapters' parameters (compact storage at the first mask update,
        the freeze from dense storage), with several ranks: the Trainer's DDP wrapper rebuilt."""
        if self._group is None or not self.schedule.parameters_replaced():
            return
        if self._ddp is None:
            raise RuntimeError(
                "sparse adapters froze under data parallelism but the DDP wrapper of the model was never seen in a "
                "forward; train through the Trainer (or train_expert) so that its DDP runs the model"
            )
        distributed.rebuild(self._ddp)

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if self.schedule is not None and state.epoch is not None and not self._freeze_pending:
            if self.schedule.after_epoch(int(round(state.epoch)), optimizer, self._loss_fn(kwargs.get("model"))):
                self._rebuild_ddp()

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.schedule is not None:
            self._freeze_pending = False
            self._freeze(optimizer, self._loss_fn(kwargs.get("model")))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_inputs = None

"""Training: Algorithm 1 for sparse adapters, and plain training for the baselines.

``train_expert`` is one loop for every method: with sparse adapters attached it runs
Algorithm 1 (mask updates every ``update_interval`` optimizer steps during the mask
epochs, then frozen compact storage); with LoRA or full fine-tuning it trains whatever
requires grad. ``SparseAdapterCallback`` gives a Hugging Face ``Trainer`` user the same
mask schedule: ``attach(model, config)``, then ``Trainer(..., callbacks=[SparseAdapterCallback()])``.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparse_engine._files import atomic_write
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.layers import FIXED, SEARCH
from sparse_engine.masking import freeze_masks, replace_parameter, update_masks
from sparse_engine.model import adapter_config, adapter_layers, attach, trainable_parameter_count

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

    def to_dict(self) -> dict:
        return asdict(self)


class MaskSchedule:
    """Algorithm 1's schedule over a model with sparse adapters attached."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = adapter_layers(model)
        if not self.layers:
            raise ValueError("the model has no sparse adapters attached; call attach(model, config) first")
        self.config: SparseAdapterConfig = adapter_config(model)
        self.updates = 0

    @property
    def frozen(self) -> bool:
        return all(layer.phase == FIXED for layer in self.layers.values())

    def after_optimizer_step(self, global_step: int, epoch: int, loss_fn: Callable[[], torch.Tensor], optimizer) -> bool:
        """Update the masks if this step is a mask step (``epoch`` 0-based). True when it did."""
        if self.frozen or epoch >= self.config.mask_epochs or global_step % self.config.update_interval:
            return False
        update_masks(self.model, self.layers, loss_fn, self.config, optimizer)
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
            update_masks(self.model, self.layers, loss_fn, self.config, optimizer)
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
) -> TrainResult:
    """Train ``model`` on ``train_dataset`` (a sequence of examples, batched by ``collate_fn``).

    ``adapter``: attach sparse adapters with this config first. With adapters attached,
    Algorithm 1 runs; otherwise every parameter requiring grad is trained (LoRA, full
    fine-tuning). ``resume=True`` continues from ``config.checkpoint_dir`` if a checkpoint
    is there: mask, values, optimizer, scheduler, step and data order, exactly.
    """
    config = config or TrainingConfig()
    n = len(train_dataset)
    if n == 0:
        raise ValueError("the training dataset is empty")
    if adapter is not None:
        attach(model, adapter)
    collate_fn = collate_fn or _default_collate
    device = next(model.parameters()).device
    schedule = MaskSchedule(model) if adapter_layers(model) else None
    optimizer = build_optimizer(model, config)
    batches_per_epoch = math.ceil(n / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total_steps))

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "losses": [], "mask_updates": 0}
    settings = run_settings(model, config)
    if resume:
        if not config.checkpoint_dir:
            raise ValueError("resume=True needs checkpoint_dir")
        path = Path(config.checkpoint_dir) / CHECKPOINT_NAME
        if path.exists():
            state = load_checkpoint(path, model, optimizer, scheduler, settings)
    if schedule is not None:
        schedule.updates = state["mask_updates"]

    batch = None

    def last_batch_loss():
        # The score pass of Algorithm 1 re-runs the current (last) micro-batch.
        return None if batch is None else (lambda: model(**batch).loss)

    start = time.perf_counter()
    was_training = model.training
    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc=config.desc, disable=not config.progress,
               dynamic_ncols=True, leave=False)
    try:
        while state["epoch"] < config.epochs and state["step"] < total_steps:
            order = _epoch_order(n, config.seed, state["epoch"])
            starts = list(range(0, n, config.batch_size))
            b = state["batch_in_epoch"]
            while b < len(starts) and state["step"] < total_steps:
                window = starts[b: b + config.grad_accum]
                total_loss = 0.0
                for s in window:
                    batch = _to_device(collate_fn([train_dataset[int(i)] for i in order[s: s + config.batch_size]]), device)
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite training loss {loss.item()} at step {state['step'] + 1}")
                    (loss / len(window)).backward()
                    total_loss += loss.item() / len(window)
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
                bar.update(1)
                bar.set_postfix(loss=f"{total_loss:.4f}", epoch=state["epoch"] + 1)
                if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
                    save_checkpoint(Path(config.checkpoint_dir) / CHECKPOINT_NAME, model, optimizer, scheduler, state,
                                    settings)
            if b >= len(starts):
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                if schedule is not None:
                    schedule.after_epoch(state["epoch"], optimizer, last_batch_loss())
                    state["mask_updates"] = schedule.updates
    finally:
        bar.close()
    if schedule is not None and not schedule.frozen:
        schedule.finish(optimizer, last_batch_loss())
        state["mask_updates"] = schedule.updates
    if config.checkpoint_dir:
        save_checkpoint(Path(config.checkpoint_dir) / CHECKPOINT_NAME, model, optimizer, scheduler, state, settings)
    model.train(was_training)
    return TrainResult(
        steps=state["step"],
        epochs=state["epoch"] + state["batch_in_epoch"] / batches_per_epoch,
        seconds=round(time.perf_counter() - start, 3),
        trainable_params=trainable_parameter_count(model),
        mask_updates=state["mask_updates"],
        active_layers=schedule.active_layers() if schedule is not None else None,
        losses=state["losses"],
    )


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


def run_settings(model, config: TrainingConfig | None) -> dict:
    """What a checkpoint records of its run, to refuse a resume with other settings."""
    layers = adapter_layers(model)
    return {
        "adapter": adapter_config(model).to_dict() if layers else None,
        "training": None if config is None else {k: getattr(config, k) for k in _RESUME_SETTINGS},
    }


def _check_resume_settings(path, saved: dict | None, current: dict) -> None:
    if saved is None:  # a checkpoint from before settings were recorded
        return
    diffs = []
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
        "adapters": {
            name: {"phase": layer.phase, "delta": layer.delta.detach().clone(),
                   "mask": layer.mask.clone() if layer.phase == SEARCH else None,
                   "indices": layer.indices.clone() if layer.phase == FIXED else None}
            for name, layer in layers.items()
        },
        "trainable": {n: p.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and id(p) not in adapter_ids},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }
    _atomic_torch_save(payload, Path(path))


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
        if saved["phase"] == FIXED:
            delta = saved["delta"]
            container = (SparseDelta(layer.shape, delta, saved["indices"]) if layer.block_size is None
                         else BlockSparseDelta(layer.shape, delta, saved["indices"]))
            old = layer.delta
            layer.load_sparse(container)
            replace_parameter(optimizer, old, layer.delta)
        else:
            if layer.phase == FIXED:
                raise ValueError(f"{name} is already frozen but the checkpoint is from the search phase")
            layer.mask.copy_(saved["mask"])
            layer.delta.data.copy_(saved["delta"])
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
    """

    def __init__(self, loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None):
        """``loss_fn(model, inputs)``: the loss of the score pass for a captured micro-batch
        (default: ``model(**inputs).loss``). Needed when the Trainer computes the loss outside
        the model (``label_smoothing_factor``, a custom ``compute_loss``)."""
        self.schedule: MaskSchedule | None = None
        self._last_inputs: dict | None = None
        self._hook = None
        self._custom_loss = loss_fn

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "label_smoothing_factor", 0.0) and self._custom_loss is None:
            raise ValueError(
                "label_smoothing_factor > 0: the Trainer takes the labels away from the model, so the score pass "
                "has no loss; pass SparseAdapterCallback(loss_fn=lambda model, inputs: ...)"
            )
        self.schedule = MaskSchedule(model)
        if state.global_step > 0 and not self.schedule.frozen:
            # resumed from a mask-epoch checkpoint: the callback's own count is gone, the steps are not
            self.schedule.updates = _mask_updates_before(state.global_step, state.epoch, self.schedule.config)
            if state.epoch is not None and state.epoch >= self.schedule.config.mask_epochs - 1e-9:
                self.schedule.finish(optimizer)  # the mask epochs ended with that checkpoint
        if getattr(args, "weight_decay", 0.0):
            warnings.warn(
                "weight_decay > 0 in TrainingArguments also decays sparse-adapter entries outside the mask; "
                "Algorithm 1 assumes they stay frozen. Use weight_decay=0 for sparse adapters.",
                stacklevel=2,
            )

        def capture(module, args_, kwargs_):
            if module.training and torch.is_grad_enabled():
                self._last_inputs = dict(kwargs_)

        self._hook = model.register_forward_pre_hook(capture, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.schedule is None or self._last_inputs is None:
            return
        epoch_index = _epoch_index(state.epoch) if state.epoch is not None else 0
        self.schedule.after_optimizer_step(state.global_step, epoch_index, self._loss_fn(model), optimizer)

    def _loss_fn(self, model):
        if model is None or self._last_inputs is None:
            return None
        inputs = self._last_inputs
        if self._custom_loss is not None:
            return lambda: self._custom_loss(model, inputs)

        def model_loss():
            loss = model(**inputs).loss
            if loss is None:
                raise ValueError(
                    "the model returned no loss for the captured batch (no labels reach the model: a custom "
                    "compute_loss?); pass SparseAdapterCallback(loss_fn=lambda model, inputs: ...)"
                )
            return loss

        return model_loss

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        if self.schedule is not None and state.epoch is not None:
            self.schedule.after_epoch(int(round(state.epoch)), optimizer, self._loss_fn(kwargs.get("model")))

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if self.schedule is not None:
            self.schedule.finish(optimizer, self._loss_fn(kwargs.get("model")))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_inputs = None

import pytest
import torch

from sparse_engine import SparseAdapterConfig
from sparse_engine.layers import FIXED
from sparse_engine.model import adapter_layers, attach
from sparse_engine.training import SparseAdapterCallback, TrainingConfig, train_expert

from .helpers import random_lm_data, tiny_phi3


class Interrupt(Exception):
    pass


def _collate_failing_after(n_calls):
    calls = {"n": 0}

    def collate(items):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise Interrupt()
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    return collate


@pytest.mark.parametrize("block_size", [None, 16])
def test_training_runs_algorithm_1_and_ends_compact(block_size):
    model = tiny_phi3()
    cfg = SparseAdapterConfig(keep_ratio=0.1, block_size=block_size, update_interval=3)
    result = train_expert(model, random_lm_data(32), TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-2,
                                                                      progress=False), adapter=cfg)
    assert result.steps == 16 and result.mask_updates == 2  # steps 3 and 6 of the 8 in epoch 1
    for layer in adapter_layers(model).values():
        assert layer.phase == FIXED
        assert layer.kept_count == cfg.kept_count(192, 64)
    assert result.trainable_params == 2 * cfg.kept_count(192, 64) * (block_size or 1) ** 2


def test_after_the_mask_epochs_no_update_reaches_unmasked_entries():
    model = tiny_phi3()
    cfg = SparseAdapterConfig(keep_ratio=0.1, update_interval=2)
    data = random_lm_data(16)
    train_expert(model, data, TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, progress=False), adapter=cfg)
    layers = adapter_layers(model)
    dense_before = {n: l.delta_weight().clone() for n, l in layers.items()}
    masks = {n: l.to_sparse().mask() for n, l in layers.items()}
    # keep training in the fixed phase with a fresh loop: only kept entries move
    train_expert(model, data, TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, progress=False))
    for n, layer in layers.items():
        after = layer.delta_weight()
        assert not after[~masks[n]].any()
        assert not torch.equal(after[masks[n]], dense_before[n][masks[n]])
        assert layer.delta.numel() == int(masks[n].sum())


@pytest.mark.parametrize("stop_after", [3, 11])  # inside the mask epoch, and after the freeze
def test_resuming_from_a_checkpoint_gives_the_same_weights(tmp_path, stop_after):
    cfg = SparseAdapterConfig(keep_ratio=0.1, update_interval=2)
    data = random_lm_data(32)

    def run(ckpt, collate=None, resume=False, model=None):
        model = model or tiny_phi3()
        if not adapter_layers(model):
            attach(model, cfg)
        tc = TrainingConfig(epochs=2, batch_size=4, grad_accum=2, learning_rate=1e-2, progress=False,
                            checkpoint_dir=str(ckpt), checkpoint_every=1)
        return model, train_expert(model, data, tc, collate_fn=collate, resume=resume)

    straight, result = run(tmp_path / "a")
    interrupted = tiny_phi3()
    with pytest.raises(Interrupt):
        run(tmp_path / "b", collate=_collate_failing_after(stop_after), model=interrupted)
    counting = _collate_failing_after(10**6)
    resumed_model, resumed = run(tmp_path / "b", collate=counting, resume=True)
    # it really continued: only the micro-batches after the last checkpoint were drawn
    assert counting.__closure__[0].cell_contents["n"] == 16 - (stop_after - stop_after % 2)
    assert resumed.steps == result.steps and resumed.losses == result.losses
    a, b = adapter_layers(straight), adapter_layers(resumed_model)
    for name in a:
        assert torch.equal(a[name].indices, b[name].indices)
        assert torch.equal(a[name].delta, b[name].delta)


@pytest.mark.parametrize("change", [{"keep_ratio": 0.3}, {"learning_rate": 1e-3}])
def test_resume_with_other_settings_is_refused(tmp_path, change):
    """A resumed run with another keep ratio or learning rate would silently mix two runs."""
    data = random_lm_data(8)

    def run(keep_ratio=0.1, learning_rate=1e-2, resume=False, max_steps=None):
        tc = TrainingConfig(epochs=1, batch_size=4, learning_rate=learning_rate, progress=False, max_steps=max_steps,
                            checkpoint_dir=str(tmp_path), checkpoint_every=1)
        return train_expert(tiny_phi3(), data, tc, adapter=SparseAdapterConfig(keep_ratio=keep_ratio),
                            resume=resume)

    run(max_steps=1)
    with pytest.raises(ValueError, match="other settings"):
        run(resume=True, **change)
    assert run(resume=True).steps == 2  # same settings, a longer run: continues


def test_a_corrupt_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    model = tiny_phi3()
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        train_expert(model, random_lm_data(8), TrainingConfig(epochs=1, batch_size=4, progress=False,
                                                              checkpoint_dir=str(tmp_path)),
                     adapter=SparseAdapterConfig(), resume=True)


def test_empty_dataset_is_refused():
    with pytest.raises(ValueError, match="empty"):
        train_expert(tiny_phi3(), [], TrainingConfig(progress=False), adapter=SparseAdapterConfig())


def test_hugging_face_trainer_with_the_callback_runs_algorithm_1(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_phi3()
    cfg = SparseAdapterConfig(keep_ratio=0.1, update_interval=2)
    attach(model, cfg)
    callback = SparseAdapterCallback()
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=100, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0)
    data = random_lm_data(16)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    base = {n: l.base.weight.clone() for n, l in adapter_layers(model).items()}
    out = trainer.train()
    assert callback.schedule.updates == 2  # steps 2 and 4 of epoch 1
    for name, layer in adapter_layers(model).items():
        assert layer.phase == FIXED and layer.kept_count == cfg.kept_count(192, 64)
        assert layer.delta.abs().sum() > 0  # the kept values trained in epoch 2
        assert torch.equal(layer.base.weight, base[name])
    assert out.global_step == 8


def _trainer(tmp_path, model, data, callback, eval_data=None, **overrides):
    from transformers import Trainer, TrainingArguments

    kw = dict(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-2,
              logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    kw.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data, eval_dataset=eval_data,
                   callbacks=[callback])


def _attached(interval):
    model = tiny_phi3()
    attach(model, SparseAdapterConfig(keep_ratio=0.1, update_interval=interval))
    return model


@pytest.mark.parametrize("interval,checkpoint", [(3, 6), (2, 8), (2, 12)])
def test_trainer_resume_ends_with_the_uninterrupted_mask_and_weights(tmp_path, interval, checkpoint):
    """Resuming a Trainer run from a checkpoint in the mask epoch (step 6 of 8, or the epoch's
    last step) or after the freeze (step 12, compact storage in the checkpoint) gives the
    uninterrupted run's masks and values: no extra mask update, no dense epoch after it, and a
    compact checkpoint loads into a freshly attached (search-phase) model."""
    data = random_lm_data(32)  # 8 optimizer steps per epoch
    full = _attached(interval)
    _trainer(tmp_path / "a", full, data, SparseAdapterCallback(), save_strategy="steps", save_steps=checkpoint).train()
    resumed = _attached(interval)
    callback = SparseAdapterCallback()
    _trainer(tmp_path / "b", resumed, data, callback).train(
        resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{checkpoint}"))
    assert callback.schedule.updates == (0 if checkpoint > 8 else 8 // interval)
    for (name, a), b in zip(adapter_layers(full).items(), adapter_layers(resumed).values()):
        assert a.phase == b.phase == FIXED
        assert torch.equal(a.indices, b.indices), name
        torch.testing.assert_close(a.delta, b.delta, rtol=1e-5, atol=1e-6)


def test_trainer_load_best_model_from_the_mask_epoch(tmp_path):
    """load_best_model_at_end with the best checkpoint saved in the search phase (compact
    search storage: kept values, their indices and the dense Ŵ) into the fixed model: the
    layers take that storage back, and the callback's train-end freeze then leaves exactly
    that checkpoint's kept entries, compact."""
    from safetensors.torch import load_file

    data = random_lm_data(32)
    model = _attached(2)
    trainer = _trainer(tmp_path, model, data, SparseAdapterCallback(), eval_data=data, eval_strategy="steps",
                       eval_steps=4, save_strategy="steps", save_steps=4, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=True)  # the worst loss: an early checkpoint
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(("checkpoint-4", "checkpoint-8"))
    saved = load_file(f"{best}/model.safetensors")
    for name, layer in adapter_layers(model).items():
        assert f"{name}.mask" not in saved and f"{name}.delta_dense" in saved  # saved after a mask update
        assert layer.phase == FIXED
        assert torch.equal(layer.indices, saved[f"{name}.indices"])
        torch.testing.assert_close(layer.delta.detach(), saved[f"{name}.delta"])


def test_trainer_without_a_model_loss_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="loss_fn"):
        _trainer(tmp_path, _attached(2), random_lm_data(8), SparseAdapterCallback(), label_smoothing_factor=0.1).train()


def test_factored_optimizer_state_restarts_at_the_freeze(tmp_path):
    """Adafactor keeps row/column moments, not one per entry: at the freeze they cannot follow
    the kept entries, so that state restarts (it used to crash the next step)."""
    model = _attached(2)
    with pytest.warns(UserWarning, match="not per entry"):
        _trainer(tmp_path, model, random_lm_data(16), SparseAdapterCallback(), optim="adafactor").train()
    assert all(layer.phase == FIXED for layer in adapter_layers(model).values())


@pytest.mark.parametrize("score,layer_drop", [("snip", False), ("gm", False), ("wm", False), ("gd", False),
                                              ("mcs", True)])
def test_every_score_and_layer_drop_train_end_to_end(score, layer_drop):
    model = tiny_phi3()
    cfg = SparseAdapterConfig(keep_ratio=0.1, score=score, layer_drop=layer_drop, update_interval=2)
    result = train_expert(model, random_lm_data(16), TrainingConfig(epochs=2, batch_size=4, learning_rate=1e-2,
                                                                      progress=False), adapter=cfg)
    layers = adapter_layers(model).values()
    kept = [layer.kept_count for layer in layers]
    k = cfg.kept_count(192, 64)
    if layer_drop:
        assert sum(kept) == 2 * k and result.active_layers == sum(1 for n in kept if n)
    else:
        assert kept == [k, k]
    assert all(layer.phase == FIXED for layer in layers)
    assert all(torch.isfinite(layer.delta).all() for layer in layers)

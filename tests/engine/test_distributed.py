"""Data-parallel training on 2 CPU ranks (gloo, 127.0.0.1): identical masks, indices and values
on every rank after every mask update and at the end, equal to one process with the global
batch (the oracle), for train_expert, a DDP-wrapped model and the Hugging Face Trainer."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.engine.dist_harness import assert_all_ok, run_ranks
from tests.engine.dist_worker import run_config, run_trainer

PER_RANK_BATCH = 4
WORLD = 2

CONFIGS = [
    {"id": "mcs", "score": "mcs"},
    {"id": "snip", "score": "snip"},
    # |Ŵ| after one AdamW step is lr for every entry (a tie that fp rounding breaks anyhow):
    # the magnitude scores update after two steps
    {"id": "wm", "score": "wm", "interval": 2, "epochs": 3, "n": 32},
    {"id": "gd", "score": "gd", "interval": 2, "epochs": 3, "n": 32},
    {"id": "mcs-block", "score": "mcs", "block": 16},
    {"id": "snip-block", "score": "snip", "block": 16},
    {"id": "gd-block", "score": "gd", "block": 16, "interval": 2, "epochs": 3, "n": 32},
    {"id": "mcs-layer-drop", "score": "mcs", "layer_drop": True},
    {"id": "gm-block-layer-drop", "score": "gm", "block": 16, "layer_drop": True},
    {"id": "mcs-accum", "score": "mcs", "grad_accum": 2, "n": 32},
    {"id": "mcs-user-ddp", "score": "mcs", "user_ddp": True},
]


def _load(out, world=WORLD):
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _assert_same_run(ranks: list[dict], oracle: dict, what: str) -> None:
    """Every rank installed the same units at every update and ends with the same adapter; all
    of it equals the single-process run (masks exactly, values to fp32 tolerance)."""
    first = ranks[0]
    assert len(first["updates"]) == len(oracle["updates"]) > 0, what
    for other in ranks[1:]:
        assert len(other["updates"]) == len(first["updates"]), what
        for i, (a, b) in enumerate(zip(first["updates"], other["updates"])):
            assert a.keys() == b.keys(), (what, i)
            for name in a:
                assert torch.equal(a[name], b[name]), f"{what}: update {i} of {name} differs between ranks"
        for name, (values, indices) in first["final"].items():
            other_values, other_indices = other["final"][name]
            assert torch.equal(indices, other_indices) and torch.equal(values, other_values), (what, name)
    for i, (a, o) in enumerate(zip(first["updates"], oracle["updates"])):
        for name in o:
            assert torch.equal(a[name], o[name]), f"{what}: update {i} of {name} differs from one process"
    for name, (values, indices) in first["final"].items():
        oracle_values, oracle_indices = oracle["final"][name]
        assert torch.equal(indices, oracle_indices), (what, name)
        assert torch.isfinite(values).all()
        # AdamW divides by sqrt(v): an entry with a tiny second moment magnifies the ranks'
        # reduction-order rounding (seen: one entry of 1229 off by 1.7e-5 on a value of 0.016)
        torch.testing.assert_close(values, oracle_values, rtol=1e-3, atol=1e-4, msg=f"{what}: {name}")


def test_train_expert_on_two_ranks_equals_one_process_with_the_global_batch(tmp_path):
    assert_all_ok(run_ranks("train", tmp_path, args={"configs": CONFIGS, "batch_size": PER_RANK_BATCH}))
    ranks = _load(tmp_path)
    for cfg in CONFIGS:
        runs = [r[cfg["id"]] for r in ranks]
        oracle = run_config(cfg, PER_RANK_BATCH * WORLD)
        _assert_same_run(runs, oracle, cfg["id"])
        assert runs[0]["world_size"] == WORLD and runs[0]["steps"] == oracle["steps"]
        # the logged loss is the global batch's mean loss, as one process logs it
        assert runs[0]["losses"] == pytest.approx(oracle["losses"], rel=1e-5)
        # DDP was rebuilt when the adapters moved to compact storage (the first mask update) and
        # the dense Ŵ parameters were released then; later updates at a per-layer k keep every
        # parameter's shape (rewritten in place, no rebuild), layer drop's may change it
        freed = runs[0]["freed"]
        assert freed and all(freed), cfg["id"]
        assert len(freed) == 1 or cfg.get("layer_drop"), (cfg["id"], freed)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
@pytest.mark.parametrize("score,block", [("mcs", None), ("gm", 16)])
def test_triton_backend_selects_the_same_masks_through_the_summed_scores(tmp_path, score, block):
    """The kernels' path under a process group: scores summed over the ranks (dense), then the
    batched top-k, must keep what one process keeps (for element layers, selecting inside the
    score pass with no dense score). One rank in this process: the sum is the identity, so any
    difference is the path's."""
    import torch.distributed as dist

    from sparse_engine.config import SparseAdapterConfig
    from sparse_engine.masking import update_masks
    from sparse_engine.model import adapter_layers, attach
    from tests.engine.dist_worker import collate, varied_lm_data
    from tests.engine.helpers import tiny_phi3

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        kept = {}
        for group in (None, dist.group.WORLD):
            model = tiny_phi3(seed=0)
            config = SparseAdapterConfig(keep_ratio=0.1, score=score, block_size=block, backend="triton")
            attach(model, config)
            with torch.no_grad():  # a trained-looking Ŵ, so that mcs ranks more than G
                for layer in adapter_layers(model).values():
                    layer.delta.normal_(0, 0.01)
            batch = collate(varied_lm_data(8))
            layers = adapter_layers(model)
            update_masks(model, layers, lambda: model(**batch).loss, config, group=group)
            kept[group is None] = {n: layer.kept_units().clone() for n, layer in layers.items()}
        for name, units in kept[True].items():
            assert torch.equal(units, kept[False][name]), name
    finally:
        dist.destroy_process_group()


def test_trainer_with_the_callback_on_two_ranks_equals_one_process(tmp_path):
    """torchrun-style ranks + Trainer (accelerate's DDP, find_unused_parameters=False) +
    SparseAdapterCallback: same masks and adapter as one process with batch 2b; the Trainer's
    DDP wrapper is rebuilt at the freeze and the dense Ŵ released."""
    configs = [{"score": "mcs"}, {"score": "snip", "block": 16}]
    args = {"configs": configs, "batch_size": PER_RANK_BATCH, "out": str(tmp_path)}
    assert_all_ok(run_ranks("trainer", tmp_path, args=args))
    ranks = _load(tmp_path)
    for cfg in configs:
        key = f"{cfg['score']}-{cfg.get('block')}"
        runs = [r[key] for r in ranks]
        oracle = run_trainer(tmp_path / f"single-{key}", PER_RANK_BATCH * WORLD, cfg["score"], cfg.get("block"))
        _assert_same_run(runs, oracle, key)
        assert runs[0]["freed"] == [True] and runs[0]["ddp_find_unused"] is False, key


def test_a_resumed_two_rank_run_equals_the_uninterrupted_one(tmp_path):
    cfg = {"score": "mcs", "block": None}
    args = {"config": cfg, "batch_size": PER_RANK_BATCH, "stop_at": 2, "checkpoint_dir": str(tmp_path / "ckpt")}
    assert_all_ok(run_ranks("resume", tmp_path, args=args))
    ranks = _load(tmp_path)
    assert ranks[0]["stopped_at"] == 2 and ranks[0]["resumed"]["steps"] == 6
    oracle = run_config(cfg, PER_RANK_BATCH * WORLD)
    for name, (values, indices) in oracle["final"].items():
        for r in ranks:
            got_values, got_indices = r["resumed"]["final"][name]
            assert torch.equal(got_indices, indices)
            torch.testing.assert_close(got_values, values, rtol=1e-3, atol=1e-4)  # AdamW: see _assert_same_run
    # only rank 0 wrote the checkpoint; the run's settings record the world size
    payload = torch.load(tmp_path / "ckpt" / "checkpoint.pt", weights_only=False)
    assert payload["settings"]["world_size"] == WORLD


def test_bad_input_is_one_clear_error_on_every_rank(tmp_path):
    """Different settings on the ranks (train_expert, the Trainer), a dataset the ranks cannot
    share, a data error on one rank mid-run, and FSDP2 (either order) fail on every rank with
    an error naming the fix; no rank hangs."""
    assert_all_ok(run_ranks("errors", tmp_path, timeout=180, args={"out": str(tmp_path)}))
    ranks = _load(tmp_path)
    assert ranks[1]["data_error"] == "KeyError: 'example 3 is broken'"
    assert ranks[0]["data_error"].startswith("RuntimeError: another rank failed to build its micro-batch")
    for r in ranks:
        assert "differs between ranks" in r["trainer_different_adapters"]
        assert "keep_ratio" in r["trainer_different_adapters"]
        assert "differs between ranks" in r["different_configs"] and "update_interval" in r["different_configs"]
        assert "23 examples" in r["indivisible"] and "trim it to 22" in r["indivisible"]
        assert "DDP" in r["fsdp_attach_then_shard"] and "FSDP" in r["fsdp_attach_then_shard"]
        assert "DDP" in r["fsdp_shard_then_attach"]


# ------------------------------------------------------------ single-process pieces


def test_attach_keeps_the_adapter_buffers_out_of_ddp_broadcasts_and_detach_undoes_it():
    from sparse_engine.config import SparseAdapterConfig
    from sparse_engine.model import attach, detach
    from tests.engine.helpers import tiny_phi3

    model = tiny_phi3()
    attach(model, SparseAdapterConfig())
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {f"model.layers.{i}.self_attn.qkv_proj.{b}" for i in range(2) for b in ("mask", "indices", "delta_dense")}
    detach(model)
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


def test_a_parameter_flattened_or_resharded_after_attach_is_refused_clearly():
    """What FSDP1 does to a module's parameters (removed, or a flat shard) is caught before a
    mask update or a save, with the supported alternative named."""
    from sparse_engine.config import SparseAdapterConfig
    from sparse_engine.model import adapter_layers, attach
    from sparse_engine.training import MaskSchedule
    from tests.engine.helpers import tiny_phi3

    model = tiny_phi3()
    attach(model, SparseAdapterConfig())
    layer = next(iter(adapter_layers(model).values()))
    layer.delta = torch.nn.Parameter(torch.zeros(7))  # a shard of the flattened Ŵ
    with pytest.raises(RuntimeError, match="DDP, not FSDP"):
        MaskSchedule(model)
    with pytest.raises(RuntimeError, match="DDP, not FSDP"):
        layer.to_sparse()
    del layer._parameters["delta"]
    layer.delta = torch.zeros(192, 64)  # FSDP1 without use_orig_params: a plain tensor view
    with pytest.raises(RuntimeError, match="no longer owns its parameter"):
        MaskSchedule(model)


def test_loss_weight_counts_the_label_tokens_the_mean_loss_averages():
    from sparse_engine.training import loss_weight

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    # the causal LM loss shifts by one: the first column's label is never predicted
    assert loss_weight({"input_ids": labels.clamp(min=0), "labels": labels}) == 4
    assert loss_weight({"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == 3


def test_a_checkpoint_of_another_world_size_is_refused(tmp_path):
    from sparse_engine.config import SparseAdapterConfig
    from sparse_engine.model import attach
    from sparse_engine.training import (TrainingConfig, build_optimizer, load_checkpoint, run_settings,
                                        save_checkpoint)
    from tests.engine.helpers import tiny_phi3

    model = tiny_phi3()
    attach(model, SparseAdapterConfig())
    config = TrainingConfig()
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, {"step": 3}, run_settings(model, config, world_size=2))
    with pytest.raises(ValueError, match="data-parallel ranks: checkpoint 2, now 1"):
        load_checkpoint(path, model, optimizer, scheduler, run_settings(model, config))

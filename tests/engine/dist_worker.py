"""One rank of a data-parallel test scenario (started by ``dist_harness.run_ranks``), and the
single-process runs the tests compare it with. Usage: ``dist_worker.py SCENARIO OUT_DIR ARGS_JSON``."""
from __future__ import annotations

import contextlib
import gc
import json
import sys
import weakref
from datetime import timedelta
from pathlib import Path

import torch

from sparse_engine import distributed, masking
from sparse_engine.config import SparseAdapterConfig
from sparse_engine.data import collate_causal_lm
from sparse_engine.model import adapter_layers, attach
from sparse_engine.training import TrainingConfig, train_expert

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.engine.helpers import tiny_phi3  # noqa: E402


def varied_lm_data(n: int = 24, vocab_size: int = 64, seed: int = 0):
    """Examples of different lengths (6-14 tokens, the second half labelled): ranks' shares hold
    different numbers of label tokens, so equal weighting of the ranks would not be exact."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return items


def collate(batch):
    return collate_causal_lm(batch, 0)


@contextlib.contextmanager
def recorded_masks():
    """Every mask update's installed units, per layer, in order."""
    updates = []
    original = masking.apply_masks

    def record(layers, kept, optimizer=None):
        updates.append({n: k.clone() for n, k in kept.items()})
        return original(layers, kept, optimizer)

    masking.apply_masks = record
    try:
        yield updates
    finally:
        masking.apply_masks = original


@contextlib.contextmanager
def recorded_rebuilds(dense_refs):
    """At each DDP rebuild: were the dense Ŵ released (weak references dead after a gc)?"""
    freed = []
    original = distributed.rebuild

    def rebuild(ddp):
        original(ddp)
        gc.collect()
        freed.append(all(ref() is None for ref in dense_refs))

    distributed.rebuild = rebuild
    try:
        yield freed
    finally:
        distributed.rebuild = original


def final_adapter(model) -> dict:
    out = {}
    for name, layer in adapter_layers(model).items():
        sparse = layer.to_sparse()
        values = sparse.values if hasattr(sparse, "values") else sparse.blocks
        indices = sparse.indices if hasattr(sparse, "indices") else sparse.block_indices
        out[name] = (values.clone(), indices.clone())
    return out


def run_config(cfg: dict, batch_size: int, process_group=None, world: int = 1, wrap_ddp: bool = False) -> dict:
    """Train one adapter; returns its mask updates, final adapter and losses."""
    model = tiny_phi3(seed=0)
    adapter = SparseAdapterConfig(keep_ratio=0.1, update_interval=cfg.get("interval", 1), score=cfg["score"],
                                  block_size=cfg.get("block"), layer_drop=cfg.get("layer_drop", False),
                                  backend=cfg.get("backend", "reference"))
    attach(model, adapter)
    dense_refs = [weakref.ref(layer.delta) for layer in adapter_layers(model).values()]
    training = TrainingConfig(epochs=cfg.get("epochs", 2), learning_rate=1e-2, batch_size=batch_size,
                              grad_accum=cfg.get("grad_accum", 1), warmup_ratio=0.0, progress=False,
                              max_steps=cfg.get("max_steps"), checkpoint_dir=cfg.get("checkpoint_dir"),
                              checkpoint_every=cfg.get("checkpoint_every", 0))
    target = model
    if wrap_ddp:
        target = torch.nn.parallel.DistributedDataParallel(model)
    with recorded_masks() as updates, recorded_rebuilds(dense_refs) as freed:
        result = train_expert(target, varied_lm_data(cfg.get("n", 24)), training, collate_fn=collate,
                              process_group=process_group, resume=cfg.get("resume", False))
    return {"updates": updates, "final": final_adapter(model), "losses": result.losses, "freed": freed,
            "steps": result.steps, "world_size": result.world_size}


# ------------------------------------------------------------------------ scenarios


def scenario_train(rank, args) -> dict:
    return {cfg["id"]: run_config(cfg, args["batch_size"], process_group="auto", wrap_ddp=cfg.get("user_ddp", False))
            for cfg in args["configs"]}


class Interrupted(Exception):
    pass


def scenario_resume(rank, args) -> dict:
    """Every rank stops during step ``stop_at + 1`` (after its checkpoint at ``stop_at``), then
    the run is resumed from that checkpoint."""
    from sparse_engine.training import MaskSchedule

    cfg = dict(args["config"], checkpoint_dir=args["checkpoint_dir"], checkpoint_every=1)
    original = MaskSchedule.after_optimizer_step

    def stop(self, global_step, *a, **kw):
        if global_step == args["stop_at"] + 1:
            raise Interrupted
        return original(self, global_step, *a, **kw)

    MaskSchedule.after_optimizer_step = stop
    try:
        run_config(cfg, args["batch_size"], process_group="auto")
        raise AssertionError("the run was not interrupted")
    except Interrupted:
        pass
    finally:
        MaskSchedule.after_optimizer_step = original
    stopped_at = torch.load(Path(args["checkpoint_dir"]) / "checkpoint.pt", weights_only=False)["state"]["step"]
    resumed = run_config(dict(cfg, resume=True), args["batch_size"], process_group="auto")
    return {"stopped_at": stopped_at, "resumed": resumed}


def scenario_errors(rank, args) -> dict:
    """Each case must raise the same clear error on every rank (and never hang)."""
    out = {}
    # ranks with different adapter settings
    try:
        run_config({"score": "mcs", "interval": 1 + rank}, 4, process_group="auto")
        out["different_configs"] = "no error"
    except ValueError as exc:
        out["different_configs"] = str(exc)
    # a dataset the ranks cannot share equally
    try:
        run_config({"score": "mcs", "n": 23}, 4, process_group="auto")
        out["indivisible"] = "no error"
    except ValueError as exc:
        out["indivisible"] = str(exc)
    # a rank whose data fails mid-run (its third example): every rank stops, none waits
    class FailingOnRank1(list):
        calls = 0

        def __getitem__(self, i):
            FailingOnRank1.calls += 1
            if rank == 1 and FailingOnRank1.calls == 3:
                raise KeyError("example 3 is broken")
            return super().__getitem__(i)

    model = tiny_phi3(seed=0)
    try:
        train_expert(model, FailingOnRank1(varied_lm_data()), TrainingConfig(epochs=1, batch_size=4, progress=False),
                     adapter=SparseAdapterConfig(keep_ratio=0.1, update_interval=1), collate_fn=collate)
        out["data_error"] = "no error"
    except (KeyError, RuntimeError) as exc:
        out["data_error"] = f"{type(exc).__name__}: {exc}"
    # the Trainer with another adapter on one rank
    from sparse_engine.training import SparseAdapterCallback

    model = tiny_phi3(seed=0)
    attach(model, SparseAdapterConfig(keep_ratio=0.1 * (1 + rank), update_interval=1))
    trainer = SequentialTrainer.make(Path(args["out"]) / f"trainer-{rank}", model, varied_lm_data(),
                                     SparseAdapterCallback(), 4)
    try:
        trainer.train()
        out["trainer_different_adapters"] = "no error"
    except ValueError as exc:
        out["trainer_different_adapters"] = str(exc)
    # FSDP2: attach then shard, and shard then attach
    from torch.distributed.fsdp import fully_shard

    model = tiny_phi3(seed=0)
    attach(model, SparseAdapterConfig(keep_ratio=0.1, update_interval=1))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    try:
        train_expert(model, varied_lm_data(), TrainingConfig(epochs=1, batch_size=4, progress=False),
                     collate_fn=collate, process_group="auto")
        out["fsdp_attach_then_shard"] = "no error"
    except RuntimeError as exc:
        out["fsdp_attach_then_shard"] = str(exc)
    model = tiny_phi3(seed=0)
    fully_shard(model)
    try:
        attach(model, SparseAdapterConfig(keep_ratio=0.1))
        out["fsdp_shard_then_attach"] = "no error"
    except RuntimeError as exc:
        out["fsdp_shard_then_attach"] = str(exc)
    return out


class SequentialTrainer:
    """A Hugging Face Trainer reading the data in order, so one process with batch 2b and two
    ranks with batch b (accelerate hands rank r every r-th batch) see the same examples."""

    @staticmethod
    def make(output_dir, model, data, callback, batch_size, **overrides):
        from torch.utils.data import SequentialSampler
        from transformers import Trainer, TrainingArguments

        class _Trainer(Trainer):
            def _get_train_sampler(self, *args, **kwargs):
                return SequentialSampler(self.train_dataset)

        kw = dict(output_dir=str(output_dir), num_train_epochs=2, per_device_train_batch_size=batch_size,
                  learning_rate=1e-2, warmup_steps=0, logging_steps=100, save_strategy="no", report_to=[],
                  use_cpu=True, disable_tqdm=True, seed=0, ddp_find_unused_parameters=False)
        kw.update(overrides)
        return _Trainer(model=model, args=TrainingArguments(**kw), train_dataset=data, data_collator=collate,
                        callbacks=[callback])


def run_trainer(output_dir, batch_size: int, score: str = "mcs", block=None) -> dict:
    from sparse_engine.training import SparseAdapterCallback

    model = tiny_phi3(seed=0)
    attach(model, SparseAdapterConfig(keep_ratio=0.1, update_interval=1, score=score, block_size=block))
    dense_refs = [weakref.ref(layer.delta) for layer in adapter_layers(model).values()]
    callback = SparseAdapterCallback()
    trainer = SequentialTrainer.make(output_dir, model, varied_lm_data(), callback, batch_size)
    with recorded_masks() as updates, recorded_rebuilds(dense_refs) as freed:
        trainer.train()
    return {"updates": updates, "final": final_adapter(model), "freed": freed,
            "ddp_find_unused": getattr(trainer.model_wrapped, "find_unused_parameters", None)}


def scenario_trainer(rank, args) -> dict:
    return {f"{c['score']}-{c.get('block')}": run_trainer(Path(args["out"]) / f"trainer-{rank}", args["batch_size"],
                                                          c["score"], c.get("block"))
            for c in args["configs"]}


SCENARIOS = {"train": scenario_train, "resume": scenario_resume, "errors": scenario_errors,
             "trainer": scenario_trainer}


def main() -> None:
    scenario, out_dir, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = int(__import__("os").environ["RANK"])
    torch.manual_seed(0)
    result = SCENARIOS[scenario](rank, args)
    torch.save(result, out_dir / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

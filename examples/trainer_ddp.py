"""One sparse expert trained with the Hugging Face Trainer, on one process or several.

    python examples/trainer_ddp.py --out runs/trainer
    torchrun --nproc_per_node 2 examples/trainer_ddp.py --out runs/trainer
    accelerate launch --num_processes 2 examples/trainer_ddp.py --out runs/trainer

``--per-device-batch`` is each rank's micro-batch: on N ranks a step sees N times as many
examples. The masks, the compact values and the saved adapter are the same on every rank;
rank 0 writes the adapter file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from sparse_engine import SparseAdapterCallback, SparseAdapterConfig, attach, data, save_adapter


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="reverse_words", help="a built-in task (default: %(default)s)")
    p.add_argument("--model", default=None, help="local Hugging Face checkpoint (default: the built-in tiny Phi-3)")
    p.add_argument("--cache-dir", default=None, help="built-in base model cache")
    p.add_argument("--out", default="runs/trainer", help="output directory (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=800, help="training examples (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs; the first is the mask epoch (default: %(default)s)")
    p.add_argument("--per-device-batch", type=int, default=8, help="micro-batch per rank (default: %(default)s)")
    p.add_argument("--update-interval", type=int, default=20, help="steps between mask updates (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: %(default)s)")
    args = p.parse_args(argv)

    training_args = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.per_device_batch,
        learning_rate=args.lr, weight_decay=0.0, save_strategy="no", report_to=[], logging_steps=10, seed=0,
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every adapter parameter gets a gradient at every step
    )
    with training_args.main_process_first(desc="base model"):  # rank 0 builds the built-in cache first
        if args.model is None:
            from sparse_engine.builtin import load_builtin_base

            model, tokenizer = load_builtin_base(cache_dir=args.cache_dir, progress=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(args.model)
            tokenizer = AutoTokenizer.from_pretrained(args.model)
    task = data.builtin_task_data(args.task, n_train=args.n_train, n_validation=0, n_test=0)
    train_set = data.TokenizedDataset(task.train, tokenizer, max_length=48)

    attach(model, SparseAdapterConfig(keep_ratio=0.1, update_interval=args.update_interval))
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set,
                      data_collator=lambda b: data.collate_causal_lm(b, tokenizer.pad_token_id),
                      callbacks=[SparseAdapterCallback()])
    trainer.train()
    if trainer.is_world_process_zero():
        path = save_adapter(model, Path(args.out) / f"{args.task}.safetensors")
        print(f"wrote {path} after {trainer.state.global_step} steps on {training_args.world_size} rank(s)")


if __name__ == "__main__":
    main()

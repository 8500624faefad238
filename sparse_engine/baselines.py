"""The paper's comparisons: LoRA (through PEFT) at a matched trainable-parameter count,
and full fine-tuning."""
from __future__ import annotations

import torch.nn as nn

from sparse_engine.config import SparseAdapterConfig
from sparse_engine.model import find_target_linears


def matched_lora_rank(model: nn.Module, config: SparseAdapterConfig) -> int:
    """LoRA rank whose trainable count r·Σ(d_in + d_out) is closest to the sparse adapter's
    Σ k_l on the same target modules (k_l = keep_ratio·d_out·d_in, or whole tiles)."""
    targets = find_target_linears(model, config.target_modules)
    sparse = 0
    for lin in targets.values():
        d_out, d_in = lin.weight.shape
        units = config.kept_count(d_out, d_in)
        sparse += units * (1 if config.block_size is None else config.block_size**2)
    per_rank = sum(lin.in_features + lin.out_features for lin in targets.values())
    return max(1, round(sparse / per_rank))


def attach_lora(model: nn.Module, rank: int, target_modules, *, alpha: float | None = None, dropout: float = 0.0):
    """Wrap ``model`` with a PEFT LoRA adapter on ``target_modules``; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else 2 * rank,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def prepare_full_finetune(model: nn.Module) -> nn.Module:
    """Every parameter trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model

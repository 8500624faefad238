"""The built-in default base model: a tiny Phi-3 pretrained by the engine, cached on disk.

A ``Phi3ForCausalLM`` with random init (seeded) is trained on the ``PRETRAIN`` task
mixture of the built-in suite — disjoint from the experts' held-in and held-out tasks — so
that it knows the prompt format and how to end an answer but none of the expert tasks. Its
tokenizer reads any text (the suite's words whole, anything else in bytes). The result is
saved (safetensors + tokenizer) under the cache directory, keyed by a hash of everything
that determines it, and rebuilt the same way when missing. ``build_model``, ``pretrain_on``
and ``save_base`` are shared with ``sparse-engine pretrain`` (a base on the user's text).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from sparse_engine import data

# 2: the tokenizer reads any text (byte fallback); 512 positions
BUILTIN_VERSION = 2
# JSON object of BuiltinBaseSpec fields that change the default built-in base (e.g. a smaller one)
SPEC_ENV = "SPARSE_ENGINE_BASE_SPEC"


@dataclass(frozen=True)
class BuiltinBaseSpec:
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # RoPE positions cost no parameters: room for real text, though pretraining sees 48 tokens
    max_position_embeddings: int = 512
    pretrain_examples_per_task: int = 1500
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 3e-3
    max_length: int = 48
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"spec": asdict(self), "version": BUILTIN_VERSION, "tasks": list(data.PRETRAIN),
                           "vocab": data.builtin_pieces()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @classmethod
    def from_env(cls) -> "BuiltinBaseSpec":
        """The default spec, with the fields given as a JSON object in ``$SPARSE_ENGINE_BASE_SPEC``."""
        text = os.environ.get(SPEC_ENV, "").strip()
        if not text:
            return cls()
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"${SPEC_ENV} is not JSON ({exc}): {text!r}") from None
        names = {f.name for f in fields(cls)}
        if not isinstance(overrides, dict) or set(overrides) - names:
            raise ValueError(f"${SPEC_ENV} must be a JSON object of fields among {sorted(names)}, got {text!r}")
        return cls(**overrides)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_ENGINE_CACHE", Path.home() / ".cache" / "sparse-engine"))


def build_model(tokenizer, spec: BuiltinBaseSpec):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    return Phi3ForCausalLM(config)


def pretrain(model, tokenizer, spec: BuiltinBaseSpec, progress: bool = True):
    """Train ``model`` on the built-in ``PRETRAIN`` mixture (loss on the answers)."""
    examples = []
    for name in data.PRETRAIN:
        task = data.builtin_task_data(name, n_train=spec.pretrain_examples_per_task, n_validation=0, n_test=0,
                                      seed=spec.seed)
        examples.extend(task.train)
    dataset = data.TokenizedDataset(examples, tokenizer, spec.max_length)
    return pretrain_on(model, tokenizer, dataset, spec, progress=progress)


def pretrain_on(model, tokenizer, dataset, spec: BuiltinBaseSpec, *, progress: bool = True,
                desc: str = "pretrain base"):
    """Train every parameter of ``model`` on ``dataset`` with the spec's pretraining settings."""
    from sparse_engine.training import TrainingConfig, train_expert

    config = TrainingConfig(
        epochs=spec.pretrain_epochs,
        learning_rate=spec.pretrain_learning_rate,
        batch_size=spec.pretrain_batch_size,
        warmup_ratio=0.05,
        weight_decay=0.01,
        seed=spec.seed,
        progress=progress,
        desc=desc,
    )
    # one process builds the base, even under torchrun (its callers let rank 0 build it first)
    return train_expert(model, dataset, config, process_group=None,
                        collate_fn=lambda b: data.collate_causal_lm(b, tokenizer.pad_token_id))


def save_base(model, tokenizer, target: Path, info: dict, *, replace: bool = False) -> Path:
    """Write a Hugging Face checkpoint directory (model, tokenizer, ``done.json`` = ``info``)
    atomically: built in a temporary sibling, then renamed into place. An existing ``target``
    is kept (another process finished first) unless ``replace``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps(info))
        if target.exists() and replace:
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-old-"))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        elif target.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_builtin_base(spec: BuiltinBaseSpec | None = None, cache_dir=None, *, rebuild: bool = False,
                      progress: bool = True):
    """(model, tokenizer) of the built-in tiny Phi-3, pretrained and cached on first use.

    ``spec`` default: :meth:`BuiltinBaseSpec.from_env` (``$SPARSE_ENGINE_BASE_SPEC``)."""
    from transformers import AutoTokenizer, Phi3ForCausalLM

    spec = spec or BuiltinBaseSpec.from_env()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-phi3-{spec.key()}"
    if rebuild and target.exists():
        shutil.rmtree(target)
    if not (target / "done.json").exists():
        tokenizer = data.build_builtin_tokenizer()
        model = build_model(tokenizer, spec)
        result = pretrain(model, tokenizer, spec, progress=progress)
        model.config._name_or_path = f"sparse-engine/tiny-phi3-{spec.key()}"
        save_base(model, tokenizer, target,
                  {"spec": asdict(spec), "pretrain": result.to_dict() | {"losses": result.losses[-5:]}})
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = Phi3ForCausalLM.from_pretrained(target, dtype=torch.float32)
    model.config._name_or_path = f"sparse-engine/tiny-phi3-{spec.key()}"
    model.eval()
    return model, tokenizer

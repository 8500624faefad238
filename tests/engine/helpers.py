"""Small shared builders for the engine tests."""
import torch


def tiny_phi3(vocab_size: int = 64, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Phi-3 whose qkv_proj is 192×64 (3:1, divisible by 16)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    cfg = Phi3Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return Phi3ForCausalLM(cfg)


def random_lm_data(n: int = 32, length: int = 12, vocab_size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(3, vocab_size, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return items

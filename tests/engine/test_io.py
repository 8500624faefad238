import json

import pytest
import torch

from sparse_engine import SparseAdapterConfig
from sparse_engine.io import load_adapter, read_adapter, save_adapter
from sparse_engine.layers import FIXED
from sparse_engine.model import adapter_layers, attach
from sparse_engine.training import TrainingConfig, train_expert

from .helpers import random_lm_data, tiny_phi3


def _trained(block_size=None, seed=0):
    model = tiny_phi3(seed=seed)
    train_expert(model, random_lm_data(16), TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, progress=False),
                 adapter=SparseAdapterConfig(keep_ratio=0.1, block_size=block_size, update_interval=2))
    return model


@pytest.mark.parametrize("block_size", [None, 16])
def test_save_then_load_reproduces_the_adapter(tmp_path, block_size):
    model = _trained(block_size)
    path = save_adapter(model, tmp_path / "a.safetensors")
    meta, deltas = read_adapter(path)
    assert meta["format_version"] == 1 and meta["config"]["block_size"] == block_size
    assert meta["layers"] == {n: [192, 64] for n in adapter_layers(model)}
    fresh = tiny_phi3()  # same base (same seed), no adapters yet: attached from the file
    load_adapter(fresh, path)
    ids = torch.randint(3, 64, (2, 7))
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, layer in adapter_layers(fresh).items():
        assert layer.phase == FIXED
        assert torch.equal(layer.delta_weight(), adapter_layers(model)[name].delta_weight())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temp file


def test_adapter_for_another_base_model_is_refused_and_nothing_changes(tmp_path):
    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    other = tiny_phi3(seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="another base model"):
        load_adapter(other, path)
    assert not adapter_layers(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_adapter_for_another_shape_is_refused(tmp_path):
    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    wider = tiny_phi3(hidden=128)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(wider, path)
    assert not adapter_layers(wider)
    attach(wider, SparseAdapterConfig())
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapter(wider, path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tiny_phi3(), cut)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match="no sparse-engine metadata"):
        read_adapter(foreign)
    with pytest.raises(FileNotFoundError):
        read_adapter(tmp_path / "missing.safetensors")


def test_tampered_indices_are_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".indices"))
    tensors[key] = tensors[key].flip(0).contiguous()  # unsorted
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="sorted"):
        read_adapter(bad)
    assert json.loads(meta["sparse_engine"])["base_model"]

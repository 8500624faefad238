import copy

import pytest
import torch
import torch.nn as nn

from sparse_engine import SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.layers import FIXED, SparseAdapterLinear
from sparse_engine.model import adapter_layers, attach, detach, merge_and_unload

from .helpers import tiny_phi3


def _fp64_linear(x, w, delta, b):
    y = x.double() @ (w.double() + delta.double()).t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("x_shape", [(5, 53), (2, 7, 53), (1, 53)])
def test_search_forward_is_x_times_w_plus_masked_delta(bias, x_shape):
    lin = nn.Linear(53, 29, bias=bias)
    layer = SparseAdapterLinear(lin, SparseAdapterConfig(backend="reference"))
    delta = torch.randn(29, 53)
    mask = torch.rand(29, 53) < 0.3
    layer.delta.data.copy_(delta)
    layer.mask.copy_(mask)
    x = torch.randn(*x_shape)
    expected = _fp64_linear(x, lin.weight, delta * mask, lin.bias)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [None, 16])
def test_fixed_phase_forward_and_storage_equal_the_dense_form(block_size):
    lin = nn.Linear(32, 96, bias=True)
    layer = SparseAdapterLinear(lin, SparseAdapterConfig(block_size=block_size, backend="reference"))
    layer.delta.data.copy_(torch.randn(96, 32))
    units = layer._unit_grid()[0] * layer._unit_grid()[1]
    kept = torch.sort(torch.randperm(units)[: units // 4]).values.to(torch.int32)
    layer.set_mask(kept)
    dense_before = layer.delta_weight().clone()
    x = torch.randn(3, 5, 32)
    y_search = layer(x)
    layer.freeze()
    assert layer.phase == FIXED and layer.mask is None
    # compact storage: only kept entries, no full-size fp32 buffer left in the layer
    assert layer.delta.numel() == int((dense_before != 0).sum()) or layer.delta.numel() == kept.numel() * (block_size or 1) ** 2
    for t in list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)):
        assert t.numel() < 96 * 32
    torch.testing.assert_close(layer.delta_weight(), dense_before)
    torch.testing.assert_close(layer(x), y_search)
    torch.testing.assert_close(layer(x).double(), _fp64_linear(x, lin.weight, dense_before, lin.bias), rtol=1e-5, atol=1e-5)
    sparse = layer.to_sparse()
    assert isinstance(sparse, BlockSparseDelta if block_size else SparseDelta)
    torch.testing.assert_close(sparse.to_dense(), dense_before)


def test_every_gradient_against_autograd_on_the_dense_form():
    lin = nn.Linear(53, 29)
    layer = SparseAdapterLinear(lin, SparseAdapterConfig(backend="reference"))
    layer.delta.data.copy_(torch.randn(29, 53))
    mask = torch.rand(29, 53) < 0.5
    layer.mask.copy_(mask)
    x = torch.randn(4, 37, 53, requires_grad=True)
    dy = torch.randn(4, 37, 29)
    layer(x).backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    delta_ref = layer.delta.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, lin.weight + delta_ref * mask, lin.bias)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.delta.grad, delta_ref.grad)
    assert not layer.delta.grad[~mask].any()  # nothing reaches unmasked entries
    assert lin.weight.grad is None and lin.bias.grad is None


def test_empty_and_full_masks():
    lin = nn.Linear(16, 48)
    layer = SparseAdapterLinear(lin, SparseAdapterConfig(backend="reference"))
    layer.delta.data.copy_(torch.randn(48, 16))
    x = torch.randn(3, 16)
    layer.set_mask(torch.zeros(0, dtype=torch.int32))
    torch.testing.assert_close(layer(x), lin(x))
    layer.freeze()
    torch.testing.assert_close(layer(x), lin(x))
    layer2 = SparseAdapterLinear(nn.Linear(16, 48), SparseAdapterConfig(backend="reference"))
    layer2.delta.data.copy_(torch.randn(48, 16))
    y = layer2(x)  # M = 1 everywhere at start
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer2.base.weight + layer2.delta, layer2.base.bias))


def test_attach_then_detach_leaves_the_model_bit_identical():
    model = tiny_phi3()
    model.lm_head.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = {n: type(m) for n, m in model.named_modules()}
    attach(model, SparseAdapterConfig())
    layers = adapter_layers(model)
    assert len(layers) == 2 and all(isinstance(l, SparseAdapterLinear) for l in layers.values())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.delta" for n in layers]
    # train the adapters a little: the base must never change
    for layer in layers.values():
        layer.delta.data.normal_()
    ids = torch.randint(3, 64, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    detach(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert types == {n: type(m) for n, m in model.named_modules()}


def test_attached_model_output_is_unchanged_at_init_and_merge_and_unload_matches():
    model = tiny_phi3()
    ids = torch.randint(3, 64, (2, 9))
    ref_logits = model(input_ids=ids).logits
    attach(model, SparseAdapterConfig(keep_ratio=0.2))
    torch.testing.assert_close(model(input_ids=ids).logits, ref_logits)
    for layer in adapter_layers(model).values():
        layer.delta.data.normal_(std=0.05)
        layer.set_mask(torch.sort(torch.randperm(192 * 64)[:500]).values.to(torch.int32))
        layer.freeze()
    adapted = model(input_ids=ids).logits
    base_weight = model.model.layers[0].self_attn.qkv_proj.base.weight.clone()
    merge_and_unload(model)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, nn.Linear)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, base_weight)


def test_llama_style_target_names_and_bad_targets():
    model = tiny_phi3()
    with pytest.raises(ValueError, match="'q_proj' matches no module.*qkv_proj"):
        attach(model, SparseAdapterConfig(target_modules=("q_proj", "k_proj", "v_proj")))
    assert not adapter_layers(model)  # nothing changed
    with pytest.raises(ValueError, match="'qkv_prj' matches no module"):  # a typo next to a valid name
        attach(model, SparseAdapterConfig(target_modules=("o_proj", "qkv_prj")))
    with pytest.raises(ValueError, match=r"'norm' matches only \['Phi3RMSNorm'\] modules, not nn.Linear"):
        attach(model, SparseAdapterConfig(target_modules=("o_proj", "norm")))
    assert not adapter_layers(model)
    attach(model, SparseAdapterConfig(target_modules=("o_proj", "down_proj")))
    assert sorted({n.rsplit(".", 1)[-1] for n in adapter_layers(model)}) == ["down_proj", "o_proj"]


def test_block_size_that_does_not_divide_the_weight_is_rejected_before_anything_changes():
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 20))
    model.qkv_proj = model[0]
    cfg = SparseAdapterConfig(block_size=16, target_modules=("0", "2"))
    with pytest.raises(ValueError, match="block_size 16 does not divide"):
        attach(model, cfg)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)


def test_loading_a_delta_copies_it_so_training_never_writes_into_the_callers_tensor():
    layer = SparseAdapterLinear(nn.Linear(16, 32), SparseAdapterConfig(backend="reference"))
    values = torch.randn(5)
    delta = SparseDelta((32, 16), values, torch.tensor([0, 3, 9, 100, 511], dtype=torch.int32))
    before = values.clone()
    layer.load_sparse(delta)
    with torch.no_grad():
        layer.delta.add_(1.0)
    assert torch.equal(values, before)


@pytest.mark.parametrize("block_size", [None, 16])
def test_load_state_dict_takes_the_phase_of_the_state(block_size):
    """A fixed-phase state dict loads into a search-phase layer and vice versa (Trainer resume
    after the freeze; load_best_model_at_end of a mask-epoch checkpoint)."""
    lin = nn.Linear(32, 48)
    cfg = SparseAdapterConfig(block_size=block_size, backend="reference")
    searching = SparseAdapterLinear(copy.deepcopy(lin), cfg)
    searching.delta.data.normal_()
    units = 48 * 32 if block_size is None else 6
    searching.set_mask(torch.arange(0, units, 3, dtype=torch.int32))
    search_state = copy.deepcopy(searching.state_dict())
    fixed = copy.deepcopy(searching)
    fixed.freeze()
    x = torch.randn(4, 32)
    fresh = SparseAdapterLinear(copy.deepcopy(lin), cfg)
    fresh.load_state_dict(fixed.state_dict())
    assert fresh.phase == FIXED and torch.equal(fresh.indices, fixed.indices)
    torch.testing.assert_close(fresh(x), fixed(x))
    fresh.load_state_dict(search_state)
    assert fresh.phase == "search" and fresh.indices is None
    torch.testing.assert_close(fresh(x), searching(x))


def test_a_tied_weight_is_refused_as_a_target():
    """A delta on a tied lm_head would also move the input embeddings (and broke saving)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="tied to model.embed_tokens.weight"):
        attach(model, SparseAdapterConfig(target_modules=("q_proj", "lm_head")))
    assert not adapter_layers(model)
    attach(model, SparseAdapterConfig(target_modules=("q_proj", "v_proj")))  # untied targets are fine
    assert len(adapter_layers(model)) == 2

import pytest
import torch
import torch.nn as nn

from sparse_engine import SparseAdapterConfig
from sparse_engine.kernels import reference as ref
from sparse_engine.masking import apply_masks, compute_scores, freeze_masks, select, update_masks
from sparse_engine.model import adapter_layers, attach

from .helpers import tiny_phi3


class OneLayer(nn.Module):
    def __init__(self, d_out, d_in, config):
        super().__init__()
        self.qkv_proj = nn.Linear(d_in, d_out)
        attach(self, config)

    def forward(self, x):
        return self.qkv_proj(x)


def _dense_grad(layer, x, target):
    """Independent G = dL/dŴ at W + Ŵ (mask ignored) by autograd on the dense weight."""
    delta = layer.delta.detach().clone().requires_grad_(True)
    y = torch.nn.functional.linear(x, layer.base.weight + delta, layer.base.bias)
    (y * target).sum().backward()
    return delta.grad


@pytest.mark.parametrize("score", ["mcs", "snip", "gm", "wm"])
@pytest.mark.parametrize("block_size", [None, 16])
def test_scores_match_an_independent_autograd_computation(score, block_size):
    cfg = SparseAdapterConfig(score=score, block_size=block_size)
    model = OneLayer(96, 32, cfg)
    layer = model.qkv_proj
    layer.delta.data.normal_()
    layer.set_mask(torch.zeros(0, dtype=torch.int32))  # the score pass must ignore the mask
    x, target = torch.randn(2, 7, 32), torch.randn(2, 7, 96)
    scores = compute_scores(model, adapter_layers(model), lambda: (model(x) * target).sum(), cfg)
    g = _dense_grad(layer, x, target)
    w = layer.delta.detach()
    expected = {"mcs": w * g, "snip": (w * g).abs(), "gm": g.abs(), "wm": w.abs()}[score]
    if block_size:
        expected = expected.reshape(6, 16, 2, 16).sum(dim=(1, 3))
    torch.testing.assert_close(scores["qkv_proj"], expected, rtol=1e-4, atol=1e-4)
    assert layer.delta.grad is None  # the score pass leaves .grad alone


def test_mcs_is_signed_a_negative_score_is_not_kept():
    cfg = SparseAdapterConfig(keep_ratio=1 / (16 * 16))  # k = 1
    model = OneLayer(16, 16, cfg)
    layer = model.qkv_proj
    x = torch.ones(1, 16)
    target = torch.ones(1, 16)  # G = targetᵀ x = all ones
    layer.delta.data.zero_()
    layer.delta.data[0, 0] = -5.0  # MCS -5: the largest |score|
    layer.delta.data[3, 4] = 2.0   # MCS +2
    kept = update_masks(model, adapter_layers(model), lambda: (model(x) * target).sum(), cfg)
    assert kept == {"qkv_proj": 1}
    assert layer.element_mask()[3, 4] and not layer.element_mask()[0, 0]
    snip = SparseAdapterConfig(keep_ratio=1 / 256, score="snip")
    scores = compute_scores(model, adapter_layers(model), lambda: (model(x) * target).sum(), snip)
    assert ref.topk_flat_indices(scores["qkv_proj"], 1).tolist() == [0]  # |score| would keep (0, 0)


def test_exactly_k_kept_with_ties_broken_by_lower_index():
    cfg = SparseAdapterConfig(keep_ratio=0.1)
    model = OneLayer(29, 53, cfg)
    layers = adapter_layers(model)
    scores = {"qkv_proj": torch.zeros(29, 53)}  # all tied
    kept = select(scores, layers, cfg)["qkv_proj"]
    k = round(0.1 * 29 * 53)
    assert kept.dtype == torch.int32 and kept.tolist() == list(range(k))
    scores = {"qkv_proj": torch.randint(0, 3, (29, 53)).float()}  # few distinct values
    kept = select(scores, layers, cfg)["qkv_proj"]
    assert kept.numel() == k
    flat = scores["qkv_proj"].flatten()
    threshold = flat[kept.long()].min()
    assert (flat[kept.long()] >= threshold).all() and int((flat > threshold).sum()) <= k
    ties = (flat == threshold).nonzero().flatten()
    assert set(kept.tolist()) & set(ties.tolist()) == set(ties[: k - int((flat > threshold).sum())].tolist())


def test_block_masks_are_true_16x16_tiles_on_a_3_to_1_weight():
    cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=16)
    model = tiny_phi3()  # qkv_proj: 192 x 64 (3:1)
    attach(model, cfg)
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.delta.data.normal_()
    ids = torch.randint(3, 64, (2, 11))
    update_masks(model, layers, lambda: model(input_ids=ids, labels=ids).loss, cfg)
    for layer in layers.values():
        mask = layer.element_mask()
        tiles = mask.reshape(12, 16, 4, 16).permute(0, 2, 1, 3).reshape(48, 256)
        per_tile = tiles.sum(1)
        assert set(per_tile.unique().tolist()) <= {0, 256}, "a tile is partly kept"
        assert int((per_tile == 256).sum()) == round(0.25 * 48)
        # the authors' bug builds rows at stride d_out/d_in; a true tile is 16 consecutive rows
        r, c = (mask.nonzero()[0]).tolist()
        assert mask[r - r % 16: r - r % 16 + 16, c - c % 16: c - c % 16 + 16].all()


def test_layer_drop_uses_one_global_threshold():
    cfg = SparseAdapterConfig(keep_ratio=0.1, layer_drop=True)
    model = tiny_phi3()
    attach(model, cfg)
    layers = adapter_layers(model)
    names = list(layers)
    scores = {names[0]: torch.rand(192, 64) + 1.0, names[1]: torch.rand(192, 64)}  # layer 1 entirely below
    kept = select(scores, layers, cfg)
    total = 2 * round(0.1 * 192 * 64)
    assert kept[names[0]].numel() == total and kept[names[1]].numel() == 0
    apply_masks(layers, kept)
    freeze_masks(layers)
    assert layers[names[1]].kept_count == 0  # dropped layer: base only
    ids = torch.randint(3, 64, (1, 5))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("compact", [True, False])
def test_values_leaving_the_mask_are_frozen_and_resume_when_selected_again(compact):
    """Policy: an entry that leaves the mask keeps its value (invisible to the forward, no
    update reaches it) and loses its optimizer moments; selected again, it resumes from the
    kept value with fresh moments. Compact search storage holds it in ``delta_dense``."""
    cfg = SparseAdapterConfig(keep_ratio=0.5, compact_search=compact)
    model = OneLayer(16, 16, cfg)
    layer = model.qkv_proj
    layers = adapter_layers(model)
    opt = torch.optim.AdamW([layer.delta], lr=0.1, weight_decay=0.0)
    x, t = torch.randn(4, 16), torch.randn(4, 16)
    for _ in range(3):
        (model(x) * t).sum().backward()
        opt.step()
        opt.zero_grad()
    dense_before = layer.delta.detach().clone()
    first = torch.arange(0, 128, dtype=torch.int32)
    apply_masks(layers, {"qkv_proj": first}, opt)
    out = ~layer.element_mask()
    layer.sync_search_delta()
    frozen_values = layer.search_delta.detach()[out].clone()
    assert frozen_values.abs().sum() > 0 and torch.equal(frozen_values, dense_before[out])
    state = opt.state[layer.delta]
    if compact:
        assert layer.delta.shape == (128,) and state["exp_avg"].shape == (128,)
    else:
        assert not state["exp_avg"][out].any() and not state["exp_avg_sq"][out].any()
    for _ in range(3):
        (model(x) * t).sum().backward()
        if not compact:
            assert not layer.delta.grad[out].any()
        opt.step()
        opt.zero_grad()
    layer.sync_search_delta()
    assert torch.equal(layer.search_delta.detach()[out], frozen_values)  # no update reached them
    second = torch.arange(128, 256, dtype=torch.int32)
    apply_masks(layers, {"qkv_proj": second}, opt)
    assert torch.equal(layer.delta_weight()[layer.element_mask()], frozen_values)  # resumed from the kept value
    if compact:
        assert not opt.state[layer.delta]["exp_avg"].any() and not opt.state[layer.delta]["exp_avg_sq"].any()


def test_freeze_carries_the_kept_adam_moments_and_drops_the_dense_state():
    cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=16, compact_search=False)
    model = OneLayer(32, 48, cfg)
    layer = model.qkv_proj
    layers = adapter_layers(model)
    opt = torch.optim.AdamW([layer.delta], lr=0.01, weight_decay=0.0)
    x, t = torch.randn(3, 48), torch.randn(3, 32)
    (model(x) * t).sum().backward()
    opt.step()
    opt.zero_grad()
    apply_masks(layers, {"qkv_proj": torch.tensor([1, 4], dtype=torch.int32)}, opt)
    old = layer.delta
    dense_m = opt.state[old]["exp_avg"].clone()
    mask = layer.mask.clone()
    freeze_masks(layers, opt)
    new = layer.delta
    assert new is not old and new.shape == (2, 16, 16)
    assert old not in opt.state and opt.param_groups[0]["params"] == [new]
    kept_m = dense_m[mask].reshape(-1)
    torch.testing.assert_close(opt.state[new]["exp_avg"].reshape(-1).sort().values, kept_m.sort().values)
    torch.testing.assert_close(opt.state[new]["exp_avg"][0], dense_m[0:16, 16:32])  # tile id 1 = rows 0-15, cols 16-31
    (model(x) * t).sum().backward()
    opt.step()  # the optimizer keeps working on the compact parameter
    assert new.grad.shape == new.shape


def test_layer_drop_ties_go_to_the_earlier_layer_in_model_order():
    """The score pass fills scores in backward order (last layer first); global ties must
    still favour the earlier layer of the model (layer order, then flat index)."""
    cfg = SparseAdapterConfig(keep_ratio=0.1, layer_drop=True)
    model = tiny_phi3()
    attach(model, cfg)
    layers = adapter_layers(model)
    names = list(layers)
    backward_order = {n: torch.ones(192, 64) for n in reversed(names)}  # all tied
    kept = select(backward_order, layers, cfg)
    total = 2 * round(0.1 * 192 * 64)
    assert kept[names[0]].numel() == total and kept[names[1]].numel() == 0
    assert torch.equal(kept[names[0]], torch.arange(total, dtype=torch.int32))


def test_grow_and_drop_cannot_be_combined_with_layer_drop():
    with pytest.raises(ValueError, match="layer_drop"):
        SparseAdapterConfig(score="gd", layer_drop=True)

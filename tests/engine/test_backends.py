"""The engine's layers give the same results through the Triton kernels (CPU interpreter
here, CUDA where present) as through the PyTorch reference, in every storage phase."""
import dataclasses

import pytest
import torch
import torch.nn as nn

from sparse_engine import SparseAdapterConfig
from sparse_engine.kernels import runtime
from sparse_engine.layers import SparseAdapterLinear
from sparse_engine.masking import compute_scores, select

pytestmark = pytest.mark.skipif(
    not (runtime.HAS_TRITON and (torch.cuda.is_available() or runtime.INTERPRET)),
    reason="needs Triton on CUDA or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(block_size, d_out=48, d_in=32, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=bias).to(DEVICE)
    delta = torch.randn(d_out, d_in, device=DEVICE)
    layers = {}
    for backend in ("reference", "triton"):
        cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=block_size, backend=backend)
        layers[backend] = SparseAdapterLinear(nn.Linear(d_in, d_out, bias=bias).to(DEVICE), cfg, "qkv_proj")
        layers[backend].base.load_state_dict(base.state_dict())
        layers[backend].delta.data.copy_(delta)
    return layers


def _run(layer, x, dy):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    grads = (x.grad, layer.delta.grad, layer.base.bias.grad if layer.base.bias is not None else None)
    layer.delta.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("block_size", [None, 16])
def test_search_and_fixed_phases_match_the_reference(block_size):
    layers = _pair(block_size)
    units = 48 * 32 if block_size is None else 6
    kept = torch.sort(torch.randperm(units)[: units // 3]).values.to(torch.int32).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    dy = torch.randn(2, 7, 48, device=DEVICE)
    for phase in ("search", "fixed"):
        results = {}
        for backend, layer in layers.items():
            if phase == "search":
                layer.set_mask(kept)
            else:
                layer.freeze()
            results[backend] = _run(layer, x, dy)
        (y_ref, g_ref), (y_tri, g_tri) = results["reference"], results["triton"]
        torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
        for a, b in zip(g_tri, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("score", ["mcs", "snip", "gm"])
@pytest.mark.parametrize("block_size", [None, 16])
def test_score_pass_and_selection_match_the_reference(score, block_size):
    layers = _pair(block_size)
    x = torch.randn(9, 32, device=DEVICE)
    t = torch.randn(9, 48, device=DEVICE)
    kept = {}
    for backend, layer in layers.items():
        cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=block_size, score=score, backend=backend)
        model = nn.ModuleDict({"qkv_proj": layer})
        scores = compute_scores(model, {"qkv_proj": layer}, lambda: (layer(x) * t).sum(), cfg)
        kept[backend] = (scores["qkv_proj"], select(scores, {"qkv_proj": layer}, cfg)["qkv_proj"])
    torch.testing.assert_close(kept["triton"][0], kept["reference"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(kept["triton"][1].cpu(), kept["reference"][1].cpu())


@pytest.mark.parametrize("block_size", [None, 16])
def test_kernel_layout_follows_state_dict_loads(block_size):
    """The cached kernel layout is rebuilt when the kept units change under it
    (load_state_dict copies new indices / a new mask in place); a stale one gave wrong outputs."""
    layers = _pair(block_size)
    units = 48 * 32 if block_size is None else 6
    first, second = (torch.sort(torch.randperm(units)[: units // 3]).values.to(torch.int32).to(DEVICE) for _ in range(2))
    x = torch.randn(5, 32, device=DEVICE)
    donors = _pair(block_size)
    for layer, donor in zip(layers.values(), donors.values()):
        donor.delta.data.mul_(-2.0)
        donor.set_mask(second)
    phases = ("search", "fixed") if block_size else ("fixed",)
    for phase in phases:
        for backend, layer in layers.items():
            if layer.phase == "search":
                layer.set_mask(first)
            if phase == "fixed" and layer.phase == "search":
                layer.freeze()
            layer(x)  # builds and caches the layout of `first`
            donor = donors[backend]
            if phase == "fixed" and donor.phase == "search":
                donor.freeze()
            layer.load_state_dict(donor.state_dict())
        y_ref, y_tri = (layers[b](x).detach() for b in ("reference", "triton"))
        torch.testing.assert_close(y_ref, donors["reference"](x).detach())
        torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)


def test_block_search_phase_runs_through_the_block_kernels(monkeypatch):
    """Block masks train through the block-sparse kernels in the search phase (kept tiles only),
    not through the dense masked-delta ones, and give the same step as the reference path."""
    from sparse_engine.kernels import block_sparse, masked_delta

    calls = []
    for mod, names in ((block_sparse, ("block_delta_linear", "block_grad_input", "block_grad_blocks")),
                       (masked_delta, ("masked_delta_linear", "masked_delta_grad_input", "masked_delta_grad_delta"))):
        for name in names:
            fn = getattr(mod, name)
            monkeypatch.setattr(mod, name, lambda *a, _fn=fn, _name=name, **k: (calls.append(_name), _fn(*a, **k))[1])
    layers = _pair(16)
    kept = torch.tensor([1, 4], dtype=torch.int32, device=DEVICE)
    x, dy = torch.randn(9, 32, device=DEVICE), torch.randn(9, 48, device=DEVICE)
    results = {}
    for backend, layer in layers.items():
        layer.set_mask(kept)
        results[backend] = _run(layer, x, dy)
    assert sorted(calls) == ["block_delta_linear", "block_grad_blocks", "block_grad_input"]
    (y_ref, g_ref), (y_tri, g_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    mask = layers["triton"].mask
    assert torch.count_nonzero(g_tri[1][~mask]) == 0 and torch.count_nonzero(g_tri[1][mask]) > 0


@pytest.mark.parametrize("block_size", [None, 16])
def test_fixed_phase_keeps_no_weight_sized_fp32_buffer_with_the_kernels(block_size):
    layer = _pair(block_size, d_out=64, d_in=96)["triton"]
    units = 64 * 96 if block_size is None else 24
    layer.set_mask(torch.sort(torch.randperm(units)[: units // 4]).values.to(torch.int32).to(DEVICE))
    layer.freeze()
    layer(torch.randn(3, 96, device=DEVICE)).sum().backward()
    layout = layer._kernel_aux[2]  # a NamedTuple (block) or a dataclass (element)
    fields = list(layout) if isinstance(layout, tuple) else [getattr(layout, f.name) for f in dataclasses.fields(layout)]
    held = list(layer.parameters(recurse=False)) + list(layer.buffers(recurse=False)) + [layer.delta.grad]
    held += [t for t in fields if torch.is_tensor(t)]
    for t in held:
        assert not (t.dtype == torch.float32 and t.numel() >= 64 * 96), (t.dtype, tuple(t.shape))


@pytest.mark.parametrize("calls,checkpointed", [(1, False), (2, False), (1, True)])
def test_element_mask_update_selects_inside_the_score_pass(monkeypatch, calls, checkpointed):
    """With the kernels, an element layer's mask update writes no dense score (top k picked by
    the histogram/select passes in its backward); a layer run twice per forward needs summed
    scores and takes the dense path, while a forward recomputed by activation checkpointing
    is still one call. Either way the masks equal the reference's."""
    from torch.utils.checkpoint import checkpoint

    from sparse_engine.kernels import masked_delta
    from sparse_engine.masking import update_masks

    used = []
    for name in ("delta_score", "delta_score_topk"):
        fn = getattr(masked_delta, name)
        monkeypatch.setattr(masked_delta, name, lambda *a, _fn=fn, _name=name, **k: (used.append(_name), _fn(*a, **k))[1])
    layers = _pair(None)
    x = torch.randn(9, 32, device=DEVICE)
    t = torch.randn(9, 48, device=DEVICE)
    masks = {}
    for backend, layer in layers.items():
        cfg = SparseAdapterConfig(keep_ratio=0.25, backend=backend)
        model = nn.ModuleDict({"qkv_proj": layer})
        run = (lambda v, _l=layer: checkpoint(_l, v, use_reentrant=False)) if checkpointed else layer
        loss = lambda _run=run: sum((_run(x) * t).sum() for _ in range(calls))  # noqa: E731
        update_masks(model, {"qkv_proj": layer}, loss, cfg)
        masks[backend] = layer.element_mask().clone()
    assert used == (["delta_score_topk"] if calls == 1 else ["delta_score", "delta_score"])
    assert torch.equal(masks["triton"], masks["reference"])
    assert int(masks["triton"].sum()) == SparseAdapterConfig(keep_ratio=0.25).kept_count(48, 32)


@pytest.mark.parametrize("score,layer_drop,block_size", [
    ("wm", False, None), ("wm", True, 16), ("gd", False, None), ("gd", False, 16),
    ("mcs", True, None), ("snip", True, 16),
])
def test_mask_updates_over_several_layers_match_the_reference(score, layer_drop, block_size):
    """update_masks with the kernels (batched top-k, fused |Ŵ|, grow-and-drop through the
    top-k launcher, layer drop's global threshold) keeps the same units as the reference."""
    from sparse_engine.masking import update_masks

    torch.manual_seed(1)
    shapes = [(48, 32), (32, 64), (16, 16)]
    x = {s: torch.randn(6, s[1], device=DEVICE) for s in shapes}
    t = {s: torch.randn(6, s[0], device=DEVICE) for s in shapes}
    deltas = [torch.randn(*s, device=DEVICE) * (i + 1) for i, s in enumerate(shapes)]
    masks = {}
    for backend in ("reference", "triton"):
        cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=block_size, score=score, layer_drop=layer_drop,
                                  backend=backend)
        layers = {}
        for i, s in enumerate(shapes):
            torch.manual_seed(10 + i)
            layer = SparseAdapterLinear(nn.Linear(s[1], s[0]).to(DEVICE), cfg, f"l{i}")
            layer.delta.data.copy_(deltas[i])
            layers[f"l{i}"] = layer
        if score == "gd":  # grow-and-drop starts from a current mask
            for layer in layers.values():
                n_units = layer._unit_grid()[0] * layer._unit_grid()[1]
                layer.set_mask(torch.arange(0, n_units, 2, dtype=torch.int32, device=DEVICE))
        model = nn.ModuleDict(layers)
        loss = lambda: sum((layers[f"l{i}"](x[s]) * t[s]).sum() for i, s in enumerate(shapes))  # noqa: E731
        update_masks(model, layers, loss, cfg)
        masks[backend] = [layers[f"l{i}"].element_mask().clone() for i in range(len(shapes))]
    for got, want in zip(masks["triton"], masks["reference"]):
        assert torch.equal(got, want)
    total = sum(int(m.sum()) for m in masks["triton"])
    per_layer = [SparseAdapterConfig(keep_ratio=0.25, block_size=block_size).kept_count(*s) * (block_size or 1) ** 2
                 for s in shapes]
    assert total == sum(per_layer)


@pytest.mark.parametrize("block_size", [None, 16])
def test_inference_mode_forwards_and_loads(block_size, tmp_path):
    """An evaluation forward under inference_mode must not leave a layout that a later training
    step cannot save for backward; an adapter loaded under inference_mode (indices without a
    version counter) still runs through the kernels."""
    from sparse_engine.io import load_adapter, save_adapter
    from sparse_engine.masking import freeze_masks
    from sparse_engine.model import adapter_layers, attach

    layers = _pair(block_size)
    units = 48 * 32 if block_size is None else 6
    kept = torch.arange(0, units, 3, dtype=torch.int32, device=DEVICE)
    x, dy = torch.randn(5, 32, device=DEVICE), torch.randn(5, 48, device=DEVICE)
    results = {}
    for backend, layer in layers.items():
        layer.set_mask(kept)
        with torch.inference_mode():
            layer(x)
        results[backend] = _run(layer, x, dy)
    (y_ref, g_ref), (y_tri, g_tri) = results["reference"], results["triton"]
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_tri[1], g_ref[1], rtol=1e-4, atol=1e-4)

    cfg = SparseAdapterConfig(keep_ratio=0.25, block_size=block_size, backend="triton", target_modules=["0"])
    base = nn.Linear(32, 48).to(DEVICE)
    trained = attach(nn.Sequential(nn.Linear(32, 48).to(DEVICE)), cfg)
    trained[0].base.load_state_dict(base.state_dict())
    trained[0].delta.data.normal_()
    trained[0].set_mask(kept)
    freeze_masks(adapter_layers(trained))
    save_adapter(trained, str(tmp_path / "a.safetensors"))
    served = attach(nn.Sequential(nn.Linear(32, 48).to(DEVICE)), cfg)
    served[0].base.load_state_dict(base.state_dict())
    with torch.inference_mode():
        load_adapter(served, str(tmp_path / "a.safetensors"))
        y = served(x)
    torch.testing.assert_close(y, trained(x).detach(), rtol=1e-4, atol=1e-4)


def test_block_layers_take_a_bias_in_another_dtype():
    """fp16 activations with an fp32 nn.Linear bias (mixed precision): the block path casts the
    bias as F.linear under autocast would, as the element path accepts it."""
    layer = _pair(16)["triton"]
    layer.set_mask(torch.tensor([0, 4], dtype=torch.int32, device=DEVICE))
    layer.base.weight.data = layer.base.weight.data.half()
    x = torch.randn(3, 32, device=DEVICE).half()
    w_eff = (layer.base.weight.float() + layer.delta_weight()).half()
    for phase in ("search", "fixed"):
        if phase == "fixed":
            layer.freeze()
        y = layer(x)
        expected = (x.double() @ w_eff.double().t() + layer.base.bias.half().double())
        torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)

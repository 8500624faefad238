"""The engine's layers give the same results through the Triton kernels (CPU interpreter
here, CUDA where present) as through the PyTorch reference, in every storage phase."""
import pytest
import torch
import torch.nn as nn

from sparse_engine import SparseAdapterConfig
from sparse_engine.kernels import _triton
from sparse_engine.layers import SparseAdapterLinear
from sparse_engine.masking import compute_scores, select

pytestmark = pytest.mark.skipif(
    not (_triton.HAS_TRITON and (torch.cuda.is_available() or _triton.INTERPRET)),
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

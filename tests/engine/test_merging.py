"""Merging: Eq. 4, the baselines against PEFT, outputs, determinism and bad input."""
import copy
import random
import warnings

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from sparse_engine import merging
from sparse_engine.config import DEFAULT_TARGET_MODULES, SparseAdapterConfig
from sparse_engine.formats import BlockSparseDelta, SparseDelta
from sparse_engine.io import base_fingerprint, load_adapter, save_adapter
from sparse_engine.merging import (
    Expert,
    LowRankDelta,
    MixedMergeWarning,
    apply_merged,
    load_expert,
    mask_result,
    merge_experts,
    save_expert,
    save_merged,
)
from sparse_engine.model import adapter_layers, attach, find_target_linears, merge_and_unload

from .helpers import tiny_phi3

SHAPE = (32, 48)


def _sparse_expert(name, shape=SHAPE, density=0.3, seed=0, fp="base0"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) < density
    values = torch.randn(shape, generator=g)
    return Expert(name, "sparse", {"w": SparseDelta.from_dense(values, mask)}, base_fingerprint=fp)


def _dense_expert(name, shape=SHAPE, seed=0, fp="base0"):
    g = torch.Generator().manual_seed(seed)
    return Expert(name, "full", {"w": torch.randn(shape, generator=g)}, base_fingerprint=fp)


# ------------------------------------------------------------------------------ Eq. 4
def test_eq4_on_hand_made_masks_with_overlaps_0_1_2_3():
    # One row of 5 entries; overlap per entry: 0, 1, 2, 3, 3 (the last one has stored zeros:
    # the overlap counts the MASKS, so its mean divides by 3, not by the 1 non-zero value).
    shape = (1, 5)

    def expert(name, entries):
        idx = torch.tensor(sorted(entries), dtype=torch.int32)
        vals = torch.tensor([entries[i] for i in sorted(entries)], dtype=torch.float32)
        return Expert(name, "sparse", {"w": SparseDelta(shape, vals, idx)})

    a = expert("a", {1: 4.0, 2: 1.0, 3: 3.0, 4: 0.0})
    b = expert("b", {2: 3.0, 3: 6.0, 4: 0.0})
    c = expert("c", {3: -3.0, 4: 9.0})
    merged = merge_experts([a, b, c], "overlap_average")
    delta = merged.layers["w"]
    assert isinstance(delta, SparseDelta)
    assert delta.indices.tolist() == [1, 2, 3, 4]  # the union of the masks
    expected = torch.tensor([[0.0, 4.0, 2.0, 2.0, 3.0]])
    assert torch.equal(delta.to_dense(), expected)
    assert merged.stats["union_density"] == pytest.approx(4 / 5)
    # 'eq4' is an alias; plain averaging divides by N everywhere
    assert torch.equal(merge_experts([a, b, c], "eq4").dense("w"), expected)
    assert torch.allclose(merge_experts([a, b, c], "average").dense("w"),
                          torch.tensor([[0.0, 4.0, 4.0, 6.0, 9.0]]) / 3)


def test_eq4_equals_densify_and_stack_reference_and_never_densifies(monkeypatch):
    experts = [_sparse_expert(f"e{i}", seed=i) for i in range(5)]
    dense = torch.stack([e.layers["w"].to_dense() for e in experts])
    masks = torch.stack([e.layers["w"].mask() for e in experts]).sum(0)
    reference = dense.sum(0) / masks.clamp(min=1)

    def boom(self):
        raise AssertionError("merging densified a sparse expert")

    monkeypatch.setattr(SparseDelta, "to_dense", boom)
    merged = merge_experts(experts, "overlap_average")
    monkeypatch.undo()
    torch.testing.assert_close(merged.dense("w"), reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [None, 16])
def test_no_method_densifies_an_expert_read_from_its_adapter_file(tmp_path, monkeypatch, block):
    base = tiny_phi3()
    paths = _adapter_experts(base, tmp_path, n=2, block=block)

    def boom(self):
        raise AssertionError("merging built a dense delta or mask of an expert")

    for cls in (SparseDelta, BlockSparseDelta):
        monkeypatch.setattr(cls, "to_dense", boom)
        monkeypatch.setattr(cls, "mask", boom)
    for method in merging.METHODS:
        for output in ("auto", "dense"):
            experts = [load_expert(p) for p in paths]
            for _ in merging.iter_merged_layers(experts, method, output=output):
                pass


# ------------------------------------------------------------------------- vs PEFT
PEFT_CASES = [
    ("task_arithmetic", {"lam": 1.0}, lambda ts, w: peft_merge.task_arithmetic(ts, w)),
    ("magnitude_prune", {"lam": 1.0, "density": 0.3}, lambda ts, w: peft_merge.magnitude_prune(ts, w, 0.3)),
    ("ties", {"lam": 1.0, "density": 0.3, "sign": "total"}, lambda ts, w: peft_merge.ties(ts, w, 0.3, "total")),
    ("ties", {"lam": 1.0, "density": 0.5, "sign": "frequency"},
     lambda ts, w: peft_merge.ties(ts, w, 0.5, "frequency")),
    ("dare_linear", {"lam": 1.0, "drop_rate": 0.3}, lambda ts, w: peft_merge.dare_linear(ts, w, 1 - 0.3)),
    ("dare_ties", {"lam": 1.0, "drop_rate": 0.6, "sign": "total"},
     lambda ts, w: peft_merge.dare_ties(ts, w, 1 - 0.6, "total")),
    ("dare_ties", {"lam": 1.0, "drop_rate": 0.5, "sign": "frequency"},
     lambda ts, w: peft_merge.dare_ties(ts, w, 1 - 0.5, "frequency")),
]


@pytest.mark.parametrize("method,params,peft_fn", PEFT_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(PEFT_CASES)])
def test_equal_to_peft_on_dense_task_vectors(method, params, peft_fn):
    experts = [_dense_expert(f"e{i}", seed=i) for i in range(4)]
    weights = [0.5, 1.0, -0.3, 2.0]
    ours = merge_experts(experts, method, weights=weights, seed=11, **params).dense("w")
    torch.manual_seed(11)  # PEFT's DARE draws from the global generator
    theirs = peft_fn([e.layers["w"] for e in experts], torch.tensor(weights))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("method,params,peft_fn", PEFT_CASES[:4], ids=["ta", "mp", "ties-total", "ties-freq"])
def test_sparse_experts_equal_peft_on_the_densified_tensors(method, params, peft_fn):
    experts = [_sparse_expert(f"e{i}", seed=10 + i, density=0.4) for i in range(3)]
    weights = [1.0, 0.7, 1.5]
    merged = merge_experts(experts, method, weights=weights, **params)
    assert isinstance(merged.layers["w"], SparseDelta)
    theirs = peft_fn([e.layers["w"].to_dense() for e in experts], torch.tensor(weights))
    assert torch.equal(merged.dense("w"), theirs)


def test_lam_scales_like_peft_weights_and_averaging_is_ta_with_one_over_n():
    experts = [_dense_expert(f"e{i}", seed=i) for i in range(3)]
    ts = [e.layers["w"] for e in experts]
    assert torch.equal(merge_experts(experts, "ties", lam=0.7, density=0.2).dense("w"),
                       peft_merge.ties(ts, torch.full((3,), 0.7), 0.2))
    assert torch.equal(merge_experts(experts, "average").dense("w"),
                       peft_merge.task_arithmetic(ts, torch.full((3,), 1 / 3)))


def test_breadcrumbs_drops_top_gamma_and_bottom_beta_fractions():
    values = torch.arange(1, 21, dtype=torch.float32).view(4, 5) * torch.tensor([1, -1, 1, -1, 1.0])
    e = Expert("e", "full", {"w": values})
    out = merge_experts([e], "breadcrumbs", lam=1.0, beta=0.25, gamma=0.1).dense("w")
    kept = out.abs().flatten()
    # 20 entries: the 2 largest (|v| 19, 20) and the 5 smallest (|v| 1..5) are dropped,
    # not only the single largest entry (the authors' bug)
    assert torch.equal(kept != 0, (values.abs().flatten() > 5) & (values.abs().flatten() < 19))
    assert torch.equal(out[out != 0], values[out != 0])


def test_ties_density_is_the_fraction_kept():
    e = Expert("e", "full", {"w": torch.arange(1, 101, dtype=torch.float32).view(10, 10)})
    out = merge_experts([e], "ties", density=0.2).dense("w")
    assert int((out != 0).sum()) == 20 and float(out.min()) == 0 and float(out[out != 0].min()) == 81


def test_stored_basis_counts_the_experts_entries():
    e = _sparse_expert("e", density=0.1, seed=3)
    nnz = e.layers["w"].nnz
    tensor_basis = merge_experts([e], "ties", density=0.2).layers["w"]
    stored_basis = merge_experts([e], "ties", density=0.2, basis="stored").layers["w"]
    assert int((tensor_basis.values != 0).sum()) == nnz  # 20% of the tensor > 10% stored: no trim
    assert int((stored_basis.values != 0).sum()) == int(0.2 * nnz)


# ------------------------------------------------------------------ order, seeds, kinds
@pytest.mark.parametrize("method", ["overlap_average", "average", "task_arithmetic", "ties", "breadcrumbs",
                                    "magnitude_prune"])
def test_merging_is_invariant_to_the_order_of_the_experts(method):
    experts = [_sparse_expert(f"e{i}", seed=20 + i) for i in range(5)]
    shuffled = experts[:]
    random.Random(1).shuffle(shuffled)
    a = merge_experts(experts, method).layers["w"]
    b = merge_experts(shuffled, method).layers["w"]
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=1e-7)


def test_dare_is_deterministic_for_a_seed():
    experts = [_sparse_expert(f"e{i}", seed=i) for i in range(3)]
    a = merge_experts(experts, "dare_linear", drop_rate=0.5, seed=3).dense("w")
    b = merge_experts(experts, "dare_linear", drop_rate=0.5, seed=3).dense("w")
    c = merge_experts(experts, "dare_linear", drop_rate=0.5, seed=4).dense("w")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(merge_experts(experts, "dare_linear", drop_rate=0.0, lam=1.0).dense("w"),
                       merge_experts(experts, "task_arithmetic", lam=1.0).dense("w"))


def test_block_experts_merge_to_a_block_adapter_on_the_union_of_tiles():
    shape, bs = (64, 32), 16
    experts, dense_experts = [], []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        tiles = torch.rand(shape[0] // bs, shape[1] // bs, generator=g) < 0.4
        delta = BlockSparseDelta.from_dense(torch.randn(shape, generator=g), tiles, bs)
        experts.append(Expert(f"b{i}", "block", {"w": delta}))
        dense_experts.append(Expert(f"b{i}", "sparse", {"w": delta.to_sparse_delta()}))
    merged = merge_experts(experts, "overlap_average")
    out = merged.layers["w"]
    assert isinstance(out, BlockSparseDelta) and out.block_size == bs
    union = torch.stack([e.layers["w"].mask() for e in experts]).any(0)
    assert torch.equal(out.mask(), union)
    torch.testing.assert_close(out.to_dense(), merge_experts(dense_experts, "overlap_average").dense("w"))


def test_lora_expert_is_scale_b_a_and_equals_peft_delta_weight():
    from sparse_engine.baselines import attach_lora

    base = tiny_phi3()
    peft_model = attach_lora(copy.deepcopy(base), 4, ["qkv_proj"])
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    expert = merging.expert_from_lora_model(peft_model, "lora", base_model=base)
    assert expert.base_fingerprint == base_fingerprint(base, find_target_linears(base, DEFAULT_TARGET_MODULES))
    module = peft_model.base_model.model.model.layers[0].self_attn.qkv_proj
    delta = expert.layers["model.layers.0.self_attn.qkv_proj.weight"]
    assert isinstance(delta, LowRankDelta) and delta.rank == 4
    torch.testing.assert_close(delta.to_dense(), module.get_delta_weight("default"))
    # merging LoRA experts averages the materialised products
    e2 = merging.expert_from_lora_model(peft_model, "lora2", base_model=base)
    merged = merge_experts([expert, e2], "average")
    torch.testing.assert_close(merged.dense("model.layers.0.self_attn.qkv_proj.weight"), delta.to_dense())


def test_full_expert_round_trip_and_merged_full_weights(tmp_path):
    base = tiny_phi3()
    experts = []
    for i in range(2):
        ft = copy.deepcopy(base)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.01 * torch.randn_like(p))
        e = merging.expert_from_full_model(ft, base, f"full{i}")
        path = save_expert(e, tmp_path / f"full{i}.safetensors")
        experts.append(load_expert(path))
    plain_fingerprint = base_fingerprint(base, find_target_linears(base, DEFAULT_TARGET_MODULES))
    assert experts[0].kind == "full" and experts[0].base_fingerprint == plain_fingerprint
    merged = merge_experts(experts, "average")
    model = apply_merged(copy.deepcopy(base), merged)
    for name, p in model.named_parameters():
        expected = base.get_parameter(name) + (experts[0].layers[name] + experts[1].layers[name]) / 2
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)


def test_fingerprint_agrees_with_adapter_files():
    base = tiny_phi3()
    fp = base_fingerprint(base, find_target_linears(base, DEFAULT_TARGET_MODULES))
    attached = attach(copy.deepcopy(base), SparseAdapterConfig())
    assert fp == base_fingerprint(attached)


# ------------------------------------------------------- sparse adapter output applied
def _adapter_experts(base, tmp_path, n=3, block=None):
    paths = []
    for i in range(n):
        model = attach(copy.deepcopy(base), SparseAdapterConfig(keep_ratio=0.2, block_size=block))
        g = torch.Generator().manual_seed(100 + i)
        for layer in adapter_layers(model).values():
            d_out, d_in = layer.shape
            if block:
                tiles = torch.rand(d_out // block, d_in // block, generator=g) < 0.2
                layer.load_sparse(BlockSparseDelta.from_dense(torch.randn(layer.shape, generator=g), tiles, block))
            else:
                mask = torch.rand(layer.shape, generator=g) < 0.2
                layer.load_sparse(SparseDelta.from_dense(torch.randn(layer.shape, generator=g), mask))
        paths.append(save_adapter(model, tmp_path / f"e{i}-{block}.safetensors", extra_metadata={"task": f"t{i}"}))
    return paths


@pytest.mark.parametrize("block", [None, 16])
def test_merged_sparse_adapter_applied_equals_dense_merged_weights(tmp_path, block):
    base = tiny_phi3()
    experts = [load_expert(p) for p in _adapter_experts(base, tmp_path, block=block)]
    assert experts[0].name == "t0" and experts[0].kind == ("block" if block else "sparse")
    merged = merge_experts(experts, "overlap_average")
    path = save_merged(merged, tmp_path / "merged.safetensors")
    with_adapter = load_adapter(copy.deepcopy(base), path)  # an ordinary adapter file
    dense = apply_merged(copy.deepcopy(base), merge_experts(experts, "overlap_average", output="dense"))
    ids = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    unloaded = merge_and_unload(with_adapter)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(unloaded.get_parameter(name), p, rtol=0, atol=1e-6)


def test_mask_result_restricts_the_merge_to_one_experts_mask():
    experts = [_sparse_expert(f"e{i}", seed=i) for i in range(3)]
    merged = merge_experts(experts, "overlap_average")
    masked = mask_result(merged, experts[1])
    mask = experts[1].layers["w"].mask()
    assert torch.equal(masked.layers["w"].mask(), mask)
    assert torch.equal(masked.dense("w"), merged.dense("w") * mask)


def _lowrank_expert(name, shapes, seed, fp):
    g = torch.Generator().manual_seed(seed)
    return Expert(name, "lora", {p: LowRankDelta(s, torch.randn(3, s[1], generator=g), torch.randn(s[0], 3, generator=g),
                                                 0.5) for p, s in shapes.items()}, base_fingerprint=fp)


def test_a_merge_of_sparse_and_dense_experts_says_it_is_dense(tmp_path):
    sparse = _sparse_expert("s", seed=5)
    lora = _lowrank_expert("l", {"w": SHAPE}, seed=6, fp="base0")
    with pytest.warns(MixedMergeWarning, match=r"1 layer\(s\) \(e\.g\. w\) mix sparse experts \['s'\] with dense "
                                               r"or low-rank ones \['l'\].*dense expert file, not a sparse adapter"):
        merged = merge_experts([sparse, lora], "eq4")
    assert not merged.is_sparse and merged.stats["mixed_layers"] == 1
    assert merged.output_kind == "dense expert file: 1 layer(s) mix sparse and dense experts"
    # Eq. 4 still: the low-rank expert's mask is full, so each entry divides by 1 or 2
    mask = sparse.layers["w"].mask()
    expected = (sparse.layers["w"].to_dense() + lora.layers["w"].to_dense()) / (1 + mask.float())
    torch.testing.assert_close(merged.dense("w"), expected, rtol=1e-6, atol=1e-6)
    # the expert file's metadata tells the same without reading its tensors
    from_file = load_expert(save_expert(lora, tmp_path / "l.safetensors"))
    with pytest.warns(MixedMergeWarning, match="mix sparse experts"):
        merge_experts([sparse, from_file], "ties")
    # asked for a dense output, or only sparse experts: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense = merge_experts([sparse, lora], "eq4", output="dense")
        only_sparse = merge_experts([sparse, _sparse_expert("t", seed=7)], "eq4")
    assert "mixed_layers" not in dense.stats and dense.output_kind == "dense expert file"
    assert only_sparse.is_sparse and "mixed_layers" not in only_sparse.stats


# ----------------------------------------------------------------------- bad input
def test_bad_input_gets_one_clear_message():
    a, b = _sparse_expert("a"), _sparse_expert("b", seed=1)
    with pytest.raises(ValueError, match="no experts given"):
        merge_experts([], "average")
    with pytest.raises(ValueError, match="different base models"):
        merge_experts([a, _sparse_expert("c", fp="other")], "average")
    # one expert without a fingerprint: the base model ids decide
    phi, llama = _sparse_expert("phi"), _sparse_expert("llama", fp=None)
    phi.base_model, llama.base_model = "microsoft/Phi-3-mini-4k-instruct", "meta-llama/Llama-3-8B"
    with pytest.raises(ValueError, match="different base models"):
        merge_experts([phi, llama], "eq4")
    with pytest.raises(ValueError, match="same shapes"):
        merge_experts([a, _sparse_expert("d", shape=(16, 48))], "average")
    with pytest.raises(ValueError, match="density must be in \\[0, 1\\]"):
        merge_experts([a, b], "ties", density=1.5)
    with pytest.raises(ValueError, match="drop_rate must be in \\[0, 1\\]"):
        merge_experts([a, b], "dare_linear", drop_rate=-0.1)
    with pytest.raises(ValueError, match="unknown merge method 'soup'"):
        merge_experts([a, b], "soup")
    with pytest.raises(ValueError, match="takes no parameter 'density'"):
        merge_experts([a, b], "task_arithmetic", density=0.3)
    bad = a.layers["w"].values.clone()
    bad[0] = float("nan")
    nan = Expert("nan", "sparse", {"w": SparseDelta(SHAPE, bad, a.layers["w"].indices)}, base_fingerprint="base0")
    with pytest.raises(ValueError, match="expert 'nan', layer w holds NaN or Inf"):
        merge_experts([nan, b], "overlap_average")
    assert merge_experts([nan, b], "overlap_average", safe_merge=False).layers["w"].values.isnan().any()


def test_apply_refuses_another_base(tmp_path):
    base = tiny_phi3()
    experts = [load_expert(p) for p in _adapter_experts(base, tmp_path, n=2)]
    merged = merge_experts(experts, "overlap_average")
    with pytest.raises(ValueError, match="another base model"):
        apply_merged(tiny_phi3(seed=1), merged)


def test_cli_merge_and_eval(tmp_path, capsys, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    from sparse_engine.cli import main

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    paths = [str(p) for p in _adapter_experts(base, tmp_path, n=2)]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *paths, "--method", "ties", "--density", "1.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "density must be in [0, 1]" in err and not out.exists()
    assert main(["merge", *paths, "--method", "eq4", "--out", str(out), "--model", str(tiny_base_dir),
                 "--model-out", str(tmp_path / "model")]) == 0
    assert out.exists() and (tmp_path / "model" / "config.json").exists()
    code = main(["eval", "--adapter", str(out), "--model", str(tiny_base_dir), "--held-in", "reverse_words",
                 "--held-out", "sort_descending", "--n-test", "4", "--max-new-tokens", "4", "--max-length", "48",
                 "--out", str(tmp_path / "eval"), "--no-progress"])
    assert code == 0
    assert "held_out" in (tmp_path / "eval" / "results.md").read_text()


def test_cli_merge_of_a_sparse_and_a_lora_expert_says_it_writes_a_dense_file(tmp_path, capsys, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    from sparse_engine.cli import main

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    (adapter,) = _adapter_experts(base, tmp_path, n=1)
    sparse = load_expert(adapter)
    shapes = {p: tuple(d.shape) for p, d in sparse.layers.items()}
    lora = save_expert(_lowrank_expert("l", shapes, seed=1, fp=sparse.base_fingerprint), tmp_path / "l.safetensors")
    out = tmp_path / "m.safetensors"
    with pytest.warns(MixedMergeWarning):
        assert main(["merge", str(adapter), str(lora), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (dense expert file: {len(shapes)} layer(s) mix sparse and dense experts)" in printed
    assert load_expert(out).kind == "merged" and not isinstance(next(iter(load_expert(out).layers.values())),
                                                                (SparseDelta, BlockSparseDelta))


@pytest.mark.parametrize("command", ["merge", "eval", "reproduce"])
def test_new_commands_have_help(command, capsys):
    from sparse_engine.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0 and f"usage: sparse-engine {command}" in capsys.readouterr().out

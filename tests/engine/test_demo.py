import json

from sparse_engine.experts import run_demo


def test_demo_at_reduced_size(tmp_path, tiny_base_cache, tiny_base_spec):
    out = tmp_path / "demo"
    results = run_demo(tasks=("colour_to_fruit",), n_train=64, n_test=8, epochs=1, update_interval=2,
                       out_dir=out, cache_dir=tiny_base_cache, progress=False, base_spec=tiny_base_spec)
    labels = [row["method"] for row in results["rows"]]
    assert labels == ["base (no training)", "element-sparse", "block-sparse", "LoRA", "full fine-tune"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    assert (out / "results.md").read_text().startswith("| method")
    assert (out / "adapters" / "colour_to_fruit-sparse.safetensors").exists()
    assert (out / "adapters" / "colour_to_fruit-block.safetensors").exists()
    params = {row["method"]: row["trainable params"] for row in results["rows"]}
    # LoRA's rank is matched to the sparse adapter's trainable count
    assert abs(params["LoRA"] - params["element-sparse"]) / params["element-sparse"] < 0.35
    assert params["full fine-tune"] > 10 * params["element-sparse"]
    assert all(0.0 <= row["mean Rouge-L"] <= 100.0 for row in results["rows"])

import pytest

from sparse_engine import SparseAdapterConfig
from sparse_engine.training import TrainingConfig


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, float("nan"), float("inf"), "0.1", True])
def test_keep_ratio_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="keep_ratio"):
        SparseAdapterConfig(keep_ratio=bad)


@pytest.mark.parametrize("bad", [7, 0, 8, 32, "16"])
def test_block_size_must_be_16_or_none(bad):
    with pytest.raises(ValueError, match="block_size"):
        SparseAdapterConfig(block_size=bad)


@pytest.mark.parametrize(
    "field,value",
    [("score", "abs"), ("update_interval", 0), ("mask_epochs", 0), ("backend", "cuda"), ("target_modules", ()),
     ("target_modules", ("",)), ("update_interval", 1.5), ("seed", "x")],
)
def test_other_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        SparseAdapterConfig(**{field: value})


def test_defaults_follow_the_paper():
    c = SparseAdapterConfig()
    assert (c.keep_ratio, c.block_size, c.target_modules, c.score, c.update_interval, c.mask_epochs) == (
        0.1, None, ("qkv_proj",), "mcs", 100, 1)
    assert c.backend == "auto" and not c.layer_drop


def test_kept_count_elements_and_blocks():
    assert SparseAdapterConfig(keep_ratio=0.1).kept_count(192, 64) == round(0.1 * 192 * 64)
    assert SparseAdapterConfig(keep_ratio=0.1, block_size=16).kept_count(192, 64) == round(0.1 * 48)
    assert SparseAdapterConfig(keep_ratio=1.0).kept_count(29, 53) == 29 * 53
    assert SparseAdapterConfig(keep_ratio=1e-6).kept_count(29, 53) == 1  # at least one unit


def test_round_trip_through_dict():
    c = SparseAdapterConfig(keep_ratio=0.25, block_size=16, target_modules=["q_proj", "k_proj"], score="snip")
    assert SparseAdapterConfig.from_dict(c.to_dict()) == c
    assert c.target_modules == ("q_proj", "k_proj")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 0), ("grad_accum", 0), ("learning_rate", 0),
                                         ("warmup_ratio", 1.0), ("max_steps", 0), ("checkpoint_every", 5)])
def test_training_config_is_validated(field, value):
    with pytest.raises(ValueError):
        TrainingConfig(**{field: value})


def test_old_files_with_gd_and_layer_drop_still_load():
    """That pair is refused now; older adapter files that name it were trained per layer."""
    d = SparseAdapterConfig(score="gd").to_dict()
    d["layer_drop"] = True
    cfg = SparseAdapterConfig.from_dict(d)
    assert cfg.score == "gd" and not cfg.layer_drop

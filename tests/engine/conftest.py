import pytest


@pytest.fixture(scope="session")
def tiny_base_spec():
    """A smaller built-in base than the demo's, so tests that need one build it in seconds."""
    from sparse_engine.builtin import BuiltinBaseSpec

    return BuiltinBaseSpec(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           pretrain_examples_per_task=64, pretrain_epochs=1)


@pytest.fixture(scope="session")
def tiny_base_cache(tmp_path_factory, tiny_base_spec):
    from sparse_engine.builtin import load_builtin_base

    cache = tmp_path_factory.mktemp("base-cache")
    load_builtin_base(tiny_base_spec, cache_dir=cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def tiny_base_dir(tiny_base_cache):
    """The cached tiny base as a local Hugging Face checkpoint directory (for --model)."""
    (path,) = [p for p in tiny_base_cache.iterdir() if p.name.startswith("tiny-phi3-")]
    return path

# TRITON_INTERPRET must be set before any @triton.jit function is defined, so this runs
# at the very top of the test session, before any test module imports the kernels.
import os

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    import torch

    torch.manual_seed(0)
    yield

"""torch_engine tests: ``@pytest.mark.gpu`` tests skip cleanly when no CUDA device is present."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _skip_gpu_without_cuda(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")

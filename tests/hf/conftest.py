"""Fixtures for the HF backend tests; importable helpers live in ``hf_helpers`` (which skips
these tests when transformers is missing)."""

import pytest

from hf_helpers import FAMILIES, tiny_model


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")

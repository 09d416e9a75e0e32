"""The transformers / kernels pairs the HF backend refuses before transformers imports."""

import pytest

from hf_helpers import transformers  # noqa: F401  (skips this module without transformers)

from hcpolicy.backends.hf.compat import broken_pair


@pytest.mark.parametrize(
    ("transformers_version", "kernels_version"),
    [("5.0.0", None), ("5.0.0", "0.14.1"), ("5.12.1", "0.11.7"), ("5.13.0", "0.19.1"), ("5.25.0", "0.19.1")],
)
def test_pairs_that_import(transformers_version, kernels_version):
    assert broken_pair(transformers_version, kernels_version) is None


@pytest.mark.parametrize(("transformers_version", "kernels_version"), [("5.0.0", "0.19.1"), ("5.12.1", "0.15.0")])
def test_pairs_that_cannot_import_name_the_fix(transformers_version, kernels_version):
    message = broken_pair(transformers_version, kernels_version)
    assert message is not None
    assert f"transformers {transformers_version}" in message and 'pip install "kernels<0.15"' in message

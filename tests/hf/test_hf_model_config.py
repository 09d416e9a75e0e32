"""The context limit read from a model's config without loading it."""

import pytest

from hcpolicy.backends.hf.loading import ModelLoadError
from hcpolicy.backends.hf.model_config import context_limit, gguf_context_length

from hf_helpers import tiny_model

gguf = pytest.importorskip("gguf")


def test_gguf_header_read_past_arrays(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])  # skipped on the way
    writer.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.125])
    writer.add_context_length(4096)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert gguf_context_length(path) == 4096
    assert context_limit(str(path)) == 4096


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"nope" * 8)
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_context_length(path)


def test_folder_and_missing_paths(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path)
    assert context_limit(str(tmp_path)) == 1024
    with pytest.raises(ModelLoadError, match="no model folder at"):  # before anything loads
        context_limit(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no GGUF file at"):
        context_limit(str(tmp_path / "missing.gguf"))

"""The GGUF conversion cache: a second load reads the saved folder (same logits, tokenizer
and stop tokens), writes are atomic, and a broken entry is rebuilt with a notice. The
conversion itself is a tiny random model here; test_hf_smollm runs the real one."""

import logging

import pytest
import torch

from hcpolicy.backends.hf import gguf_cache, loading
from hcpolicy.backends.hf.stops import GGUFTokens, stop_token_ids

from hf_helpers import tiny_model
from test_hf_evaluate import char_tokenizer


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A '.gguf' file whose 'conversion' is a tiny llama + char tokenizer; counts conversions."""
    monkeypatch.setenv("HCPOLICY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF not really" * 100)
    conversions = []
    real = loading._from_pretrained

    def from_pretrained(source, dtype, **kwargs):
        if "gguf_file" in kwargs:
            conversions.append(source)
            return tiny_model("llama"), char_tokenizer()
        return real(source, dtype, **kwargs)

    monkeypatch.setattr(loading, "_from_pretrained", from_pretrained)
    monkeypatch.setattr(loading, "gguf_tokens", lambda p: GGUFTokens(stop_ids=(5, 7)))
    return path, conversions


def logits(loaded):
    with torch.no_grad():
        return loaded.model(torch.arange(3, 40).view(1, -1)).logits


def entry_of(path):
    from transformers import __version__

    return gguf_cache.entry_path(path, __version__)


def test_second_load_reads_the_cache(fake_gguf, tmp_path):
    path, conversions = fake_gguf
    first = loading.load(str(path))
    entry = entry_of(path)
    assert conversions == [str(tmp_path)] and entry.is_dir()
    assert not list(entry.parent.glob(".partial-*"))
    second = loading.load(str(path))
    assert len(conversions) == 1
    assert torch.equal(logits(first), logits(second))
    assert stop_token_ids(first.model) == stop_token_ids(second.model) == {5, 7}
    assert second.tokenizer.eos_token_id == 5  # the GGUF's eos, not the conversion's '~'
    assert second.tokenizer("a b~c")["input_ids"] == first.tokenizer("a b~c")["input_ids"]
    assert second.tokenizer.pad_token == first.tokenizer.pad_token


def test_a_changed_file_is_a_new_entry(fake_gguf):
    path, conversions = fake_gguf
    loading.load(str(path))
    path.write_bytes(b"another file")
    loading.load(str(path))
    assert len(conversions) == 2 and len(list(entry_of(path).parents[1].iterdir())) == 2


@pytest.mark.parametrize("damage", ["truncate", "manifest", "unlisted"])
def test_a_broken_entry_is_rebuilt_with_a_notice(fake_gguf, caplog, damage):
    path, conversions = fake_gguf
    good = logits(loading.load(str(path)))
    entry = entry_of(path)
    if damage == "truncate":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "manifest":
        (entry / gguf_cache.MANIFEST).unlink()
    else:  # sizes all match, but the weights are not a safetensors file
        (entry / "model.safetensors").write_bytes(b"x" * (entry / "model.safetensors").stat().st_size)
    with caplog.at_level(logging.WARNING):
        again = loading.load(str(path))
    assert len(conversions) == 2 and torch.equal(logits(again), good)
    notices = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    gguf_cache.check(entry)  # rebuilt
    loading.load(str(path))
    assert len(conversions) == 2


def test_an_interrupted_write_leaves_nothing_trusted(fake_gguf, monkeypatch, caplog):
    path, conversions = fake_gguf
    save = gguf_cache._save_model

    def crash(model, folder):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_cache, "_save_model", crash)
    with caplog.at_level(logging.WARNING):
        loaded = loading.load(str(path))
    assert stop_token_ids(loaded.model) == {5, 7}  # the conversion is still used
    assert any("could not cache" in r.getMessage() for r in caplog.records)
    entry = entry_of(path)
    assert not entry.exists() and not list(entry.parent.glob(".partial-*"))
    (entry.parent / ".partial-killed").mkdir()  # what a killed process leaves behind
    monkeypatch.setattr(gguf_cache, "_save_model", save)
    loading.load(str(path))
    assert len(conversions) == 2
    gguf_cache.check(entry)


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HCPOLICY_CACHE", str(tmp_path / "a"))
    assert gguf_cache.cache_root() == tmp_path / "a"
    monkeypatch.delenv("HCPOLICY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "hcpolicy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache.cache_root() == tmp_path / "home" / ".cache" / "hcpolicy"

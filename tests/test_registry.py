import os
import subprocess
import sys
import textwrap

import pytest

from hcpolicy.registry import POLICIES, Registry

PLUGIN = textwrap.dedent(
    '''
    import attrs
    from hcpolicy.policy import Policy

    @attrs.define(kw_only=True)
    class NoopPolicy(Policy):
        """A third-party policy that keeps everything."""
        strength: int = 3

        def prefill(self, obs):
            return ()
    '''
)


@pytest.fixture
def plugin_dir(tmp_path):
    """A fake installed distribution declaring entry points in both hcpolicy groups."""
    (tmp_path / "hc_fake_plugin.py").write_text(PLUGIN)
    info = tmp_path / "hc_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hc-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[hcpolicy.policies]\nnoop = hc_fake_plugin:NoopPolicy\n\n"
        "[hcpolicy.backends]\nfakebackend = hc_fake_plugin:NoopPolicy\n"
    )
    return tmp_path


def test_entry_point_policies_are_discovered(plugin_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_dir))
    reg = Registry("policy", "hcpolicy.policies", builtins={"x": "hcpolicy.policy.base:Policy"})
    assert reg.names() == ["noop", "x"]
    cls = reg.get("noop")
    assert cls.__name__ == "NoopPolicy" and cls().strength == 3


def test_hc_list_shows_plugins_and_builtins(plugin_dir):
    env = dict(os.environ, COLUMNS="250", PYTHONPATH=str(plugin_dir) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(
        [sys.executable, "-m", "hcpolicy.cli", "list"], env=env, capture_output=True, text=True, check=True,
        cwd=plugin_dir,
    ).stdout  # fmt: skip
    assert "noop" in out and "strength=3" in out
    assert "fakebackend" in out
    for name in POLICIES.names():
        assert name in out
    assert "failed to load" not in out
    assert "profile (required)" in out  # heterocache needs a profile


def test_registry_errors():
    reg = Registry("policy", "hcpolicy.nothing-here")
    reg.register("a", object)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", int)
    with pytest.raises(ValueError, match="alphanumeric"):
        reg.register("bad name", int)
    with pytest.raises(KeyError, match="unknown policy 'b'; known: a"):
        reg.get("b")


def test_decorator_registration():
    reg = Registry("policy", "hcpolicy.nothing-here")

    @reg.register("mine")
    class Mine:
        pass

    assert reg.get("mine") is Mine

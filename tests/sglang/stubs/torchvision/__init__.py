"""Import-only stand-in for torchvision, for running SGLang's CPU classes in tests.

Why: sglang 0.5.23 imports torchvision while importing its memory pools (through
``sglang.srt.configs`` -> ``multimodal/internvl_utils``), and transformers, once it finds
any ``torchvision`` module, imports ``torchvision.io`` and ``torchvision.transforms.v2``.
No CPU build of torchvision is on PyPI (its wheels need ``libc10_cuda.so``, and
installing one pulls a CUDA torch). Nothing hcpolicy's tests run touches images, so every
``torchvision.*`` module here is empty, and any name read from it is a placeholder that
raises the moment it is called.

tests/sglang/conftest.py puts this folder on ``sys.path`` only when no real torchvision
is importable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+hcpolicy.stub"


class _PlaceholderMeta(type):
    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")

    def __call__(cls, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{cls.__qualname__}: torchvision is stubbed out in hcpolicy's sglang tests")


def _placeholder(qualname: str) -> type:
    return _PlaceholderMeta(qualname.rsplit(".", 1)[-1], (), {"__qualname__": qualname})


def _module_getattr(module_name: str):
    def __getattr__(name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{module_name}.{name}")

    return __getattr__


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``torchvision.<sub>`` an empty package of placeholders."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


__getattr__ = _module_getattr(__name__)
if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())

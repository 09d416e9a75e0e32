"""What ``hc list`` shows of a registered class: its summary line and constructor options.

Registries name built-ins by lazy ``"module:attr"`` paths, and importing a policy module
imports torch, a backend's transformers (seconds each). ``describe`` reads the class from
its module's source instead, without executing the module; it returns None when the source
says more than it can read (a computed default, a missing file), and the caller imports.
``describe_class`` gives the same text from an imported class; tests pin the two together.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import inspect
import types
from pathlib import Path
from typing import Any

import attrs

_ATTRS_DECORATORS = {"define", "frozen", "mutable", "s", "attrs"}
_FIELD_CALLS = {"field", "ib", "attrib"}


@attrs.frozen
class Description:
    summary: str
    options: str


class _Unreadable(Exception):
    """The source holds something only running it would tell."""


def describe(path: str) -> Description | None:
    """``Description`` of the class at ``"module:attr"``, read from source; None if unreadable."""
    module, _, attr = path.partition(":")
    try:
        cls, found_in = _find_class(module, attr)
        fields = _fields(cls, found_in)
    except (_Unreadable, OSError, SyntaxError, ImportError, ValueError):
        return None
    doc = ast.get_docstring(cls) or ""
    return Description(doc.splitlines()[0] if doc else "", _render([(f[1], f[2]) for f in fields]))


def describe_class(cls: object) -> Description:
    """``Description`` of an imported class (what ``describe`` reads from its source)."""
    doc = inspect.getdoc(cls) or ""
    summary = doc.splitlines()[0] if doc else ""
    if not isinstance(cls, type) or not attrs.has(cls):
        return Description(summary, "")
    fields: list[tuple[str, str | None]] = []
    earlier: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if not field.init:
            continue
        name = field.alias or field.name
        if field.default is attrs.NOTHING:
            fields.append((name, None))
            continue
        if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            factory = field.default.factory
            if isinstance(factory, type):  # a class: its name reads better than its repr
                fields.append((name, f"{factory.__name__}()"))
                continue
            value = factory(types.SimpleNamespace(**earlier)) if field.default.takes_self else factory()
        else:
            value = field.default
        earlier[field.name] = value
        fields.append((name, repr(value)))
    return Description(summary, _render(fields))


def _render(fields: list[tuple[str, str | None]]) -> str:
    return ", ".join(f"{name} (required)" if shown is None else f"{name}={shown}" for name, shown in fields)


# -- locating source without importing ---------------------------------------------------------


def _source(module: str) -> Path:
    """The file of ``module``, found without importing it or its parent packages (whose
    ``__init__`` may import torch)."""
    parts = module.split(".")
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            break
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), spec.submodule_search_locations)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise _Unreadable(module)
    return Path(spec.origin)


def _find_class(module: str, attr: str) -> tuple[ast.ClassDef, str]:
    """(class definition, module defining it), following ``from x import y``."""
    path = _source(module)
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == attr:
            return node, module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == attr:
                    source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
                    return _find_class(source, alias.name)
    raise _Unreadable(f"{module}:{attr}")


# -- attrs fields from a class definition ---------------------------------------------------


Field = tuple[str, str, str | None, Any]  # attribute name, option name, shown default (None: required), value


def _fields(cls: ast.ClassDef, module: str) -> list[Field]:
    """The class's init fields in attrs' order: inherited ones not redefined, then its own."""
    inherited: list[Field] = []
    for base in cls.bases:
        if not isinstance(base, ast.Name):
            raise _Unreadable(ast.unparse(base))
        if base.id in ("ABC", "object", "Generic"):
            continue
        base_cls, base_module = _find_class(module, base.id)
        inherited += _fields(base_cls, base_module)
    if not _is_attrs(cls):  # annotations of a plain class are not fields
        return inherited
    own = _own_fields(cls, {f[0]: f[3] for f in inherited})
    names = {f[0] for f in own}
    return [f for f in inherited if f[0] not in names] + own


def _is_attrs(cls: ast.ClassDef) -> bool:
    for deco in cls.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr in _ATTRS_DECORATORS:
            return True
    return False


def _own_fields(cls: ast.ClassDef, earlier: dict[str, Any]) -> list[Field]:
    """Init fields of ``cls``'s own body; ``earlier`` (attribute -> value) feeds takes_self factories."""
    out = []
    namespace = dict(earlier)
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        if "ClassVar" in ast.unparse(node.annotation):
            continue
        name = node.target.id
        default, factory, takes_self, init, alias = _field_args(node.value)
        if not init:
            continue
        option = alias or name.lstrip("_")
        if default is None and factory is None:
            out.append((name, option, None, None))
            continue
        if factory is None:
            value = _literal(default)
            shown = repr(value)
        elif isinstance(factory, ast.Name):  # a class or function: shown by name, as imported
            value, shown = None, f"{factory.id}()"
        else:
            value = _call(factory, takes_self, namespace)
            shown = repr(value)
        namespace[name] = value
        out.append((name, option, shown, value))
    return out


def _field_args(value: ast.expr | None) -> tuple[ast.expr | None, ast.expr | None, bool, bool, str | None]:
    """(default, factory, takes_self, init, alias) of an annotated class attribute."""
    if value is None:
        return None, None, False, True, None
    if not (isinstance(value, ast.Call) and _called(value) in _FIELD_CALLS):
        return _unfactory(value, None, False) + (True, None)
    kw = {k.arg: k.value for k in value.keywords if k.arg}
    init = not (isinstance(kw.get("init"), ast.Constant) and kw["init"].value is False)
    alias = kw["alias"].value if isinstance(kw.get("alias"), ast.Constant) else None
    takes_self = isinstance(kw.get("takes_self"), ast.Constant) and bool(kw["takes_self"].value)
    if "default" in kw:
        return _unfactory(kw["default"], None, False) + (init, alias)
    return None, kw.get("factory"), takes_self, init, alias


def _unfactory(
    default: ast.expr, factory: ast.expr | None, takes_self: bool
) -> tuple[ast.expr | None, ast.expr | None, bool]:
    """``default=attrs.Factory(f, takes_self=...)`` as a factory; anything else stays a default."""
    if isinstance(default, ast.Call) and _called(default) == "Factory" and default.args:
        kw = {k.arg: k.value for k in default.keywords if k.arg}
        flag = kw.get("takes_self")
        return None, default.args[0], isinstance(flag, ast.Constant) and bool(flag.value)
    return default, factory, takes_self


def _called(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _literal(node: ast.expr | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        raise _Unreadable(ast.unparse(node)) from None


def _call(factory: ast.expr, takes_self: bool, namespace: dict[str, Any]) -> Any:
    """The value of a lambda factory whose body reads only literals and earlier fields."""
    if not isinstance(factory, ast.Lambda):
        raise _Unreadable(ast.unparse(factory))
    args = [a.arg for a in factory.args.args]
    scope = {args[0]: types.SimpleNamespace(**namespace)} if takes_self and args else {}
    try:
        code = compile(ast.Expression(factory.body), "<default>", "eval")
        return eval(code, {"__builtins__": {}}, scope)  # the package's own source, minus builtins
    except Exception:
        raise _Unreadable(ast.unparse(factory)) from None

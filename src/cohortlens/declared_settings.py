"""The settings the library declares (names, types, literal values), read from its source without importing it.

The config check (`cohortlens.config`) runs every time Snakemake parses the Snakefile: once per run, and once per
job on a cluster. Importing the settings classes would import torch and MONAI with the models (~8 s on a loaded
machine), so their declarations are read from the source instead. Only plain declarations are followed:

- a dataclass: its annotated fields (`ProbeSettings`, `TrainSettings`, ...);
- a function or method: its parameters with a default (`BetaVAE.__init__`, `erase_inlp`);
- a module-level literal (dict, list, tuple; `**OTHER` splats of module-level literals are resolved):
  the dict's keys (`report.sections.DEFAULTS`) or the value itself (`registry.PRESETS`).

Anything else raises `NotDeclarative` naming the declaration, so a declaration that stops being plain fails
loudly instead of being read wrong (tests/test_config.py compares the reading with the imported objects).

A reference is `package.module:Name`, `package.module:Class.method` or `package.module:NAME.key` (a key of a
literal dict).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any


class NotDeclarative(ValueError):
    """A reference to something this reader cannot follow without running the library."""


class _Unknown:
    """A value that is not a literal (a call, an imported name): its key counts, its type is not checked."""

    def __repr__(self) -> str:
        return "<not a literal>"


UNKNOWN = _Unknown()

# annotation name -> JSON-schema type
_TYPES = {
    "int": "integer", "float": "number", "bool": "boolean", "str": "string",
    "dict": "object", "Mapping": "object", "list": "array", "tuple": "array", "Sequence": "array",
}


def declared_keys(ref: str) -> dict[str, dict]:
    """Setting name -> JSON-schema fragment (its type, as far as the declaration says) of a dataclass,
    a function's parameters with defaults, or a literal dict's keys."""
    node, scope = _find(ref)
    if isinstance(node, ast.ClassDef):
        return _dataclass_fields(node, ref)
    if isinstance(node, ast.FunctionDef):
        return _parameters(node)
    value = _resolve(node, scope, ref)
    if not isinstance(value, dict):
        raise NotDeclarative(f"{ref} is not a dict literal, a dataclass or a function")
    return {str(k): _value_schema(v) for k, v in value.items()}


def declared_value(ref: str) -> Any:
    """The literal value a module-level name (or a key of a literal dict) is bound to."""
    node, scope = _find(ref)
    return _resolve(node, scope, ref)


# ------------------------------------------------------------------------------------------------ finding


@functools.cache
def _module_scope(module: str) -> dict[str, ast.AST]:
    """Module-level names -> their class / function definition or the expression they are bound to."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise NotDeclarative(f"no Python source for module {module}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)
    scope: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            scope[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            scope[node.targets[0].id] = node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            scope[node.target.id] = node.value
    return scope


def _find(ref: str) -> tuple[Any, dict[str, ast.AST]]:
    """The definition `ref` names (an AST node, or a literal value for NAME.key) and its module's scope."""
    module, _, qualname = ref.partition(":")
    if not qualname:
        raise NotDeclarative(f"{ref!r} is not of the form package.module:Name")
    scope = _module_scope(module)
    first, *rest = qualname.split(".")
    if first not in scope:
        raise NotDeclarative(f"{ref}: {module} declares no {first}")
    node: Any = scope[first]
    for part in rest:
        if isinstance(node, ast.ClassDef):
            members = {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            if part not in members:
                raise NotDeclarative(f"{ref}: {node.name} declares no {part}")
            node = members[part]
        else:
            value = _resolve(node, scope, ref)
            if not isinstance(value, dict) or part not in value:
                raise NotDeclarative(f"{ref}: no key {part!r}")
            node = value[part]
    return node, scope


# ------------------------------------------------------------------------------------------------ reading


def _dataclass_fields(cls: ast.ClassDef, ref: str) -> dict[str, dict]:
    # a base class could add fields this reader does not see
    if cls.bases or cls.keywords:
        raise NotDeclarative(f"{ref}: a class with base classes is not read statically")
    fields = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" in ast.unparse(node.annotation):
                continue
            fields[node.target.id] = _annotation_schema(node.annotation)
    return fields


def _parameters(fn: ast.FunctionDef) -> dict[str, dict]:
    """Parameters with a default (the others are inputs, not settings)."""
    args = fn.args
    positional = args.posonlyargs + args.args
    with_default = positional[len(positional) - len(args.defaults):] if args.defaults else []
    with_default += [a for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return {a.arg: _annotation_schema(a.annotation) for a in with_default if a.arg not in ("self", "cls")}


def _resolve(node: Any, scope: dict[str, ast.AST], ref: str, seen: frozenset = frozenset()) -> Any:
    """A literal expression as a Python value; splats and names of module-level literals are followed,
    anything else becomes UNKNOWN."""
    if not isinstance(node, ast.AST):
        return node  # already a value (a key of a resolved dict)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _resolve(node.operand, scope, ref, seen)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
        return UNKNOWN
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_resolve(e, scope, ref, seen) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if key is None:  # **OTHER
                merged = _resolve(value, scope, ref, seen)
                if not isinstance(merged, dict):
                    raise NotDeclarative(f"{ref}: cannot follow the splat **{ast.unparse(value)}")
                out.update(merged)
            else:
                out[_resolve(key, scope, ref, seen)] = _resolve(value, scope, ref, seen)
        return out
    if isinstance(node, ast.Name) and node.id in scope and node.id not in seen:
        target = scope[node.id]
        if not isinstance(target, (ast.ClassDef, ast.FunctionDef)):
            return _resolve(target, scope, ref, seen | {node.id})
    return UNKNOWN


# ------------------------------------------------------------------------------------------------ types


def _annotation_schema(node: ast.AST | None) -> dict:
    """JSON-schema type of an annotation: int, float, str, bool, dict, list[...] / tuple[...], X | None,
    Optional[X]; anything else is not constrained."""
    if node is None:
        return {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _annotation_schema(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Constant) and node.value is None:
        return {"type": ["null"]}
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([_annotation_schema(node.left), _annotation_schema(node.right)])
    if isinstance(node, ast.Subscript):
        base = _name(node.value)
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base == "Optional":
            return _union([_annotation_schema(args[0]), {"type": ["null"]}])
        if base == "Union":
            return _union([_annotation_schema(a) for a in args])
        out = _annotation_schema(node.value)
        if out.get("type") == ["array"]:
            items = [a for a in args if not (isinstance(a, ast.Constant) and a.value is Ellipsis)]
            if len(items) == 1 and _annotation_schema(items[0]):
                out["items"] = _annotation_schema(items[0])
        return out
    kind = _TYPES.get(_name(node))
    return {"type": [kind]} if kind else {}


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):  # typing.Sequence
        return node.attr
    return ""


def _union(parts: list[dict]) -> dict:
    if any(not p for p in parts):  # one side unconstrained: so is the union
        return {}
    types = [t for p in parts for t in p["type"]]
    out: dict = {"type": sorted(set(types), key=types.index)}
    items = [p["items"] for p in parts if "items" in p]
    if len(items) == 1:
        out["items"] = items[0]
    return out


def _value_schema(value: Any) -> dict:
    """JSON-schema type of a default value (bool before int: True is an int in Python)."""
    for py, kind in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (dict, "object"),
                     ((list, tuple), "array")):
        if isinstance(value, py):
            return {"type": [kind]}
    return {}  # None or not a literal: any type

"""Loading a recipe: YAML files, ``extends:``, dotted overrides, ``${...}`` references, then validation
against the schema (:mod:`cpt.recipe.schema`), with one-line error messages that name the key at fault.

A recipe file may name parents with ``extends:`` (a path or a list, relative to the file); parents are
merged depth-first, dicts recursively, anything else replaced. Dotted overrides from the command line
(``schedule.max_lr=1e-3``, values parsed as YAML) are applied on top, then ``${a.b}`` references are
filled from the merged recipe, then the result is validated. :func:`recipe_diff` compares two resolved
recipes key by key.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cpt.errors import CptError
from cpt.recipe.schema import Recipe


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge (``extends:``), override, interpolate and validate a recipe; CptError on any problem."""
    data = _load_tree(Path(path), chain=())
    for item in overrides:
        _apply_override(data, item)
    data = _interpolate(data, data)
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise CptError(_explain(e, data, source)) from None


def _load_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise CptError(f"{path}: extends itself through {' -> '.join(p.name for p in chain)}")
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise CptError(f"recipe file not found: {path}{where}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise CptError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise CptError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _merge(merged, _load_tree(path.parent / parent, chain + (path,)))
    return _merge(merged, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise CptError(f"override {item!r}: expected key.path=value, e.g. schedule.max_lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):  # stages.1.tokens: an index into a list
            if not part.isdigit() or int(part) >= len(node):
                raise CptError(f"override {item!r}: {where} is not an index of a list of {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise CptError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


_REF = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _interpolate(node: Any, root: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, root) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, root) for v in node]
    if isinstance(node, str) and "${" in node:
        def sub(m: re.Match[str]) -> str:
            value: Any = root
            for part in m.group(1).split("."):
                if not isinstance(value, dict) or part not in value:
                    raise CptError(f"${{{m.group(1)}}}: no such key in the recipe")
                value = value[part]
            if isinstance(value, (dict, list)):
                raise CptError(f"${{{m.group(1)}}}: refers to a section, not a value")
            return str(value)

        return _REF.sub(sub, node)
    return node


# ------------------------------------------------------------------------------------ error messages


def _explain(err: ValidationError, data: dict[str, Any], source: str) -> str:
    """One line naming the key, the value and what was expected (plus a count of further problems)."""
    errors = err.errors(include_url=False)
    first = errors[0]
    key, value, present = _locate(first["loc"], data)
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        choices = _field_names(first["loc"][:-1], data)
        close = difflib.get_close_matches(str(first["loc"][-1]), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (expected one of: {', '.join(choices)})"
        return f"{source}: {key}: unknown key{hint}{more}"
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        key = f"{key}.kind"
        value, present = (value or {}).get("kind") if isinstance(value, dict) else None, True
        kinds = first.get("ctx", {}).get("expected_tags", "")
        return f"{source}: {key} = {value!r}: expected one of {kinds}{more}"
    if first["type"] == "missing":
        return f"{source}: {key}: required key is missing{more}"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if not key or msg.startswith(key.split(".")[0]):
            return f"{source}: {msg}{more}"
    shown = f" = {value!r}" if present else ""
    return f"{source}: {key}{shown}: {msg}{more}"


def _locate(loc: tuple[Any, ...], data: Any) -> tuple[str, Any, bool]:
    """Map a pydantic loc onto the recipe's keys, dropping union-tag segments (e.g. 'wsd')."""
    parts: list[str] = []
    node, present = data, True
    for item in loc:
        if isinstance(node, dict) and item in node:
            node = node[item]
            parts.append(str(item))
        elif isinstance(node, (list, tuple)) and isinstance(item, int) and item < len(node):
            node = node[item]
            parts.append(str(item))
        elif isinstance(node, dict) and node.get("kind") == item:
            continue  # discriminated-union tag: not a key the user wrote
        elif isinstance(item, str) and ("[" in item or item.startswith("function-")):
            continue  # pydantic's internal names for union members / validators
        else:
            parts.append(str(item))
            present = False
    return ".".join(parts), node if present else None, present


def _field_names(loc: tuple[Any, ...], data: Any) -> list[str]:
    """Field names allowed at ``loc`` in the schema, following the input through unions."""
    model: Any = Recipe
    node = data
    for item in loc:
        if isinstance(node, dict) and node.get("kind") == item:
            continue
        if isinstance(item, str) and "[" in item:
            continue  # a union member's tag
        if isinstance(item, int) and isinstance(node, list):
            node = node[item] if item < len(node) else None
            continue  # an element of a list: _model_of(list[X]) finds X
        ann = _model_of(model, node)
        if ann is None or item not in ann.model_fields:
            return []
        model = ann.model_fields[item].annotation
        node = node.get(item) if isinstance(node, dict) else None
    ann = _model_of(model, node)
    return list(ann.model_fields) if ann is not None else []


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    models = [m for arg in typing.get_args(annotation) if (m := _model_of(arg, node)) is not None]
    for m in models:
        kind = m.model_fields.get("kind")
        if kind is None or not isinstance(node, dict):
            return m
        if node.get("kind") in typing.get_args(kind.annotation):
            return m
    # a single model with a defaulted kind (e.g. `PeftConfig | None`): not a union to pick from
    return models[0] if len(models) == 1 else None


# --------------------------------------------------------------------------------- comparing recipes


def recipe_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved recipes: {key: (old, new)}."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out

"""The scenario file reference, generated from the pydantic schema so it cannot drift from it."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from amp4ec.scenario import Scenario


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " or ".join(repr(v).replace("'", '"') for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + " (optional)"
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return f"list of {_type_name(item)}"
    if origin is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
    return f"`{field.default!r}`".replace("'", '"')


def _constraints(field: Any) -> str:
    parts = []
    for item in field.metadata:
        for name, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "length >="), ("pattern", "matches")):
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Return the pydantic models inside an annotation such as ``list[NodeSpec]`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_nested_models(arg))
    return found


def _section(model: type[BaseModel], title: str, seen: set[type]) -> list[str]:
    lines = [f"## {title}", ""]
    doc = (model.__doc__ or "").strip()
    if doc:
        lines += [doc.splitlines()[0], ""]
    lines += ["| key | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        lines.append(
            f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {_constraints(field)} | {field.description or ''} |"
        )
        for sub in _nested_models(field.annotation):
            if sub not in seen:
                seen.add(sub)
                origin = typing.get_origin(field.annotation)
                nested.append((sub, f"[[{key}]]" if origin is list else f"[{key}]"))
    lines.append("")
    for sub, sub_title in nested:
        lines += _section(sub, sub_title, seen)
    return lines


def scenario_reference() -> str:
    """Return the Markdown reference of every scenario key, its type, default and meaning."""
    lines = [
        "# Scenario file reference",
        "",
        "Generated from the schema in `amp4ec/scenario.py` by `amp4ec scenario-reference`; do not edit by hand.",
        "A scenario is a TOML file. Unknown keys are rejected, so a misspelt key fails instead of being ignored.",
        "",
    ]
    lines += _section(Scenario, "Top level", {Scenario})
    from amp4ec.timeline import timeline_reference

    lines += timeline_reference()
    return "\n".join(lines).rstrip() + "\n"

"""Config reference in Markdown, generated from the pydantic model (README keeps a copy; a test
checks it is current): ``python -m edge_app.configdoc``."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel

from edge_app.config import ServiceConfig


def _models(ann) -> list[type[BaseModel]]:
    out = []
    args = typing.get_args(ann) or (ann,)
    for a in args:
        if isinstance(a, type) and issubclass(a, BaseModel):
            out.append(a)
        elif typing.get_args(a):
            out.extend(_models(a))
    return out


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    if origin is list:
        return f"list of {_type_name(typing.get_args(ann)[0])}"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if field.is_required():
            default = "**required**"
        elif field.default_factory is not None:
            default = "(section)"
        else:
            default = f"`{field.default!r}`" if field.default is not None else "`null`"
        if name == "type" and prefix.startswith("cameras[]"):
            default = "**required**"
        if name == "backend" and prefix.startswith("model (") and field.default is None:
            default = "**required**"
        out.append(f"| `{path}` | {_type_name(field.annotation)} | {default} | {field.description or ''} |")
        for sub in _models(field.annotation):
            sub_prefix = f"{path}[]." if typing.get_origin(field.annotation) is list else f"{path}."
            if len(_models(field.annotation)) > 1:  # a tagged union: say which member the keys belong to
                member = f"({sub.__name__}) ."
                sub_prefix = f"{path}[] {member}" if sub_prefix.endswith("[].") else f"{path} {member}"
            out.extend(rows(sub, sub_prefix))
    return out


def markdown() -> str:
    head = "| key | type | default | meaning |\n|---|---|---|---|"
    seen: list[str] = []
    for r in rows(ServiceConfig):
        if r not in seen:
            seen.append(r)
    return head + "\n" + "\n".join(seen) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

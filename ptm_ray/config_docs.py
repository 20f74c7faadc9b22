"""``ptm-ray config show``: a resolved config as YAML, each field under its one-line doc, changed values
marked with their default.

The docs are the attribute docstrings in ``ptm_ray/config.py`` (the string under each field). Python keeps
no such string at run time, so they are read from the source with ``ast``. The output is valid YAML that
``load_config`` reads back to the same config.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import typing
from typing import Any

import yaml

from ptm_ray import config as config_module
from ptm_ray.config import Config

__all__ = ["field_docs", "format_config"]


def field_docs() -> dict[str, dict[str, str]]:
    """Class name -> field name -> its docstring on one line, read from ``ptm_ray/config.py``'s source.

    Empty when the source is not installed (only compiled files): the config still shows, without docs.
    """
    try:
        source = inspect.getsource(config_module)
    except (OSError, TypeError):
        return {}
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for field, after in zip(node.body, node.body[1:]):
            if (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[field.target.id] = _one_line(after.value.value)
    return docs


def format_config(cfg: Config, source: str = "") -> str:
    """``cfg`` as commented YAML: per group, each field's doc as a comment above ``name: value``, and
    ``# default: ...`` after a value that differs from the default. ``source`` heads the text."""
    docs = field_docs()
    hints = typing.get_type_hints(Config)
    lines = [f"# ptm_ray config: {source}" if source else "# ptm_ray config"]
    for group in dataclasses.fields(Config):
        cls = hints[group.name]
        value, default = getattr(cfg, group.name), cls()
        lines += ["", f"{group.name}:"]
        lines += _group_lines(cls, value, default, docs, "  ")
    return "\n".join(lines) + "\n"


def _group_lines(cls: type, value: Any, default: Any, docs: dict[str, dict[str, str]], indent: str) -> list[str]:
    """One group's fields, each under its doc; a nested group (``model.lora``) indented one level further."""
    lines = []
    for field in dataclasses.fields(cls):
        doc = docs.get(cls.__name__, {}).get(field.name)
        if doc:
            lines.append(f"{indent}# {doc}")
        current, initial = getattr(value, field.name), getattr(default, field.name)
        if dataclasses.is_dataclass(current):
            lines.append(f"{indent}{field.name}:")
            lines += _group_lines(type(current), current, initial, docs, indent + "  ")
            continue
        note = "" if current == initial else f"  # default: {_yaml_value(initial)}"
        lines.append(f"{indent}{field.name}: {_yaml_value(current)}{note}")
    return lines


def _one_line(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip().replace("``", "`")


def _yaml_value(value: Any) -> str:
    """One value as inline YAML that reads back to itself (flow style for lists and mappings)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

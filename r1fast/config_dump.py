"""Writing configs back out: the resolved config as TOML (with each field's docstring as a comment),
and the ``--help`` text of every option. The inverse of ``r1fast.config_io``'s loading."""

from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import re
import sys
import textwrap
from typing import Any

from r1fast.config_io import _fields, _is_section, _type_name, bound_text, load_config
from r1fast.safe_write import write_file

__all__ = ["config_to_toml", "save_config", "field_docs", "describe", "print_help"]

USAGE = """usage: [--config PATH] [--section.field VALUE | --section.field=VALUE ...]
Values: bool true/false/1/0 (a bare --flag means true), numbers, text, none for optional fields,
lists as a,b,c or [a, b], tables as {name = 1.0}; one table entry as --section.table.name VALUE.
A value that itself starts with -- must be written --section.field=VALUE."""


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else _toml_string(k)


def _toml_literal(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _dump_section(obj: Any, prefix: str, lines: list[str], comments: bool) -> None:
    docs = field_docs(type(obj))
    subsections = []
    for name, (_, tp) in _fields(type(obj)).items():
        if _is_section(tp):
            subsections.append(name)
            continue
        if comments:
            lines += [f"# {line}" for line in docs.get(name, "").splitlines()]
        lines.append(f"{_toml_key(name)} = {_toml_literal(getattr(obj, name))}")
    for name in subsections:
        lines += ["", f"[{prefix}{name}]"]
        _dump_section(getattr(obj, name), f"{prefix}{name}.", lines, comments)


def config_to_toml(cfg: Any, *, comments: bool = True) -> str:
    """The resolved config as TOML; ``load_config`` of this text gives back an equal ``Config``."""
    lines = ["# r1fast resolved config (None is written as \"none\")"]
    _dump_section(cfg, "", lines, comments)
    return "\n".join(lines).lstrip("\n") + "\n"


def save_config(cfg: Any, path: str) -> None:
    """Write ``config_to_toml(cfg)`` to ``path`` (creating parent directories)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_file(path, config_to_toml(cfg))  # replaced, never written through a symlink at ``path``


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """name -> docstring (the string literal right under the field), read from the class source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):  # source unavailable (e.g. frozen app): no docs, not an error
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def describe(cfg_cls: type, prefix: str = "", defaults: Any = None) -> str:
    """Every option of ``cfg_cls`` as ``--key TYPE = default`` followed by its docstring (for --help).

    ``defaults``: an instance whose values are shown (e.g. the recipe a command runs when given no
    --config); None shows the dataclass defaults.
    """
    out = []
    defaults = cfg_cls() if defaults is None else defaults
    docs = field_docs(cfg_cls)
    for name, (f, tp) in _fields(cfg_cls).items():
        key = f"{prefix}{name}"
        if _is_section(tp):
            out += ["", f"[{key}]  {inspect.cleandoc(tp.__doc__ or '')}".rstrip(),
                    describe(tp, key + ".", getattr(defaults, name))]
            continue
        bounds = f.metadata.get("bounds", {})
        rng = ", ".join(f"{'>=' if k == 'ge' else '>' if k == 'gt' else '<=' if k == 'le' else '<'} {bound_text(v)}"
                        for k, v in bounds.items())
        default = getattr(defaults, name)
        shown = "none" if default is None else _toml_literal(default)
        out.append(f"  --{key} {_type_name(tp)} = {shown}"
                   + (f"  ({rng})" if rng else ""))
        out += [f"      {line}" for line in docs.get(name, "").splitlines()]
    return "\n".join(out).strip("\n")


def print_help(schema: type, shown: str | None, overrides: list[str]) -> None:
    """Print every option with the values a command would run (the file ``shown``, if any, then ``overrides``)
    and exit 0, quietly also when the reader went away (``--help | head`` ended in a BrokenPipeError)."""
    header = USAGE + (f"\nValues shown are those of {shown}" if shown else "")
    if overrides:
        header += (" with " if shown else "\nValues shown are the defaults with ") + "the overrides given"
    header += "." if shown or overrides else ""
    resolved = load_config(shown, overrides, schema=schema, whole=False) if shown or overrides else None
    try:
        sys.stdout.write(header + "\n\n" + describe(schema, defaults=resolved) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit and would report the same EPIPE: point it at devnull first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(0)

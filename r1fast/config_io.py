"""Generic config machinery: TOML files and ``--section.field value`` overrides onto nested dataclasses.

Every field carries a docstring (the string literal under it, read back with ``ast`` for ``--help``).
Types come from the annotation: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (choices),
``X | None`` (written ``none``), ``list[X]``, ``tuple[X, ...]``/``tuple[X, Y]``, ``dict[str, X]`` and
nested dataclasses (sections). Numeric ranges are declared with ``bounded(default, ge=.., gt=.., le=..,
lt=..)``; they apply to every element of a list/tuple/dict value too. Every error is a one-line
``ConfigError`` naming the full key. ``None`` is dumped as ``"none"`` (TOML has no null). The run's sections
live in ``r1fast.config``; this module knows none of them."""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import functools
import math
import sys
import types
import typing
from dataclasses import field
from typing import Any, Literal

from r1fast.recipe_files import installed_fallback

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib

__all__ = ["ConfigError", "DataError", "bounded", "load_config", "parse_cli", "read_toml", "run_cli"]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the full key."""


class DataError(ValueError):
    """Bad user data (an empty file, a malformed line, a record without a required field): one line naming
    the file (and ``path:line``). The CLIs print it without a traceback, as they do a ``ConfigError``."""


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with a numeric range, checked on load and by ``Config.validate``."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"bounds": bounds})


# ---------------------------------------------------------------------------------------------------
# Types: describe, parse text, coerce values.
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (Field, resolved annotation), in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union annotation {tp!r}: only X | None is allowed")
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _split_optional(tp)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in args)
    elif origin in (list, tuple) and (origin is list or (len(args) == 2 and args[1] is Ellipsis)):
        name = f"list of {_type_name(args[0])}"
    elif origin is tuple:
        name = "(" + ", ".join(_type_name(a) for a in args) + ")"
    elif origin is dict:
        name = f"table of {_type_name(args[0])} to {_type_name(args[1])}"
    else:
        name = getattr(inner, "__name__", repr(inner))
    return f"{name} or none" if optional else name


def _bad(key: str, tp: Any, value: Any, where: str) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{where}")


def _coerce(value: Any, tp: Any, key: str, where: str = "") -> Any:
    """Check a TOML-native value against ``tp`` and normalize it (int -> float, list -> tuple)."""
    inner, optional = _split_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise _bad(key, tp, value, where)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed{where}; allowed values: "
                          + ", ".join(repr(a) for a in args))
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(str(value))  # via str: a TOML integer past float's range is inf, not an OverflowError
    elif inner is str:
        if isinstance(value, str):
            return value
    elif origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        if isinstance(value, (list, tuple)):
            items = [_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in pairs)
    elif origin is dict:
        if isinstance(value, dict):
            return {_coerce(k, args[0], key, where): _coerce(v, args[1], f"{key}.{k}", where)
                    for k, v in value.items()}
    else:
        raise TypeError(f"{key}: unsupported annotation {tp!r} (see the r1fast.config docstring)")
    raise _bad(key, tp, value, where)


def _toml_value(text: str) -> Any:
    return tomllib.loads(f"v = {text}")["v"]


def _from_text(text: str, tp: Any, key: str, where: str) -> Any:
    """Turn a command-line string into a value of ``tp`` (then checked by ``_coerce``)."""
    inner, optional = _split_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    try:
        if inner is bool:
            word = text.strip().lower()
            if word in ("true", "1"):
                return True
            if word in ("false", "0"):
                return False
        elif inner is int:
            return int(text)
        elif inner is float:
            return float(text)
        elif inner is str:
            return text
        elif origin is Literal:
            for choice in args:
                if str(choice) == text:
                    return choice
            return text  # _coerce reports it with the allowed values
        elif origin in (list, tuple):
            if text.lstrip().startswith("["):
                return _toml_value(text)
            parts = [p.strip() for p in text.split(",")] if text.strip() else []
            elem_types = [args[0]] * len(parts) if origin is list or args[-1] is Ellipsis else list(args)
            if len(elem_types) != len(parts):
                raise ValueError
            pairs = enumerate(zip(parts, elem_types, strict=True))
            return [_from_text(p, t, f"{key}[{i}]", where) for i, (p, t) in pairs]
        elif origin is dict:
            if text.lstrip().startswith("{"):
                return _toml_value(text)
    except ConfigError:  # an element's own error names the element: keep it
        raise
    except (ValueError, tomllib.TOMLDecodeError):
        pass
    raise _bad(key, tp, text, where)


def bound_text(bound: float) -> str:
    """A range bound for messages: ints exactly (a seed bound 2**63 - 1 is not 9.22337e+18), floats short."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _check_bounds(value: Any, bounds: dict[str, float], key: str, where: str = "") -> None:
    """Range-check ``value`` (each element of a list/tuple/dict). NaN and +-inf are never in range: no field
    can use them (lr=inf gives NaN weights after one step, temperature=inf uniform sampling)."""
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(v, bounds, f"{key}[{i}]", where)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _check_bounds(v, bounds, f"{key}.{k}", where)
        return
    non_finite = isinstance(value, float) and not math.isfinite(value)
    if not bounds and not non_finite:
        return
    violated = (non_finite
                or ("ge" in bounds and value < bounds["ge"]) or ("gt" in bounds and value <= bounds["gt"])
                or ("le" in bounds and value > bounds["le"]) or ("lt" in bounds and value >= bounds["lt"]))
    if violated:
        lo = "".join(f"{bound_text(bounds[k])} {op} " for k, op in (("ge", "<="), ("gt", "<")) if k in bounds)
        hi = "".join(f" {op} {bound_text(bounds[k])}" for k, op in (("le", "<="), ("lt", "<")) if k in bounds)
        finite = " (finite)" if non_finite else ""
        raise ConfigError(f"{key}: {value!r} is out of range{where}; allowed: {lo}value{hi}{finite}")


def _check_tree(obj: Any, prefix: str) -> None:
    """Type- and range-check every field (normalizing values in place), then call section validate()."""
    for name, (f, tp) in _fields(type(obj)).items():
        key = f"{prefix}{name}"
        value = getattr(obj, name)
        if _is_section(tp):
            if not isinstance(value, tp):
                raise ConfigError(f"{key}: expected section {tp.__name__}, got {value!r}")
            _check_tree(value, key + ".")
            continue
        value = _coerce(value, tp, key)
        _check_bounds(value, f.metadata.get("bounds", {}), key)
        setattr(obj, name, value)
    if prefix and hasattr(obj, "validate"):
        obj.validate()


# ---------------------------------------------------------------------------------------------------
# Loading: TOML tables, then command-line overrides.
# ---------------------------------------------------------------------------------------------------


def _unknown(key: str, cls: type, where: str) -> ConfigError:
    allowed = list(_fields(cls))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    scope = f"[{key.rsplit('.', 1)[0]}]" if "." in key else "the top level"
    return ConfigError(f"unknown key {key!r}{where}{hint}; allowed keys in {scope}: {', '.join(allowed)}")


def _set_leaf(obj: Any, f: dataclasses.Field, tp: Any, value: Any, key: str, where: str) -> None:
    value = _coerce(value, tp, key, where)
    _check_bounds(value, f.metadata.get("bounds", {}), key, where)
    setattr(obj, f.name, value)


def _apply_table(obj: Any, table: dict[str, Any], prefix: str, where: str) -> None:
    fields = _fields(type(obj))
    for name, value in table.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(key, type(obj), where)
        f, tp = fields[name]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section{where}; write it as a [{key}] table, got {value!r}")
            _apply_table(getattr(obj, name), value, key + ".", where)
        else:
            _set_leaf(obj, f, tp, value, key, where)


def _apply_override(cfg: Any, key: str, text: str | None) -> None:
    """Set one dotted key from command-line text; ``text`` None means a bare flag (booleans only)."""
    where = f" (from --{key})"
    obj, parts = cfg, key.split(".")
    for depth, name in enumerate(parts):
        fields = _fields(type(obj))
        sub = ".".join(parts[: depth + 1])
        if name not in fields:
            raise _unknown(sub, type(obj), where)
        f, tp = fields[name]
        rest = parts[depth + 1:]
        if _is_section(tp):
            if not rest:
                raise ConfigError(f"{sub} is a section{where}; set one of its keys: {', '.join(_fields(tp))}")
            obj = getattr(obj, name)
            continue
        inner, _ = _split_optional(tp)
        if text is None and inner is not bool:
            raise ConfigError(f"--{key} needs a value ({_type_name(tp)})")
        if rest and typing.get_origin(inner) is dict and len(rest) == 1:
            # --rewards.weights.format 0.2: replace one entry of a table field.
            value_tp = typing.get_args(inner)[1]
            entry = _from_text(text, value_tp, key, where)
            _set_leaf(obj, f, tp, {**(getattr(obj, name) or {}), rest[0]: entry}, sub, where)
        elif rest:
            raise ConfigError(f"{sub} is not a section{where}; {key!r} does not exist")
        else:
            value = True if text is None else _from_text(text, tp, key, where)
            _set_leaf(obj, f, tp, value, key, where)
        return


def _split_overrides(overrides: list[str]) -> list[tuple[str, str | None]]:
    pairs, i = [], 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"expected an override written --section.field VALUE, got {token!r}")
        if "=" in token:
            key, text = token[2:].split("=", 1)
            i += 1
        elif i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
            key, text = token[2:], overrides[i + 1]
            i += 2
        else:
            key, text = token[2:], None
            i += 1
        pairs.append((key, text))
    return pairs


def read_toml(path: str, what: str = "config file") -> dict[str, Any]:
    """The table of the TOML file at ``path``; any failure is a one-line ``ConfigError`` naming the file. A UTF-8
    BOM (Windows editors write one) is skipped; other encodings are refused with the byte and line, not guessed."""
    try:  # installed_fallback: recipes/<name>.toml outside a checkout is the installed one
        with open(installed_fallback(path), "rb") as fh:
            data = fh.read().removeprefix(codecs.BOM_UTF8)
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path!r}: {err.strerror or err}") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} at line {line}); save the file as "
                          "UTF-8, the only encoding TOML allows") from err
    try:
        return tomllib.loads(text)
    except ValueError as err:  # TOMLDecodeError, or an integer of over 4300 digits (Python's int-from-str limit)
        raise ConfigError(f"{path}: invalid TOML: {err}") from err


def load_config(path: str | None, overrides: list[str] | None, *, schema: type, whole: bool = True) -> Any:
    """Defaults, then the TOML file at ``path`` (if any), then ``--section.field value`` overrides.

    ``schema`` is the root dataclass (``Config``; tests and tools may pass another). The result is checked by
    its ``validate()`` if any and ``whole``, else field by field (--help, before required fields are given).
    """
    cfg = schema()
    if path is not None:
        _apply_table(cfg, read_toml(path), "", f" (in {path})")
    for key, text in _split_overrides(list(overrides or [])):
        _apply_override(cfg, key, text)
    if whole and hasattr(cfg, "validate"):
        cfg.validate()
    else:
        _check_tree(cfg, "")
    return cfg


def parse_cli(argv: list[str] | None, *, schema: type, default_config: str | None = None) -> tuple[str | None, list[str]]:
    """Split argv into (config path or None, override tokens). ``--help``/``-h`` prints every option and exits,
    showing the values of ``--config``, else of ``default_config`` (what the command runs without one), else
    the defaults, with the overrides applied. A token after a key is its value (``--train.name -h``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path, rest, i, want_help = None, [], 0, False
    while i < len(argv):
        token = argv[i]
        if token in ("--help", "-h"):
            want_help, i = True, i + 1
        elif token == "--config" or token.startswith("--config="):
            if token == "--config":
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ConfigError("--config needs a path")
                value, i = argv[i + 1], i + 2
            else:
                value, i = token.split("=", 1)[1], i + 1
            if path is not None:
                raise ConfigError(f"--config given twice ({path!r} and {value!r})")
            path = value
        elif token.startswith("--") and "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            rest, i = [*rest, token, argv[i + 1]], i + 2
        else:
            rest.append(token)
            i += 1
    _split_overrides(rest)  # report malformed tokens now, before any work starts
    if want_help:
        from r1fast.config_dump import print_help  # (config_dump imports this module's type helpers)

        print_help(schema, path or default_config, rest)
    return path, rest


def run_cli(prog: str, body, *, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a stage's ``body() -> int``; a ``ConfigError`` (or a ``DataError``, or one of ``user_errors``: a
    missing file, an empty result) prints one line ``<prog>: error: ...`` and returns 2 (1 for bad data and
    user_errors), no traceback. Other exceptions propagate: they are bugs and their traceback is wanted."""
    try:
        return body()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except (DataError, *user_errors) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1

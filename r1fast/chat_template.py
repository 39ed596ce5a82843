"""Chat templates: untrusted Jinja code from downloaded tokenizer configs, rendered as transformers does.

Templates render in Jinja's immutable sandbox (a plain ``jinja2.Environment`` lets
``{{ cycler.__init__.__globals__.os.system(...) }}`` run a shell command) with the context transformers'
``apply_chat_template(tokenize=False)`` gives them: every named special token, ``tools``/``documents`` =
None, ``strftime_now``, ``{% generation %}``, and the "default" of a list of named templates. So both
produce the same prompt.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

__all__ = ["named_templates", "stored_templates", "check_syntax", "render"]

# jinja2 < 3.1.6 has known sandbox escapes (transformers refuses it for the same reason).
_MIN_JINJA = (3, 1, 6)


def named_templates(chat_template):
    """``chat_template`` as stored (None, a string, a {name: template} dict, or tokenizer_config.json's list of
    {"name", "template"} entries) with the list turned into a dict, as transformers loads it."""
    if chat_template is None or isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, (list, tuple)):
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in chat_template):
            raise ValueError('chat_template: a list must hold {"name": str, "template": str} entries')
        chat_template = {t["name"]: t["template"] for t in chat_template}
    if not isinstance(chat_template, dict) or not all(isinstance(v, str) for v in chat_template.values()):
        raise ValueError(f"chat_template: expected a string, a list of named templates or a dict, "
                         f"got {type(chat_template).__name__}")
    return chat_template


def stored_templates(chat_template):
    """The tokenizer_config.json form of ``chat_template``: a string, or the list of named templates."""
    if isinstance(chat_template, dict):
        return [{"name": name, "template": t} for name, t in chat_template.items()]
    return chat_template


def _select_template(chat_template) -> str:
    """The template to render: the string itself, or the "default" one of named templates."""
    if chat_template is None:
        raise ValueError("this tokenizer has no chat_template")
    if isinstance(chat_template, dict):
        if "default" not in chat_template:
            raise ValueError(f"chat_template: named templates {sorted(chat_template)} have no 'default'")
        return chat_template["default"]
    return chat_template


def _plain(value):
    """``value`` rebuilt from JSON types, anything else as "<TypeName>": the sandbox cannot know which methods of
    a rich object (an ndarray's ``tofile``, say) are dangerous, so templates only ever see plain data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # subclasses (str/int enums, numpy floats) back to the base type; str(value) would give "Enum.NAME"
    for base, convert in ((str, str.__str__), (int, int.__int__), (float, float.__float__)):
        if isinstance(value, base):
            return convert(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy / torch scalar
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandboxed Jinja environment chat templates render in, with the helpers transformers gives them.

    Templates come from downloaded tokenizer_config.json files, i.e. they are untrusted code: a plain
    ``jinja2.Environment`` lets ``{{ cycler.__init__.__globals__.os.system(...) }}`` run a shell command.
    """
    import jinja2  # noqa: PLC0415  (a torch dependency; only needed for chat templates)
    import jinja2.ext  # noqa: PLC0415
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < _MIN_JINJA:
        raise ImportError(f"chat templates need jinja2>={'.'.join(map(str, _MIN_JINJA))} (older ones have "
                          f"sandbox escapes); found {jinja2.__version__}")

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for a loss mask in transformers;
        rendering only needs the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore attributes (the sandbox hides them from reads, not writes)."""

        def __init__(*args, **kwargs):  # Jinja's signature trick, so namespace(self=...) still works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat template: namespace attribute {name!r} is not allowed")

    class Dict:
        """``dict(...)`` and ``dict.fromkeys`` without handing the template the ``dict`` type itself."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &), which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=Dict())
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    return _environment().from_string(template)


def check_syntax(chat_template) -> None:
    """Compile every template of ``chat_template`` (as ``named_templates`` returns it; cached for ``render``), so a
    loader can report a Jinja syntax error with its file: it surfaced at the first render, after a model had
    loaded, as jinja's bare ``TemplateSyntaxError: unexpected '}'``. ValueError naming the template's line."""
    if chat_template is None:
        return
    import jinja2  # noqa: PLC0415

    try:
        _environment()
    except ImportError:
        return  # too old a jinja2: rendering refuses it with its own message; loading need not
    for name, template in (chat_template.items() if isinstance(chat_template, dict) else [(None, chat_template)]):
        try:
            _compile(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            which = "chat_template" if name is None else f"chat_template {name!r}"
            raise ValueError(f"{which} line {e.lineno}: Jinja syntax error: {' '.join(str(e.message).split())}") from None


def render(chat_template, messages, add_generation_prompt: bool, special_tokens: dict) -> str:
    """``chat_template`` rendered as transformers' ``apply_chat_template(tokenize=False)`` renders it: the named
    special tokens, ``tools``/``documents`` = None, and messages without None-valued keys."""
    template = _select_template(chat_template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = _plain({**special_tokens, "messages": messages, "tools": None, "documents": None,
                      "add_generation_prompt": add_generation_prompt})
    return _compile(template).render(**context)

"""Chat templates: untrusted Jinja code from downloaded tokenizer configs, rendered as transformers does.

Templates render in Jinja's immutable sandbox (a plain ``jinja2.Environment`` lets
``{{ cycler.__init__.__globals__.os.system(...) }}`` run a shell command) with the context transformers'
``apply_chat_template(tokenize=False)`` gives them: every named special token, ``tools``/``documents`` =
None, ``strftime_now``, ``{% generation %}``, and the "default" of a list of named templates. So both
produce the same prompt.

A template is code that runs at every render, so rendering is bounded (see ``render``): a deadline checked at
every loop iteration, call and output piece, a cap on the output, and caps on what ``*``, ``**`` and
``+`` may build. Without them ``range(100000)`` nested twice (each passes Jinja's own MAX_RANGE check) kept
``r1fast.eval`` rendering for minutes, and ``'a' * 10**10`` asked for 10 GB.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from datetime import datetime

__all__ = ["named_templates", "stored_templates", "check_syntax", "render"]

# jinja2 < 3.1.6 has known sandbox escapes (transformers refuses it for the same reason).
_MIN_JINJA = (3, 1, 6)

# Bounds on one render. Measured on r1fast's 2-core CPU box (`python tests/test_untrusted_inputs.py` renders the
# templates): Qwen2.5-, Llama-3- and R1-Distill-style templates render 10,001 messages (2.7 M characters, ~700k
# tokens, past any model's context) in 17-45 ms (28-62 ms with these checks) and write at most 3.3 M characters.
# So 5 s is an 80x margin on time and 2**26 (67 M) characters a 20x margin on output; 2**26 also caps `*`/`+`.
RENDER_DEADLINE_S = 5.0
MAX_OUTPUT_CHARS = 2**26
MAX_SEQUENCE_ITEMS = 2**26
MAX_INT_BITS = 2**16  # a template's numbers are indices and counters (< 64 bits); 10**10**5 is not one

_BUDGET = threading.local()  # .deadline: time.monotonic() bound of the render running on this thread


class _BudgetExceeded(ValueError):
    """A template went past one of the bounds above; ``render`` adds which template."""


def _check_deadline() -> None:
    """Raise once the running render is past its deadline: called at every loop iteration (a tick the
    environment inserts into each loop body, as a loop that writes nothing never reaches the output), every call
    (macros recurse through it) and every output piece, so no stretch of template code runs unchecked for long:
    what runs between checks is straight-line code of the template's own length."""
    deadline = getattr(_BUDGET, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _BudgetExceeded(f"rendering took longer than {RENDER_DEADLINE_S:g} s (RENDER_DEADLINE_S)")


def _bounded_binop(operator: str, left, right) -> None:
    """Refuse ``*``, ``**`` and ``+`` whose result would pass MAX_SEQUENCE_ITEMS / MAX_INT_BITS, before Python
    allocates it (``'a' * 10**10`` asked for 10 GB; ``10 ** (10 ** 9)`` computes for minutes in one C call)."""
    seq = (str, list, tuple)
    if operator == "*":
        for seq_side, n in ((left, right), (right, left)):
            if isinstance(seq_side, seq) and isinstance(n, int) and len(seq_side) * n > MAX_SEQUENCE_ITEMS:
                raise _BudgetExceeded(f"'*' would build {len(seq_side) * n} items (MAX_SEQUENCE_ITEMS = "
                                      f"{MAX_SEQUENCE_ITEMS})")
        if isinstance(left, int) and isinstance(right, int) and \
                left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _BudgetExceeded(f"'*' would build a number over MAX_INT_BITS = {MAX_INT_BITS} bits")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * abs(left).bit_length() > MAX_INT_BITS:
            raise _BudgetExceeded(f"'**' would build a number over MAX_INT_BITS = {MAX_INT_BITS} bits")
    elif operator == "+" and isinstance(left, seq) and isinstance(right, seq) and \
            len(left) + len(right) > MAX_SEQUENCE_ITEMS:
        raise _BudgetExceeded(f"'+' would build {len(left) + len(right)} items (MAX_SEQUENCE_ITEMS = "
                              f"{MAX_SEQUENCE_ITEMS})")


def _bounded_widths(method, args) -> None:
    """Refuse a str method's integer argument over MAX_SEQUENCE_ITEMS (center, ljust, zfill build that much)."""
    for a in args:
        if isinstance(a, int) and a > MAX_SEQUENCE_ITEMS:
            raise _BudgetExceeded(f"str.{method.__name__}({a}) would build over MAX_SEQUENCE_ITEMS = "
                                  f"{MAX_SEQUENCE_ITEMS} characters")


def _sized(text: str) -> str:
    """``text`` (a ``~`` result) if within MAX_SEQUENCE_ITEMS: ``{% set ns.s = ns.s ~ ns.s %}`` in a loop doubles
    it each time (2**34 characters after 34 iterations), faster than any deadline can stop."""
    if len(text) > MAX_SEQUENCE_ITEMS:
        raise _BudgetExceeded(f"'~' built {len(text)} characters (MAX_SEQUENCE_ITEMS = {MAX_SEQUENCE_ITEMS})")
    return text


def _tick(_context, _value) -> None:
    """Called first in every loop body (as a filter on None, so it compiles to a plain call)."""
    _check_deadline()


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
    import jinja2.visitor  # noqa: PLC0415
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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The immutable sandbox plus the render bounds: the deadline at every call, size checks on
        ``*``/``**``/``+`` and on str methods' widths, and the ``Bounds`` rewrite of loops and ``~``."""

        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator, left, right):
            # no deadline check here: an operator outside a loop or call runs once, and its size is bounded
            _bounded_binop(operator, left, right)
            return self.binop_table[operator](left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805  (jinja's names: kwargs may be 'self')
            _check_deadline()
            if isinstance(getattr(__obj, "__self__", None), str):  # "a".center(10**10): a 10 GB string
                _bounded_widths(__obj, (*args, *kwargs.values()))
            return ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)

        def _generate(self, source, name, filename, defer_init=False):
            # jinja's documented hook between parsing and code generation
            return super()._generate(Bounds().visit(source), name, filename, defer_init)

    class Bounds(jinja2.visitor.NodeTransformer):
        """Rewrites a parsed template: a deadline check first in every loop body (in the body, not the iterable,
        so recursive loops and loops over a prebuilt list check too) and ``~`` results through ``_sized``. Both
        are filters, which compile to a direct call: as calls through the sandbox's ``call`` (plus a deadline
        check per operator) a 10,001-message render took 2-3x its time; now 1.35-1.6x."""

        def visit_For(self, node):
            self.generic_visit(node)
            tick = jinja2.nodes.Filter(jinja2.nodes.Const(None), "_r1fast_tick", [], [], None, None)
            node.body.insert(0, jinja2.nodes.ExprStmt(tick).set_lineno(node.lineno))
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return jinja2.nodes.Filter(node, "_r1fast_sized", [], [], None, None).set_lineno(node.lineno)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    # pass_context: jinja folds a filter of a constant at compile time; the tick must run at render time
    env.filters.update(tojson=tojson, _r1fast_tick=jinja2.pass_context(_tick), _r1fast_sized=_sized)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       namespace=Namespace, dict=Dict())
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    return _environment().from_string(template)


def _describe(name, template: str) -> str:
    """Which template an error is about: its name, or its opening characters (the source has no name)."""
    if name is not None:
        return f"chat_template {name!r}"
    head = " ".join(template.split())
    return f"chat_template {head[:60]!r}{'...' if len(head) > 60 else ''}"


def check_syntax(chat_template) -> None:
    """Compile every template of ``chat_template`` (as ``named_templates`` returns it; cached for ``render``), so a
    loader can report a Jinja syntax error with its file: it surfaced at the first render, after a model had
    loaded, as jinja's bare ``TemplateSyntaxError: unexpected '}'``. ValueError naming the template's line, or
    saying it is nested too deeply (Jinja's parser recurses per level: 3,000 nested parentheses raised a bare
    RecursionError that escaped the loader's one-line error)."""
    if chat_template is None:
        return
    import jinja2  # noqa: PLC0415

    try:
        _environment()
    except ImportError:
        return  # too old a jinja2: rendering refuses it with its own message; loading need not
    for name, template in (chat_template.items() if isinstance(chat_template, dict) else [(None, chat_template)]):
        which = "chat_template" if name is None else f"chat_template {name!r}"
        try:
            _compile(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"{which} line {e.lineno}: Jinja syntax error: {' '.join(str(e.message).split())}") from None
        except (RecursionError, SyntaxError) as e:  # SyntaxError: Python's compile of the generated code
            detail = f" ({e.msg})" if isinstance(e, SyntaxError) else ""  # 100 nested ifs: 100 indentation levels
            raise ValueError(f"{which}: template nested too deeply to compile{detail}") from None


def render(chat_template, messages, add_generation_prompt: bool, special_tokens: dict) -> str:
    """``chat_template`` rendered as transformers' ``apply_chat_template(tokenize=False)`` renders it: the named
    special tokens, ``tools``/``documents`` = None, and messages without None-valued keys.

    The template is untrusted code, so the render is bounded: RENDER_DEADLINE_S of wall-clock time, checked in
    every loop iteration and call too (not only between output pieces: a loop that writes nothing yields none),
    MAX_OUTPUT_CHARS of output, and the operator caps. Past a bound, or nested too deeply to render (a recursive
    macro), it raises ValueError naming the template and the bound."""
    name = "default" if isinstance(chat_template, dict) else None
    template = _select_template(chat_template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = _plain({**special_tokens, "messages": messages, "tools": None, "documents": None,
                      "add_generation_prompt": add_generation_prompt})
    check_syntax(template if name is None else {name: template})  # one built in code skipped the loader's check
    previous = getattr(_BUDGET, "deadline", None)
    _BUDGET.deadline = time.monotonic() + RENDER_DEADLINE_S
    pieces, size = [], 0
    try:
        for piece in _compile(template).generate(**context):  # streamed, so the output cap holds before it is joined
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _BudgetExceeded(f"output passed MAX_OUTPUT_CHARS = {MAX_OUTPUT_CHARS} characters")
            _check_deadline()
            pieces.append(piece)
    except _BudgetExceeded as e:
        raise ValueError(f"{_describe(name, template)}: {e}") from None
    except RecursionError:
        raise ValueError(f"{_describe(name, template)}: template nested too deeply to render "
                         "(recursion past Python's limit)") from None
    finally:
        _BUDGET.deadline = previous
    return "".join(pieces)

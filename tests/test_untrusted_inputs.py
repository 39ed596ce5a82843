"""Untrusted files a user downloads: chat templates (Jinja code run at every render) and a sharded checkpoint's
index. Each must fail with a bounded, one-line error naming what it refused, never hang, allocate gigabytes,
crash with a bare RecursionError, or read a file outside the checkpoint directory."""

import json
import sys
import threading
import time

import pytest
import torch

from r1fast import chat_template, tokenizer
from r1fast.chat_template import check_syntax, render
from r1fast.checkpoint import INDEX_FILE, CheckpointError
from r1fast.config_io import ConfigError
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs

# Real-world-shaped templates (Qwen2.5 with its tool branches, Llama 3 with strftime_now, R1-Distill with a
# namespace and the </think> split): chat_template.py's bounds were set from their render time and size.
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{{- messages[0]['content'] }}{%- for tool in tools %}{{- '\\n' }}"
    "{{- tool | tojson }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'tool' %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}{{- '\\n<tool_response>\\n' ~ message.content ~ '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Today Date: ' + strftime_now('%Y') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role']"
    " + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
R1_DISTILL = (
    "{% set ns = namespace(is_tool=false, system_prompt='') %}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- endif %}{%- endfor -%}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>"}


def _conversation(turns: int, chars: int) -> list[dict]:
    messages = [{"role": "system", "content": "You are helpful."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"q{i} " * (chars // 4)})
        messages.append({"role": "assistant", "content": "<think>" + "t " * (chars // 4) + "</think>" + f"a{i} " * 9})
    messages.append({"role": "tool", "content": "42"})
    return messages


@pytest.mark.parametrize("template", [QWEN, LLAMA3, R1_DISTILL], ids=["qwen2.5", "llama3", "r1-distill"])
def test_real_templates_render_as_plain_jinja_does(template):
    """The bounds (a check in every loop body, ``~`` through a size check) change no character of the prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    plain.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    plain.filters["tojson"] = json.dumps
    messages = _conversation(50, 400)
    for generation_prompt in (True, False):
        expected = plain.from_string(template).render(messages=messages, tools=None, documents=None,
                                                      add_generation_prompt=generation_prompt, **SPECIALS)
        assert render(template, messages, generation_prompt, SPECIALS) == expected


def _render_within(template: str, seconds: float = 20.0):
    """render(template) in a daemon thread: the exception it raised, or a test failure if it is still running
    after ``seconds`` (an unbounded render would otherwise hang the suite)."""
    outcome = {}

    def target():
        try:
            outcome["text"] = render(template, [{"role": "user", "content": "hi"}], True, SPECIALS)
        except Exception as e:  # noqa: BLE001  (the test inspects it)
            outcome["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"render still running after {seconds} s: no bound stopped {template[:60]!r}"
    assert "error" in outcome, f"rendered {len(outcome['text'])} characters instead of refusing"
    return outcome["error"]


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",  # the probe's, silent
    "{% set l = range(100000)|list %}{% for i in l %}{% for j in l %}{% endfor %}{% endfor %}",  # no range() call
    "{% set l = range(1000)|list %}{% for x in l recursive %}{% if loop.depth < 9 %}{{ loop(l) }}{% endif %}"
    "{% endfor %}",  # the inner levels iterate loop()'s argument
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",  # 2**60 calls
], ids=["nested-range", "prebuilt-list", "recursive-loop", "branching-macro"])
def test_render_deadline_stops_loops_that_write_nothing(template, monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_DEADLINE_S", 0.3)
    error = _render_within(template)
    assert isinstance(error, ValueError) and "longer than 0.3 s (RENDER_DEADLINE_S)" in str(error)
    assert template[:20] in str(error)  # names the template


def test_output_cap(monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_OUTPUT_CHARS", 10_000)
    error = _render_within("{% for i in range(100000) %}{{ 'abc' }}{% endfor %}")
    assert isinstance(error, ValueError) and "MAX_OUTPUT_CHARS = 10000" in str(error)


@pytest.mark.parametrize("template,bound", [
    ("{{ 'a' * 10**12 }}", "MAX_SEQUENCE_ITEMS"),  # unbounded: a MemoryError, or a 10 GB string at 10**10
    ("{{ [0] * 10**12 }}", "MAX_SEQUENCE_ITEMS"),
    ("{{ (3 ** (10 ** 6)) % 7 }}", "MAX_INT_BITS"),  # jinja's ** is left-associative
    ("{% set a = 2 ** 30000 %}{{ (a * a * a) % 7 }}", "MAX_INT_BITS"),
    ("{{ 'a'.center(10**12) }}", "MAX_SEQUENCE_ITEMS"),
    ("{% set ns = namespace(s='a') %}{% for i in range(26) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~' built"),
    ("{% set ns = namespace(s=[0]) %}{% for i in range(26) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'+' would"),
])
def test_operator_caps(template, bound, monkeypatch):
    """Checked before Python allocates (or, for ``~``, as soon as a result passes the cap): doubling a string
    34 times reaches 16 GB long before any deadline (26 here: the unbounded run stays under 1 GB)."""
    monkeypatch.setattr(chat_template, "MAX_SEQUENCE_ITEMS", 2**20)
    error = _render_within(template)
    assert isinstance(error, ValueError) and bound in str(error), error


def test_small_operators_still_work():
    out = render("{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ [1] + [2] }}{{ 'x'.center(5) }}|{{ 'a' ~ 1 }}", [], True, SPECIALS)
    assert out == "abab1024[1, 2]  x  |a1"


DEEP = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"


def test_deep_nesting_is_a_value_error_at_compile_and_a_config_error_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="nested too deeply"):
        check_syntax(DEEP)  # Jinja's parser: RecursionError
    with pytest.raises(ValueError, match="nested too deeply to compile .too many levels of indentation"):
        check_syntax("{% if 1 %}" * 100 + "{% endif %}" * 100)  # Python's compile of the generated code
    with pytest.raises(ValueError, match="chat_template 'default': template nested too deeply"):
        render({"default": DEEP}, [], True, SPECIALS)  # built in code, never through a loader's check
    tokenizer.CharTokenizer().save(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": DEEP}))
    with pytest.raises(ConfigError, match=f"{config_file}: chat_template: template nested too deeply"):
        tokenizer.load(tmp_path)


def test_unbounded_recursion_at_render_is_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply to render"):
        render("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", [], True, SPECIALS)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A two-shard checkpoint of a tiny model, and the same shards copied outside its directory."""
    root = tmp_path_factory.mktemp("index")
    model = Transformer.from_config(ModelArgs(vocab_size=32, hidden_size=16, num_layers=2, intermediate_size=32,
                                              num_heads=2, num_kv_heads=1), seed=0)
    model.save_pretrained(root / "model", max_shard_size="8KB")
    index = json.loads((root / "model" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    (root / "outside").mkdir()
    for shard in set(index["weight_map"].values()):
        (root / "outside" / shard).write_bytes((root / "model" / shard).read_bytes())
    return root, index


@pytest.mark.parametrize("target", ["../outside/{shard}", "{root}/outside/{shard}", "sub/{shard}", "..", "", 7])
def test_index_shards_must_be_file_names_in_the_directory(target, sharded, tmp_path):
    """'../x' or '/x' loaded another directory's weights (the probe's 'LOADED (traversal)'), '/dev/zero' was
    opened before the refusal; now every weight_map value is checked before any shard is opened."""
    root, index = sharded
    path = tmp_path / "model"
    path.mkdir()
    for name in ("config.json", *set(index["weight_map"].values())):
        (path / name).write_bytes((root / "model" / name).read_bytes())
    tensor = sorted(index["weight_map"])[0]
    shard = index["weight_map"][tensor]
    value = target.format(root=root, shard=shard) if isinstance(target, str) else target
    (path / INDEX_FILE).write_text(json.dumps({**index, "weight_map": {**index["weight_map"], tensor: value}}))
    with pytest.raises(CheckpointError, match="not a file name in") as err:
        Transformer.from_pretrained(path)
    assert f"tensor {tensor} maps to {value!r}" in str(err.value)
    (path / INDEX_FILE).write_text(json.dumps(index))  # the untouched index loads the same weights
    loaded, saved = Transformer.from_pretrained(path), Transformer.from_pretrained(root / "model")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values(),
                                                 strict=True))


if __name__ == "__main__":  # the measurement behind chat_template.py's RENDER_DEADLINE_S and MAX_OUTPUT_CHARS
    turns = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    for label, template in (("qwen2.5", QWEN), ("llama3", LLAMA3), ("r1-distill", R1_DISTILL)):
        messages = _conversation(turns, 200)
        start = time.perf_counter()
        out = render(template, messages, True, SPECIALS)
        print(f"{label}: {len(messages)} messages -> {len(out)} characters in {time.perf_counter() - start:.3f} s")


BOS_EOS = {"bos_token": "<bos>", "eos_token": "<eos>"}


def test_default_named_template_is_used_even_when_not_first():
    assert render({"tool_use": "T", "default": "D{{ eos_token }}", "rag": "R"}, [], True, BOS_EOS) == "D<eos>"


@pytest.mark.parametrize("base", ["2", "(-2)"])
def test_power_of_two_is_capped_too(base):
    with pytest.raises(ValueError, match="MAX_INT_BITS"):
        render("{{ (" + base + " ** (10 ** 6)) % 7 }}", [], True, BOS_EOS)
    assert render("{{ " + base + " ** 10 }}", [], True, BOS_EOS) == "1024"


def test_tojson_keeps_non_ascii_and_html_characters_as_transformers_does():
    messages = [{"role": "user", "content": "π ≈ 3.14 <b>&</b> 你好"}]
    out = render("{{ messages[0].content | tojson }}", messages, True, BOS_EOS)
    assert out == '"π ≈ 3.14 <b>&</b> 你好"'

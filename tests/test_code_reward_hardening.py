"""The code reward against completions and settings a black-box probe found mishandled: a program
faking "the sandbox failed", fences the extractor misread, lone surrogates, and bad parameters."""

import logging
import os

import pytest

import r1fast.rewards.code as code_mod
from r1fast.rewards import combine
from r1fast.rewards import sandbox as sandbox_mod
from r1fast.rewards.code import code_batch, code_reward, extract_code, parse_tests
from r1fast.rewards.code_extract import fenced_blocks
from r1fast.rewards.sandbox import SandboxError, SandboxLimits, _run_isolated, capabilities, run_python

FAST = SandboxLimits(wall_time_s=3, cpu_time_s=2, memory_bytes=256 * 2**20, max_processes=8,
                     max_file_bytes=2**16, max_open_files=16, max_output_bytes=4096)
PLUS_ONE = "print(int(input()) + 1)\n"
TESTS = [{"input": "1", "output": "2"}]

# Writes "sandbox: ..." to every descriptor it holds (the status pipe among them, were it reachable),
# to stderr, and to the init's descriptors, then exits 125: what the launcher's own failure looked like.
FAKER = ("import os, sys\n"
         "paths = ['/proc/self/fd/' + f for f in os.listdir('/proc/self/fd')]\n"
         "try:\n"
         "    paths += ['/proc/1/fd/' + f for f in os.listdir('/proc/1/fd')]\n"
         "except OSError:\n"
         "    pass\n"
         "for path in paths:\n"
         "    try:\n"
         "        fd = os.open(path, os.O_WRONLY)\n"
         "        os.write(fd, b'sandbox: fake\\n')\n"
         "    except OSError:\n"
         "        pass\n"
         "for fd in range(3, 64):\n"
         "    try:\n"
         "        os.write(fd, b'sandbox: fake\\n')\n"
         "    except OSError:\n"
         "        pass\n"
         "sys.stderr.write('sandbox: fake\\n')\n"
         "sys.exit(125)\n")


def _answer(body: str) -> str:
    return f"<think>t</think><answer>\n{body}</answer>"


@pytest.mark.parametrize("degraded", [False, True])
def test_a_program_cannot_fake_a_sandbox_failure(degraded):
    caps = capabilities()
    if degraded:  # no namespaces: the program runs in the launcher's own process, after its exec
        caps = {**caps, "netns": 0, "ipcns": False, "pidns": False, "filesystem": False, "cgroups": []}
    result = _run_isolated(FAKER, "", FAST, caps)
    assert result.returncode == 125 and not result.ok and result.stderr.startswith("sandbox: fake")


def test_a_launcher_failure_still_raises_sandbox_error():
    caps = {**capabilities(), "python": "/nonexistent-r1fast/bin/python3"}  # its exec fails in the launcher
    with pytest.raises(SandboxError, match=r"sandbox: FileNotFoundError"):
        _run_isolated("print(1)\n", "", FAST, caps)


def test_a_failed_cgroup_join_is_reported_by_the_sandbox(tmp_path, monkeypatch):
    """The init (or, without a PID namespace, the launcher) cannot join the program to its cgroup: a
    'cgroup.procs' that refuses writes (/dev/full, ENOSPC) stands in for a real cgroup that does."""
    fake = tmp_path / "cg"
    fake.mkdir()
    os.symlink("/dev/full", fake / "cgroup.procs")
    monkeypatch.setattr(sandbox_mod, "_cgroup_create", lambda parents, name, limits: [str(fake)])
    monkeypatch.setattr(sandbox_mod, "_cgroup_remove", lambda dirs: None)
    with pytest.raises(SandboxError, match="errno 28"):
        _run_isolated("print('ran')\n", "", FAST, capabilities())


def test_code_batch_keeps_failures_to_their_own_sample(monkeypatch, caplog):
    """One program faking a sandbox failure, one genuine SandboxError and one malformed test: the other
    samples keep their scores and every program runs once (the whole batch ran again serially before)."""
    calls = []
    real = code_mod.run_python

    def counting(code, stdin="", limits=None):
        calls.append(code)
        if "GENUINE" in code:
            raise SandboxError("sandbox: mount /tmp failed, errno 12")
        return real(code, stdin, limits)

    monkeypatch.setattr(code_mod, "run_python", counting)
    good = _answer(f"```python\n{PLUS_ONE}```\n")
    completions = [good, _answer(f"```python\n{FAKER}```\n"), _answer("```python\n# GENUINE\n```\n"), good, good]
    metas = [{"tests": TESTS}] * 4 + [{"tests": [{"input": "\udcff", "output": "2"}]}]
    reward = combine({"code": 1.0}, {"code": {"limits": FAST}})
    with caplog.at_level(logging.WARNING, logger="r1fast.rewards"):
        batch = reward.score([""] * 5, completions, metas)
    assert batch.total == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert batch.errors == {"code": 2} and len(calls) == 4  # the malformed sample never ran
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "SandboxError('sandbox: mount /tmp failed" in logged and "meta['tests'][0]['input']" in logged
    scores = code_batch([""] * 2, completions[1:3], metas[1:3], limits=FAST)
    assert scores[0] == 0.0 and isinstance(scores[1], SandboxError)
    with pytest.raises(SandboxError):  # one sample on its own still raises
        code_reward("", completions[2], metas[2], limits=FAST)


@pytest.mark.parametrize("name, text, expected", [
    ("js block first", "```js\nconsole.log(1)\n```\nIn Python:\n```python\nA\n```\n", "A\n"),
    ("capital tag", "```Python\nA\n```\n", "A\n"),
    ("CRLF", "```python\r\nA\r\nB\r\n```\r\n", "A\nB\n"),
    ("backticks in a string", '```python\nprint("```")\nB\n```\n', 'print("```")\nB\n'),
    ("info string and tags", "```py title=a.py\nA\n```\n```python3\nB\n```\n", "B\n"),
    ("untagged block", "```\nA\n```\n", "A\n"),
    ("last python block wins over a later shell block", "```python\nA\n```\n```bash\nrun\n```\n", "A\n"),
    ("longer fence holds a shorter one", "````python\nA\n```\nB\n````\n", "A\n```\nB\n"),
    ("indented fence", "Code:\n  ```python\n  if x:\n      y\n  ```\n", "if x:\n    y\n"),
    ("unclosed block (truncated)", "```python\nA\nB", "A\nB\n"),
    ("inline fence is not a block", "```python print(1)```\nA", "```python print(1)```\nA"),
    ("only another language", "```js\nconsole.log(1)\n```\n", None),
])
def test_extract_code_reads_fences_line_by_line(name, text, expected):
    assert extract_code(_answer(text)) == expected, name


def test_fenced_programs_now_score():
    completions = [_answer(f"```js\nconsole.log(1)\n```\nIn Python:\n```python\n{PLUS_ONE}```\n"),
                   _answer(f"```Python\n{PLUS_ONE}```\n").replace("\n", "\r\n")]
    assert code_batch(["", ""], completions, [{"tests": TESTS}] * 2, limits=FAST) == [1.0, 1.0]


def test_lone_surrogates_leak_nothing_and_fail_only_their_sample():
    capabilities()
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ValueError, match="code: not valid UTF-8"):
            run_python("print('\udcff')\n", "", FAST)
        with pytest.raises(ValueError, match="stdin: not valid UTF-8"):
            run_python("print(1)\n", "\udcff", FAST)
    assert sorted(os.listdir("/proc/self/fd")) == before
    # the model's program: an ordinary failed sample; the dataset's test: malformed, named
    assert code_reward("", _answer("```python\nprint('\udcff')\n```\n"), {"tests": TESTS}, limits=FAST) == 0.0
    for key in ("input", "output"):
        with pytest.raises(ValueError, match=rf"meta\['tests'\]\[0\]\['{key}'\]: not valid UTF-8"):
            parse_tests(f'[{{"input": "1", "output": "2", "{key}": "\\udcff"}}]')


@pytest.mark.parametrize("params, match", [
    ({"timeout_s": 0}, "params.code.timeout_s: expected a positive finite number, got 0"),
    ({"timeout_s": -1}, "params.code.timeout_s"),
    ({"timeout_s": "5"}, "params.code.timeout_s"),
    ({"timeout_s": float("nan")}, "params.code.timeout_s"),
    ({"timeout_s": True}, "params.code.timeout_s"),
    ({"timeout_s": 1e300}, r"params.code.limits.cpu_time_s: expected an int in \[1, 2\*\*62\]"),
    ({"memory_mb": 0}, "params.code.memory_mb"),
    ({"memory_mb": 1e-9}, "params.code.limits.memory_bytes: expected an int in .*, got 0"),
    ({"limits": {"wall_time_s": 2}}, "params.code.limits: expected a SandboxLimits, got dict"),
    ({"limits": SandboxLimits(cpu_time_s=1.5)}, "params.code.limits.cpu_time_s: expected an int .*, got 1.5"),
    ({"limits": SandboxLimits(max_processes=True)}, "params.code.limits.max_processes: .*, got True"),
    ({"limits": SandboxLimits(wall_time_s=float("inf"))}, "params.code.limits.wall_time_s: .*, got inf"),
    ({"all_or_nothing": "no"}, "params.code.all_or_nothing: expected a bool"),
])
def test_bad_code_params_fail_at_combine(params, match):
    with pytest.raises(ValueError, match=match):
        combine({"code": 1.0}, {"code": params})


def test_good_code_params_pass_and_apply():
    combine({"code": 1.0}, {"code": {"timeout_s": 2.5, "memory_mb": 256, "all_or_nothing": True,
                                     "limits": SandboxLimits()}})
    limits = code_mod._limits(FAST, 2.5, 128)
    assert (limits.wall_time_s, limits.cpu_time_s, limits.memory_bytes) == (2.5, 3, 128 * 2**20)
    with pytest.raises(ValueError, match="limits.memory_bytes: expected an int in .*, got 1.0"):
        SandboxLimits(memory_bytes=1.0).validate()


# ---- fence rules (CommonMark fenced code blocks) ----------------------------------------------------

def test_four_space_indent_is_no_fence():
    # 4+ spaces make an indented code block in CommonMark, not a fence: nothing is fenced here
    text = "Code:\n    ```python\n    A\n    ```\n"
    assert fenced_blocks(text) == []
    assert extract_code(_answer(text)) == text.strip()
    assert fenced_blocks("   ```python\n   A\n   ```\n") == [("python", "A\n")]


def test_a_longer_closing_fence_closes():
    assert fenced_blocks("```python\nA\n`````\nB\n") == [("python", "A\n")]
    assert extract_code(_answer("```python\nA\n````\nprose\n")) == "A\n"


def test_lone_carriage_returns_are_newlines():
    assert extract_code(_answer("```python\rA\rB\r```\r")) == "A\nB\n"


def test_body_lines_indented_less_than_the_fence_keep_their_text():
    text = "Code:\n  ```python\nx = 1\n y = 2\n    z = 3\n  ```\n"
    assert extract_code(_answer(text)) == "x = 1\ny = 2\n  z = 3\n"


def test_blank_answer_is_no_program():
    assert extract_code("<think>t</think><answer>\n \n</answer>") is None


def test_closing_fence_may_carry_trailing_whitespace():
    assert extract_code(_answer("```python\nA\n```   \t\nprose\n")) == "A\n"


def test_a_long_line_that_almost_opens_a_fence_is_read_in_linear_time():
    """`[ \\t]*([^`]*)` let a line of ``` + 32k spaces + ` backtrack quadratically: 8.8 s in the trainer process
    (reading the program happens before any sandbox limit applies); 100k characters took minutes."""
    import time

    line = "```" + " " * 32_000 + "`"
    start = time.perf_counter()
    assert fenced_blocks(line) == [] and extract_code(_answer(line)) == line  # no fence: the answer text itself
    assert time.perf_counter() - start < 0.5
    assert fenced_blocks("```  Python  extra\nA\n```\n") == [("python", "A\n")]  # the info string still splits

"""Repository contracts: the README quickstart and the CI script agree, and the install layout holds."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, flags=re.S)
    cmds = [line.split("#", 1)[0].strip() for b in blocks for line in b.splitlines()]
    return [c for c in cmds if c]


def test_readme_quickstart_has_exactly_two_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].startswith("torchrun") and "-m r1fast.train" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_cmd = ci.split("# README test command:", 1)[1].strip().splitlines()[0]
    assert ci_cmd.replace('"$PY"', "python") == test_cmd


def test_kernels_installed_as_r1fast_kernels():
    import r1fast.kernels

    assert pathlib.Path(r1fast.kernels.__file__).resolve().parent == ROOT / "kernels"
    setup = (ROOT / "setup.py").read_text()
    assert '"r1fast.kernels": "kernels"' in setup


def test_the_sdist_carries_what_a_gpu_build_and_the_tests_need():
    """setuptools packs csrc/ into an sdist only when it builds r1fast._C at sdist time (never on a CPU
    machine), and tests/ only as test_*.py: 28 of 737 tests failed to collect from an unpacked sdist."""
    grafted = {line.split()[1] for line in (ROOT / "MANIFEST.in").read_text().splitlines()
               if line.startswith("graft ")}
    assert {"csrc", "kernels", "recipes", "tests", "bench"} <= grafted

"""Config values that passed validation and then failed a run: non-finite floats, run names that are not one
directory, seeds outside torch's range, config files that are not UTF-8; and the --help / bench CLI edges."""

import codecs
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from r1fast import seeding
from r1fast.config import Config, ConfigError, load_config
from r1fast.config_io import bounded, parse_cli
from r1fast.config_io import load_config as load_stage_config


def _error(path=None, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


# ----------------------------------------------------------------------------------------- non-finite floats


@pytest.mark.parametrize("key, allowed", [
    ("train.lr", "allowed: 0 < value"),
    ("rollout.temperature", "allowed: 1e-05 <= value"),
    ("model.rope_theta", "allowed: 0 < value"),
    ("model.rms_norm_eps", "allowed: 0 < value"),
    ("grpo.eps_high", "allowed: 0 <= value"),
    ("grpo.beta", "allowed: 0 <= value"),
    ("train.grad_clip", "allowed: 0 <= value"),
    ("rewards.sandbox_timeout_s", "allowed: 0 < value"),
    ("train.sft_lr", "allowed: 0 < value"),
])
@pytest.mark.parametrize("text", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_out_of_range_on_the_command_line(key, allowed, text):
    message = _error(overrides=[f"--{key}", text])
    assert message.startswith(f"{key}: {text} is out of range") and message.endswith(allowed + " (finite)")


def test_non_finite_floats_are_out_of_range_in_toml_and_in_tuples(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nrope_theta = inf\n")
    assert _error(str(path)).startswith(f"model.rope_theta: inf is out of range (in {path})")
    path.write_text("[train]\nbetas = [0.9, nan]\n")
    assert _error(str(path)).startswith("train.betas[1]: nan is out of range")
    huge = "1" + "0" * 400  # a TOML integer past float's range: an OverflowError traceback before
    path.write_text(f"[train]\nlr = {huge}\nbetas = [-{huge}, 0.9]\n")
    assert _error(str(path)).startswith(f"train.lr: inf is out of range (in {path})")
    path.write_text(f"[train]\nbetas = [-{huge}, 0.9]\n")
    assert _error(str(path)).startswith("train.betas[0]: -inf is out of range")
    path.write_text("[train]\nsteps = " + "1" * 5000 + "\n")  # tomllib's own ValueError escaped as a traceback
    assert _error(str(path)).startswith(f"{path}: invalid TOML: Exceeds the limit (4300 digits)")
    path.write_text(f"[rewards]\nweights = {{accuracy = {huge}}}\n")
    assert _error(str(path)).startswith(f"rewards.weights.accuracy: inf is out of range (in {path})")
    cfg = Config()
    cfg.grpo.eps_low = float("-inf")  # set in code (the pipeline builds configs so), caught by validate
    with pytest.raises(ConfigError, match=r"^grpo\.eps_low: -inf is out of range; allowed: 0 <= value < 1 \(finite\)"):
        cfg.validate()


# ----------------------------------------------------------------------------------------- train.name


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", "/abs", "nul\0byte"])
def test_train_name_must_be_one_directory_name(name):
    message = _error(overrides=[f"--train.name={name}"])
    assert message.startswith(f"train.name: {name!r} is not a directory name")


def test_train_name_accepts_any_single_component(tmp_path):
    for name in ("run-1", "with space", "...", ".hidden", "é"):
        assert load_config(None, ["--train.name", name]).train.name == name
    path = tmp_path / "run.toml"
    path.write_text('[train]\nname = ".."\n')
    assert _error(str(path)).startswith("train.name: '..' is not a directory name")


@pytest.mark.parametrize("where", ["pipeline", "stage"])
def test_pipeline_and_stage_names_must_be_directory_names(tmp_path, where):
    """A stage writes to <out_dir>/<pipeline.name>/<stage name>: '..' escaped the run directory."""
    from r1fast.pipeline_recipe import load_recipe

    text = (Path(__file__).resolve().parents[1] / "recipes" / "tiny_r1.toml").read_text()
    if where == "pipeline":
        text = text.replace('name = "tiny_r1"', 'name = ".."', 1)
        key = "pipeline.name"
    else:
        first = text.index('name = "', text.index("[[stages]]"))
        end = text.index('"', first + len('name = "'))
        text = text[:first] + 'name = "a/b' + text[end:]
        key = "stages[0].name"
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .* is not a directory name"):
        load_recipe(str(path))


def test_sft_name_must_be_a_directory_name():
    from r1fast.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"^name: '\.\.' is not a directory name"):
        SFTConfig(data="x.jsonl", name="..").validate()


# ----------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("key", ["train.seed", "data.seed"])
def test_seed_fields_are_bounded_to_a_toml_integer(key):
    for seed in (2**63, -(2**63) - 1):
        message = _error(overrides=[f"--{key}", str(seed)])
        assert message.startswith(f"{key}: {seed} is out of range")
        assert "allowed: -9223372036854775808 <= value <= 9223372036854775807" in message  # exact, not 9.2e18
    for seed in (-(2**63), 2**32, 2**63 - 1):
        assert load_config(None, [f"--{key}", str(seed)]).train.seed == (seed if key == "train.seed" else 0)


def _legacy_rollout_seeds(seed, step, prompts, group):
    """The formula train.py used before r1fast.seeding (invalid for train.seed >= ~2.33e9)."""
    return [(seed * 7_919 + step) * 1_000_003 + i * group + j for i in prompts for j in range(group)]


def _stream(seed):
    return torch.rand(4, generator=torch.Generator().manual_seed(seed))


def test_rollout_seeds_keep_every_stream_that_worked_and_fix_the_rest():
    for seed in (0, 17, -5, 2_000_000_000):  # valid before: the very same generator streams
        old, new = _legacy_rollout_seeds(seed, 3, [0, 2], 4), seeding.rollout_seeds(seed, 3, [0, 2], 4)
        assert len(new) == 8 and all(torch.equal(_stream(a), _stream(b)) for a, b in zip(old, new, strict=True))
    for seed in (2**32, 2**63 - 1, -(2**63)):  # torch refused these: "seed must give seeds in [-2**63, 2**64)"
        seeds = seeding.rollout_seeds(seed, 5, [1, 3], 2)
        assert all(0 <= s < 2**64 for s in seeds) and len(set(seeds)) == 4
        for s in seeds:
            torch.Generator().manual_seed(s)
    assert seeding.rollout_seeds(2**32, 0, [0], 2) != seeding.rollout_seeds(2**32, 1, [0], 2)


def test_generator_seed_keeps_every_stream_torch_accepted_and_makes_the_rest_valid():
    """Evaluation, eval and rejection sampling seed completion j of prompt i with seed * 1_000_003 + i * k + j
    through generator_seed: the same stream where torch took the raw value, valid where it refused it."""
    for value in (0, 17, -5, 2**63, 2**64 - 1):
        assert torch.equal(_stream(value), _stream(seeding.generator_seed(value)))
    for value in (2**62 * 1_000_003, -(2**63) * 1_000_003):  # refused raw: [-2**63, 2**64)
        torch.Generator().manual_seed(seeding.generator_seed(value))


# ----------------------------------------------------------------------------------------- file encoding


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[train]\nname = "café"\n'.encode("latin-1"))
    message = _error(str(path))
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 at line 2)")


def test_a_utf8_bom_is_skipped(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(codecs.BOM_UTF8 + '[train]\nname = "café"\n'.encode())
    assert load_config(str(path), []).train.name == "café"


def test_a_recipe_that_is_not_utf8_is_a_config_error_naming_it(tmp_path):
    from r1fast.pipeline_recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_bytes(b'[pipeline]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"recipe\.toml: not UTF-8 text \(byte 0xff at line 2\)"):
        load_recipe(str(path))
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(str(tmp_path / "missing.toml"))


# ----------------------------------------------------------------------------------------- --help and CLI


def test_help_shows_the_values_with_the_overrides_applied(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--train.lr", "2", "--help", "--train.name=x"], schema=Config)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Values shown are the defaults with the overrides given." in out
    assert "--train.lr float = 2.0  (> 0)" in out and '--train.name str = "x"' in out


def test_a_value_after_a_key_is_a_value_even_when_it_looks_like_help():
    assert parse_cli(["--train.name", "-h"], schema=Config) == (None, ["--train.name", "-h"])
    assert load_config(None, ["--train.name", "-h"]).train.name == "-h"


def test_help_into_a_closed_pipe_exits_zero_quietly(monkeypatch):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `--help | head -1`: the reader is gone
    pipe = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stdout", pipe)
    try:
        with pytest.raises(SystemExit) as info:
            parse_cli(["--help"], schema=Config)  # ~20 KB of text: more than one write
        assert info.value.code == 0
    finally:
        pipe.close()  # flushes into devnull: the descriptor was pointed there


def test_bench_ceilings_refuses_only(capsys):
    from bench.run import main

    with pytest.raises(SystemExit) as info:
        main(["--ceilings", "--only", "nosuch"])
    assert info.value.code == 2 and "takes no --only" in capsys.readouterr().err


def test_a_run_with_a_64_bit_seed_gets_through_evaluation_and_rollout(tmp_path, monkeypatch):
    """train.seed 2**62 passed the config and then crashed the first evaluation and the first rollout."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")  # the seeds, not the interpreted kernels, are under test
    from train_testing import tiny_config

    from r1fast.train import run

    cfg = tiny_config(tmp_path, "--train.seed", str(2**62), "--train.steps", "1", "--train.sft_steps", "0",
                      "--data.eval_size", "1", "--train.eval_samples", "1", "--train.name", "big_seed")
    summary = run(cfg)
    assert summary["steps"] == 1 and "eval_before_rl" in summary


@pytest.mark.parametrize("stage", ["eval", "sft", "rejection", "datagen"])
def test_every_stage_seed_is_bounded_like_train_seed(stage):
    """r1fast.sft --seed 2**64 crashed in torch.manual_seed after loading; eval's negative seed crashed the
    bootstrap after the whole generation (np.random.default_rng(-5))."""
    from r1fast.eval import EvalConfig
    from r1fast.pipeline_recipe import DataGenConfig
    from r1fast.rejection import RejectionConfig
    from r1fast.sft import SFTConfig

    schema = {"eval": EvalConfig, "sft": SFTConfig, "rejection": RejectionConfig, "datagen": DataGenConfig}[stage]
    with pytest.raises(ConfigError, match=r"seed: 18446744073709551616 is out of range"):
        load_stage_config(None, ["--seed", str(2**64)], schema=schema, whole=False)
    assert load_stage_config(None, ["--seed", "-5"], schema=schema, whole=False).seed == -5


def test_bootstrap_takes_any_config_seed():
    from r1fast.eval_metrics import bootstrap_std

    assert bootstrap_std([0.0, 1.0, 1.0], seed=-5) == bootstrap_std([0.0, 1.0, 1.0], seed=2**64 - 5) > 0


def test_help_of_a_stage_with_required_fields_applies_overrides(capsys):
    """`r1fast.eval --help --k 8` exited 2 with 'model is required' instead of printing the options."""
    from r1fast.eval import EvalConfig

    with pytest.raises(SystemExit) as info:
        parse_cli(["--help", "--k", "8"], schema=EvalConfig)
    assert info.value.code == 0 and "--k int = 8" in capsys.readouterr().out


def test_ref_update_steps_without_a_reference_is_refused():
    assert "grpo.ref_update_steps=5 has no effect with grpo.beta=0" in _error(overrides=["--grpo.ref_update_steps", "5", "--grpo.beta", "0"])
    assert load_config(None, ["--grpo.ref_update_steps", "5", "--grpo.beta", "0.01"]).grpo.ref_update_steps == 5


def test_the_readme_recipe_paths_read_the_installed_recipes_outside_a_checkout(tmp_path, monkeypatch, capsys):
    """`python -m r1fast.pipeline --recipe recipes/tiny_r1.toml` (the README's form) failed with "No such file"
    from any directory but a checkout, although a wheel install ships the file."""
    from r1fast.config_io import ConfigError, read_toml
    from r1fast.pipeline_recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    assert load_recipe("recipes/tiny_r1.toml").stages
    assert "reading the recipe installed with r1fast" in capsys.readouterr().err
    assert read_toml("recipes/tiny_r1_zero.toml")["train"]
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tiny_r1_zero.toml").write_text('[train]\nname = "mine"\n')
    assert read_toml("recipes/tiny_r1_zero.toml") == {"train": {"name": "mine"}}  # a file that is here wins
    for missing in ("recipes/nope.toml", "elsewhere/tiny_r1.toml", "tiny_r1.toml"):
        with pytest.raises(ConfigError, match="cannot read config file .*No such file"):
            read_toml(missing)


def _toml(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_bool_is_not_an_int(tmp_path):
    """TOML `seed = true` must not be taken as seed 1 (bool is an int subclass in Python)."""
    with pytest.raises(ConfigError, match=r"train\.seed"):
        load_config(_toml(tmp_path, "[train]\nseed = true\n"))
    with pytest.raises(ConfigError, match=r"rollout\.max_new_tokens"):
        load_config(_toml(tmp_path, "[rollout]\nmax_new_tokens = false\n"))


@pytest.mark.parametrize("value", ["[1.0, 2.0]", "[-1.0, -0.5, 0.5, 1.0, 2.0]"])
def test_fixed_length_tuple_length_is_checked(tmp_path, value):
    """tuple[float, float, float, float]: a wrong length is a ConfigError naming the key, not a bare
    zip() ValueError (which the CLIs print as a traceback)."""
    with pytest.raises(ConfigError, match=r"rewards\.length_cosine_values"):
        load_config(_toml(tmp_path, f"[rewards]\nlength_cosine_values = {value}\n"))
    with pytest.raises(ConfigError, match=r"train\.betas"):
        load_config(_toml(tmp_path, "[train]\nbetas = [0.9]\n"))


@pytest.mark.parametrize("override, key", [
    (["--train.min_lr_ratio", "1.5"], "train.min_lr_ratio"),   # a cosine floor above lr
    (["--train.log_every", "0"], "train.log_every"),           # step % 0
])
def test_train_ranges(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)
    # the bound itself is allowed
    edge = {"train.min_lr_ratio": "1.0", "train.log_every": "1"}[key]
    cfg = load_config(None, [override[0], edge])
    assert getattr(cfg.train, key.split(".")[1]) == type(getattr(cfg.train, key.split(".")[1]))(float(edge))


@dataclass
class _Inner:
    sizes: list[int] = bounded((1, 2), ge=1)
    scales: dict[str, float] = bounded(None, gt=0)

    def __post_init__(self):
        if self.scales is None:
            self.scales = {"a": 1.0}


@dataclass
class _Schema:
    inner: _Inner = field(default_factory=_Inner)


@pytest.mark.parametrize("text, key", [
    ("[inner]\nsizes = [3, 0]\n", r"inner\.sizes\[1\]"),
    ("[inner]\nscales = {a = 1.0, b = -2.0}\n", r"inner\.scales\.b"),
    ("[inner]\nscales = {a = inf}\n", r"inner\.scales\.a"),
])
def test_bounds_apply_to_every_element(tmp_path, text, key):
    """config_io's contract: a bounded() range applies to every element of a list/tuple/dict value."""
    with pytest.raises(ConfigError, match=key):
        load_stage_config(_toml(tmp_path, text), None, schema=_Schema)
    ok = load_stage_config(_toml(tmp_path, "[inner]\nsizes = [3, 1]\nscales = {a = 0.5}\n"), None, schema=_Schema)
    assert ok.inner.sizes == [3, 1] and ok.inner.scales == {"a": 0.5}

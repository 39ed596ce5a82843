"""r1fast.config: TOML + CLI overrides, strict one-line errors, dump/load round trip, docs, --help."""

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import pytest

from r1fast import config as C
from r1fast.config import Config, ConfigError, config_to_toml, describe, field_docs, load_config, parse_cli, save_config


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _error(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message, f"error message must be one line: {message!r}"
    return message


def _sections(cls=Config):
    for f in dataclasses.fields(cls):
        yield f.name, typing.get_type_hints(cls)[f.name]


def test_defaults_without_file_or_overrides():
    cfg = load_config(None, [])
    assert cfg == Config()
    assert cfg.model.name_or_path == "tiny" and cfg.model.dtype == "float32"
    assert cfg.train.out_dir == "runs" and cfg.grpo.delta is None
    assert isinstance(cfg.train.betas, tuple)


def test_every_field_has_a_docstring():
    for name, section in _sections():
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
        assert not missing, f"[{name}] fields without a docstring: {missing}"
        assert section.__doc__, f"section {section.__name__} has no class docstring"


def test_toml_file_sets_values_and_normalizes_types(tmp_path):
    path = _write(tmp_path, """
[train]
lr = 1          # int accepted for a float field
betas = [0.8, 0.9]
resume = "latest"
[grpo]
loss_type = "dr_grpo"
delta = 1.5
[rewards]
weights = {accuracy = 2, "odd key" = 0.25}
""")
    cfg = load_config(path, [])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.9) and cfg.train.resume == "latest"
    assert cfg.grpo.loss_type == "dr_grpo" and cfg.grpo.delta == 1.5
    assert cfg.rewards.weights == {"accuracy": 2.0, "odd key": 0.25}
    assert cfg.model == Config().model  # untouched sections keep their defaults


@pytest.mark.parametrize(
    "tokens, getter, expected",
    [
        (["--parallel.fsdp", "true"], lambda c: c.parallel.fsdp, True),
        (["--parallel.fsdp=0"], lambda c: c.parallel.fsdp, False),
        (["--model.tie_word_embeddings", "FALSE"], lambda c: c.model.tie_word_embeddings, False),
        (["--model.tie_word_embeddings", "True"], lambda c: c.model.tie_word_embeddings, True),
        (["--parallel.activation_checkpointing"], lambda c: c.parallel.activation_checkpointing, True),
        (["--model.hidden_size", "96"], lambda c: c.model.hidden_size, 96),
        (["--data.seed=-3"], lambda c: c.data.seed, -3),
        (["--data.seed", "-3"], lambda c: c.data.seed, -3),
        (["--train.lr", "1e-6"], lambda c: c.train.lr, 1e-6),
        (["--train.name", "my run=1"], lambda c: c.train.name, "my run=1"),
        (["--train.name=a=b"], lambda c: c.train.name, "a=b"),
        (["--grpo.scale_rewards", "batch"], lambda c: c.grpo.scale_rewards, "batch"),
        (["--grpo.delta", "2.5"], lambda c: c.grpo.delta, 2.5),
        (["--grpo.delta", "none"], lambda c: c.grpo.delta, None),
        (["--train.resume", "None"], lambda c: c.train.resume, None),
        (["--train.betas", "0.5,0.6"], lambda c: c.train.betas, (0.5, 0.6)),
        (["--train.betas=[0.7, 0.8]"], lambda c: c.train.betas, (0.7, 0.8)),
        (["--rewards.weights", "{accuracy = 3, length = -0.5}"], lambda c: c.rewards.weights,
         {"accuracy": 3.0, "length": -0.5}),
        (["--rewards.weights.format", "0.2"], lambda c: c.rewards.weights, {"accuracy": 1.0, "format": 0.2}),
    ],
)
def test_cli_override_of_each_type(tokens, getter, expected):
    value = getter(load_config(None, tokens))
    assert value == expected and type(value) is type(expected)


def test_cli_overrides_apply_after_the_file_in_order(tmp_path):
    path = _write(tmp_path, "[train]\nsteps = 5\nlr = 0.1\n")
    cfg = load_config(path, ["--train.steps", "7", "--train.steps=9"])
    assert cfg.train.steps == 9 and cfg.train.lr == 0.1


@pytest.mark.parametrize(
    "toml, overrides, must_contain",
    [
        ("[grpo]\neps_lo = 0.1\n", [], ["'grpo.eps_lo'", "did you mean 'eps_low'", "eps_high", "micro_batch_size"]),
        ("", ["--grpo.eps_lo", "0.1"], ["'grpo.eps_lo'", "--grpo.eps_lo", "allowed keys in [grpo]", "eps_low"]),
        ("[optim]\nlr = 1\n", [], ["'optim'", "allowed keys in the top level", "model", "train"]),
        ("", ["--optim.lr", "1"], ["'optim'", "model, rollout, grpo, rewards, data, parallel, train"]),
        ("", ["--train.lr.x", "1"], ["train.lr is not a section"]),
        ("", ["--train", "1"], ["train is a section", "lr"]),
        ("model = 3\n", [], ["model is a section", "[model]"]),
    ],
)
def test_unknown_keys_name_the_key_and_list_allowed(tmp_path, toml, overrides, must_contain):
    message = _error(_write(tmp_path, toml) if toml else None, overrides)
    for text in must_contain:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize(
    "toml, overrides, must_contain",
    [
        ("[model]\nhidden_size = \"big\"\n", [], ["model.hidden_size", "expected int", "'big'", "run.toml"]),
        ("", ["--model.hidden_size", "1.5"], ["model.hidden_size", "expected int", "'1.5'", "--model.hidden_size"]),
        ("[model]\nhidden_size = 64.0\n", [], ["model.hidden_size", "expected int", "64.0"]),
        ("", ["--parallel.fsdp", "yes please"], ["parallel.fsdp", "expected bool", "'yes please'"]),
        ("[parallel]\nfsdp = 1\n", [], ["parallel.fsdp", "expected bool", "got 1"]),
        ("", ["--train.lr", "fast"], ["train.lr", "expected float", "'fast'"]),
        ("[train]\nlr = true\n", [], ["train.lr", "expected float", "True"]),
        ("[train]\nname = 3\n", [], ["train.name", "expected str", "3"]),
        ("", ["--grpo.delta", "wide"], ["grpo.delta", "expected float or none", "'wide'"]),
        ("[grpo]\ndelta = \"wide\"\n", [], ["grpo.delta", "expected float or none"]),
        ("", ["--train.betas", "0.9"], ["train.betas", "expected (float, float)", "'0.9'"]),
        ("[train]\nbetas = [0.9, \"x\"]\n", [], ["train.betas[1]", "expected float", "'x'"]),
        ("", ["--rewards.weights", "accuracy=1"], ["rewards.weights", "expected table of str to float"]),
        ("[rewards]\nweights = {accuracy = \"high\"}\n", [], ["rewards.weights.accuracy", "expected float"]),
        ("", ["--rewards.weights.format", "lots"], ["rewards.weights.format", "expected float", "'lots'"]),
        ("", ["--model.hidden_size"], ["--model.hidden_size needs a value", "int"]),
    ],
)
def test_wrong_types_name_key_expected_type_and_value(tmp_path, toml, overrides, must_contain):
    message = _error(_write(tmp_path, toml) if toml else None, overrides)
    for text in must_contain:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["--grpo.scale_rewards", "std"], ["grpo.scale_rewards", "'std'", "'group', 'batch', 'none'"]),
        (["--grpo.loss_type", "ppo"], ["grpo.loss_type", "'grpo', 'bnpo', 'dr_grpo', 'dapo'"]),
        (["--grpo.eps_low", "1"], ["grpo.eps_low", "1.0", "0 <= value < 1"]),
        (["--grpo.eps_low=-0.1"], ["grpo.eps_low", "0 <= value < 1"]),
        (["--train.lr", "0"], ["train.lr", "0 < value"]),
        (["--train.lr", "nan"], ["train.lr", "0 < value"]),
        (["--grpo.samples_per_prompt", "1"], ["grpo.samples_per_prompt", "2 <= value"]),
        (["--rollout.top_p", "1.5"], ["rollout.top_p", "0 < value <= 1"]),
        (["--rollout.temperature", "0"], ["rollout.temperature", "1e-05 <= value"]),  # GRPO divides logits by it
        (["--rollout.temperature", "1e-6"], ["rollout.temperature", "1e-06", "1e-05 <= value"]),  # engine refuses it
        (["--train.betas", "0.9,1.0"], ["train.betas[1]", "0 <= value < 1"]),
        (["--grpo.delta", "0.5"], ["grpo.delta", "1 < value"]),
        # at or below 1 + eps_high the cap clipped positive advantages too (accepted before)
        (["--grpo.delta", "1.2"], ["grpo.delta=1.2 must exceed 1 + grpo.eps_high = 1.2", "positive advantages"]),
        (["--grpo.delta", "1.25", "--grpo.eps_high", "0.28"], ["grpo.delta=1.25 must exceed 1 + grpo.eps_high = 1.28"]),
    ],
)
def test_out_of_range_names_key_and_allowed_values(overrides, must_contain):
    message = _error(None, overrides)
    for text in must_contain:
        assert text in message, f"{text!r} not in {message!r}"


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["--model.num_heads", "3"], ["model.num_heads=3", "model.hidden_size=64"]),
        (["--model.num_kv_heads", "3"], ["model.num_kv_heads=3", "model.num_heads=4"]),
        (["--model.num_heads", "64"], ["model head dim 1 must be even"]),
        (["--model.head_dim", "9", "--model.num_heads", "6"], ["model head dim 9 must be even"]),
        (["--rollout.block_size", "12"], ["rollout.block_size=12", "power of two"]),
        (["--grpo.soft_overlong_penalty", "--grpo.overlong_cache_len", "64"], ["grpo.overlong_cache_len=64",
                                                                               "rollout.max_new_tokens=64"]),
        (["--rollout.max_new_tokens", "512"], ["rollout.max_new_tokens=512", "model.max_seq_len=512"]),
        (["--data.template", "nosuch"], ["data.template", "'nosuch'", "r1_zero, compact, none, chat, auto"]),
        (["--rewards.weights.format", "inf"], ["rewards.weights.format", "finite"]),
    ],
)
def test_cross_field_checks(overrides, must_contain):
    message = _error(None, overrides)
    for text in must_contain:
        assert text in message, f"{text!r} not in {message!r}"


def test_head_dim_may_be_set_independently_of_hidden_size():
    cfg = load_config(None, ["--model.num_heads", "6", "--model.num_kv_heads", "3", "--model.head_dim", "16"])
    assert cfg.model.resolved_head_dim == 16 and Config().model.resolved_head_dim == 16


def test_validate_catches_programmatic_mistakes():
    cfg = Config()
    cfg.train.lr = "fast"
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float, got 'fast'$"):
        cfg.validate()
    cfg = Config()
    cfg.train.betas = [0.8, 0.9]  # a list is normalized to the annotated tuple
    assert cfg.validate().train.betas == (0.8, 0.9)


def _unusual_config():
    cfg = Config()
    cfg.train.name = 'quote " backslash \\ tab \t newline \n unicode é 😀 del \x7f'
    cfg.train.lr = 1.2345678901234567e-7
    cfg.train.betas = (0.0, 0.999999)
    cfg.train.resume = "none-like but not none"
    cfg.grpo.delta = math.nextafter(1 + cfg.grpo.eps_high, math.inf)  # the smallest delta allowed
    cfg.grpo.loss_type = "dapo"
    cfg.rollout.num_blocks = 12345
    cfg.rollout.temperature = math.nextafter(1e-5, 1.0)  # just above the engine's smallest temperature
    cfg.rewards.weights = {"accuracy": -1e300, "with space": 5e-324, "a.b": 0.1, "": 2.0}
    cfg.model.rope_theta = 1e6
    cfg.data.seed = -(2**62)
    return cfg


@pytest.mark.parametrize("comments", [True, False])
def test_dump_then_load_is_exact(tmp_path, comments):
    for cfg in (Config(), _unusual_config()):
        text = config_to_toml(cfg, comments=comments)
        loaded = load_config(_write(tmp_path, text), [])
        assert loaded == cfg
        assert config_to_toml(loaded, comments=comments) == text


def test_save_config_writes_loadable_file(tmp_path):
    cfg = load_config(None, ["--train.steps", "3", "--rewards.weights={x = 1.5}"])
    path = tmp_path / "nested" / "dir" / "config.toml"
    save_config(cfg, str(path))
    assert load_config(str(path), []) == cfg


@dataclass
class _MoE:
    """Mixture of experts (a section nested in a section)."""

    num_experts: int = C.bounded(8, ge=1)
    """Experts per layer."""
    layers: list[int] = field(default_factory=lambda: [1, 3])
    """Which layers are MoE."""
    router: typing.Literal["topk", "group"] = "topk"
    """Routing rule."""


@dataclass
class _Model:
    """A model section holding a nested section."""

    width: int = 4
    """Width."""
    moe: _MoE = field(default_factory=_MoE)
    """Experts."""


@dataclass
class _Root:
    """A root schema without validate(): the loader checks it field by field."""

    model: _Model = field(default_factory=_Model)
    """The model."""


def test_nested_sections_and_list_fields_work_for_any_schema(tmp_path):
    """A section added later (a dataclass inside a section) needs no loader changes."""
    path = _write(tmp_path, "[model]\nwidth = 6\n[model.moe]\nnum_experts = 4\nlayers = [0]\n")
    cfg = load_config(path, ["--model.moe.router", "group", "--model.moe.layers", "2,5"], schema=_Root)
    assert cfg == _Root(_Model(width=6, moe=_MoE(num_experts=4, layers=[2, 5], router="group")))
    text = config_to_toml(cfg)
    assert "[model.moe]" in text
    assert load_config(_write(tmp_path, text, "dump.toml"), [], schema=_Root) == cfg
    assert "--model.moe.num_experts int = 8  (>= 1)" in describe(_Root)
    assert "      Experts per layer." in describe(_Root)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["--model.moe.num_expert", "2"], schema=_Root)
    assert "'model.moe.num_expert'" in str(info.value) and "allowed keys in [model.moe]" in str(info.value)
    with pytest.raises(ConfigError, match=r"^model\.moe\.num_experts: 0 is out of range"):
        load_config(None, ["--model.moe.num_experts=0"], schema=_Root)
    with pytest.raises(ConfigError, match=r"model\.moe\.layers\[1\]: expected int, got 'x'"):
        load_config(None, ["--model.moe.layers", "1,x"], schema=_Root)


def test_describe_lists_every_option_with_type_default_and_doc():
    text = describe(Config)
    for name, section in _sections():
        assert f"[{name}]" in text
        for f in dataclasses.fields(section):
            assert f"--{name}.{f.name} " in text
    assert "--grpo.scale_rewards one of 'group', 'batch', 'none' = \"group\"" in text
    assert "--grpo.eps_low float = 0.2  (>= 0, < 1)" in text
    assert "--grpo.delta float or none = none  (> 1)" in text
    assert "G: completions sampled per prompt" in text


def test_parse_cli_splits_config_path_and_overrides():
    assert parse_cli([]) == (None, [])
    assert parse_cli(["--config", "a.toml", "--train.lr", "1e-3"]) == ("a.toml", ["--train.lr", "1e-3"])
    assert parse_cli(["--train.steps=2", "--config=b.toml"]) == ("b.toml", ["--train.steps=2"])
    with pytest.raises(ConfigError, match="--config needs a path"):
        parse_cli(["--config"])
    with pytest.raises(ConfigError, match="given twice"):
        parse_cli(["--config", "a", "--config", "b"])
    with pytest.raises(ConfigError, match=r"--section\.field VALUE, got 'stray'"):
        parse_cli(["stray"])


def test_parse_cli_help_prints_options_and_exits(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--train.lr", "1", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config PATH" in out and "--train.lr float = 1.0  (> 0)" in out  # the value this command would run


def test_train_help_shows_the_values_the_command_would_run(capsys, tmp_path):
    """``r1fast.train`` without --config runs the tiny recipe, so --help shows its values, not the dataclass's."""
    from r1fast.train import default_recipe, main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert f"Values shown are those of {default_recipe()}" in out
    assert "--model.hidden_size int = 128" in out and "--parallel.fsdp bool = true" in out
    with pytest.raises(SystemExit):
        main(["--help", "--config", _write(tmp_path, "[model]\nhidden_size = 96\n")])
    assert "--model.hidden_size int = 96" in capsys.readouterr().out


def test_unreadable_and_invalid_files_are_config_errors(tmp_path):
    assert "cannot read config file" in _error(str(tmp_path / "missing.toml"))
    assert "invalid TOML" in _error(_write(tmp_path, "[train\nlr = 1\n"))


def test_non_finite_floats_are_out_of_range_even_where_bounded_only_below(tmp_path):
    cfg = Config()
    cfg.rollout.temperature = math.inf  # bounded only below: inf passed every check before
    with pytest.raises(ConfigError, match=r"^rollout\.temperature: inf is out of range"):
        load_config(_write(tmp_path, config_to_toml(cfg)), [])


def test_run_cli_reports_user_errors_in_one_line_and_lets_bugs_through(capsys):
    from r1fast.config_io import DataError, run_cli

    def raising(err):
        def body():
            raise err
        return body

    assert run_cli("prog", raising(ConfigError("k: bad"))) == 2
    assert capsys.readouterr().err == "prog: error: k: bad\n"
    assert run_cli("prog", raising(DataError("d.jsonl:3: malformed JSON"))) == 1  # bad data: no user_errors needed
    assert capsys.readouterr().err == "prog: error: d.jsonl:3: malformed JSON\n"
    assert run_cli("prog", raising(FileNotFoundError("data: gone")), user_errors=(FileNotFoundError,)) == 1
    assert capsys.readouterr().err == "prog: error: data: gone\n"
    with pytest.raises(ValueError, match="a bug"):  # any other ValueError is a bug: its traceback is wanted
        run_cli("prog", raising(ValueError("a bug")))
    assert issubclass(DataError, ValueError) and not issubclass(DataError, ConfigError)


def test_temperature_bound_is_the_engines_smallest_temperature():
    """The config refuses what the rollout engine would refuse mid-run (with a traceback, not a one-line error)."""
    from r1fast.rollout.sampler import MIN_TEMPERATURE

    assert C.RolloutConfig.__dataclass_fields__["temperature"].metadata["bounds"] == {"ge": MIN_TEMPERATURE}


def test_every_template_the_data_pipeline_takes_is_accepted():
    from r1fast.data import TEMPLATES

    names = (*TEMPLATES, "chat", "auto")
    assert [load_config(None, ["--data.template", name]).data.template for name in names] == list(names)
    assert "unknown template 'R1_Zero'" in _error(None, ["--data.template", "R1_Zero"])  # case-sensitive, as r1fast.data


def test_max_seq_len_bounds_max_new_tokens_only_for_the_tiny_model(tmp_path):
    """An HF model's positions come from its config.json (r1fast.train checks them against the real prompts)."""
    overrides = ["--rollout.max_new_tokens", "600"]
    assert "model.max_seq_len=512" in _error(None, overrides)
    cfg = load_config(None, ["--model.name_or_path", str(tmp_path), *overrides])
    assert cfg.rollout.max_new_tokens == 600 and cfg.model.max_seq_len == 512


def test_defaults_fit_the_default_prompts():
    """A config without overrides runs: the longest default prompt plus rollout.max_new_tokens fits the model."""
    from r1fast.data_setup import build_datasets, encode_prompts
    from r1fast.tokenizer import CharTokenizer

    cfg = load_config(None, [])
    assert cfg.model.name_or_path == "tiny" and cfg.data.template == "r1_zero"
    _, train, heldout = build_datasets(cfg)  # the prompts r1fast.train checks with fit_lengths
    longest = max(len(ids) for ids in encode_prompts(CharTokenizer(), train + heldout, cfg.data.template))
    assert longest > 256  # the R1-Zero template alone is 365 characters: the old default 256 could not run
    assert longest + cfg.rollout.max_new_tokens <= cfg.model.max_seq_len, (longest, cfg.rollout.max_new_tokens)

"""Config mistakes that need the data, the tokenizer or the reward registry are refused before the model is
built (a 7B load takes minutes; the probe measured 15-21 s for a wrong task or reward name on a 300M model)."""

import pytest
from train_testing import tiny_config

import r1fast.train as T
from r1fast.config_io import ConfigError


class Built(Exception):
    """Raised where the model would load: a run that gets there passed every earlier check."""


@pytest.fixture
def no_model_load(monkeypatch):
    def build_model(*args, **kwargs):
        raise Built

    monkeypatch.setattr(T, "build_model", build_model)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")


@pytest.mark.parametrize(("override", "match"), [
    (("--rewards.weights", "{acuracy = 1.0}"), "rewards.weights.acuracy: unknown reward"),
    (("--data.task", "additon"), "data.task: 'additon' is neither a built-in task"),
    (("--data.params", "{min_digits = 1, max_digit = 2}"), "data.params="),
    (("--data.template", "chat"), "chat"),
    (("--parallel.fp8_experts", "true"), "parallel.fp8_experts=true: the tiny model is dense"),
    (("--grpo.prompts_per_step", "3"), None),  # one rank: any count divides; reaches the model
])
def test_mistakes_fail_before_the_model_is_built(tmp_path, no_model_load, override, match):
    cfg = tiny_config(tmp_path, *override)
    with pytest.raises(Built if match is None else ConfigError, match=match):
        T.run(cfg)
    assert not (tmp_path / cfg.train.name).exists()  # nothing written for a refused run


def test_no_evaluation_set_reports_no_accuracy(tmp_path, monkeypatch):
    """data.eval_size=0 ("no evaluation set") reported greedy accuracy 0.0 over 0 prompts and a gain of 0."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    summary = T.run(tiny_config(tmp_path, "--data.eval_size", "0", "--train.steps", "1", "--train.sft_steps", "0"))
    assert summary["eval_before_rl"] is None and summary["eval_after_rl"] is None
    assert "greedy_accuracy_gain_points" not in summary


def test_too_long_prompts_are_named_by_file_line():
    """One 809-token prompt in a 7.5k-line MATH export stopped the run without saying which line it was."""
    from r1fast.train_checks import fit_lengths

    cfg = tiny_config("/tmp", "--rollout.max_new_tokens", "8", "--model.max_seq_len", "64")
    samples = [{"id": f"math.jsonl:{i + 1}"} for i in range(6)]
    prompts = [[1] * n for n in (10, 57, 56, 80, 60, 90)]
    with pytest.raises(ConfigError, match=r"64 positions .*fewer than 4 prompt\(s\) plus rollout.max_new_tokens=8 need: "
                                          r"math.jsonl:2 \(57 tokens\), math.jsonl:4 \(80 tokens\), math.jsonl:5 "
                                          r"\(60 tokens\), \.\.\. \(longest 90 tokens\)"):
        fit_lengths(cfg, None, prompts, [], samples)
    assert fit_lengths(cfg, None, prompts[:1] + prompts[2:3], [], samples[:2]) == []


def test_a_bad_resume_fails_before_the_model_is_built(tmp_path, monkeypatch):
    """A wrong --train.resume was found only after the model and the rollout engine were built (minutes for a 7B)."""
    def build_model(*args, **kwargs):
        pytest.fail("model built before train.resume was checked")

    monkeypatch.setattr(T, "build_model", build_model)
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    (tmp_path / "state.pt").write_text("x")
    for resume, error in ((str(tmp_path / "missing"), FileNotFoundError), ("latest", FileNotFoundError),
                          (str(tmp_path / "state.pt"), ConfigError)):
        cfg = tiny_config(tmp_path, "--train.resume", resume)
        with pytest.raises(error, match="train.resume"):
            T.run(cfg)
        assert not (tmp_path / cfg.train.name).exists()


def test_a_file_without_one_parsable_gold_answer_fails_before_the_model_is_built(tmp_path, no_model_load):
    """Every gold "see solution": each step skipped all 16 samples, made no update, and the run exited 0 with a
    summary of 0.0 accuracy over 0 prompts. One parsable gold is enough to train (the others are skipped)."""
    import json

    from r1fast.config_io import DataError

    data = tmp_path / "math.jsonl"
    rows = [{"prompt": f"what is {i} plus {i}", "answer": "see solution"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("--data.task", str(data), "--data.train_size", "40", "--train.sft_steps", "0")
    cfg = tiny_config(tmp_path, *args)
    with pytest.raises(DataError, match=r"data.task=.*math-verify parses none of the 1 distinct gold answers"):
        T.run(cfg)
    assert not (tmp_path / cfg.train.name).exists()
    for row in rows[:5]:  # some of them in the train split (~80%)
        row["answer"] = "10"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Built):
        T.run(tiny_config(tmp_path, *args))


def test_a_kv_cache_too_small_for_a_prompt_fails_before_the_model_is_built(tmp_path, monkeypatch):
    """--rollout.num_blocks 2 (32 tokens) crashed in evaluation.py with a ValueError traceback after config.toml
    and metrics.jsonl were written; fit_lengths checked only the model's positions."""
    def build_model(*args, **kwargs):
        pytest.fail("model built before the KV cache was checked")

    monkeypatch.setattr(T, "build_model", build_model)
    cfg = tiny_config(tmp_path, "--rollout.num_blocks", "2")
    with pytest.raises(ConfigError, match=r"rollout.num_blocks=2 x rollout.block_size=16 holds 32 KV-cache tokens, "
                                          r"but .* \+ rollout.max_new_tokens=12 - 1 needs \d+: set rollout.num_blocks"):
        T.run(cfg)
    assert not (tmp_path / cfg.train.name).exists()


def test_an_engine_sized_kv_cache_is_checked_before_any_file_is_written(tmp_path, monkeypatch):
    """num_blocks none: the engine sizes the cache (from free GPU memory on CUDA); checked once it has."""
    from r1fast.rollout import Engine

    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    monkeypatch.setattr(T, "Engine", lambda model, **kw: Engine(model, **{**kw, "num_blocks": 1}))
    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match=r"the cache sized from rollout.memory_fraction=.* holds 16 KV-cache tokens"):
        T.run(cfg)
    assert not (tmp_path / cfg.train.name).exists()


def test_fp8_experts_on_an_unfit_checkpoint_fail_before_it_loads(tmp_path, no_model_load):
    """A dense checkpoint (or experts off the recipe's 128 tile) was refused only after the whole model loaded."""
    from conftest import save_char_checkpoint, save_tiny_moe_checkpoint

    narrow = save_char_checkpoint(tmp_path / "narrow", model_type="deepseek_v3", hidden_size=64, intermediate_size=128,
                                  num_layers=2, num_heads=2, num_kv_heads=2, head_dim=48, qkv_bias=False,
                                  q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                  v_head_dim=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                  moe_intermediate_size=128, first_k_dense_replace=1, n_group=2, topk_group=1,
                                  routed_scaling_factor=1.0, max_position_embeddings=64)
    cases = ((save_char_checkpoint(tmp_path / "dense"), "is a dense qwen2 model"),
             (narrow, "multiples of 128, .* has 64 and 128"),
             (save_tiny_moe_checkpoint(tmp_path / "moe"), None))  # fits: reaches the model load
    for name, (path, match) in enumerate(cases):
        cfg = tiny_config(tmp_path, "--model.name_or_path", path, "--parallel.fp8_experts", "true",
                          "--train.name", f"run{name}")
        with pytest.raises(Built if match is None else ConfigError, match=match):
            T.run(cfg)


def test_an_hf_models_positions_are_checked_before_it_loads(tmp_path, no_model_load):
    """fit_lengths read max_position_embeddings from the built model: a completion length an HF checkpoint cannot
    hold was refused only after its whole load (minutes for a 7B); config.json says it before."""
    from conftest import save_char_checkpoint

    path = save_char_checkpoint(tmp_path / "short", max_position_embeddings=64)
    cfg = tiny_config(tmp_path, "--model.name_or_path", path, "--rollout.max_new_tokens", "60")
    with pytest.raises(ConfigError, match=r"^the model holds 64 positions \(max_position_embeddings in its config.json\)"):
        T.run(cfg)
    with pytest.raises(Built):  # TINY's 12 new tokens fit: the run reaches the load
        T.run(tiny_config(tmp_path, "--model.name_or_path", path, "--train.name", "b"))

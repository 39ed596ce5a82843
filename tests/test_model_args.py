"""r1fast.model_config.ModelArgs: shapes the model cannot run and configs HF cannot express are refused early;
config.json fields left out take the defaults transformers' config classes give them.

Pure config checks (no model is built), so the whole file runs in well under a second.
"""

import pytest

from r1fast.model_config import ModelArgs

MLA = dict(model_type="deepseek_v3", num_kv_heads=4, head_dim=16, v_head_dim=12, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
           first_k_dense_replace=1)
DENSE_MLA = {k: v for k, v in MLA.items()
             if k not in ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size")}


def test_qk_norm_follows_model_type_unless_given():
    assert ModelArgs(model_type="qwen3").qk_norm is True
    assert ModelArgs(model_type="llama").qk_norm is False and ModelArgs().qk_norm is False
    assert ModelArgs(qkv_bias=True).qk_norm is False  # qwen2
    assert ModelArgs(model_type="qwen3", qk_norm=False).qk_norm is False
    assert ModelArgs(model_type="qwen3").replace(vocab_size=512).qk_norm is True


@pytest.mark.parametrize("kw,match", [
    (dict(head_dim=15), "head_dim=15 must be even"),
    ({**MLA, "qk_rope_head_dim": 7, "head_dim": 15}, "qk_rope_head_dim=7 must be even"),
    ({**MLA, "num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({**MLA, "num_experts_per_tok": 0}, "num_experts_per_tok=0"),
    ({**MLA, "n_group": 2, "topk_group": 3}, "topk_group=3"),
    ({**MLA, "n_group": 2, "topk_group": 0}, "topk_group=0"),
    ({**MLA, "n_group": 0}, "n_group=0"),
    ({**MLA, "n_group": 3}, "n_group=3"),
    ({**MLA, "n_group": 8}, "n_group=8"),  # one expert per group: the top-2 group score cannot run
    ({**MLA, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "num_experts_per_tok=3 exceeds"),
    ({**MLA, "moe_layer_freq": 0}, "moe_layer_freq=0"),
])
def test_shapes_the_model_cannot_run_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**kw)


def test_valid_router_shapes_pass():
    ModelArgs(**{**MLA, "n_group": 4, "topk_group": 1})  # 2 experts in the one chosen group, k=2: fine
    ModelArgs(**{**MLA, "n_group": 8, "topk_group": 2, "topk_method": "group_limited_greedy",
                 "scoring_func": "softmax", "model_type": "deepseek_v2"})  # max group score: 1 per group is fine
    ModelArgs(num_experts_per_tok=99, topk_group=5)  # dense (n_routed_experts=0): router fields are unused
    ModelArgs(**{**MLA, "head_dim": 15, "qk_nope_head_dim": 7})  # MLA rotates only qk_rope_head_dim=8 dims


@pytest.mark.parametrize("kw,match", [
    (dict(model_type="qwen3", qk_norm=False), "qk_norm=False"),
    (dict(model_type="llama", qk_norm=True), "qk_norm=True"),
    (dict(model_type="qwen2", qkv_bias=True, qk_norm=True), "qk_norm=True"),
    (dict(model_type="llama", o_bias=True), "o_bias=True"),
    (dict(model_type="qwen3", qkv_bias=True), "qkv_bias=True"),
    (dict(model_type="qwen2"), "qkv_bias=False"),
    (dict(model_type="qwen2", qkv_bias=True, o_bias=True), "o_bias=True"),
    (dict(model_type="qwen2", qkv_bias=True, mlp_bias=True), "mlp_bias=True"),
    (dict(model_type="qwen3", mlp_bias=True), "mlp_bias=True"),
    (dict(model_type="llama", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8), "n_routed_experts=4"),
    ({**MLA, "model_type": "llama", "n_routed_experts": 0}, "kv_lora_rank=16"),
    (dict(model_type="deepseek_v3"), "kv_lora_rank=0"),
    ({**MLA, "mlp_bias": True}, "mlp_bias=True"),
    ({**MLA, "model_type": "deepseek_v2", "rope_interleave": False, "topk_method": "greedy", "scoring_func": "softmax"},
     "rope_interleave=False"),
    ({**MLA, "model_type": "deepseek_v2", "topk_method": "greedy"}, "scoring_func='sigmoid'"),
    ({**MLA, "model_type": "deepseek_v2", "scoring_func": "softmax"}, "topk_method='noaux_tc'"),
    ({**MLA, "moe_layer_freq": 2, "num_layers": 4}, "moe_layer_freq=2"),
    ({**MLA, "scoring_func": "softmax"}, "scoring_func='softmax'"),
    ({**MLA, "topk_method": "greedy"}, "topk_method='greedy'"),
])
def test_to_hf_config_refuses_what_the_architecture_cannot_hold(kw, match):
    """transformers builds modules from the config alone: these would load as a different model."""
    args = ModelArgs(**kw)
    with pytest.raises(ValueError, match=match) as err:
        args.to_hf_config()
    assert f"model_type={args.model_type!r}" in str(err.value)


@pytest.mark.parametrize("kw", [
    dict(model_type="qwen3"), dict(model_type="qwen3", qkv_bias=True, o_bias=True),
    dict(model_type="llama", qkv_bias=True, o_bias=True, mlp_bias=True), dict(qkv_bias=True), MLA,
    {**MLA, "rope_interleave": False}, {**MLA, "qkv_bias": True},  # MLA has no q/k/v biases to lose
    {**MLA, "model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "scoring_func": "softmax"},
])
def test_expressible_args_round_trip_through_the_hf_config(kw):
    args = ModelArgs(**kw)
    back = ModelArgs.from_hf_config(args.to_hf_config())
    skip = {"hf_config", "qkv_bias", "o_bias"} if args.is_mla else {"hf_config"}
    assert {k: v for k, v in back.to_dict().items() if k not in skip} == \
        {k: v for k, v in args.to_dict().items() if k not in skip}


def test_dense_deepseek_config_builds_no_moe_layer():
    """n_routed_experts=0: every layer is dense (transformers would otherwise build MoE layers of 0 experts)."""
    cfg = ModelArgs(**DENSE_MLA, num_layers=3).to_hf_config()
    assert cfg["first_k_dense_replace"] == 3
    assert not ModelArgs.from_hf_config(cfg).is_moe


# ---- config.json fields left out take transformers' defaults; settings r1fast cannot run are refused ----

HF_DENSE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4)  # Qwen reads a missing count as 32 (below)
HF_MLA = dict(HF_DENSE, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=16, n_group=1, topk_group=1)  # V3's n_group 8 > 4 experts
MODEL_TYPES = ["llama", "qwen2", "qwen3", "deepseek_v3", "deepseek_v2"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_minimal_config_defaults_match_transformers(model_type):
    transformers = pytest.importorskip("transformers", minversion="5")  # rope_parameters, qwen3, deepseek_v2
    cfg = dict(HF_MLA if model_type.startswith("deepseek") else HF_DENSE, model_type=model_type)
    args = ModelArgs.from_hf_config(cfg)
    hf = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if k != "model_type"})
    assert args.rms_norm_eps == hf.rms_norm_eps == 1e-6
    assert args.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert args.rope_scaling is None
    assert args.tie_word_embeddings is False and hf.tie_word_embeddings is False
    assert args.num_kv_heads == 4
    assert args.max_position_embeddings == hf.max_position_embeddings
    assert (args.bos_token_id, args.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    if model_type.startswith("deepseek"):
        assert args.norm_topk_prob == hf.norm_topk_prob == (model_type == "deepseek_v3")
        for key in ("routed_scaling_factor", "first_k_dense_replace", "q_lora_rank", "n_shared_experts"):
            assert getattr(args, key) == getattr(hf, key), key
    else:
        assert args.head_dim == hf.head_dim if model_type != "qwen2" else args.head_dim == 32 // 4


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("heads,hidden", [(32, 64 * 32), (64, 48 * 64)])
def test_every_default_r1fast_fills_in_is_the_one_transformers_does(model_type, heads, hidden):
    """hf_config_defaults.HF_DEFAULTS against transformers' config classes, key by key (DeepSeek-V3's full-size
    router defaults included: a config.json without routed_scaling_factor is scaled by 2.5 there, so here too)."""
    transformers = pytest.importorskip("transformers", minversion="5")
    from r1fast.hf_config_defaults import HF_DEFAULTS, hf_value

    core = dict(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=1, num_attention_heads=heads)
    hf = transformers.AutoConfig.for_model(model_type, **core)
    # a key the class lacks: its modeling code's fallback (no such bias; Qwen2's head_dim getattr)
    lacking = dict(attention_bias=False, mlp_bias=False, head_dim=hidden // heads)
    for key in HF_DEFAULTS[model_type]:
        assert hf_value(core, model_type, key) == getattr(hf, key, lacking.get(key, "no default")), key
    assert hf_value(dict(core, routed_scaling_factor=None), model_type, "routed_scaling_factor") is None  # key wins


def test_deepseek_v3_without_router_fields_takes_the_full_size_router():
    cfg = {k: v for k, v in HF_MLA.items() if k not in ("n_group", "topk_group")}
    cfg.update(model_type="deepseek_v3", n_routed_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    args = ModelArgs.from_hf_config(cfg)
    assert (args.routed_scaling_factor, args.n_group, args.topk_group, args.first_k_dense_replace) == (2.5, 8, 4, 3)
    assert args.q_lora_rank == 1536 and ModelArgs.from_hf_config(dict(cfg, q_lora_rank=None)).q_lora_rank is None
    assert [args.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    with pytest.raises(ValueError, match="n_group=8"):  # 4 experts cannot form transformers' 8 groups
        ModelArgs.from_hf_config(dict(cfg, n_routed_experts=4, num_experts_per_tok=2))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_without_kv_head_count_reads_32_or_is_refused(model_type):
    cfg = {k: v for k, v in HF_DENSE.items() if k != "num_key_value_heads"}
    with pytest.raises(ValueError, match="no num_key_value_heads.*num_attention_heads=4"):
        ModelArgs.from_hf_config(dict(cfg, model_type=model_type))
    assert ModelArgs.from_hf_config(dict(cfg, model_type=model_type, num_attention_heads=64, hidden_size=256,
                                         head_dim=8)).num_kv_heads == 32


def test_deepseek_v3_without_rope_interleave_rotates_interleaved_pairs():
    # released DeepSeek-V3 config.json files carry no rope_interleave: DeepSeek's code always interleaves
    cfg = dict(HF_MLA, model_type="deepseek_v3")
    assert ModelArgs.from_hf_config(cfg).rope_interleave is True
    assert ModelArgs.from_hf_config(dict(cfg, rope_interleave=False)).rope_interleave is False


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_sliding_window_attention_is_refused(model_type):
    cfg = dict(HF_DENSE, model_type=model_type, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_window"):
        ModelArgs.from_hf_config(cfg)
    # the flag off (Qwen's released configs): sliding_window is only a number then, and full attention is right
    ModelArgs.from_hf_config(dict(cfg, use_sliding_window=False))


def test_query_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelArgs(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelArgs.from_hf_config(dict(HF_DENSE, model_type="llama", num_attention_heads=4, num_key_value_heads=3))
    assert ModelArgs(vocab_size=64, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=3, head_dim=8).num_kv_heads == 3

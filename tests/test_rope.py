"""RoPE: the variants the architecture tests do not reach, against transformers' own ROPE_INIT_FUNCTIONS (linear
scaling, YaRN's default betas at a real head dim (Qwen2.5's 128), YaRN's attention factor with mscale !=
mscale_all_dim, the MLA softmax scale), and config.json's RoPE forms: DeepSeek's released configs name the kind
under the legacy key ``type``; partial rotary is refused rather than run as full rotary."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")  # rope_parameters

from r1fast.model_config import ModelArgs  # noqa: E402
from r1fast.rope import inv_freq_and_attention_factor, mla_softmax_scale  # noqa: E402
from r1fast.rope_config import read_rope  # noqa: E402


def _qwen2(rope_scaling, head_dim=128, max_pos=32768, theta=1e6):
    return transformers.Qwen2Config(vocab_size=64, hidden_size=4 * head_dim, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_pos,
                                    rope_theta=theta, rope_scaling=rope_scaling)


def _compare(cfg):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = ModelArgs.from_hf_config(cfg.to_dict())
    ref, ref_factor = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg)
    ours, factor = inv_freq_and_attention_factor(args.rope_dim, args.rope_theta, args.rope_scaling,
                                                 args.max_position_embeddings)
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-9)
    return ours, factor


def test_linear_rope_scaling_divides_frequencies_by_factor():
    ours, factor = _compare(_qwen2({"rope_type": "linear", "factor": 4.0}))
    plain = 1.0 / (1e6 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    torch.testing.assert_close(ours.double(), plain / 4.0, atol=0, rtol=1e-6)
    assert factor == 1.0


@pytest.mark.parametrize("theta", [1e6, 500.0])  # 500: the ramp's upper end passes dim / 2 and is clamped at dim - 1
def test_yarn_default_betas_at_real_head_dim(theta):
    # Qwen2.5's published YaRN recipe: no beta_fast / beta_slow in config.json, so transformers' 32 / 1 apply
    ours, factor = _compare(_qwen2({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                                   max_pos=131072, theta=theta))
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # the ramp must be a real blend: some frequencies kept, some divided by the factor, some between
    plain = 1.0 / (theta ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    ratio = plain / ours.double()
    assert ratio.min() == pytest.approx(1.0)
    if theta == 1e6:  # at theta 500 even the slowest frequency is only partly interpolated
        assert ratio.max() == pytest.approx(4.0)
    assert ((ratio > 1.01) & (ratio < 3.99)).any()


def test_yarn_attention_factor_with_distinct_mscales():
    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5}
    _, factor = _compare(_qwen2(scaling, max_pos=163840))
    m = lambda s: 0.1 * s * math.log(40.0) + 1.0  # noqa: E731
    assert factor == pytest.approx(m(1.0) / m(0.5))
    assert factor > 1.0


def test_mla_softmax_scale_is_mscale_all_dim_squared():
    scaling = {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5}
    m = 0.1 * 0.5 * math.log(40.0) + 1.0
    assert mla_softmax_scale(192, scaling) == pytest.approx(192**-0.5 * m * m)
    assert mla_softmax_scale(192, None) == pytest.approx(192**-0.5)


def test_yarn_without_factor_uses_max_position_ratio():
    # transformers: factor None -> max_position_embeddings / original_max_position_embeddings (here 4)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](
        _qwen2({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, max_pos=131072))
    ours, factor = inv_freq_and_attention_factor(
        128, 1e6, {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32768}, 131072)
    torch.testing.assert_close(ours, ref, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor) and factor > 1.1


MLA = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
           num_attention_heads=4, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
           max_position_embeddings=163840, rope_theta=10000)
V3_ROPE = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
           "original_max_position_embeddings": 4096}


def test_legacy_type_key_selects_the_scaling_kind():
    theta, scaling = read_rope(dict(MLA, rope_scaling={**V3_ROPE, "type": "yarn"}))
    assert theta == 10000.0
    assert scaling == {**V3_ROPE, "rope_type": "yarn"}
    legacy = ModelArgs.from_hf_config(dict(MLA, rope_scaling={**V3_ROPE, "type": "yarn"}))
    modern = ModelArgs.from_hf_config(dict(MLA, rope_scaling={**V3_ROPE, "rope_type": "yarn"}))
    assert legacy.rope_scaling == modern.rope_scaling and legacy.rope_scaling["rope_type"] == "yarn"


def test_legacy_linear_type_on_a_dense_model():
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4, rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelArgs.from_hf_config(cfg).rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("where", ["top", "rope_parameters"])
def test_partial_rotary_factor_is_refused(where):
    cfg = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=4)
    if where == "top":
        cfg["partial_rotary_factor"] = 0.5
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelArgs.from_hf_config(cfg)

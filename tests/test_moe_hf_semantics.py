"""DeepSeek MoE configs where r1fast, DeepSeek's own code and transformers could disagree: each is refused with a
ValueError naming the field, computed identically, or (the one deliberate difference) warned about on load and save.

Checkpoints are tiny (64 hidden, 8 experts, 2 layers) and built by transformers itself; fp64 where logits are
compared, so "identical" means max error 0 up to fp64 rounding (atol 1e-12).
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from test_model import V, randomize  # noqa: E402

from r1fast.checkpoint import SINGLE_FILE, CheckpointError  # noqa: E402
from r1fast.model import Transformer  # noqa: E402
from r1fast.model_config import ModelArgs  # noqa: E402
from r1fast.rope import inv_freq_and_attention_factor  # noqa: E402

H = 64
TINY = dict(vocab_size=V, hidden_size=H, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1)  # left out, V3 reads transformers' 8 groups of 4


def _save_hf(config, path):
    """A transformers model of ``config`` with std-0.15 weights, saved to ``path``; returned in fp64, eval mode."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    randomize(model)
    model.save_pretrained(path)
    return model.double()


def _v3(**kw):
    return transformers.DeepseekV3Config(**{**TINY, "q_lora_rank": 24, "n_group": 2, "topk_group": 1, **kw})


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else model.logits(out)


def _messages(record, text):
    return [str(w.message) for w in record if text in str(w.message)]


def test_v2_norm_topk_prob_keeps_deepseek_semantics_and_warns_on_load_and_save(tmp_path):
    """DeepSeek's V2 code renormalizes the top-k softmax probabilities instead of scaling them; transformers
    ignores norm_topk_prob for V2. r1fast computes DeepSeek's numbers and says so, loudly, both ways."""
    config = transformers.DeepseekV2Config(**TINY, q_lora_rank=None, topk_method="greedy", norm_topk_prob=True,
                                           routed_scaling_factor=1.5)
    hf = _save_hf(config, tmp_path / "hf")
    with pytest.warns(UserWarning, match=r"load: deepseek_v2 with norm_topk_prob=True.*transformers ignores"):
        ours = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    x = 3 * torch.randn(40, H, dtype=torch.float64)
    with torch.no_grad():
        weights, ids = ours.layers[1].mlp.gate(x)
        probs = torch.softmax(x.float() @ ours.layers[1].mlp.gate.weight.float().T, dim=-1)  # fp32, as both codes
        assert torch.equal(ids.sort(dim=-1).values, probs.topk(3, dim=-1).indices.sort(dim=-1).values)
        top = probs.gather(1, ids)
        # DeepSeek's formula: renormalized to sum 1, routed_scaling_factor not applied
        torch.testing.assert_close(weights, top / (top.sum(-1, keepdim=True) + 1e-20), atol=0, rtol=0)
        # and transformers' routed output is exactly ours scaled by 1.5 x the token's top-k mass: the warned difference
        shared = ours.layers[1].mlp.shared_experts(x)
        ours_routed = ours.layers[1].mlp(x) - shared
        hf_routed = hf.model.layers[1].mlp(x[None])[0] - shared
    ratio = (1.5 * top.sum(-1, keepdim=True)).to(torch.float64)
    torch.testing.assert_close(hf_routed, ours_routed * ratio, atol=1e-5, rtol=1e-5)
    assert (hf_routed - ours_routed).abs().max() > 1.0  # a real difference, not rounding
    with pytest.warns(UserWarning, match=r"save: deepseek_v2 with norm_topk_prob=True"):
        ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["norm_topk_prob"] is True


@pytest.mark.parametrize("kw", [dict(norm_topk_prob=False), dict(norm_topk_prob=True, num_experts_per_tok=1)])
def test_v2_configs_transformers_computes_alike_do_not_warn(kw):
    """k=1 skips DeepSeek's renormalization, norm_topk_prob=False never asks for it: both scale, like transformers."""
    args = ModelArgs.from_hf_config({**TINY, **kw, "architectures": ["DeepseekV2ForCausalLM"], "q_lora_rank": None})
    assert args.transformers_divergence() is None


@pytest.mark.parametrize("model_type,kw,field", [
    ("deepseek_v3", dict(scoring_func="softmax"), "scoring_func='softmax'"),  # DeepSeek's V3 code raises too
    ("deepseek_v3", dict(topk_method="greedy"), "topk_method='greedy'"),
    ("deepseek_v3", dict(topk_method="group_limited_greedy"), "topk_method='group_limited_greedy'"),
    ("deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq=2"),
    ("deepseek_v2", dict(topk_method="noaux_tc"), "topk_method='noaux_tc'"),
    ("deepseek_v2", dict(moe_layer_freq=2), "moe_layer_freq=2"),
])
def test_router_fields_transformers_ignores_are_refused_at_load(model_type, kw, field):
    """Loading these used to route differently from transformers (scoring_func) or fail on tensor names; save
    already refused them, so load and save now accept the same configs."""
    cfg = {**TINY, **kw, "model_type": model_type, "q_lora_rank": None, "num_hidden_layers": 4}
    with pytest.raises(ValueError, match=f"{field} is not supported for model_type='{model_type}'") as err:
        ModelArgs.from_hf_config(cfg)
    if "moe_layer_freq" in field:
        assert "every layer from first_k_dense_replace on an MoE layer" in str(err.value)


def test_v3_router_field_error_names_the_config_file(tmp_path):
    _save_hf(_v3(scoring_func="softmax"), tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: scoring_func='softmax' is not supported"):
        Transformer.from_pretrained(tmp_path)


def test_v3_without_shared_experts_round_trips_with_transformers(tmp_path):
    """transformers writes 0-width shared_experts tensors for n_shared_experts=0; they hold no weights."""
    hf = _save_hf(_v3(n_shared_experts=0), tmp_path / "hf")
    ids = torch.randint(0, V, (2, 13))
    ours = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    assert ours.layers[1].mlp.shared_experts is None
    ref = _logits(hf, ids)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(_logits(ours, ids), ref, atol=1e-12, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float64,
                                                             experts_implementation="eager").eval()
    torch.testing.assert_close(_logits(back, ids), ref, atol=1e-12, rtol=0)
    # only empty tensors are skipped: one with weights in a module r1fast lacks is still an error
    tensors = load_file(tmp_path / "ours" / SINGLE_FILE)
    tensors["model.layers.1.mlp.shared_experts.down_proj.weight"] = torch.zeros(H, 1, dtype=torch.float64)
    save_file(tensors, tmp_path / "ours" / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.1.mlp.shared_experts.down_proj"):
        Transformer.from_pretrained(tmp_path / "ours")


@pytest.mark.parametrize("alpha,warns", [(0.01, True), (0.0, False)])
def test_aux_loss_alpha_warns_once_on_load(alpha, warns, tmp_path):
    """Nothing computes the balancing loss; a checkpoint that asks for one says so once per load."""
    cfg = {**TINY, "architectures": ["DeepseekV2ForCausalLM"], "q_lora_rank": None, "norm_topk_prob": False,
           "aux_loss_alpha": alpha, "seq_aux": True}
    Transformer.from_config(cfg, seed=0).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Transformer.from_pretrained(tmp_path)
    assert len(_messages(record, f"aux_loss_alpha={alpha} is ignored")) == (1 if warns else 0)
    assert not _messages(record, "norm_topk_prob")


def test_v3_selection_bias_is_a_buffer_training_never_updates():
    model = Transformer.from_config(ModelArgs.from_hf_config(_v3().to_dict()), seed=0)
    assert not [n for n, _ in model.named_parameters() if "e_score_correction_bias" in n]
    assert [n for n, _ in model.named_buffers() if "e_score_correction_bias" in n]


@pytest.mark.parametrize("original,max_pos", [(4096, 163840), (64, 512)])
def test_yarn_frequencies_bit_identical_to_transformers(original, max_pos):
    """DeepSeek-V3's real rope (factor 40, rope dim 64): (1/base)/factor left 4 of 32 entries 1 fp32 ulp off."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": original, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = _v3(qk_rope_head_dim=64, rope_scaling=scaling, max_position_embeddings=max_pos)
    args = ModelArgs.from_hf_config(config.to_dict())
    ref, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    ours, factor = inv_freq_and_attention_factor(args.rope_dim, args.rope_theta, args.rope_scaling,
                                                 args.max_position_embeddings)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    assert factor == ref_factor

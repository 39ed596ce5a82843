"""MoE details the architecture comparisons miss: top-1 softmax routing with norm_topk_prob (DeepSeek scales
instead of renormalizing when k = 1), several shared experts (one SwiGLU of n_shared * moe_intermediate_size),
the weighted sum over a token's k experts in fp32 for bf16 models, the router scoring in fp32 in a bf16 model,
and the DeepSeek-V3 selection bias starting at zero (from_config allocates with to_empty)."""

import copy

import pytest
import torch

from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.moe import MoE, Router, grouped_experts

transformers = pytest.importorskip("transformers")


def _args(**kw):
    base = dict(model_type="deepseek_v2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=2, num_kv_heads=2, head_dim=16, v_head_dim=8, kv_lora_rank=8, qk_nope_head_dim=8,
                qk_rope_head_dim=8, n_routed_experts=6, num_experts_per_tok=1, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1, topk_method="greedy", scoring_func="softmax",
                norm_topk_prob=True, routed_scaling_factor=1.5)
    return ModelArgs(**{**base, **kw})


def test_top1_softmax_router_scales_instead_of_renormalizing():
    # DeepSeek-V2's code: `if top_k > 1 and norm_topk_prob: renormalize; else: * routed_scaling_factor`
    router = Router(_args())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
    x = torch.randn(20, 32, generator=gen)
    w, ids = router(x)
    probs = (x.double() @ router.weight.double().T).softmax(-1)
    top, top_ids = probs.max(-1)
    assert torch.equal(ids[:, 0], top_ids)
    torch.testing.assert_close(w[:, 0].double(), top * 1.5, atol=1e-6, rtol=0)
    assert (top < 0.9).any()  # some weights far from the renormalized 1 * 1.5


def test_shared_experts_width_matches_transformers():
    cfg = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=2,
                                        first_k_dense_replace=1, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=8,
                                        qk_rope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1)
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    ours = MoE(ModelArgs.from_hf_config(cfg.to_dict()))
    ref = hf.model.layers[1].mlp.shared_experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert getattr(ours.shared_experts, name).weight.shape == getattr(ref, name).weight.shape
    assert ours.shared_experts.gate_proj.weight.shape == (32, 32)  # 2 shared x 16


def test_bf16_weighted_sum_accumulates_in_fp32():
    """Each expert output is a bf16 GEMM; the k-way weighted sum of them is one fp32 sum rounded once."""
    gen = torch.Generator().manual_seed(0)
    t, h, inter, e, k = 16, 32, 16, 8, 8
    x = torch.randn(t, h, generator=gen).bfloat16()
    w_gate_up = (torch.randn(e, 2 * inter, h, generator=gen) * 0.3).bfloat16()
    w_down = (torch.randn(e, h, inter, generator=gen) * 0.3).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen)
    out = grouped_experts(x, w, ids, w_gate_up, w_down)
    ref = torch.zeros(t, h, dtype=torch.float64)
    for i in range(t):
        for j in range(k):
            gate, up = torch.nn.functional.linear(x[i:i + 1], w_gate_up[ids[i, j]]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down[ids[i, j]])  # bf16, as the code
            ref[i] += w[i, j].double() * y[0].double()
    assert out.dtype == torch.bfloat16
    # one rounding of the (fp32 ~ exact) sum: at most 0.2% of entries differ from the rounded fp64 sum over seeds
    # 0-39 (fp32 vs fp64 near a rounding tie); a bf16 running sum rounds k times and moves >= 51.7% of them
    assert (out != ref.bfloat16()).float().mean() < 0.01


def _v3_router_args(**kw):
    base = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=48, num_layers=2,
                num_heads=2, num_kv_heads=2, head_dim=16, v_head_dim=8, kv_lora_rank=8, qk_nope_head_dim=8,
                qk_rope_head_dim=8, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1)
    return ModelArgs(**{**base, **kw})


def test_bf16_router_scores_in_fp32():
    gen = torch.Generator().manual_seed(0)
    for kw in (dict(topk_method="noaux_tc", scoring_func="sigmoid"),
               dict(model_type="deepseek_v2", topk_method="greedy", scoring_func="softmax", norm_topk_prob=False)):
        router = Router(_v3_router_args(**kw))
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.3)
        bf16 = copy.deepcopy(router).to(torch.bfloat16)
        ref = copy.deepcopy(router)
        with torch.no_grad():
            ref.weight.copy_(bf16.weight.float())  # the same (bf16-representable) weights, in fp32
        x = (torch.randn(256, 64, generator=gen)).bfloat16()
        w, ids = bf16(x)
        w_ref, ids_ref = ref(x.float())
        assert w.dtype == torch.float32
        ids, order = ids.sort(-1)
        ids_ref, order_ref = ids_ref.sort(-1)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6, rtol=0)


def _v3_args():
    return _v3_router_args(hidden_size=32, n_routed_experts=4, num_experts_per_tok=2, topk_method="noaux_tc",
                           scoring_func="sigmoid")


def test_reset_parameters_zeroes_the_router_selection_bias():
    model = Transformer.from_config(_v3_args(), seed=0)
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    assert gates and all(torch.equal(g.e_score_correction_bias, torch.zeros(4)) for g in gates)
    with torch.no_grad():
        for g in gates:
            g.e_score_correction_bias.fill_(0.5)
    model.reset_parameters(seed=0)
    assert all(torch.equal(g.e_score_correction_bias, torch.zeros(4)) for g in gates)

"""r1fast.model vs HF transformers on tiny random checkpoints that transformers itself builds and saves.

Weights are re-drawn with std 0.15 (transformers' 0.02 init makes every layer nearly the identity and
would hide mistakes), router selection biases and norm weights are random too. fp32 on CPU; logits
must agree within 1e-5.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from r1fast.model import Transformer  # noqa: E402
from r1fast.model_config import ModelArgs  # noqa: E402
from r1fast.moe import MoE, get_fp8_experts_fn, grouped_experts, set_fp8_experts_fn  # noqa: E402

V, H = 300, 64
ATOL = 1e-5


def hf_config(name: str):
    """Tiny transformers configs, one per supported architecture / feature combination."""
    common = dict(vocab_size=V, hidden_size=H, max_position_embeddings=512, rms_norm_eps=1e-6)
    if name == "llama":
        return transformers.LlamaConfig(
            **common, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            attention_bias=True, mlp_bias=True, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64})
    if name == "qwen2":
        return transformers.Qwen2Config(
            **common, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=True, rope_theta=1e6,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    if name == "qwen3":
        return transformers.Qwen3Config(
            **common, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=24, tie_word_embeddings=False)
    moe = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
               first_k_dense_replace=1, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12)
    if name == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **common, **moe, num_key_value_heads=4, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    if name == "deepseek_v3_plain":  # no q LoRA, rotate-half rope, no groups, no scaling
        return transformers.DeepseekV3Config(
            **common, **moe, num_key_value_heads=4, q_lora_rank=None, n_group=1, topk_group=1, rope_interleave=False,
            routed_scaling_factor=1.0)
    if name == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **common, **moe, num_key_value_heads=4, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
            topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False)
    raise KeyError(name)


ARCHS = ["llama", "qwen2", "qwen3", "deepseek_v3", "deepseek_v3_plain", "deepseek_v2"]


@torch.no_grad()
def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn(b.shape, generator=gen))


_SAVED = {}


def saved_hf(name, tmp_path_factory):
    """(transformers model, its saved directory), built once per architecture per session."""
    if name not in _SAVED:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name)).eval()
        randomize(model)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        _SAVED[name] = (model, path)
    return _SAVED[name]


def hf_logits(model, ids, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=position_ids).logits


def r1_logits(model, ids, **kw):
    with torch.no_grad():
        return model.logits(model(ids, **kw))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tmp_path_factory):
    hf, path = saved_hf(arch, tmp_path_factory)
    ours = Transformer.from_pretrained(path)
    assert ours.args.model_type == arch.replace("_plain", "")
    ids = torch.randint(0, V, (2, 13))
    # positions past original_max_position_embeddings exercise the rope scaling
    pos = torch.arange(13).repeat(2, 1) + torch.tensor([[0], [150]])
    ref = hf_logits(hf, ids, pos)
    out = r1_logits(ours, ids, position_ids=pos)
    assert out.shape == (2, 13, V)
    assert ref.abs().max() > 0.5, "logits too small to be a meaningful comparison"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "deepseek_v3"])
@pytest.mark.parametrize("path", ["padded", "loop"])
def test_varlen_packed_equals_per_sequence(arch, path, tmp_path_factory):
    """Packed with cu_seqlens (positions restarting at 0 per sequence, no attention across boundaries), forward
    and backward equal one forward per sequence: dense, Qwen3 q/k norm, MLA + MoE; both SDPA layouts."""
    from r1fast.attention import SDPAAttention

    _, path_ = saved_hf(arch, tmp_path_factory)
    model = Transformer.from_pretrained(path_)
    attn = SDPAAttention()
    attn._padding_pays = lambda *a: path == "padded"
    lengths = [5, 1, 9, 4]
    seqs = [torch.randint(0, V, (n,)) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    weight = torch.randn(sum(lengths), H)  # a loss that reads every position

    def grads(out):
        model.zero_grad()
        (out * weight).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed = model(torch.cat(seqs), cu_seqlens=cu, attn=attn)
    g_packed = grads(packed)
    single = torch.cat([model(s[None], attn=attn)[0] for s in seqs])
    g_single = grads(single)
    assert packed.shape == (sum(lengths), H)
    torch.testing.assert_close(packed, single, atol=ATOL, rtol=0)
    assert g_packed.keys() == g_single.keys() == {n for n, _ in model.named_parameters() if n != "lm_head.weight"}
    for name, g in g_single.items():
        assert (g_packed[name] - g).abs().max() <= 1e-5 * g.abs().max() + 1e-7, name


def test_attention_backend_gets_the_contract(tmp_path_factory):
    """An injected backend sees packed q/k/v, layer index, cu_seqlens, max_seqlen, positions and scale."""
    _, path = saved_hf("deepseek_v3", tmp_path_factory)
    model = Transformer.from_pretrained(path)
    default = model._attention_for(torch.zeros(1))
    calls = []

    def spy(q, k, v, *, layer, cu_seqlens, max_seqlen, softmax_scale, positions):
        calls.append((layer, q.shape, k.shape, v.shape, cu_seqlens.tolist(), max_seqlen, positions.tolist(), softmax_scale))
        return default(q, k, v, layer=layer, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                       softmax_scale=softmax_scale, positions=positions)

    ids = torch.randint(0, V, (7,))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, attn=spy)
        ref = model(ids, cu_seqlens=cu)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert [c[0] for c in calls] == [0, 1, 2]
    layer, qs, ks, vs, cu_seen, max_len, pos, scale = calls[1]
    assert qs == (7, 4, 16) and ks == (7, 4, 16) and vs == (7, 4, 12)
    assert cu_seen == [0, 3, 7] and max_len == 4 and pos == [0, 1, 2, 0, 1, 2, 3]
    mscale = 0.1 * torch.log(torch.tensor(4.0)).item() + 1
    assert scale == pytest.approx(16**-0.5 * mscale * mscale)


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v3_plain", "deepseek_v2"])
def test_moe_routing_matches_transformers(arch, tmp_path_factory):
    hf, path = saved_hf(arch, tmp_path_factory)
    ours = Transformer.from_pretrained(path)
    x = torch.randn(37, H) * 3
    with torch.no_grad():
        _, ref_w, ref_ids = hf.model.layers[1].mlp.gate(x)
        w, ids = ours.layers[1].mlp.gate(x)
    assert w.dtype == torch.float32
    ref_ids, order_ref = ref_ids.sort(dim=-1)
    ids, order = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w.gather(1, order), ref_w.gather(1, order_ref), atol=1e-6, rtol=0)
    if arch != "deepseek_v2":  # the selection bias must have changed some choices, else it was not tested
        plain = torch.sigmoid(x @ ours.layers[1].mlp.gate.weight.T).topk(3, dim=-1)[1].sort(dim=-1)[0]
        assert not torch.equal(plain, ids)


def test_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from r1fast.rope import inv_freq_and_attention_factor

    for name in ["llama", "qwen2", "deepseek_v3"]:
        cfg = hf_config(name)
        args = ModelArgs.from_hf_config(cfg.to_dict())
        ref, ref_factor = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg)
        ours, factor = inv_freq_and_attention_factor(args.rope_dim, args.rope_theta, args.rope_scaling,
                                                     args.max_position_embeddings)
        # same formulas, same fp32 operation order: bit-identical (YaRN's interpolation was 1 ulp off before)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)
        assert factor == pytest.approx(ref_factor)


def _grouped_reference(x, w, ids, w_gate_up, w_down):
    """Per-token fp64 loop: sum_j w[t, j] * expert_{ids[t, j]}(x[t])."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    out = torch.zeros(x.shape[0], w_down.shape[1], dtype=torch.float64)
    inter = w_gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            h = w_gate_up[e] @ x[t]
            out[t] += w[t, j].double() * (w_down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return out


def test_grouped_experts_forward_backward_vs_fp64():
    torch.manual_seed(1)
    num_experts, hid, inter, tokens, k = 5, 24, 10, 19, 2
    x = torch.randn(tokens, hid, requires_grad=True)
    wgu = (0.3 * torch.randn(num_experts, 2 * inter, hid)).requires_grad_()
    wd = (0.3 * torch.randn(num_experts, hid, inter)).requires_grad_()
    ids = torch.stack([torch.randperm(4)[:k] for _ in range(tokens)])  # expert 4 never chosen: empty group
    w = torch.rand(tokens, k)
    out = grouped_experts(x, w, ids, wgu, wd)
    ref = _grouped_reference(x, w, ids, wgu, wd)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    xd, gud, dd = (t.detach().double().requires_grad_() for t in (x, wgu, wd))
    _grouped_reference(xd, w, ids, gud, dd).backward(grad.double())
    for ours_g, ref_g in [(x.grad, xd.grad), (wgu.grad, gud.grad), (wd.grad, dd.grad)]:
        torch.testing.assert_close(ours_g.double(), ref_g, atol=1e-5, rtol=0)
    assert torch.all(wgu.grad[4] == 0) and torch.all(wd.grad[4] == 0)


def test_experts_fn_injection_and_fp8_hook(tmp_path_factory):
    _, path = saved_hf("deepseek_v3", tmp_path_factory)
    model = Transformer.from_pretrained(path)
    ids = torch.randint(0, V, (1, 6))
    seen = []

    def spy(x, topk_weights, topk_ids, w_gate_up, w_down):
        seen.append((x.shape, topk_weights.dtype, topk_ids.shape, w_gate_up.shape, w_down.shape))
        return grouped_experts(x, topk_weights, topk_ids, w_gate_up, w_down)

    ref = r1_logits(model, ids)
    model.set_experts_fn(spy)
    torch.testing.assert_close(r1_logits(model, ids), ref, atol=0, rtol=0)
    assert seen[0] == ((6, H), torch.float32, (6, 3), (8, 64, H), (8, H, 32)) and len(seen) == 2
    fp8_model = Transformer.from_config(model.args.replace(fp8=True))
    previous = get_fp8_experts_fn()
    try:
        set_fp8_experts_fn(None)
        with pytest.raises(RuntimeError, match="set_fp8_experts_fn"):
            fp8_model(ids)
        set_fp8_experts_fn(spy)
        seen.clear()
        fp8_model(ids)
        assert len(seen) == 2
    finally:
        set_fp8_experts_fn(previous)


def test_from_config_trains_and_keeps_router_bias_fp32():
    args = ModelArgs.from_hf_config(hf_config("deepseek_v3").to_dict())
    model = Transformer.from_config(args, dtype=torch.bfloat16, seed=3)
    again = Transformer.from_config(args, dtype=torch.bfloat16, seed=3)
    assert torch.equal(model.embed_tokens.weight, again.embed_tokens.weight)
    moe = [m for m in model.modules() if isinstance(m, MoE)]
    assert moe and all(m.gate.e_score_correction_bias.dtype == torch.float32 for m in moe)
    assert model.layers[1].mlp.experts.w_gate_up.dtype == torch.bfloat16
    hidden = model(torch.randint(0, V, (2, 8)))
    assert hidden.dtype == torch.bfloat16 and hidden.shape == (2, 8, H)
    model.logits(hidden).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_forward_input():
    model = Transformer.from_config(ModelArgs(vocab_size=V, hidden_size=H, num_layers=1))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(2, 3, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(6, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="rope_type"):
        ModelArgs(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="architectures"):
        ModelArgs.from_hf_config({**hf_config("llama").to_dict(), "architectures": ["MistralForCausalLM"]})


@pytest.mark.parametrize("cu", [[2, 5, 10], [0, 3, 12], [0, 3, 7], [0, 6, 4, 10], [], [0]])
def test_malformed_cu_seqlens_are_refused(cu):
    """Each once ran on wrong sequence boundaries or failed with "shape '[10, -1]' is invalid"."""
    model = Transformer.from_config(ModelArgs(vocab_size=V, hidden_size=H, num_layers=1))
    with pytest.raises(ValueError, match=r"cu_seqlens=.*10 tokens"):
        model(torch.zeros(10, dtype=torch.long), cu_seqlens=torch.tensor(cu, dtype=torch.int32))


def test_empty_input_gives_empty_hidden_states():
    model = Transformer.from_config(ModelArgs(vocab_size=V, hidden_size=H, num_layers=1))
    empty = torch.zeros(0, dtype=torch.long)
    assert model(empty).shape == (0, H)
    assert model(empty, cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)).shape == (0, H)
    assert model(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0, H)
    assert model.logits(model(torch.zeros(0, 0, dtype=torch.long))).shape == (0, 0, V)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(empty, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))


@pytest.mark.gpu
def test_cuda_bf16_experts_and_model_close_to_fp64():
    """On CUDA bf16 (torch._grouped_mm on Hopper; flash-attn when installed): error within 3x PyTorch's own."""
    from conftest import assert_close_to_ref

    torch.manual_seed(2)
    num_experts, hid, inter, tokens, k = 8, 256, 128, 1000, 3
    x = torch.randn(tokens, hid, device="cuda")
    wgu = 0.05 * torch.randn(num_experts, 2 * inter, hid, device="cuda")
    wd = 0.05 * torch.randn(num_experts, hid, inter, device="cuda")
    ids = torch.randint(0, num_experts - 1, (tokens, k), device="cuda")  # last expert empty
    w = torch.rand(tokens, k, device="cuda")
    ref = grouped_experts(x.double(), w, ids, wgu.double(), wd.double())
    bf = [t.bfloat16() for t in (x, wgu, wd)]
    out = grouped_experts(bf[0], w, ids, bf[1], bf[2])
    naive = torch.zeros_like(ref, dtype=torch.bfloat16)
    for j in range(k):  # PyTorch's own bf16 computation, token by token's choice j
        h = torch.einsum("th,tih->ti", bf[0], bf[1][ids[:, j]])
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        naive += (torch.einsum("ti,thi->th", act, bf[2][ids[:, j]]).float() * w[:, j, None]).bfloat16()
    assert_close_to_ref(out, ref, naive, name="grouped_experts bf16")
    args = ModelArgs.from_hf_config(hf_config("deepseek_v3").to_dict())
    model = Transformer.from_config(args, seed=0)
    ids = torch.randint(0, V, (64,))
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    with torch.no_grad():
        ref = model.double()(ids, cu_seqlens=cu)
        torch_bf16 = model.float().bfloat16()(ids, cu_seqlens=cu)
        cuda_bf16 = model.cuda()(ids.cuda(), cu_seqlens=cu.cuda())
    assert_close_to_ref(cuda_bf16, ref, torch_bf16, name="hidden states")

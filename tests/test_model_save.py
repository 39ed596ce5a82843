"""save_pretrained / from_pretrained edges: dtype names, refused dtypes, fp64 oracle runs, RoPE in both HF forms,
the V3 selection bias kept fp32 in a bf16 save, old checkpoints' rotary inv_freq buffers, position_ids sizes."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from test_model import V, saved_hf  # noqa: E402
from test_moe_routing import _v3_args  # noqa: E402

from r1fast.checkpoint import SINGLE_FILE  # noqa: E402
from r1fast.model import Transformer  # noqa: E402
from r1fast.model_config import ModelArgs  # noqa: E402
from r1fast.moe import MoE, grouped_experts  # noqa: E402


def _tiny():
    return Transformer.from_config(ModelArgs(model_type="llama", vocab_size=32, num_layers=1), seed=0)


def _header_dtypes(path):
    with safe_open(path / SINGLE_FILE, framework="pt") as f:
        return {f.get_slice(n).get_dtype() for n in f.keys()}


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", "torch.bfloat16", torch.bfloat16])
def test_save_dtype_by_name_or_dtype(dtype, tmp_path):
    """from_pretrained takes dtype names, so save_pretrained must too (a name used to crash in torch.empty)."""
    _tiny().save_pretrained(tmp_path, dtype=dtype)
    assert _header_dtypes(tmp_path) == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert Transformer.from_pretrained(tmp_path).embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, "int8", "float8_e4m3fn", "complex64"])
def test_save_refuses_non_weight_dtypes_before_writing(dtype, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="dtype="):
        _tiny().save_pretrained(out, dtype=dtype)
    assert not out.exists()


def test_from_pretrained_dtype_set_is_fp32_bf16_fp16_fp64(tmp_path):
    """fp8 weights without scales cannot run a forward (no fp8 add): refuse them; fp64 runs, by name too."""
    _tiny().save_pretrained(tmp_path)
    for bad in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, "float8"):
        with pytest.raises(ValueError, match="dtype="):
            Transformer.from_pretrained(tmp_path, dtype=bad)
    ids = torch.tensor([[1, 2, 3]])
    ref = None
    for name in ("float64", "fp64", "double", torch.float64):
        model = Transformer.from_pretrained(tmp_path, dtype=name)
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        with torch.no_grad():
            logits = model.logits(model(ids))
        ref = logits if ref is None else ref
        torch.testing.assert_close(logits, ref, atol=0, rtol=0)
    _tiny().save_pretrained(tmp_path / "f64", dtype="fp64")  # config.json says float64: loads as fp64 by default
    assert Transformer.from_pretrained(tmp_path / "f64").embed_tokens.weight.dtype == torch.float64


def _expert_loop(x, w, ids, w_gate_up, w_down):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (w_gate_up[ids[t, j]] @ x[t]).chunk(2)
            out[t] += w[t, j].to(x.dtype) * (w_down[ids[t, j]] @ (torch.nn.functional.silu(gate) * up))
    return out


def test_grouped_experts_fp64_is_not_rounded_through_fp32():
    """fp64 oracle runs: the weighted sum used to round to fp32 (~4e-8 relative error)."""
    gen = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, k = 13, 32, 24, 5, 2
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    w_gate_up = 0.1 * torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64)
    w_down = 0.1 * torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=gen)  # the router's fp32 gate values
    out = grouped_experts(x, w, ids, w_gate_up, w_down)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _expert_loop(x, w, ids, w_gate_up, w_down), atol=1e-13, rtol=0)
    # low precision still sums in fp32 and returns the input dtype
    out16 = grouped_experts(x.bfloat16(), w, ids, w_gate_up.bfloat16(), w_down.bfloat16())
    assert out16.dtype == torch.bfloat16


def test_fp64_moe_matches_transformers_fp64(tmp_path_factory):
    """DeepSeek-V3 in fp64: transformers' eager experts and ours agree to rounding (was ~1e-7 off). Not V2:
    transformers' V2 RMSNorm computes in fp32 even for fp64 weights, so it is no fp64 oracle (2e-6 apart)."""
    _, path = saved_hf("deepseek_v3", tmp_path_factory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                           experts_implementation="eager").eval()
    ours = Transformer.from_pretrained(path, dtype="float64")
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = ours.logits(ours(ids))
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3", "qwen3"])
def test_saved_config_carries_rope_in_both_forms(arch, tmp_path, tmp_path_factory):
    """transformers 4.x and vLLM read ``rope_scaling``; with only ``rope_parameters`` a llama3 / yarn checkpoint
    loaded there with default RoPE. Both forms must carry the same values, and every reader must agree."""
    _, src = saved_hf(arch, tmp_path_factory)
    Transformer.from_pretrained(src).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    original = transformers.AutoConfig.from_pretrained(src).rope_parameters
    assert cfg["rope_theta"] == original["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    scaling = {k: v for k, v in original.items() if k != "rope_theta"}
    if original["rope_type"] == "default":
        assert cfg["rope_scaling"] is None  # what transformers 4.x writes for plain RoPE
    else:  # 4.x form: no theta inside, the kind under rope_type and (DeepSeek's remote code) type
        assert cfg["rope_scaling"] == {**scaling, "type": original["rope_type"]}
    # transformers 5 prefers rope_scaling when both are present: it must rebuild the same parameters
    reloaded = dict(transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters)
    reloaded.pop("type", None)
    assert reloaded == original
    # our loader reads either form alone to the same args
    args = ModelArgs.from_hf_config(cfg)
    for drop in ("rope_parameters", "rope_scaling"):
        one_form = ModelArgs.from_hf_config({k: v for k, v in cfg.items() if k != drop})
        assert (one_form.rope_theta, one_form.rope_scaling) == (args.rope_theta, args.rope_scaling)
    assert args.rope_scaling == (None if original["rope_type"] == "default" else scaling)


def test_llama3_rope_without_original_length_uses_the_models_own(tmp_path):
    """transformers 5 fills a missing original_max_position_embeddings with max_position_embeddings; we raised
    KeyError. Logits at positions past 64 must equal transformers'."""
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0})
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):  # a hand-written config that never had the key
        if isinstance(stored.get(key), dict):
            stored[key].pop("original_max_position_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(stored))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ours = Transformer.from_pretrained(tmp_path, dtype="float64")
    ids, pos = torch.randint(0, V, (1, 6)), torch.arange(6)[None] + 100
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids, position_ids=pos)),
                                   hf(input_ids=ids, position_ids=pos).logits, atol=1e-12, rtol=0)


# --- tie_word_embeddings=true with a stored lm_head.weight: transformers 5's tie_weights rules -------------------


def _tied_llama(path, head: str):
    """A tiny tied Llama saved by transformers; ``head``: "distinct" stores a different lm_head.weight, "equal" a
    copy of the embedding, "only" the head in place of the embedding (transformers then ties the embedding to it)."""
    from safetensors.torch import load_file, save_file

    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    state = load_file(path / SINGLE_FILE)
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = torch.randn_like(embed) if head == "distinct" else embed.clone()
    if head == "only":
        del state["model.embed_tokens.weight"]
    save_file(state, path / SINGLE_FILE, metadata={"format": "pt"})
    return state["lm_head.weight"]


def _logits_error(path, ours) -> float:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        return (ours.logits(ours(ids[0])) - hf(input_ids=ids).logits[0]).abs().max().item()


def test_tied_config_with_a_distinct_stored_head_loads_untied_like_transformers(tmp_path):
    """The stored head was dropped silently (logits off by up to 1.39 in a probe) and a save wrote the changed
    model as tied; transformers 5 warns and uses the stored head. So must we, saving tie_word_embeddings=false."""
    stored_head = _tied_llama(tmp_path / "in", "distinct")
    with pytest.warns(UserWarning, match=rf"{tmp_path / 'in' / SINGLE_FILE}: lm_head.weight differs from "
                                         r"model.embed_tokens.weight .* loading them untied"):
        ours = Transformer.from_pretrained(tmp_path / "in", dtype=torch.float32)
    assert ours.lm_head is not None and not ours.args.tie_word_embeddings
    assert _logits_error(tmp_path / "in", ours) < 1e-5  # fp32, same weights: only summation-order noise
    ours.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with safe_open(tmp_path / "out" / SINGLE_FILE, framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), stored_head)


@pytest.mark.parametrize("head", ["equal", "only"])
def test_tied_config_with_an_equal_or_lone_stored_head_stays_tied(tmp_path, head, recwarn):
    """An lm_head.weight equal to the embedding is dropped (tied, no warning); one stored without the embedding
    fills it (transformers swaps the tie's source), instead of a missing-tensor error."""
    _tied_llama(tmp_path, head)
    ours = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.lm_head is None and ours.args.tie_word_embeddings
    assert not [w for w in recwarn if "lm_head" in str(w.message)]
    assert _logits_error(tmp_path, ours) < 1e-5


def test_bf16_save_keeps_selection_bias_fp32(tmp_path):
    model = Transformer.from_config(_v3_args(), seed=0)
    gate = next(m for m in model.modules() if isinstance(m, MoE)).gate
    bias = torch.tensor([0.1234567, -0.0456789, 0.3333333, 1e-4])  # not bf16-representable
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(bias)
    model.save_pretrained(tmp_path, dtype="bfloat16")
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(name).dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    loaded = Transformer.from_pretrained(tmp_path)
    assert torch.equal(next(m for m in loaded.modules() if isinstance(m, MoE)).gate.e_score_correction_bias, bias)


def test_stored_rotary_inv_freq_buffers_are_ignored(tmp_path):
    args = ModelArgs(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=16)
    model = Transformer.from_config(args, seed=0)
    model.save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(file)
    for i in range(2):  # what transformers < 4.31 saved for every Llama layer
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, file, metadata={"format": "pt"})
    loaded = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (9,))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_position_ids_of_the_wrong_size_are_refused():
    model = Transformer.from_config(ModelArgs(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
                                              num_kv_heads=1, head_dim=16), seed=0)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(2, 5, dtype=torch.long), position_ids=torch.arange(6).repeat(2, 1))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(7, dtype=torch.long), position_ids=torch.arange(5))

"""Block-FP8 checkpoints (the layout DeepSeek-V3/R1 and Qwen3-FP8 ship): loaded dequantized, equal to transformers'
dequantization and to an fp64 one with partial blocks; saved unquantized; refused loudly when a scale is wrong."""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from test_model import ATOL, V, hf_logits, r1_logits, saved_hf  # noqa: E402

from r1fast import checkpoint_fp8  # noqa: E402
from r1fast.checkpoint import SINGLE_FILE, CheckpointError  # noqa: E402
from r1fast.model import Transformer  # noqa: E402

PROJECTION = re.compile(r".*proj(_with_mqa)?\.weight$")
"""What the released checkpoints quantize: attention and MLP projections (dense, shared and routed experts); the
embedding, lm_head, routers (mlp.gate.weight) and norms stay bf16."""


def _block_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale_inv) with DeepSeek-V3's recipe: scale = block amax / 448, partial edge blocks."""
    (n, k), (bn, bk) = w.shape, block
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    padded = torch.zeros(grid[0] * bn, grid[1] * bk, dtype=torch.float64)
    padded[:n, :k] = w.double()
    scale = padded.view(grid[0], bn, grid[1], bk).abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448
    scale = scale.float()
    full = scale.double().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (w.double() / full).float().to(torch.float8_e4m3fn), scale


def _dequant64(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    (n, k), (bn, bk) = q.shape, block
    return q.double() * scale.double().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]


def _read_all(path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def quantize_dir(src, dst, block, *, scale_dtype=torch.float32, split_scales=False):
    """Write src's checkpoint as block FP8 into dst; return the fp64 dequantized tensors (the oracle's weights).

    split_scales: every scale goes to a second shard, away from its weight (an index maps them)."""
    dst.mkdir()
    weights, scales, dequantized = {}, {}, {}
    for name, w in _read_all(src).items():
        if PROJECTION.match(name) and w.dim() == 2:
            q, s = _block_fp8(w, block)
            weights[name], scales[name + "_scale_inv"] = q, s.to(scale_dtype)
            dequantized[name] = _dequant64(q, s.to(scale_dtype), block)
        else:
            weights[name] = dequantized[name] = w
    assert scales, "nothing was quantized"
    if split_scales:
        files = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
        for file, tensors in files.items():
            save_file(tensors, dst / file, metadata={"format": "pt"})
        weight_map = {name: file for file, tensors in files.items() for name in tensors}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file({**weights, **scales}, dst / SINGLE_FILE, metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dequantized


def _oracle_dir(src, dst, dequantized):
    """src's config with the fp64-dequantized weights rounded once to fp32, unquantized."""
    dst.mkdir()
    save_file({n: t.float() if t.is_floating_point() else t for n, t in dequantized.items()}, dst / SINGLE_FILE,
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3"])
def test_fp8_checkpoint_equals_what_transformers_dequantizes(arch, tmp_path, tmp_path_factory):
    """[8, 8] blocks divide every tiny shape, so transformers (which derives the block from the scale grid) reads
    the same numbers; it needs accelerate for any FP8 load, and dequantizes on CPU or when asked."""
    pytest.importorskip("accelerate")
    hf, src = saved_hf(arch, tmp_path_factory)
    quantized = tmp_path / "fp8"
    dequantized = quantize_dir(src, quantized, (8, 8))
    ours = Transformer.from_pretrained(quantized, dtype=torch.float32)
    _assert_same_parameters(ours, Transformer.from_pretrained(_oracle_dir(src, tmp_path / "oracle", dequantized)))
    qcfg = transformers.FineGrainedFP8Config(weight_block_size=[8, 8], dequantize=True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32,
                                                               quantization_config=qcfg).eval()
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(r1_logits(ours, ids), hf_logits(theirs, ids), atol=ATOL, rtol=0)
    # not vacuous: FP8 rounding moved the logits by far more than the tolerance
    assert (r1_logits(ours, ids) - hf_logits(hf, ids)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("block,scale_dtype,split", [((128, 128), torch.float32, False), ((16, 32), torch.bfloat16, True)])
def test_partial_blocks_and_split_scales_match_fp64(block, scale_dtype, split, tmp_path, tmp_path_factory):
    """Blocks larger than the tiny dims, or not dividing them (V3's 576-row kv_a_proj_with_mqa in 128 blocks), and
    bf16 scales in another shard than their weights: every parameter is the fp64 dequantization rounded once."""
    _, src = saved_hf("deepseek_v3", tmp_path_factory)
    dequantized = quantize_dir(src, tmp_path / "fp8", block, scale_dtype=scale_dtype, split_scales=split)
    oracle = _oracle_dir(src, tmp_path / "oracle", dequantized)
    for dtype in (torch.float32, torch.bfloat16):
        _assert_same_parameters(Transformer.from_pretrained(tmp_path / "fp8", dtype=dtype),
                                Transformer.from_pretrained(oracle, dtype=dtype))


def test_mtp_layers_and_their_scales_are_skipped(tmp_path, tmp_path_factory):
    """Released V3 ships one FP8 multi-token-prediction layer after the last decoder layer, scales included."""
    _, src = saved_hf("deepseek_v3", tmp_path_factory)
    quantize_dir(src, tmp_path / "fp8", (16, 16))
    tensors = _read_all(tmp_path / "fp8")
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    q, s = _block_fp8(torch.randn(24, 64), (16, 16))
    tensors[f"model.layers.{layers}.self_attn.q_a_proj.weight"] = q
    tensors[f"model.layers.{layers}.self_attn.q_a_proj.weight_scale_inv"] = s
    save_file(tensors, tmp_path / "fp8" / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="2 multi-token-prediction tensors"):
        Transformer.from_pretrained(tmp_path / "fp8")


def test_saved_fp8_model_is_unquantized_and_loads_in_transformers(tmp_path, tmp_path_factory):
    _, src = saved_hf("deepseek_v3", tmp_path_factory)
    quantize_dir(src, tmp_path / "fp8", (16, 16))
    ours = Transformer.from_pretrained(tmp_path / "fp8", dtype=torch.float32)
    ours.save_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert not any(name.endswith("_scale_inv") for name in _read_all(tmp_path / "out"))
    ids = torch.randint(0, V, (2, 7))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    back = Transformer.from_pretrained(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(r1_logits(back, ids), hf_logits(theirs, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(r1_logits(back, ids), r1_logits(ours.to(torch.bfloat16).float(), ids), atol=ATOL, rtol=0)


def _rewrite(path, change):
    tensors = _read_all(path)
    change(tensors)
    save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})


def test_broken_fp8_checkpoints_name_the_tensor(tmp_path, tmp_path_factory):
    _, src = saved_hf("qwen3", tmp_path_factory)
    name = "model.layers.1.mlp.down_proj.weight"
    good = tmp_path / "good"
    quantize_dir(src, good, (16, 16))
    cases = [(lambda t: t.pop(name + "_scale_inv"), f"{name} is stored as F8_E4M3 without its scale"),
             (lambda t: t.update({name + "_scale_inv": torch.ones(4, 5)}), r"down_proj.weight_scale_inv has shape \(4, 5\), expected \(4, 6\)"),
             (lambda t: t.update({name + "_scale_inv": torch.ones(4, 6, dtype=torch.uint8)}), "stored as U8, expected a float scale")]
    for i, (change, match) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        _rewrite(bad, change)
        with pytest.raises(CheckpointError, match=match):
            Transformer.from_pretrained(bad)
    unscaled = tmp_path / "no_config"
    shutil.copytree(good, unscaled)
    cfg = json.loads((unscaled / "config.json").read_text())
    del cfg["quantization_config"]
    (unscaled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no block-FP8 quantization_config"):
        Transformer.from_pretrained(unscaled)


@pytest.mark.parametrize("qcfg,match", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt='e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    ({"quant_method": "fp8"}, "weight_block_size=None"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [True, 128]}, "weight_block_size"),
    (["fp8"], "not a JSON object"),
])
def test_unsupported_quantization_configs_are_refused(qcfg, match, tmp_path, tmp_path_factory):
    _, src = saved_hf("qwen3", tmp_path_factory)
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}))
    with pytest.raises(ValueError, match=match) as err:
        Transformer.from_pretrained(tmp_path / "m")
    assert "config.json" in str(err.value)


def test_dequantize_into_chunks_strided_and_stacked(monkeypatch):
    """Row chunks (forced small here: 64 MiB in use) start on block boundaries; a strided destination (one
    expert's gate half of w_gate_up) and stacked [E, N, K] experts are written in place."""
    monkeypatch.setattr(checkpoint_fp8, "_CHUNK_ELEMENTS", 3 * 40)
    block = (2, 8)
    experts = torch.randn(3, 50, 40)
    pairs = [_block_fp8(w, block) for w in experts]
    q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    ref = torch.stack([_dequant64(a, b, block) for a, b in pairs]).float()
    stacked = torch.full((3, 100, 40), float("nan"))
    checkpoint_fp8.dequantize_into(stacked[:, :50], q, s, block)  # the gate halves: a strided view
    assert torch.equal(stacked[:, :50], ref) and stacked[:, 50:].isnan().all()
    one = torch.full((50, 40), float("nan"), dtype=torch.bfloat16)
    checkpoint_fp8.dequantize_into(one, q[1], s[1], block)
    assert torch.equal(one, ref[1].bfloat16())

"""r1fast.checkpoint: HF safetensors in and out (sharded or not), and loud failures on bad checkpoints."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from conftest import assert_close_to_ref  # noqa: E402
from test_model import ATOL, V, hf_config, hf_logits, r1_logits, saved_hf  # noqa: E402

from r1fast.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError  # noqa: E402
from r1fast.checkpoint_save import parse_size  # noqa: E402
from r1fast.model import Transformer  # noqa: E402
from r1fast.model_config import ModelArgs  # noqa: E402


def _load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,shard", [("qwen2", None), ("llama", "20KB"), ("deepseek_v3", None), ("deepseek_v3", "30KB"),
                                        ("deepseek_v2", "30KB"), ("qwen3", None)])
def test_save_pretrained_loads_in_transformers(arch, shard, tmp_path, tmp_path_factory):
    hf, src = saved_hf(arch, tmp_path_factory)
    ours = Transformer.from_pretrained(src)
    out = tmp_path / "out"
    ours.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    files = sorted(os.listdir(out))
    if shard:
        assert INDEX_FILE in files and SINGLE_FILE not in files
        assert sum(f.endswith(".safetensors") for f in files) > 1
    else:  # transformers wrote a generation_config.json: it comes back verbatim (eos ids, sampling defaults)
        assert files == ["config.json", "generation_config.json", SINGLE_FILE]
    assert (out / "generation_config.json").read_text() == json.dumps(
        json.loads((Path(src) / "generation_config.json").read_text()), indent=2)
    ids = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(hf_logits(_load_hf(out), ids), hf_logits(hf, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(r1_logits(Transformer.from_pretrained(out), ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_sharded_transformers_checkpoint_loads(tmp_path, tmp_path_factory):
    hf, _ = saved_hf("deepseek_v3", tmp_path_factory)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.isfile(tmp_path / INDEX_FILE)
    ids = torch.randint(0, V, (1, 11))
    torch.testing.assert_close(r1_logits(Transformer.from_pretrained(tmp_path), ids), hf_logits(hf, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("model_type", ["qwen2", "deepseek_v3"])
def test_from_config_checkpoint_is_complete_for_transformers(model_type, tmp_path):
    """A model that never saw an HF config (tiny recipes) still writes a config transformers understands."""
    if model_type == "qwen2":
        args = ModelArgs(model_type="qwen2", vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True, eos_token_id=2)
    else:
        args = ModelArgs.from_hf_config(hf_config("deepseek_v3").to_dict()).replace(hf_config={})
    ours = Transformer.from_config(args, seed=5)
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(6.0)  # std 0.12: meaningful logits
    ours.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    ids = torch.randint(0, V, (2, 7))
    back = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
    # against fp64: logits reach 22 here, where transformers' own fp32 rounding (2.7e-5 with 5.24's grouped_mm
    # experts) exceeds a fixed 1e-5; both libraries in fp64 must agree to rounding of fp64
    ref = r1_logits(Transformer.from_pretrained(tmp_path, dtype=torch.float64), ids)
    moe = {"experts_implementation": "eager"} if args.is_moe else {}  # grouped_mm has no fp64
    hf64 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, **moe).eval()
    torch.testing.assert_close(hf_logits(hf64, ids), ref, atol=1e-10, rtol=0)
    assert_close_to_ref(r1_logits(back, ids), ref, hf_logits(_load_hf(tmp_path), ids), name="fp32 logits")
    rounded = ours.to(torch.bfloat16).to(torch.float32)  # what the bf16 file holds
    torch.testing.assert_close(r1_logits(back, ids), r1_logits(rounded, ids), atol=ATOL, rtol=0)


def test_dtype_and_device_arguments(tmp_path_factory):
    _, path = saved_hf("deepseek_v3", tmp_path_factory)
    model = Transformer.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().max() > 0
    with safe_open(os.path.join(path, SINGLE_FILE), "pt") as f:
        assert torch.equal(bias, f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_save_replaces_an_earlier_sharded_save(tmp_path, tmp_path_factory):
    _, path = saved_hf("qwen2", tmp_path_factory)
    model = Transformer.from_pretrained(path)
    model.save_pretrained(tmp_path, max_shard_size=20_000)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", SINGLE_FILE]
    assert not any(".tmp." in f or f.endswith(".tmp") for f in os.listdir(tmp_path))
    # every file gets open()'s mode under the umask: safetensors wrote the weights 0600, readable by no one else
    umask = os.umask(0o022)
    os.umask(umask)
    assert {f: os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path)} == dict.fromkeys(
        os.listdir(tmp_path), 0o666 & ~umask)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    for bad in ["lots", "-1MB", 0]:
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


# ---- bad checkpoints: an error naming the file and the tensor, never a half-loaded model ----------------
def _copy(name, tmp_path, tmp_path_factory):
    _, src = saved_hf(name, tmp_path_factory)
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _rewrite(file, edit):
    with safe_open(file, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("problem,tensor", [
    ("missing", "model.layers.1.mlp.experts.3.up_proj.weight"),
    ("extra", "model.layers.0.self_attn.surprise.weight"),
    ("shape", "model.layers.2.self_attn.kv_b_proj.weight"),
])
def test_bad_tensors_are_named(problem, tensor, tmp_path, tmp_path_factory):
    path = _copy("deepseek_v3", tmp_path, tmp_path_factory)
    file = str(path / SINGLE_FILE)

    def edit(t):
        if problem == "missing":
            del t[tensor]
        elif problem == "extra":
            t[tensor] = torch.zeros(3)
        else:
            t[tensor] = torch.zeros(t[tensor].shape[0], t[tensor].shape[1] + 1)

    _rewrite(file, edit)
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(path)
    assert tensor in str(err.value) and SINGLE_FILE in str(err.value)


def test_truncated_file_is_named(tmp_path, tmp_path_factory):
    path = _copy("qwen3", tmp_path, tmp_path_factory)
    file = path / SINGLE_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=SINGLE_FILE):
        Transformer.from_pretrained(path)


def test_truncated_shard_and_index_mismatch(tmp_path, tmp_path_factory):
    hf, _ = saved_hf("llama", tmp_path_factory)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.load(open(tmp_path / INDEX_FILE))
    shard = sorted(set(index["weight_map"].values()))[-1]
    name = next(n for n, f in index["weight_map"].items() if f == shard)
    index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        Transformer.from_pretrained(tmp_path)
    assert name in str(err.value)
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[:200])
    with pytest.raises(CheckpointError, match=shard):
        Transformer.from_pretrained(tmp_path)


def test_unsupported_configs_are_refused(tmp_path, tmp_path_factory):
    path = _copy("llama", tmp_path, tmp_path_factory)
    cfg = json.load(open(path / "config.json"))
    for change, match in [({"architectures": ["MixtralForCausalLM"]}, "architectures"),
                          ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type"),
                          ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config")]:
        (path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match) as err:
            Transformer.from_pretrained(path)
        assert "config.json" in str(err.value)
    os.remove(path / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        Transformer.from_pretrained(path)


def test_default_model_args_save_and_load(tmp_path):
    """ModelArgs() round-trips (no q/k/v biases: a Llama; with them a Qwen2); its old default, a Qwen2 without
    biases, could not be saved."""
    from r1fast.model import Transformer
    from r1fast.model_config import ModelArgs

    for args, model_type in ((ModelArgs(), "llama"), (ModelArgs(qkv_bias=True), "qwen2")):
        assert args.model_type == model_type
        model = Transformer.from_config(args, seed=0)
        model.save_pretrained(tmp_path / model_type)
        again = Transformer.from_pretrained(tmp_path / model_type)
        assert again.args.model_type == model_type
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                     strict=True))


def test_surplus_layers_load_only_as_deepseek_v3_mtp_layers(tmp_path, tmp_path_factory):
    """Layers past num_hidden_layers are skipped only where DeepSeek keeps its num_nextn_predict_layers MTP
    layers; anywhere else the config and the weights disagree, and a silently truncated model is the worst outcome."""
    qwen = _copy("qwen2", tmp_path, tmp_path_factory)  # 2 layers
    cfg = json.load(open(qwen / "config.json"))
    (qwen / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.1\."):
        Transformer.from_pretrained(qwen)
    v3 = _copy("deepseek_v3", tmp_path, tmp_path_factory)  # 3 layers, num_nextn_predict_layers=1
    assert json.load(open(v3 / "config.json"))["num_nextn_predict_layers"] == 1
    _rewrite(str(v3 / SINGLE_FILE), lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(2, 2)}))
    with pytest.warns(UserWarning, match="1 multi-token-prediction tensors .* are not loaded"):
        loaded = Transformer.from_pretrained(v3)
    assert len(loaded.layers) == 3
    loaded.save_pretrained(tmp_path / "saved")  # declares none of the MTP layers it does not write
    assert json.load(open(tmp_path / "saved" / "config.json"))["num_nextn_predict_layers"] == 0
    _rewrite(str(v3 / SINGLE_FILE), lambda t: t.update({"model.layers.4.eh_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.4\.eh_proj"):
        Transformer.from_pretrained(v3)
    v2 = _copy("deepseek_v2", tmp_path, tmp_path_factory)  # no MTP layers
    _rewrite(str(v2 / SINGLE_FILE), lambda t: t.update({"model.layers.3.eh_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.3\.eh_proj"):
        Transformer.from_pretrained(v2)


def test_dtype_names_and_integer_tensors(tmp_path, tmp_path_factory):
    path = _copy("llama", tmp_path, tmp_path_factory)
    for name, expected in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("torch.float16", torch.float16),
                           ("float32", torch.float32)]:
        assert Transformer.from_pretrained(path, dtype=name).embed_tokens.weight.dtype == expected
    for bad in ["int8", "fp9", torch.int32]:
        with pytest.raises(ValueError, match="dtype="):
            Transformer.from_pretrained(path, dtype=bad)
    _rewrite(str(path / SINGLE_FILE), lambda t: t.update({"model.norm.weight": (t["model.norm.weight"] * 4).int()}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is stored as I32"):
        Transformer.from_pretrained(path)


@pytest.mark.parametrize("kw", [dict(model_type="qwen3"), dict(model_type="deepseek_v3", num_layers=3, head_dim=16,
                                v_head_dim=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8)])
def test_args_built_in_code_save_what_transformers_loads(kw, tmp_path):
    """ModelArgs(model_type='qwen3') once saved without q/k norms; a DeepSeek without experts, MoE layers of 0."""
    ours = Transformer.from_config(ModelArgs(vocab_size=V, hidden_size=64, intermediate_size=96, num_heads=4,
                                             **{"num_kv_heads": 4, **kw}), seed=2)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.add_(0.3 * torch.randn_like(p)) if name.endswith("norm.weight") else p.mul_(6.0)
    ours.save_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, 7))
    torch.testing.assert_close(hf_logits(_load_hf(tmp_path), ids), r1_logits(ours, ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(r1_logits(Transformer.from_pretrained(tmp_path), ids), r1_logits(ours, ids), atol=0, rtol=0)

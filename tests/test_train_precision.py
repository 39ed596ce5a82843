"""bf16 training keeps fp32 master weights (FSDP2 mixed precision): small updates are not rounded away; fp16
compute keeps them too; RMSNorm rounds in bf16 as transformers does."""

import json

import pytest
import torch
from safetensors import safe_open
from train_testing import final_weights, rl_metrics, tiny_config

from r1fast.config import ConfigError, load_config
from r1fast.model import RMSNorm
from r1fast.parallelize import master_and_compute_dtypes


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's own values as a plain tensor: a DTensor's local shard, else the tensor, detached."""
    p = p.detach()
    return p.to_local() if hasattr(p, "to_local") else p


def test_bf16_run_updates_fp32_masters_computes_in_bf16_and_saves_bf16(tmp_path, monkeypatch):
    """At lr 1e-6 a bf16 parameter (ulp 2^-8 relative) cannot take AdamW's ~1e-6 steps: 77 of 28,320 weights
    moved in two steps before. The masters are fp32 and nearly all move; the rollout's KV cache, the KL
    reference and the saved checkpoint are bf16, and the first step's KL is exactly 0 (the reference is the
    bf16 cast of the same masters the policy computes with)."""
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    from r1fast import train

    seen = {}
    real_step = train.Trainer.grpo_step

    def step_and_compare(self, step):
        # the local shards (FSDP2 parameters are DTensors): torch 2.11's DTensor has no sharding rule for
        # aten.ne.Tensor ("does not have a sharding strategy registered"); 2.13 derives pointwise ones from tags
        before = {n: _local(p).clone() for n, p in self.root.named_parameters()}
        out = real_step(self, step)
        params = dict(self.root.named_parameters())
        seen["dtypes"] = {p.dtype for p in params.values()}
        seen["moved"] = sum(int((_local(params[n]) != b).sum()) for n, b in before.items())
        seen["total"] = sum(b.numel() for b in before.values())
        seen["cache"] = self.engine.cache.dtype if hasattr(self.engine.cache, "dtype") else self.engine.dtype
        seen["ref"] = {p.dtype for p in self.ref_root.parameters()}
        return out

    monkeypatch.setattr(train.Trainer, "grpo_step", step_and_compare)
    cfg = tiny_config(tmp_path, "--train.steps", "1", "--train.name", "bf16", "--model.dtype", "bfloat16",
                      "--train.lr", "1e-6", "--train.log_every", "1", "--grpo.beta", "0.04",
                      "--rewards.weights", "{length_cosine = 1.0}", "--parallel.fsdp", "true")
    train.run(cfg)
    assert not torch.distributed.is_initialized()  # the 1-rank group FSDP2 needed is gone with the run
    assert seen["dtypes"] == {torch.float32} and seen["ref"] == {torch.bfloat16} and seen["cache"] == torch.bfloat16
    assert seen["moved"] > 0.9 * seen["total"], (seen["moved"], seen["total"])
    assert rl_metrics(tmp_path / "bf16")[0]["kl"] == 0.0
    weights = final_weights(tmp_path / "bf16")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    ckpt = next((tmp_path / "bf16" / "checkpoints").iterdir()) / "model"
    assert json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def test_bf16_without_fsdp_is_refused():
    with pytest.raises(ConfigError, match=r"^model\.dtype=bfloat16 trains with fp32 master weights.*parallel\.fsdp"):
        load_config(None, ["--model.dtype", "bfloat16", "--parallel.fsdp", "false"])
    from r1fast.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"^model\.dtype=bfloat16"):
        SFTConfig(data="x.jsonl", model=load_config(None, ["--model.dtype", "bfloat16"]).model).validate()


def test_rmsnorm_bf16_bit_identical_to_transformers():
    """Normalize in fp32, cast to bf16, *then* multiply by the weight (transformers' rounding)."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=gen) * 3).bfloat16()
    w = (1 + 0.3 * torch.randn(96, generator=gen)).bfloat16()
    ours, ref = RMSNorm(96, 1e-6).bfloat16(), LlamaRMSNorm(96, eps=1e-6).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(w)
        ref.weight.copy_(w)
        out, expect = ours(x), ref(x)
    assert out.dtype == torch.bfloat16
    # independent reference too: fp64 normalization, rounded to bf16, then the bf16 weight product
    xd = x.double()
    normed = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    torch.testing.assert_close(out, expect, atol=0, rtol=0)
    # the fp64 normalization can round the other way near a tie (8 of 200 seeds): within one bf16 step of it
    ulp = torch.finfo(torch.bfloat16).eps * (w * normed).abs().float()
    assert ((out.float() - (w * normed).float()).abs() <= ulp).all()


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float16])
def test_half_compute_keeps_fp32_masters(compute):
    assert master_and_compute_dtypes(compute) == (torch.float32, compute)


@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_full_precision_compute_needs_no_cast(compute):
    assert master_and_compute_dtypes(compute) == (compute, None)

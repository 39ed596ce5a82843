"""The rollout samples from logits computed as the trainer's fused log-prob / loss path computes them, so the
GRPO ratio starts at 1: fp32 on the reference path (a bf16 rollout rounded them to bf16 there: max |r - 1| 0.135
on the first update in the probe), the kernel path's buffer dtype otherwise (fp16 -> fp32: no overflow)."""

import pytest
import torch

import r1fast.kernels as K
from r1fast.kernels.grpo_logits_chunk import lm_head_logits
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.rollout import Engine


@pytest.mark.parametrize("path", ["torch", "triton-interpret"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lm_head_logits_follow_the_loss_path(monkeypatch, path, dtype):
    if path == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    elif K.backend(torch.device("cpu")) != "triton-interpret":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without CUDA)")
    h = torch.randn(5, 64).to(dtype)
    w = (torch.randn(300, 64) * 3).to(dtype)
    got = lm_head_logits(h, w)
    want_dtype = torch.float32 if path == "torch" or dtype != torch.bfloat16 else torch.bfloat16
    assert got.dtype == want_dtype
    exact = h.double() @ w.double().t()
    rounding = 1e-4 if want_dtype == torch.float32 else 2**-8  # fp32 accumulate; bf16: one rounding of the sum
    assert ((got.double() - exact).abs() <= rounding * exact.abs() + 1e-4).all()


def test_bf16_rollout_logprobs_are_log_softmax_of_fp32_logits(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    args = ModelArgs(vocab_size=500, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=32)
    model = Transformer.from_config(args, seed=0)
    with torch.no_grad():
        model.lm_head_weight.mul_(30.0)  # logits with std ~7: bf16 rounding moves log-probs by ~1e-2
    model = model.to(torch.bfloat16)
    seen = []
    real = lm_head_logits

    def spy(hidden, weight):
        seen.append(real(hidden, weight))
        return seen[-1]

    monkeypatch.setattr("r1fast.rollout.engine.lm_head_logits", spy)
    out = Engine(model, block_size=16, num_blocks=16).generate([[1, 2, 3]], n=1, max_new_tokens=4, temperature=1.0,
                                                             seed=0)[0][0]
    assert all(z.dtype == torch.float32 for z in seen) and len(seen) == 4
    want = [torch.log_softmax(z[-1].double(), -1)[t].item() for z, t in zip(seen, out.token_ids, strict=True)]
    assert out.logprobs == pytest.approx(want, abs=1e-5)

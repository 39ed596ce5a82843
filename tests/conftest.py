"""Shared test setup: interpreter switch, seeding, tolerances, markers, the error-bound helper.

Kernel tests compare against an fp64 reference and bound the kernel's error by a multiple of the
error PyTorch itself makes in the same dtype (``assert_close_to_ref``), plus a tiny absolute floor.
Import the helpers with ``from conftest import assert_close_to_ref, TOLERANCES``.
"""

import os
import random
import sys

# Must happen before anything imports Triton: Triton decides at decoration time whether a
# @triton.jit function is compiled or interpreted.
if "triton" not in sys.modules:
    try:
        import torch as _torch

        _has_cuda = _torch.cuda.is_available()
    except Exception:  # torch missing entirely: tests will fail on import anyway
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite picks its kernel path itself (tests that want the reference set R1FAST_KERNELS=torch through
# monkeypatch or a subprocess's env): inherited from the shell, the override turned every kernel-vs-reference
# test into reference vs reference, and the 16 tests that assert the kernel path ran failed.
os.environ.pop("R1FAST_KERNELS", None)

import pytest
import torch

# Per-dtype tolerances. ``mult``: allowed multiple of PyTorch's own same-dtype error against the
# fp64 reference; ``atol``: absolute floor for outputs whose PyTorch error is ~0 (e.g. exact zeros).
# The multiples follow flash-attention's practice (2x PyTorch's error); bf16 gets 3x because a
# kernel's different summation order alone moves bf16 results by ~1 ulp.
TOLERANCES = {
    torch.float64: {"mult": 2.0, "atol": 1e-12},
    torch.float32: {"mult": 2.0, "atol": 1e-6},
    torch.float16: {"mult": 3.0, "atol": 1e-4},
    torch.bfloat16: {"mult": 3.0, "atol": 1e-3},
}


def _worst(err: torch.Tensor, out: torch.Tensor, ref: torch.Tensor, k: int = 5) -> str:
    flat = err.flatten()
    k = min(k, flat.numel())
    vals, idx = flat.topk(k)
    lines = []
    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
        pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else ()
        lines.append(f"  at {pos}: got {out.flatten()[i].item():.8g}, ref {ref.flatten()[i].item():.8g}, err {v:.3g}")
    return "\n".join(lines)


def assert_close_to_ref(out, ref, torch_out=None, *, dtype=None, mult=None, atol=None, name="output"):
    """Assert ``max|out - ref| <= mult * max|torch_out - ref| + atol``.

    ``ref`` is the fp64 reference; ``torch_out`` is PyTorch's own result computed in the same dtype
    as the kernel (when None, the bound is ``atol`` alone). ``dtype`` picks the tolerance row
    (default: ``out.dtype``). NaN/Inf where the reference is finite always fails. On failure the
    message lists the worst elements.
    """
    out = torch.as_tensor(out)
    ref = torch.as_tensor(ref)
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    row = TOLERANCES[dtype or out.dtype]
    mult = row["mult"] if mult is None else mult
    atol = row["atol"] if atol is None else atol
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    if o.numel() == 0:
        return
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite\n" + _worst(
        bad.double(), o, r
    )
    err = (o - r).abs().nan_to_num(0.0)
    torch_err = 0.0
    if torch_out is not None:
        t = torch.as_tensor(torch_out).detach().to("cpu", torch.float64)
        torch_err = (t - r).abs().nan_to_num(0.0).max().item()
    bound = mult * torch_err + atol
    worst = err.max().item()
    assert worst <= bound, (
        f"{name}: max error {worst:.3g} > bound {bound:.3g} (= {mult} x PyTorch's same-dtype error "
        f"{torch_err:.3g} + atol {atol:.1g})\nworst elements:\n" + _worst(err, o, r)
    )


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """Scale-invariant difference used for FP8 results: 1 - 2*sum(xy) / (sum(x^2) + sum(y^2))."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds, so a failure reproduces."""
    random.seed(0)
    torch.manual_seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_char_checkpoint(path, **model_args) -> str:
    """A randomly initialised model with the character tokenizer, saved as an HF directory at ``path``.

    ``model_args`` override a 1-layer Qwen2-style model (32 wide); the ids of the tokenizer are filled in.
    """
    from r1fast.model import Transformer
    from r1fast.model_config import ModelArgs
    from r1fast.tokenizer import CharTokenizer

    tok = CharTokenizer()
    shape = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                 qkv_bias=True, max_position_embeddings=128)
    args = ModelArgs(**{**shape, **model_args}, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                     bos_token_id=tok.bos_id, pad_token_id=tok.pad_id)
    Transformer.from_config(args, seed=0).save_pretrained(path)
    tok.save(path)
    return str(path)


def save_tiny_moe_checkpoint(path) -> str:
    """A 2-layer DeepSeek-V3-style MoE (dims multiples of 128, as the FP8 recipe needs) with the character tokenizer."""
    return save_char_checkpoint(
        path, model_type="deepseek_v3", hidden_size=128, intermediate_size=128, num_layers=2, num_heads=2,
        num_kv_heads=2, head_dim=48, qkv_bias=False, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=128, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.0,
        max_position_embeddings=64)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """``save_char_checkpoint`` under tmp_path/ckpt."""
    return save_char_checkpoint(tmp_path / "ckpt")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on an H100/H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

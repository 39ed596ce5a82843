"""The dispatch rule of ARCHITECTURE.md and the interpreter-safe dot helper."""

import os
import subprocess
import sys

import pytest
import torch

import r1fast.kernels as K


def _backend_in_fresh_process(env_updates):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "R1FAST_KERNELS")}
    env.update(env_updates)
    code = "import r1fast.kernels as k; print(k.backend('cpu'))"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd="/")
    return res.stdout.strip()


def test_backend_cpu_default_is_torch():
    assert _backend_in_fresh_process({}) == "torch"


def test_backend_cpu_interpret():
    assert _backend_in_fresh_process({"TRITON_INTERPRET": "1"}) == "triton-interpret"


def test_backend_forced_torch(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    assert K.backend("cpu") == "torch"
    assert K.backend(torch.device("cuda", 0)) == "torch"


def test_backend_cuda_device_is_triton(monkeypatch):
    monkeypatch.delenv("R1FAST_KERNELS", raising=False)
    assert K.backend("cuda") == "triton"
    assert K.backend(torch.empty(0, device="meta")) == "torch"


def test_backend_rejects_unknown_env(monkeypatch):
    monkeypatch.setenv("R1FAST_KERNELS", "tritonn")
    with pytest.raises(ValueError, match="R1FAST_KERNELS"):
        K.backend("cpu")


# Values Triton itself reads as true / false; ' 1' and '1 ' are not stripped by Triton (it compiles).
_INTERPRET_VALUES = ["1", "on", "ON", "yes", "Yes", "y", "TRUE", "true", " 1", "1 ", "0", "off", "", "no", "2", "t"]


@pytest.mark.parametrize("value", _INTERPRET_VALUES)
def test_interpreting_reads_triton_interpret_as_triton_does(monkeypatch, value):
    libtriton = pytest.importorskip("triton._C.libtriton")
    from r1fast.kernels.dispatch import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == libtriton.getenv_bool("TRITON_INTERPRET", False)
    assert interpreting() == (value.lower() in ("1", "on", "yes", "y", "true"))  # pinned, should triton drift


def test_empty_build_cuda_env_means_auto_like_empty_kernels_env(monkeypatch):
    """setup.py refused R1FAST_BUILD_CUDA='' while an empty R1FAST_KERNELS means auto."""
    monkeypatch.setenv("R1FAST_KERNELS", "")
    assert K.backend("cpu") in ("torch", "triton-interpret")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = [sys.executable, "setup.py", "--name"]  # a display option: decides the extension, builds nothing
    for value, code in (("", 0), (" ", 0), ("maybe", 1)):
        env = {**os.environ, "R1FAST_BUILD_CUDA": value, "CUDA_HOME": "", "PATH": os.path.dirname(sys.executable)}
        res = subprocess.run(run, env=env, cwd=root, capture_output=True, text=True)
        assert res.returncode == code, res.stderr
    assert "R1FAST_BUILD_CUDA must be auto, 0 or 1 (empty = auto), got 'maybe'" in res.stderr


def test_unknown_op_is_attribute_error():
    with pytest.raises(AttributeError, match="no_such_op"):
        K.no_such_op  # noqa: B018


def test_kernels_is_not_a_top_level_module():
    """`kernels` is HuggingFace's package name; we must only install r1fast.kernels."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or "r1fast" not in (spec.origin or ""), spec


triton = pytest.importorskip("triton")
tl = triton.language

from r1fast.kernels.triton_utils import dot  # noqa: E402


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K_: tl.constexpr, USE_HELPER: tl.constexpr):
    om = tl.arange(0, M)
    on = tl.arange(0, N)
    ok = tl.arange(0, K_)
    a = tl.load(a_ptr + om[:, None] * K_ + ok[None, :])
    b = tl.load(b_ptr + ok[:, None] * N + on[None, :])
    acc = tl.zeros((M, N), dtype=tl.float32)
    if USE_HELPER:
        acc = dot(a, b, acc)
    else:
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + om[:, None] * N + on[None, :], acc)


def _run_mm(use_helper, device):
    a = torch.randn(16, 32, dtype=torch.bfloat16, device=device)
    b = torch.randn(32, 16, dtype=torch.bfloat16, device=device)
    c = torch.empty(16, 16, device=device)
    _mm_kernel[(1,)](a, b, c, 16, 16, 32, use_helper)
    return (c.double() - a.double() @ b.double()).abs().max().item()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter-only check")
def test_interpreter_bf16_dot_is_wrong_and_helper_fixes_it():
    # bf16 products are exact in fp32, so only fp32 summation error may remain.
    assert _run_mm(True, "cpu") < 1e-4
    raw_err = _run_mm(False, "cpu")
    if raw_err < 1e-4:
        pytest.skip("this Triton's interpreter computes bf16 tl.dot correctly; the helper then costs nothing")
    assert raw_err > 1.0, raw_err


@pytest.mark.gpu
def test_dot_helper_compiles_to_native_bf16_mma():
    assert _run_mm(True, "cuda") < 1e-4


def test_op_named_like_its_module_stays_the_function():
    import importlib

    module = importlib.import_module("r1fast.kernels.paged_attention")
    assert callable(K.paged_attention) and K.paged_attention is module.paged_attention
    assert K.paged_attention_cascade is module.paged_attention_cascade


def test_every_kernel_launch_is_a_registered_torch_op():
    """Importing the public ops registers their torch.ops.r1fast operators (ARCHITECTURE: kernels -> launcher ->
    torch.library registration -> public function)."""
    import torch

    from r1fast.kernels.registration import registered_ops

    for name in K.__all__:
        getattr(K, name)
    expected = {"grpo_linear_logprobs", "grpo_linear_loss_and_grads", "paged_attention", "paged_attention_cascade",
                "append_kv", "fp8_quantize_rows_cols", "fp8_quantize_blocks", "fp8_grouped_gemm",
                "fp8_grouped_gemm_wgrad", "moe_expert_histogram", "moe_gather_rows", "moe_combine",
                "moe_combine_backward"}
    assert set(registered_ops()) == expected  # fakes: opcheck in test_{fp8,grpo_loss,paged_attention}_ops.py
    assert all(registered_ops()[name] is getattr(torch.ops.r1fast, name) for name in expected)

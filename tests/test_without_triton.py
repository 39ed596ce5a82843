"""r1fast on an install without Triton (setup.py declares triton for Linux only: macOS / Windows get torch alone).

A child process gets a ``sitecustomize`` that hides the installed triton from every import finder, as if it
were not installed. There ``import r1fast.kernels``, every public op's PyTorch reference, the registered
``torch.ops.r1fast.*``, ``import r1fast.train / rollout / integrations.liger`` and a tiny ``python -m
r1fast.train`` run must work; a call that the dispatch rule sends to a Triton kernel (a CUDA tensor, or
``TRITON_INTERPRET=1``) must raise ImportError "Triton is not installed; ...". Before the fix every op module
imported triton at the top: ModuleNotFoundError from ``fused_linear_logprobs`` and from all three imports.
"""

import os
import subprocess
import sys

import pytest
from train_testing import TINY, rl_metrics

from r1fast.kernels import dispatch

_HIDE_TRITON = '''
import sys


class _HideTriton:
    """Wraps a finder: it finds everything but triton, so triton looks not installed."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_HideTriton(f) for f in sys.meta_path]
'''

_OPS_SCRIPT = r'''
import importlib.util, os, sys
import torch

assert importlib.util.find_spec("triton") is None  # the simulation holds
try:
    import triton  # noqa: F401
    raise SystemExit("triton was importable: the simulation failed")
except ImportError:
    pass

import r1fast.kernels as K
from r1fast.kernels import dispatch, fp8, ref_fp8

assert not dispatch.triton_available() and K.backend("cpu") == "torch"
torch.manual_seed(0)

# log-probs: fp32 against fp64 log_softmax
h, w, ids = torch.randn(5, 8), torch.randn(11, 8), torch.randint(0, 11, (5,))
ref = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, ids[:, None])[:, 0]
assert torch.allclose(K.fused_linear_logprobs(h, w, ids).double(), ref, atol=1e-5)

# GRPO loss with backward against autograd through an explicit log_softmax (old = logp: ratio 1)
B, T, H, V = 2, 3, 8, 11
hid, wt = torch.randn(B, T, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
tok, adv = torch.randint(0, V, (B, T)), torch.randn(B, dtype=torch.float64)
mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
hid_k, wt_k = hid.clone().requires_grad_(), wt.clone().requires_grad_()
loss, metrics = K.fused_linear_grpo_loss(hid_k, wt_k, tok, mask, adv, loss_type="bnpo")
loss.backward()
hid_r, wt_r = hid.clone().requires_grad_(), wt.clone().requires_grad_()
logp = torch.log_softmax(hid_r @ wt_r.T, -1).gather(-1, tok[..., None])[..., 0]
ratio = torch.exp(logp - logp.detach())
loss_r = -(ratio * adv[:, None] * mask).sum() / mask.sum()
loss_r.backward()
assert torch.allclose(loss, loss_r) and torch.allclose(hid_k.grad, hid_r.grad) and torch.allclose(wt_k.grad, wt_r.grad)
assert set(metrics) == {"clip_frac", "entropy"}

# paged attention (decode, 2 sequences of 9 and 16 tokens in pages of 8, 2 query heads on 1 KV head)
kc, vc, q = torch.randn(4, 8, 1, 64), torch.randn(4, 8, 1, 64), torch.randn(2, 2, 64)
table, lens = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), torch.tensor([9, 16], dtype=torch.int32)
out = K.paged_attention(q, kc, vc, table, lens)
for i in range(2):
    keys, vals = (c[table[i].long()].reshape(-1, 64)[: lens[i]].double() for c in (kc, vc))
    want = torch.softmax(q[i].double() @ keys.T / 8.0, -1) @ vals  # scale 1/sqrt(64)
    assert torch.allclose(out[i].double(), want, atol=1e-5), (out[i] - want).abs().max()

# FP8: quantizer bytes as the reference's; grouped GEMM and the MoE layer (forward + backward)
x = torch.randn(64, 256)
qx, sx = K.quantize_fp8_1x128(x)
rq, rs = ref_fp8.quantize_fp8_1x128(x)
assert torch.equal(qx.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(sx, rs)
wq = torch.randn(2, 128, 256)
qw, sw = torch.ops.r1fast.fp8_quantize_blocks(wq, False)  # the registered op itself
rqw, rsw = ref_fp8.quantize_fp8_128x128(wq)
assert torch.equal(qw.view(torch.uint8), rqw.view(torch.uint8)) and torch.equal(sw, rsw)
sizes = torch.tensor([40, 24], dtype=torch.int32)
gemm = K.fp8_grouped_gemm(qx, sx, qw, sw, sizes)
assert torch.equal(gemm, ref_fp8.fp8_grouped_gemm(qx, sx, qw, sw, sizes))
assert gemm.shape == (64, 128) and torch.isfinite(gemm).all()
xm = torch.randn(16, 128).requires_grad_()
tw, ti = torch.randn(16, 3).softmax(-1).topk(2, dim=-1)
wgu, wd = (torch.randn(3, 256, 128) / 128**0.5).requires_grad_(), (torch.randn(3, 128, 128) / 128**0.5).requires_grad_()
y = K.moe_ffn_fp8(xm, tw, ti, wgu, wd)
y.sum().backward()
y_ref = ref_fp8.moe_ffn_fp8(xm.double(), tw.double(), ti, wgu.double(), wd.double())
db = 10 * torch.log10((y_ref**2).sum() / ((y.double() - y_ref) ** 2).sum())
assert db >= 21.0, db  # the bound of tests/test_moe_layer.py (the recipe lands at 22-25 dB)
assert all(torch.isfinite(t.grad).all() for t in (xm, wgu, wd))

# what needs a kernel: a clear ImportError naming the package, never ModuleNotFoundError from deep inside
def missing(call):
    try:
        call()
    except ModuleNotFoundError as err:
        raise SystemExit(f"bare ModuleNotFoundError: {err}")
    except ImportError as err:
        assert str(err).startswith("Triton is not installed;") and "R1FAST_KERNELS=torch" in str(err), err
        return
    raise SystemExit(f"{call} did not raise")

missing(lambda: dispatch.use_triton(torch.device("cuda", 0)))
os.environ["TRITON_INTERPRET"] = "1"
assert K.backend("cpu") == "triton-interpret"  # the rule's choice, as for a broken interpreter
missing(lambda: K.fused_linear_logprobs(h, w, ids))
missing(lambda: K.quantize_fp8_1x128(x))
os.environ["R1FAST_KERNELS"] = "torch"  # the way out the message names
assert torch.allclose(K.fused_linear_logprobs(h, w, ids).double(), ref, atol=1e-5)

import r1fast.integrations.liger, r1fast.rollout, r1fast.train  # noqa: E401,F401
assert "triton" not in sys.modules
print("OK")
'''


def _env_without_triton(tmp_path):
    """This process's environment with a sitecustomize on PYTHONPATH that hides triton from the child."""
    (tmp_path / "sitecustomize.py").write_text(_HIDE_TRITON)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "R1FAST_KERNELS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", R1FAST_PROGRESS="0")
    return env


def test_kernels_without_triton_run_the_reference_and_name_the_missing_package(tmp_path):
    res = subprocess.run([sys.executable, "-c", _OPS_SCRIPT], env=_env_without_triton(tmp_path), cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-2000:] + res.stderr[-4000:]


def test_train_cli_runs_without_triton(tmp_path):
    """The README's training command, shortened as tests/train_testing.py shortens it, on the default backend."""
    args = [*TINY, "--train.out_dir", str(tmp_path / "out"), "--train.name", "notriton", "--train.steps", "1",
            "--train.sft_steps", "0", "--train.warmup_steps", "0"]
    res = subprocess.run([sys.executable, "-m", "r1fast.train", *args], env=_env_without_triton(tmp_path),
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert len(rl_metrics(tmp_path / "out" / "notriton")) == 1  # one GRPO step: rollout, loss, optimizer


def test_a_finder_that_refuses_triton_reads_as_not_installed(monkeypatch):
    """importlib.util.find_spec raises when a finder refuses the name (or triton's module was half removed):
    that must read as "not installed", not break ``import r1fast.kernels``."""

    def refuse(name, package=None):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(dispatch.importlib.util, "find_spec", refuse)
    assert dispatch._find_triton() is False


def test_launch_math_gives_tritons_integers():
    """The launchers' grids moved from triton.cdiv / next_power_of_2 to launch_math: same integers."""
    triton = pytest.importorskip("triton")
    from r1fast.kernels.launch_math import cdiv, next_power_of_2

    sizes = [*range(0, 4100), 2**31 - 1, 2**31, 2**31 + 1, 152_064, 3 * 2**40 + 7]
    assert [next_power_of_2(n) for n in sizes] == [triton.next_power_of_2(n) for n in sizes]
    assert [cdiv(n, d) for n in sizes for d in (1, 16, 64, 128, 512)] == \
        [triton.cdiv(n, d) for n in sizes for d in (1, 16, 64, 128, 512)]

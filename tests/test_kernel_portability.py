"""Kernels across Triton / NumPy versions: the interpreter check in ``dispatch`` and the FP8 signed zero.

The GPU image pins Triton 3.6.0 and NumPy 2.5.2. Triton 3.6's interpreter calls int() on a shape-(1,) array
for every runtime loop bound, which NumPy >= 2.4 refuses: 112 interpreted kernel tests died with a cryptic
InterpreterError. ``dispatch.check_interpreter`` now probes once and raises one RuntimeError naming the
versions and the way out; here the decision is tested with the defect simulated (this stack, Triton 3.9,
is fine). Triton 3.6's interpreter also negates 0.0 to +0.0, which made the FP8 quantizers write 0x00 where
PyTorch writes -0 (0x80); the byte tests below pin the sign on every quantizer.
"""

import pytest
import torch

import r1fast.kernels.dispatch as dispatch
from r1fast.kernels import fp8, ref_fp8

INDEX_ERROR = "only 0-dimensional arrays can be converted to Python scalars"  # NumPy 2.4's words


def _broken_interpreter_probe():
    """What Triton 3.6's interpreter raises on NumPy >= 2.4: InterpreterError wrapping NumPy's TypeError."""
    from triton.runtime.errors import InterpreterError

    try:
        raise TypeError(INDEX_ERROR)
    except TypeError as err:
        raise InterpreterError(repr(err)) from err


def test_interpreter_check_passes_on_this_stack():
    if not dispatch.interpreting():
        pytest.skip("the interpreter check runs only under TRITON_INTERPRET (CPU CI)")
    dispatch.check_interpreter()
    import numpy
    import triton

    # the real probe kernel runs (and counts right) here, so a failure elsewhere is the stack's, not the probe's
    assert dispatch.interpreter_problem(dispatch._probe_kernel, triton.__version__, numpy.__version__) is None
    assert dispatch.use_triton("cpu")


def test_decision_names_versions_and_the_way_out_for_the_index_defect():
    message = dispatch.interpreter_problem(_broken_interpreter_probe, "3.6.0", "2.5.2")
    assert "Triton 3.6.0 with NumPy 2.5.2" in message
    assert f"triton>={dispatch.FIRST_FIXED_TRITON}" in message and dispatch.FIRST_FIXED_TRITON == "3.7.0"
    assert "numpy<2.4" in message and "R1FAST_KERNELS=torch" in message


def test_decision_reports_any_other_probe_failure_as_it_is():
    def wrong_count():
        raise RuntimeError("the probe kernel counted 2 iterations of range(0, 3)")

    message = dispatch.interpreter_problem(wrong_count, "9.9.9", "3.0.0")
    assert "Triton 9.9.9 with NumPy 3.0.0" in message and "counted 2 iterations" in message
    assert "triton>=" not in message  # the version advice is for the known defect only
    assert dispatch.interpreter_problem(lambda: None, "9.9.9", "3.0.0") is None


def test_first_interpreted_call_raises_once_probed_and_other_backends_do_not(monkeypatch):
    calls = []

    def probe():
        calls.append(1)
        _broken_interpreter_probe()

    monkeypatch.setattr(dispatch, "_probe_kernel", probe)
    monkeypatch.setattr(dispatch, "_interpreter_verdict", [])  # not probed yet in this simulated process
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("R1FAST_KERNELS", raising=False)
    assert dispatch.backend("cpu") == "triton-interpret"  # asking which backend runs never raises
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"cannot run r1fast's kernels on Triton .* with NumPy .*numpy<2\.4"):
            dispatch.use_triton("cpu")
    assert len(calls) == 1  # once per process: the verdict is kept
    assert dispatch.use_triton(torch.device("cuda", 0))  # compiled kernels are not affected
    monkeypatch.setenv("R1FAST_KERNELS", "torch")
    assert not dispatch.use_triton("cpu")  # the reference is the way out


@pytest.mark.parametrize("quantizer", ["1x128", "1x128_dual", "128x128"])
def test_fp8_negative_values_that_round_to_zero_keep_the_sign_byte(quantizer):
    x = torch.full((128, 256), -1e-4)
    x[:, 1::2] = 1e-4  # positive tiny values stay +0
    # scale 1 for the tiles holding 448 (row 0, column 0): +-1e-4 round to +-0 there; -0.0 is -0 as given
    x[0, 0], x[0, 2], x[1, 0] = 448.0, -0.0, 1e-4
    if quantizer == "128x128":
        got, want = fp8.quantize_fp8_128x128(x)[0], ref_fp8.quantize_fp8_128x128(x)[0]
    elif quantizer == "1x128":
        got, want = fp8.quantize_fp8_1x128(x)[0], ref_fp8.quantize_fp8_1x128(x)[0]
    else:
        got, want = fp8.quantize_fp8_1x128_dual(x)[2], ref_fp8.quantize_fp8_1x128(x.t().contiguous())[0]
    got, want = got.view(torch.uint8), want.view(torch.uint8)
    assert torch.equal(got, want)
    assert (want == 0x80).any() and (want == 0x00).any()  # both signed zeros are exercised

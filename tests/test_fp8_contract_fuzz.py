"""Seeded fuzz of the FP8 quantizers against the contract (issue #7), written from its text alone.

``tests/test_fp8.py`` compares the kernels with ``ref_fp8``, which shares their design (same fp32 steps). This
oracle shares nothing with either: E4M3 values come from the format's definition (4 exponent bits, bias 7, 3
mantissa bits, no inf, 448 the largest), the rounding is a nearest-value search with ties to the even code, and
every step is fp64 on values rounded to fp32 where the contract computes in fp32 (the scale, the quotient).
Inputs aim at the edges: rounding midpoints, exact powers of two, all-zero tiles, tiles far below the amax floor,
values near the fp32 maximum, ragged last tiles (K, M, N not multiples of 128), M = 0, NaN and inf.
"""

import pytest
import torch

from r1fast.kernels import fp8


def _e4m3_values() -> torch.Tensor:
    """fp64 value of each non-negative finite E4M3 code 0x00..0x7E (0x7F is NaN), from the format's definition."""
    codes = torch.arange(0x7F, dtype=torch.float64)
    exp, man = torch.div(codes, 8, rounding_mode="floor"), codes % 8
    return torch.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))


VALUES = _e4m3_values()
MIDPOINTS = (VALUES[1:] + VALUES[:-1]) / 2


def _to_e4m3_bytes(y: torch.Tensor) -> torch.Tensor:
    """fp64 y (|y| <= 448 or NaN) -> uint8 codes: nearest E4M3 value, ties to the even code, sign kept on zero."""
    mag = y.abs().nan_to_num(0.0)
    hi = torch.searchsorted(VALUES, mag).clamp(1, VALUES.numel() - 1)  # VALUES[hi - 1] < mag <= VALUES[hi]
    d_lo, d_hi = mag - VALUES[hi - 1], VALUES[hi] - mag
    code = torch.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, hi - 1)
    code = torch.where(mag == 0, 0, code) + torch.signbit(y).long() * 0x80
    return torch.where(y.isnan(), 0x7F, code).to(torch.uint8)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float().double()


def _quantize_tiles(x: torch.Tensor, rows: int, floor: float, power_of_two: bool):
    """x fp64 [M, K] in (rows x 128) tiles -> (bytes uint8 [M, K], scale fp64 [ceil(M/rows), ceil(K/128)])."""
    M, K = x.shape
    nm, nk = -(-M // rows), -(-K // 128)
    q, scale = torch.zeros(M, K, dtype=torch.uint8), torch.zeros(nm, nk, dtype=torch.float64)
    for i in range(nm):
        for j in range(nk):
            tile = x[i * rows:(i + 1) * rows, j * 128:(j + 1) * 128]  # valid elements only: ragged tiles stay short
            amax = tile.abs().max() if not tile.isnan().any() else torch.tensor(float("nan"), dtype=torch.float64)
            s = _fp32(torch.maximum(amax, _fp32(torch.tensor(floor))) / 448)  # an fp32 division, correctly rounded
            if power_of_two and s.isfinite():
                s = 2.0 ** torch.ceil(torch.log2(s))
            scale[i, j] = s
            y = _fp32(tile / s).clamp(-448, 448)  # the fp32 quotient, saturated (clamp keeps NaN)
            q[i * rows:(i + 1) * rows, j * 128:(j + 1) * 128] = _to_e4m3_bytes(y)
    return q, scale


def _fuzz_input(gen: torch.Generator, M: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    kind = int(torch.randint(6, (), generator=gen))
    if kind == 0:  # quotients on and beside rounding midpoints: the row's first element pins amax to 448 * 2^e
        pool = torch.cat([MIDPOINTS, VALUES, MIDPOINTS * (1 + 2.0**-12), MIDPOINTS * (1 - 2.0**-12)])
        x = pool[torch.randint(pool.numel(), (M, K), generator=gen)]
        x[:, ::128] = 448.0
        x = x * 2.0 ** float(torch.randint(-20, 20, (), generator=gen))
    elif kind == 1:  # exact powers of two
        x = 2.0 ** torch.randint(-30, 30, (M, K), generator=gen).double()
    elif kind == 2:  # an all-zero first tile, then tiny values far below the 1e-4 floor
        x = torch.randn(M, K, generator=gen, dtype=torch.float64) * 1e-9
        x[:, :128] = 0.0
    elif kind == 3:  # near the fp32 maximum (bf16 keeps it; fp16 turns it into inf, a non-finite tile)
        x = torch.randn(M, K, generator=gen, dtype=torch.float64) * 1e38
    else:  # rows whose magnitudes span 1e-9 .. 1e9
        x = torch.randn(M, K, generator=gen, dtype=torch.float64) * torch.exp(torch.randn(M, 1, generator=gen) * 7)
    sign = torch.randint(2, (M, K), generator=gen) * 2 - 1
    x = (x * sign).to(dtype)
    if M and K and int(torch.randint(3, (), generator=gen)) == 0:
        x[int(torch.randint(M, (), generator=gen)), int(torch.randint(K, (), generator=gen))] = float(
            [float("nan"), float("inf"), -float("inf")][int(torch.randint(3, (), generator=gen))])
    return x


def _check(q: torch.Tensor, s: torch.Tensor, want_q: torch.Tensor, want_s: torch.Tensor, what: str) -> None:
    bad_bytes = int((q.view(torch.uint8) != want_q).sum())
    s = s.double()
    bad_scales = int((~((s == want_s) | (s.isnan() & want_s.isnan()))).sum())
    assert bad_bytes == 0 and bad_scales == 0, f"{what}: {bad_bytes} bytes, {bad_scales} scales differ"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_quantizers_match_an_independent_implementation_of_the_contract(monkeypatch, kernels):
    monkeypatch.setenv("R1FAST_KERNELS", kernels)
    gen = torch.Generator().manual_seed(7)
    shapes = [(0, 256), (1, 1), (3, 127), (5, 128), (130, 129), (64, 300), (129, 384), (200, 200)]
    for case in range(24):
        M, K = shapes[case % len(shapes)]
        dtype = (torch.float32, torch.bfloat16, torch.float16)[case % 3]
        power_of_two, floor = case % 4 >= 2, (1e-4, fp8.GRAD_AMAX_FLOOR)[case % 2]
        x = _fuzz_input(gen, M, K, dtype)
        if case % 5 == 4 and M > 1 and K > 1:
            x = x.t().contiguous().t()  # column-major: a non-contiguous input
        what = f"case {case}: {dtype} [{M}, {K}] power_of_two={power_of_two} floor={floor:g} ({kernels})"
        x64 = x.double()
        q, s, qt, st = fp8.quantize_fp8_1x128_dual(x, power_of_two=power_of_two, amax_floor=floor)
        _check(q, s, *_quantize_tiles(x64, 1, floor, power_of_two), what + " 1x128")
        _check(qt, st, *_quantize_tiles(x64.t(), 1, floor, power_of_two), what + " 128x1")
        if M:
            qw, sw = fp8.quantize_fp8_128x128(x, power_of_two=power_of_two)  # weights: always the 1e-4 floor
            _check(qw, sw, *_quantize_tiles(x64, 128, fp8.AMAX_FLOOR, power_of_two), what + " 128x128")

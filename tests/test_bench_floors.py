"""Every registered benchmark case's floor against FLOP and byte counts written independently here."""

import pytest
from bench_testing import REPO  # noqa: F401  (puts the repository, home of `bench`, on sys.path)

from bench import registry


def _registered_cases():
    return {c.name: c for generate in registry.families().values() for c in generate(False)}


def test_registered_floors_equal_counts_derived_here():
    """Every reported ratio divides by these: each case's FLOPs / minimum bytes against a count written
    independently from the issues' shapes (a floor 2.67x too high went unnoticed before this test)."""
    cases = _registered_cases()

    def close(name, field, want, rel=1e-9):
        got = getattr(cases[name], field)
        assert got == pytest.approx(want, rel=rel), f"{name}.{field}: case says {got:.4g}, count is {want:.4g}"

    for tag, (n, h, v) in {"A": (16384, 3584, 152064), "B": (32768, 1536, 151936)}.items():
        close(f"grpo_loss.fwd_bwd.{tag}", "flops", 6 * n * h * v)  # logits, dlogits @ W, dlogits^T @ h
        close(f"grpo_loss.logprobs.{tag}", "flops", 2 * n * h * v)
    kv_token = 2 * 4 * 128 * 2  # K and V, 4 KV heads, D = 128, bf16
    for b, seq in ((64, 8192), (256, 4096), (16, 32768)):
        close(f"paged_attention.decode.B{b}_L{seq}", "bytes", b * seq * kv_token)
    group = "paged_attention.group_decode.P2048_G16_gen1024"
    close(group, "bytes", (16 * 2048 + 16 * 16 * 1024) * kv_token)  # each group's prompt read once
    assert cases[group].rates["effective GB"] == pytest.approx(16 * 16 * (2048 + 1024) * kv_token / 1e9)
    for kind in ("fwd", "dgrad", "wgrad"):
        for ragged in ("", ".ragged"):
            close(f"moe_gemm.{kind}.fc1{ragged}", "flops", 2 * 32768 * 4096 * 7168)
            close(f"moe_gemm.{kind}.fc2{ragged}", "flops", 2 * 32768 * 7168 * 2048)
    t, h, inter, k = 8192, 7168, 2048, 8  # fwd + dgrad + wgrad of fc1 [2I, H] and fc2 [H, I]
    close("moe_gemm.layer.fwd_bwd", "flops", 3 * (2 * t * k * h * 2 * inter + 2 * t * k * inter * h))
    hid, inter, layers, hq, hkv, d, vocab = 1536, 8960, 28, 12, 2, 128, 151936  # Qwen2.5-1.5B
    matmul_params = layers * (hid * (hq + 2 * hkv) * d + hq * d * hid + 3 * hid * inter) + vocab * hid
    for b, seq in ((2, 4096), (4, 4096)):
        causal_attention = 3 * layers * b * 2 * (2 * seq * seq * hq * d) / 2  # QK^T and PV, half masked, fwd+bwd
        close(f"model.train_fwd_bwd.qwen2.5-1.5b.{b}x{seq}", "flops", 6 * b * seq * matmul_params + causal_attention)
        assert cases[f"model.train_fwd_bwd.qwen2.5-1.5b.{b}x{seq}"].rates == {"tokens": b * seq}
    weight_bytes = 2 * (layers * (hid * (hq + 2 * hkv) * d + (hq + 2 * hkv) * d + hq * d * hid + 3 * hid * inter
                                  + 2 * hid) + vocab * hid + hid)
    kv_token = layers * 2 * hkv * d * 2
    for p, g, new in ((16, 16, 512), (64, 16, 1024), (4, 16, 128)):
        # the weights once per forward (prefill, which yields the first token, then new - 1 decode steps);
        # each decode step reads every group's prompt KV once (cascade) and each sample's own tokens so far
        steps = new - 1
        reads = new * weight_bytes + steps * p * 256 * kv_token + p * g * kv_token * sum(range(1, new))
        close(f"rollout.qwen2.5-1.5b.{p}x{g}x{new}", "bytes", reads)
        assert cases[f"rollout.qwen2.5-1.5b.{p}x{g}x{new}"].rates == {"tokens": p * g * new}

"""What r1fast.kernels does with inputs a trainer gets wrong, found by a user-side probe of the public API:

* an out-of-range token id with the host checks off (torch.compile, graph capture, trusted_inputs) read
  another row or past the logits buffer (a garbage log-prob, or SIGSEGV at 10**6): now NaN there;
* the quantizers' outputs required grad (the kernel path then gave x.grad None, the reference 1017.0);
* a NaN advantage of a fully masked sequence gave loss -0.5 (kernel, token level) or NaN (elsewhere);
* tensors on another device than hidden / a (meta here) were read as garbage with no error;
* paged attention's table entries past the cache and cu_seqlens_q past T crashed the CPU process.
"""

import pytest
import torch

import r1fast.kernels as K
from r1fast.kernels.registration import trusted_inputs

B, T, H, V = 2, 5, 16, 37


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / 4
    ids = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, ids


@pytest.mark.parametrize("bad", [V, -1, 10**6])
def test_out_of_range_ids_without_host_checks_give_nan_not_a_read_past_the_row(bad):
    hidden, weight, ids = _inputs()
    expected = K.fused_linear_logprobs(hidden, weight, ids)
    ids[0, 1] = bad
    with pytest.raises(ValueError, match="token_ids must lie in"):
        K.fused_linear_logprobs(hidden, weight, ids)
    if K.backend(hidden.device) == "torch":
        pytest.skip("the reference's gather raises for any id (no kernel reads a row here)")
    with trusted_inputs():
        got = K.fused_linear_logprobs(hidden, weight, ids)
    assert got[0, 1].isnan()
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[0, 1] = False
    torch.testing.assert_close(got[keep], expected[keep], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_quantizers_return_no_grad_outputs(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    x = torch.randn(4, 256, requires_grad=True)
    for out in (*K.quantize_fp8_1x128(x), *K.quantize_fp8_128x128(x)):
        assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_nan_advantage_of_a_fully_masked_sequence_changes_nothing(level, backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    hidden, weight, ids = _inputs(1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1] = False  # padding sequence: its advantage is (r - mean) / std of nothing
    losses, grads = [], []
    for adv in (torch.tensor([0.7, float("nan")]), torch.tensor([0.7, 0.0])):
        h = hidden.clone().requires_grad_()
        loss, _ = K.fused_linear_grpo_loss(h, weight, ids, mask, adv, importance_level=level,
                                           old_logps=torch.zeros(B, T) - 1.5)
        loss.backward()
        losses.append(loss.detach())
        grads.append(h.grad)
    assert losses[0].isfinite()
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_loss_arguments_on_another_device_are_named():
    hidden, weight, ids = _inputs()
    mask, adv = torch.ones(B, T, dtype=torch.bool), torch.randn(B)
    meta = dict(bias=torch.zeros(V, device="meta"))
    with pytest.raises(ValueError, match="bias is on meta but hidden is on cpu"):
        K.fused_linear_logprobs(hidden, weight, ids, **meta)
    with pytest.raises(ValueError, match="token_ids is on meta"):
        K.fused_linear_logprobs(hidden, weight, ids.to("meta"))
    cases = {"advantages": dict(advantages=adv.to("meta")), "mask": dict(mask=mask.to("meta")),
             "old_logps": dict(old_logps=torch.zeros(B, T, device="meta")),
             "ref_logps": dict(ref_logps=torch.zeros(B, T, device="meta"), beta=0.1),
             "rollout_is_ratio": dict(rollout_is_ratio=torch.ones(B, T, device="meta")),
             "normalizer": dict(normalizer=torch.tensor(3.0, device="meta"), loss_type="dapo")}
    for name, kw in cases.items():
        args = {"mask": mask, "advantages": adv, **kw}
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            K.fused_linear_grpo_loss(hidden, weight, ids, args.pop("mask"), args.pop("advantages"), **args)
    # a CPU scalar normalizer stays accepted, as torch takes CPU scalars beside any device's tensors
    K.fused_linear_grpo_loss(hidden, weight, ids, mask, adv, normalizer=torch.tensor(3.0), loss_type="dapo")


def test_grouped_gemm_arguments_on_another_device_are_named():
    M, N, K_ = 5, 64, 128
    a, a_scale = K.quantize_fp8_1x128(torch.randn(M, K_))
    b, b_scale = K.quantize_fp8_128x128(torch.randn(2, N, K_))
    sizes = torch.tensor([2, 3], dtype=torch.int32)
    for name, change in (("group_sizes", dict(group_sizes=sizes.to("meta"))), ("b_scale", dict(b_scale=b_scale.to("meta"))),
                         ("a_scale", dict(a_scale=a_scale.to("meta")))):
        args = {**dict(a=a, a_scale=a_scale, b=b, b_scale=b_scale, group_sizes=sizes), **change}
        with pytest.raises(ValueError, match=f"{name} is on meta but a is on cpu"):
            K.fp8_grouped_gemm(**args)
    from r1fast.kernels.fp8 import quantize_fp8_128x1
    from r1fast.kernels.moe_gemm import fp8_grouped_gemm_wgrad

    at, at_scale = quantize_fp8_128x1(torch.randn(M, N))
    bt, bt_scale = quantize_fp8_128x1(torch.randn(M, K_))
    with pytest.raises(ValueError, match="group_sizes is on meta but at is on cpu"):
        fp8_grouped_gemm_wgrad(at, at_scale, bt, bt_scale, sizes.to("meta"))


def _paged(seq=(9, 5), blocks=6, bs=8):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(blocks, bs, 1, 64, generator=g)
    v = torch.randn(blocks, bs, 1, 64, generator=g)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor(seq, dtype=torch.int32)
    return k, v, table, lens


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_paged_attention_refuses_indices_outside_the_cache_on_cpu(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setenv("R1FAST_KERNELS", "torch")
    k, v, table, lens = _paged()
    q = torch.randn(2, 2, 64)
    K.paged_attention(q, k, v, table, lens)
    unused = table.clone()
    unused[1, 1] = 10**8  # row 1 holds 5 tokens: its second block is never read, whatever it holds
    K.paged_attention(q, k, v, unused, lens)
    for entry, match in ((6, r"block_table\[0, 1\] = 6 is not a block of the cache \(\[0, 6\)\)"),
                         (10**8, "is not a block"), (-1, "is not a block")):
        bad = table.clone()
        bad[0, 1] = entry
        with pytest.raises(ValueError, match=match):
            K.paged_attention(q, k, v, bad, lens)
    with pytest.raises(ValueError, match=r"seq_lens\[1\] = 17 is outside \[0, 16\]"):
        K.paged_attention(q, k, v, table, torch.tensor([9, 17], dtype=torch.int32))
    prefill = torch.randn(5, 2, 64)
    for cu in ([0, 1, 6], [0, 3, 2], [1, 2, 5]):  # [0, 1, 6] ends past T = 5: the kernel wrote past out
        cu = torch.tensor(cu, dtype=torch.int32)
        with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease and end at T = 5"):
            K.paged_attention(prefill, k, v, table, lens, cu_seqlens_q=cu, max_seqlen_q=5)
    bad_groups = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"group_of_seq must lie in \[0, 2\)"):
        K.paged_attention_cascade(q, k, v, table, lens, bad_groups, table[[1, 0]], lens, max_group_size=2)
    with trusted_inputs():  # the caller's promise, as on CUDA (where reading them would sync per layer)
        K.paged_attention(q, k, v, unused, lens)

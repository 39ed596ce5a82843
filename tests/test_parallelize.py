"""Parallelism and kernel choices applied from outside the model."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.parallelize import apply_fsdp, clip_and_step, enable_fp8_experts, unsharded_for_rollout


def _moe_args(fp8: bool) -> ModelArgs:
    return ModelArgs(model_type="deepseek_v3", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2,
                     num_heads=2, num_kv_heads=2, head_dim=48, q_lora_rank=None, kv_lora_rank=32,
                     qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                     n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
                     first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, fp8=fp8)


def test_fp8_experts_hook_runs_the_fp8_layer_close_to_bf16_reference():
    ids = torch.randint(0, 64, (2, 7))
    ref = Transformer.from_config(_moe_args(fp8=False), seed=3)
    fp8 = Transformer.from_config(_moe_args(fp8=True), seed=3)
    cache = enable_fp8_experts(fp8)
    out = fp8(ids)
    out.square().mean().backward()
    fp8(ids)  # a second forward before any optimizer step reuses the quantized weights
    # one MoE layer: w_gate_up and w_down quantized once; the second forward reuses both
    assert cache.quantizations == 2
    w = next(p for n, p in fp8.named_parameters() if n.endswith("w_gate_up"))
    with torch.no_grad():
        w.mul_(1.0)  # an in-place optimizer-style update bumps the version: re-quantize that weight only
    fp8(ids)
    assert cache.quantizations == 3
    with torch.no_grad():
        expected = ref(ids)
    # FP8 (E4M3, 1x128 / 128x128 scales) on both GEMMs of each expert: ~2-3 significant digits
    err = (out.detach() - expected).norm() / expected.norm()
    assert err < 0.05, float(err)
    assert all(p.grad is not None for n, p in fp8.named_parameters() if "w_gate_up" in n or "w_down" in n)


def test_without_process_group_fsdp_and_rollout_mode_are_no_ops():
    model = Transformer.from_config(ModelArgs(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                                              num_kv_heads=1, head_dim=16, intermediate_size=64))
    assert apply_fsdp(model, None) is model
    with unsharded_for_rollout(model):
        model(torch.randint(0, 32, (1, 5)))


def test_activation_checkpointing_keeps_outputs_gradients_and_checkpoint_names():
    from r1fast.parallelize import apply_activation_checkpointing

    args = ModelArgs(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                     intermediate_size=64)
    plain, wrapped = Transformer.from_config(args, seed=1), Transformer.from_config(args, seed=1)
    apply_activation_checkpointing(wrapped)
    ids = torch.randint(0, 32, (2, 6))
    for m in (plain, wrapped):
        m(ids).square().mean().backward()
    assert plain.state_dict().keys() == wrapped.state_dict().keys()  # HF save names unchanged
    grads = dict(wrapped.named_parameters())
    for name, p in plain.named_parameters():
        wrapped_name = name if name in grads else ".".join(
            [*name.split(".")[:2], "_checkpoint_wrapped_module", *name.split(".")[2:]])
        torch.testing.assert_close(grads[wrapped_name].grad, p.grad, rtol=0, atol=0)


_SCALE_SCRIPT = r"""
import json, math, sys
import torch, torch.distributed as dist
from torch.distributed.tensor import Replicate, Shard
from torch.testing._internal.distributed.fake_pg import FakeStore
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.parallelize import apply_fsdp, build_mesh

report = {}
for rank in (0, 511):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=512)
    mesh = build_mesh("cpu", 512, 8)  # 64 nodes x 8 GPUs
    model = Transformer.from_config(ModelArgs(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, head_dim=16, intermediate_size=72), seed=1)
    full = {n: tuple(p.shape) for n, p in model.named_parameters()}
    apply_fsdp(model, mesh)
    params = dict(model.named_parameters())
    out = model(torch.randint(0, 64, (2, 5)))
    model.logits(out).float().logsumexp(-1).sum().backward()
    report[rank] = {
        "mesh": list(mesh.shape), "names": list(mesh.mesh_dim_names), "coord": mesh.get_coordinate(),
        "placements_ok": all(p.placements == (Replicate(), Shard(0)) for p in params.values()),
        "grads_ok": all(p.grad is not None and p.grad.placements == p.placements for p in params.values()),
        "local": {n: list(p.to_local().shape) for n, p in params.items()}, "full": full,
        "out": list(out.shape),
    }
    dist.destroy_process_group()
print(json.dumps(report))
"""


def test_hsdp_mesh_and_sharding_at_512_ranks_on_a_fake_process_group():
    """ARCHITECTURE's scale check: 64 nodes x 8 GPUs -> (replicate 64, shard 8) HSDP, run on CPU by a fake PG."""
    proc = subprocess.run([sys.executable, "-c", _SCALE_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert report[0]["coord"] == [0, 0] and report[511]["coord"] == [63, 7]
    for rank, r in report.items():
        assert r["mesh"] == [64, 8] and r["names"] == ["replicate", "shard"]
        assert r["placements_ok"] and r["grads_ok"] and r["out"] == [2, 5, 32]
        shard = r["coord"][1]
        for name, full in r["full"].items():
            chunk = -(-full[0] // 8)  # torch.chunk sizes: ceil(dim0 / 8), the last shards may be short or empty
            rows = max(0, min(chunk, full[0] - shard * chunk))
            assert r["local"][name] == [rows, *full[1:]], (rank, name)
    assert "returned a view tensor" not in proc.stderr  # the model's output is not a view (FSDP2's hook stays)


def test_enable_fp8_experts_switches_moe_layers_and_rejects_dense_models():
    dense = Transformer.from_config(ModelArgs(vocab_size=32, hidden_size=32, num_layers=1, num_heads=2,
                                              num_kv_heads=1, head_dim=16, intermediate_size=64))
    with pytest.raises(ValueError, match="has no MoE layers"):
        enable_fp8_experts(dense)
    # refused here, before training: the kernel's own check ran at the first forward, after the run had set the
    # previous run aside and written its config
    small = dataclasses.replace(_moe_args(fp8=False), moe_intermediate_size=96)
    with pytest.raises(ValueError, match="multiples of 128, got 128 and 96"):
        enable_fp8_experts(Transformer.from_config(small))
    model = Transformer.from_config(_moe_args(fp8=False), seed=3)  # args say bf16; the switch comes from outside
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cache = enable_fp8_experts(model, optimizer)
    ids = torch.randint(0, 64, (2, 7))
    model(ids).square().mean().backward()
    assert cache.quantizations == 2
    optimizer.step()
    model(ids)
    assert cache.quantizations == 4  # re-quantized after the step
    # a second model with its own cache leaves the first on the cache its optimizer invalidates (a
    # process-global hook moved it onto the second model's cache, which served stale weights after a step)
    other = Transformer.from_config(_moe_args(fp8=False), seed=4)
    other_cache = enable_fp8_experts(other, torch.optim.SGD(other.parameters(), lr=0.1))
    model(ids).square().mean().backward()
    other(ids)
    assert cache.quantizations == 4 and other_cache.quantizations == 2
    optimizer.step()
    with torch.no_grad():
        after_step = model(ids)
    assert cache.quantizations == 6
    enable_fp8_experts(model)  # a fresh cache quantizes the stepped weights: the same output
    with torch.no_grad():
        assert torch.equal(model(ids), after_step)


_FSDP_FP8_SCRIPT = r"""
import json, torch, torch.distributed as dist
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.parallelize import apply_fsdp, build_mesh, enable_fp8_experts
dist.init_process_group("gloo")
args = ModelArgs(**json.loads(ARGS))
model = Transformer.from_config(args, seed=3)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
cache = enable_fp8_experts(model, optimizer)
apply_fsdp(model, build_mesh("cpu", 2, 2))
ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(dist.get_rank()))
counts = []
for step in range(2):
    for micro in range(2):  # gradient accumulation: FSDP2 gathers the experts again for every micro-batch
        model(ids).square().mean().backward()
        counts.append(cache.quantizations)
    optimizer.step()
    optimizer.zero_grad()
with torch.no_grad():
    stepped = model(ids)
cache.invalidate()
with torch.no_grad():
    fresh = model(ids)
print(json.dumps({"counts": counts, "same_as_fresh": bool(torch.equal(stepped, fresh))}))
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_fsdp2_fp8_experts_quantize_once_per_step_and_never_serve_stale_weights(tmp_path):
    from dataclasses import asdict

    script = tmp_path / "fsdp_fp8.py"
    script.write_text(f"ARGS = {json.dumps(json.dumps(asdict(_moe_args(fp8=False))))}\n" + _FSDP_FP8_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 2
    for report in reports:  # 2 expert weights: quantized at the first forward of each step only
        assert report["counts"] == [2, 2, 4, 4], report
        assert report["same_as_fresh"]  # after a step the cache holds the new weights


def _clip_setup(grads):
    params = [torch.nn.Parameter(torch.zeros(len(g), dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.tensor(g, dtype=torch.float64)
    return torch.nn.ParameterList(params), torch.optim.SGD(params, lr=1.0)


def test_clips_the_global_norm_and_returns_the_unclipped_one():
    root, opt = _clip_setup([[3.0, 0.0], [4.0]])  # global norm 5
    assert clip_and_step(root, opt, 1.0, False) == 5.0
    assert torch.allclose(root[0].detach(), torch.tensor([-0.6, 0.0], dtype=torch.float64), rtol=1e-6, atol=0)
    assert torch.allclose(root[1].detach(), torch.tensor([-0.8], dtype=torch.float64), rtol=1e-6, atol=0)
    root, opt = _clip_setup([[3.0, 0.0], [4.0]])
    assert clip_and_step(root, opt, 0.0, False) == 5.0  # 0: no clipping
    assert root[0].detach().tolist() == [-3.0, 0.0] and root[1].detach().tolist() == [-4.0]


def test_a_non_finite_norm_skips_the_step():
    root, opt = _clip_setup([[float("nan"), 1.0], [2.0]])
    assert math.isnan(clip_and_step(root, opt, 1.0, False))
    assert root[0].detach().tolist() == [0.0, 0.0] and root[1].detach().tolist() == [0.0]


def test_rollout_forwards_under_fsdp_never_make_a_block_the_forward_root():
    """FSDP2 makes the first module to run a forward its root, and a root's pre-forward makes the all-gather
    streams wait on the current stream. The engine calls the inner model, so every block used to become a root:
    inside a CUDA-graph capture those waits fork the streams into the capture, which cannot then end, and every
    FSDP rollout decoded eagerly. During a rollout the running root is the policy's, and after it the training
    forward is its own root again."""
    from r1fast.parallelize import build_mesh, release_one_rank_group

    class PolicyLike(torch.nn.Module):  # the trainer's root: a module around the model the engine calls
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, ids):
            return self.model(ids)

    model = Transformer.from_config(ModelArgs(vocab_size=32, hidden_size=32, num_layers=2, num_heads=2,
                                              num_kv_heads=1, head_dim=16, intermediate_size=64), seed=0)
    ids = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        expected = model(ids)
    try:
        root = apply_fsdp(PolicyLike(model), build_mesh("cpu", 1, 1, one_rank=True))
        seen = []
        for block in model.layers:
            block.register_forward_pre_hook(  # runs after FSDP's own (prepended) pre-forward hook
                lambda mod, args: seen.append(mod._get_fsdp_state()._state_ctx.iter_forward_root))
        with unsharded_for_rollout(root), torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(model(ids), expected, rtol=0, atol=0)
        state = root._get_fsdp_state()
        assert len(seen) == 4 and all(s is state for s in seen)
        assert state._state_ctx.iter_forward_root is None
        seen.clear()
        root(ids).square().mean().backward()  # a training forward: root is the forward's root again
        assert seen == [state, state]
        grads = {n: p.grad is not None for n, p in model.named_parameters()}
        assert all(has for n, has in grads.items() if n != "lm_head.weight"), grads  # hidden states: no head
    finally:
        release_one_rank_group()

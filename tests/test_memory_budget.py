"""The KV cache's GPU budget leaves room for what training allocates after the engine is built
(r1fast.memory_budget): AdamW moments, gradients, and the weights FSDP2 gathers for generation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from train_testing import tiny_config

from r1fast.memory_budget import training_reserve_bytes
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs

ARGS = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
            intermediate_size=72)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_unsharded_model_reserves_moments_and_gradients_until_they_exist():
    model = Transformer.from_config(ModelArgs(**ARGS), seed=1)
    frozen = model.norm.weight  # not trained: no moments, no gradient
    frozen.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    size = _bytes(trained)
    assert training_reserve_bytes(model, optimizer, torch.float32) == 2 * size + size
    assert training_reserve_bytes(model, None, torch.float32) == 0  # nothing will be trained
    model.logits(model(torch.randint(0, 64, (2, 5)))).square().mean().backward()
    assert training_reserve_bytes(model, optimizer, torch.float32) == 2 * size  # gradients exist now
    optimizer.step()
    assert training_reserve_bytes(model, optimizer, torch.float32) == 0
    optimizer.zero_grad(set_to_none=True)  # dropped after every update: needed again at the next backward
    assert training_reserve_bytes(model, optimizer, torch.float32) == size


_FSDP_SCRIPT = r"""
import json, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from r1fast.memory_budget import training_reserve_bytes
from r1fast.model import Transformer
from r1fast.model_config import ModelArgs
from r1fast.parallelize import apply_fsdp, build_mesh

dist.init_process_group("fake", store=FakeStore(), rank=3, world_size=8)
model = Transformer.from_config(ModelArgs(**ARGS), seed=1)
full = sum(p.numel() for p in model.parameters())
apply_fsdp(model, build_mesh("cpu", 8, 8), param_dtype=torch.bfloat16)
local = sum(p.to_local().numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
print(json.dumps(dict(full=full, local=local, reserve=training_reserve_bytes(model, optimizer, torch.bfloat16))))
dist.destroy_process_group()
"""


def test_fsdp2_reserves_the_model_gathered_whole_for_generation():
    """8 ranks (a fake process group): moments of the local shard in fp32, plus the larger of the whole model
    in bf16 (generation) and the shard's fp32 gradient (training), which never coexist."""
    proc = subprocess.run([sys.executable, "-c", f"ARGS = {ARGS!r}\n" + _FSDP_SCRIPT], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["local"] < r["full"] / 4  # sharded over 8 ranks
    assert r["reserve"] == 2 * 4 * r["local"] + max(2 * r["full"], 4 * r["local"])


@pytest.mark.parametrize("fp8", [False, True])
def test_trainer_sizes_the_cache_with_its_training_reserve(tmp_path, monkeypatch, fp8):
    from conftest import save_tiny_moe_checkpoint

    from r1fast import train
    from r1fast.memory_budget import fp8_expert_copy_bytes

    seen = {}

    class Stop(Exception):
        pass

    def engine(model, **kwargs):
        seen.update(kwargs, params=_bytes(p for p in model.parameters() if p.requires_grad),
                    fp8=fp8_expert_copy_bytes(model))
        raise Stop

    monkeypatch.setattr(train, "Engine", engine)
    extra = ("--model.name_or_path", save_tiny_moe_checkpoint(tmp_path / "moe"), "--parallel.fp8_experts", "true",
             "--grpo.beta", "0.04") if fp8 else ()
    with pytest.raises(Stop):
        train.run(tiny_config(tmp_path, "--train.name", "budget", *extra))
    # one fp32 process: no sharding; AdamW's two moments plus the gradients, none allocated yet, plus (FP8
    # experts) the cache's copies of the policy's and the reference's experts
    assert seen["reserve_bytes"] == 3 * seen["params"] + (2 * seen["fp8"] if fp8 else 0) > 0
    assert (seen["fp8"] > 0) == fp8


def test_engine_budget_subtracts_the_reserve(monkeypatch):
    from types import SimpleNamespace

    from r1fast.rollout import Engine

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    fake = SimpleNamespace(device=torch.device("cuda"), args=SimpleNamespace(hidden_size=64, intermediate_size=128,
                                                                            vocab_size=100), weight_itemsize=2)
    per_block, overhead = 1 << 20, 4096 * (8 * 64 + 3 * 128) * 2 + 64 * 100 * 4 * 6
    assert Engine._default_num_blocks(fake, per_block, 16, 0.5, 4096, 64, 10 * gib) == \
        int(((40 - 10) * gib * 0.5 - overhead) // per_block)
    with pytest.raises(ValueError, match="40.00 GiB free, 40.00 GiB of it reserved for training"):
        Engine._default_num_blocks(fake, per_block, 16, 0.5, 4096, 64, 40 * gib)
    model = Transformer.from_config(ModelArgs(**ARGS))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reserve_bytes"):
            Engine(model, reserve_bytes=bad)


def test_fp8_expert_copies_counted_as_the_weight_cache_holds_them():
    """fp8_expert_copy_bytes against the bytes Fp8WeightCache holds after a forward (MoE layer 2 of 2)."""
    from r1fast.memory_budget import fp8_expert_copy_bytes
    from r1fast.parallelize import enable_fp8_experts

    args = ModelArgs(model_type="deepseek_v3", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=2,
                     num_heads=2, num_kv_heads=2, head_dim=48, q_lora_rank=None, kv_lora_rank=32,
                     qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=4,
                     n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128, first_k_dense_replace=1,
                     n_group=2, topk_group=1)
    model = Transformer.from_config(args, seed=3)
    cache = enable_fp8_experts(model)
    assert fp8_expert_copy_bytes(model) > 0 and fp8_expert_copy_bytes(None) == 0
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 7)))
    held = sum(t.numel() * t.element_size() for *_, w in cache._entries.values()
               for t in (w.q, w.scale, w.q_t, w.scale_t))
    assert held == fp8_expert_copy_bytes(model)
    assert fp8_expert_copy_bytes(model, None, model) == 2 * held

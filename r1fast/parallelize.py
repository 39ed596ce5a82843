"""Applies parallelism to a built model from outside: the model itself knows none of it.

Dense models: FSDP2 (``fully_shard``) per transformer block, then the root. Across nodes the mesh is
2-D, replicate x shard (HSDP): the shard axis stays inside a node where NVLink carries the
all-gathers and reduce-scatters, and only the gradient all-reduce crosses InfiniBand.
Rollouts run on the live weights: ``unsharded_for_rollout`` gathers them once for the whole
generation (ranks generate different numbers of tokens, so per-forward all-gathers would deadlock)
and re-shards afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

_ONE_RANK_GROUP = False
"""Whether ``build_mesh`` initialized the default process group itself (one process, bf16 training)."""


def build_mesh(device_type: str, world_size: int, local_world_size: int, *, one_rank: bool = False):
    """1-D shard mesh inside a node, 2-D (replicate, shard) mesh across nodes; None on one process unless
    ``one_rank``: a 1-rank mesh (and process group), because bf16 training keeps its fp32 master weights through
    FSDP2's mixed precision even on one GPU."""
    from torch.distributed.device_mesh import init_device_mesh

    if world_size <= 1:
        if not one_rank:
            return None
        if not dist.is_initialized():  # an in-process store: nothing to rendezvous with
            global _ONE_RANK_GROUP
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1)
            _ONE_RANK_GROUP = True
        return init_device_mesh(device_type, (1,), mesh_dim_names=("shard",))

    if world_size > local_world_size and world_size % local_world_size == 0:
        return init_device_mesh(
            device_type, (world_size // local_world_size, local_world_size), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def release_one_rank_group() -> None:
    """Destroy the 1-rank process group ``build_mesh`` created, if it did: a programmatic run (tests, the
    pipeline's stages) returns without a default group left behind, which made a later init_process_group in
    the same process fail ("trying to initialize the default process group twice")."""
    global _ONE_RANK_GROUP
    if _ONE_RANK_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _ONE_RANK_GROUP = False


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks that are sharded one by one (``model.layers`` by convention)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__} has no `layers` to shard")
    return list(layers)


def master_and_compute_dtypes(compute: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype the trained parameters and optimizer state live in, FSDP2 ``param_dtype`` or None).

    bf16/fp16 compute trains fp32 master weights that FSDP2 casts to the compute dtype when it gathers them
    (with bf16 parameters AdamW's small updates round away: at lr 1e-6, 77 of 28,320 weights moved)."""
    if compute in (torch.bfloat16, torch.float16):
        return torch.float32, compute
    return compute, None


def apply_fsdp(root: nn.Module, mesh, *, param_dtype: torch.dtype | None = None, reduce_dtype=torch.float32,
               reshard_root_after_forward: bool = False) -> nn.Module:
    """Shard each transformer block, then ``root`` (which owns embeddings, final norm and head).

    FSDP2 keeps the root's parameters gathered from forward to backward; a model that only runs
    forwards (a frozen reference) passes ``reshard_root_after_forward=True`` so they are freed.
    """
    if mesh is None:
        return root
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs off: the root's forward takes the loss inputs (advantages, old/ref log-probs), which must
    # stay fp32 (bf16 log-probs are ~1e-2 off: importance ratios would move), and a block computes in its
    # parameters' dtype anyway, as an unsharded bf16 model does.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in transformer_blocks(root):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    # None: FSDP2's default, which keeps the root gathered until backward
    fully_shard(root, mesh=mesh, mp_policy=mp, reshard_after_forward=True if reshard_root_after_forward else None)
    return root


def apply_activation_checkpointing(root: nn.Module) -> None:
    """Recompute each transformer block in backward instead of keeping its activations.

    Costs one extra block forward per backward (about +33% block FLOPs) and keeps only each block's
    input; applied before FSDP so the recomputation re-gathers the block's parameters itself.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    inner = getattr(root, "model", root)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(inner).__name__} has no `layers` to checkpoint")
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block)


def clip_and_step(root: nn.Module, optimizer, grad_clip: float, manual_allreduce: bool) -> float:
    """Average gradients over ranks when no FSDP does it (``manual_allreduce``), clip the global norm
    (0 = no clipping; DTensor norms are gathered), and step unless the norm is non-finite. Returns the norm."""
    params = [p for p in root.parameters() if p.grad is not None]
    if manual_allreduce:
        for p in params:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if torch.isfinite(norm):
        optimizer.step()
    return float(norm)


def _fsdp_modules(root: nn.Module):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded_for_rollout(root: nn.Module):
    """Hold full (unsharded) parameters while the rollout engine runs forwards of its own pace."""
    mods = _fsdp_modules(root) if dist.is_initialized() else []
    if not mods:
        yield
        return
    # The engine calls the inner model, not ``root``. Before root's first forward FSDP2 has not yet
    # decided which module is the root, and a block's forward would make that block a root of its own
    # ("FSDP state has already been lazily initialized" at the next root forward). FSDP2 has no public
    # call for this decision, so make it here the way root's first forward would.
    # Each block's forward would also make that block the forward's root, whose pre-forward makes FSDP's
    # all-gather streams wait on the current stream: inside a CUDA-graph capture that forks them into the
    # capture, which then cannot end (unjoined streams), so every FSDP rollout fell back to eager decode.
    # Marking root's state as the running forward's root (FSDP2's own flag, shared by all states; the engine
    # never calls root itself) skips that for the whole rollout.
    state_ctx = None
    if mods[0] is root:
        state = root._get_fsdp_state()
        state._lazy_init()
        state_ctx = state._state_ctx
        state_ctx.iter_forward_root = state
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        if state_ctx is not None:
            state_ctx.iter_forward_root = None
        for m in mods:
            m.reshard()
            # FSDP2 keeps the root's parameters gathered between forward and backward (they are
            # needed again at once); every other module reshards after forward.
            m.set_reshard_after_forward(m is not root, recurse=False)


def enable_fp8_experts(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                       frozen: tuple[nn.Module, ...] = ()):
    """Route MoE experts through the FP8 kernels (DeepSeek-V3 recipe); returns the weight cache.

    Every MoE module of ``model`` switches to the FP8 path. One weight cache per model: expert
    weights are quantized once and reused by every forward until they change. Pass the
    ``optimizer`` whenever the model trains: the cache is then invalidated after each step, which
    FSDP2 needs (its gathers change the weights without bumping their version counters; see
    ``Fp8WeightCache``). ``frozen`` models (the KL reference) switch too and share the cache: the
    reference must see the quantization the policy sees, or k3 measures FP8 rounding as policy
    drift (nonzero KL at step 0). Raises ValueError for a model without MoE layers.
    """
    import functools

    from r1fast.kernels.moe_layer import TILE, Fp8WeightCache, moe_ffn_fp8
    from r1fast.moe import MoE

    models = (model, *frozen)
    for m in models:
        layers = [mod for mod in m.modules() if isinstance(mod, MoE)]
        if not layers:
            raise ValueError(f"enable_fp8_experts: {type(m).__name__} has no MoE layers (FP8 applies to routed "
                             "experts)")
        # the recipe's 1xTILE / TILExTILE tiles: checked here, before training, not at the first forward's kernel
        _, two_i, hidden = layers[0].experts.w_gate_up.shape
        if hidden % TILE or (two_i // 2) % TILE:
            raise ValueError(f"enable_fp8_experts: the FP8 recipe needs hidden_size and moe_intermediate_size to "
                             f"be multiples of {TILE}, got {hidden} and {two_i // 2}")
    cache = Fp8WeightCache()
    if optimizer is not None:
        cache.attach(optimizer)
    # Each MoE layer of these models gets the function bound to *this* cache (not the process-global hook of
    # r1fast.moe: a second model's enable_fp8_experts moved the first model onto the second's cache, which
    # the first model's optimizer steps never invalidate).
    fn = functools.partial(moe_ffn_fp8, cache=cache, validate=False)  # router ids: in range
    for m in models:
        m.set_experts_fn(fn)
    return cache

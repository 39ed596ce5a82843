"""The rollout engine: ``Engine(model).generate(prompts, n=G, ...)`` on the trainer's live weights.

One step = one packed forward of the scheduler's chunks (``scheduler.py``) through the model with the paged
backend (``paged_backend.py``), then one batched sampling call (``sampler.py``) for the sequences whose
next token is due. The model's parameters are used as they are (no copy): after an optimizer step the
next ``generate`` sees the new weights; CUDA graphs are dropped when a parameter's storage moved.

GRPO groups (``n > 1``): the full blocks of each prompt are computed once by a prefix job and shared by
the prompt's n samples (``kv_cache.py`` explains the partially filled last block); decode steps where
samples share prefixes run the cascade kernel, which reads each shared block once per group.

On CUDA, pure-decode steps replay CUDA graphs captured per (batch bucket, block-table width, kernel
form); every other step, and every step on CPU, runs eagerly. Both paths take their inputs from
``step_inputs.prepare_step``: one host->device copy per step, block tables gathered on the device from the
engine's persistent ``BlockTable`` (host work independent of the context length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from r1fast.kernels.grpo_logits_chunk import lm_head_logits

from . import arguments
from .block_table import BlockTable
from .cuda_graphs import DecodeGraphs
from .kv_cache import PagedKVCache
from .paged_backend import PagedAttentionBackend, cache_head_dim
from .sampler import SamplingParams, SequenceRandom, sample
from .scheduler import Chunk, Scheduler, Sequence
from .step_inputs import HostStaging, prepare_step

CPU_CACHE_TOKENS = 65536
"""CPU default cache size in tokens (capped at 1 GiB): tests and small models, not production."""


@dataclass
class Completion:
    """One generated completion."""

    token_ids: list[int]
    """Generated tokens (without the prompt); a stop token that ended it is included."""
    logprobs: list[float]
    """Per generated token: log-prob under the distribution sampled from, after temperature, before
    top-p/top-k truncation (greedy: the untempered distribution); see ``sampler.py``."""
    finish_reason: str
    """"stop" (a stop token was sampled) or "length" (max_new_tokens reached)."""


def _attention_dims(args) -> tuple[int, int, int]:
    """(cached KV heads, qk head dim, v head dim) of the tensors the model hands its attention backend."""
    if args.is_mla:  # MLA hands decompressed per-head k and v to the backend
        return args.num_heads, args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    return args.num_kv_heads, args.head_dim, args.v_head_dim


class Engine:
    """Paged-KV generation engine over a ``r1fast.model.Transformer`` (live weights, no copy)."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None, memory_fraction: float = 0.9,
                 max_batch_tokens: int = 8192, max_num_seqs: int = 1024, use_cuda_graphs: bool = True,
                 dtype: torch.dtype | None = None, reserve_bytes: int = 0):
        # integers as generate takes them: numpy/torch ints were refused ("got 8"), bools passed as 1
        what = "a power of two from 8 to 128"
        block_size = arguments.positive_int(block_size, "block_size", what)
        if not 8 <= block_size <= 128 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be {what}, got {block_size!r}")
        # a string raised a bare TypeError from the comparison, a bool passed as 1.0
        if not (arguments.is_real(memory_fraction) and 0.0 < memory_fraction <= 1.0):
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        max_batch_tokens = arguments.positive_int(max_batch_tokens, "max_batch_tokens")
        max_num_seqs = arguments.positive_int(max_num_seqs, "max_num_seqs")
        # reserve_bytes: GPU memory the caller will allocate after the cache is sized (a trainer's optimizer
        # state and gathered weights: r1fast.memory_budget), kept out of the free memory memory_fraction takes
        reserve = arguments.as_int(reserve_bytes)
        if reserve is None or reserve < 0:
            raise ValueError(f"reserve_bytes must be a non-negative int, got {reserve_bytes!r}")
        self.model = model
        self.args = model.args
        weight = model.lm_head_weight
        # dtype: the compute dtype when it differs from the stored weights' (fp32 masters that FSDP2 gathers in bf16):
        # a promise about the weights ``generate`` runs on, so it is checked there, never followed away
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        self.device, self.dtype = weight.device, dtype or weight.dtype
        self._pinned_dtype = dtype
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.use_cuda_graphs = use_cuda_graphs
        if num_blocks is None:
            num_blocks = self._default_num_blocks(self._bytes_per_block(), block_size, memory_fraction,
                                                  max_batch_tokens, max_num_seqs, reserve)
        else:
            num_blocks = arguments.positive_int(num_blocks, "num_blocks", "a positive int or None")
        self._build_cache(num_blocks)
        # independent of the cache (a cast rebuilds only that); every generate resets the table before use.
        # Every running sequence takes >= 1 token of a step's budget, so no more than max_batch_tokens ever
        # run at once: rows past that would never be used (max_num_seqs=10**9 built a 1e9-entry free list
        # and a 64 GB table before this cap)
        self._table_rows = min(max_num_seqs, max_batch_tokens)
        self.block_table = BlockTable(self._table_rows, self.device)
        self.staging = HostStaging(self.device)
        self._stats = {"preemptions": 0, "generated_tokens": 0, "generate_seconds": 0.0, "steps": 0,
                       "max_blocks_used": 0, "max_blocks_shared": 0, "last_tokens_per_s": 0.0}

    def _bytes_per_block(self) -> int:
        kv_heads, qk_dim, v_dim = _attention_dims(self.args)
        return PagedKVCache.bytes_per_block(num_layers=self.args.num_layers, block_size=self.block_size,
                                            num_kv_heads=kv_heads, head_dim=cache_head_dim(qk_dim, v_dim),
                                            dtype=self.dtype)

    def _build_cache(self, num_blocks: int) -> None:
        """The KV cache in ``self.dtype`` on ``self.device``, its attention backend and (CUDA) decode graphs."""
        kv_heads, qk_dim, v_dim = _attention_dims(self.args)
        self.cache = PagedKVCache(num_layers=self.args.num_layers, num_blocks=num_blocks, block_size=self.block_size,
                                  num_kv_heads=kv_heads, head_dim=cache_head_dim(qk_dim, v_dim), dtype=self.dtype,
                                  device=self.device)
        self.backend = PagedAttentionBackend(self.cache)
        use_graphs = self.use_cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self) if use_graphs else None

    def _default_num_blocks(self, per_block, block_size, memory_fraction, max_batch_tokens, max_num_seqs,
                            reserve_bytes=0) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            # memory PyTorch's caching allocator holds but does not use is free for the cache too; the
            # driver counts it as taken (after a training step that can be most of the GPU)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            a = self.args
            item = self.weight_itemsize
            # activations of the largest step (a few [T, H] and [T, I] buffers) and the logits/sampling
            # temporaries of the largest decode batch; estimated, not measured
            activations = max_batch_tokens * (8 * a.hidden_size + 3 * a.intermediate_size) * item
            sampling = min(max_num_seqs, max_batch_tokens) * a.vocab_size * 4 * 6
            budget = (free - reserve_bytes) * memory_fraction - activations - sampling
            blocks = int(budget // per_block)
            if blocks < 1:
                raise ValueError(f"no GPU memory left for the KV cache ({free / 2**30:.2f} GiB free, "
                                 f"{reserve_bytes / 2**30:.2f} GiB of it reserved for training, "
                                 f"memory_fraction={memory_fraction}); pass num_blocks or free memory")
            return blocks
        tokens = min(CPU_CACHE_TOKENS, (1 << 30) * block_size // per_block)
        return max(1, tokens // block_size)

    @property
    def weight_itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    # -- public API -------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Blocks used / shared now and at peak, preemptions, steps and generated tokens/s (all calls)."""
        s = dict(self._stats)
        alloc = self.cache.allocator
        s.update(num_blocks=alloc.num_blocks, blocks_used=alloc.num_used, blocks_shared=alloc.num_shared,
                 block_size=self.block_size)
        s["tokens_per_s"] = s["generated_tokens"] / s["generate_seconds"] if s["generate_seconds"] else 0.0
        return s

    @torch.no_grad()
    def generate(self, prompts, *, n: int = 1, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, seed=None, stop_token_ids=()) -> list[list[Completion]]:
        """``n`` completions for each prompt (lists of token ids); returns ``[len(prompts)][n]`` Completions.

        seed: None (drawn from torch's global RNG), an int (completion k = i * n + j of prompt i gets
        seed + k) or a list of ``len(prompts) * n`` ints; each completion's tokens depend only on its own
        seed, so ``generate([p], n=4, seed=s)`` equals ``generate([p] * 4, seed=s)``. temperature 0 =
        greedy. Integers may be numpy/torch ints (never bools); stop_token_ids may be one id. Raises
        ValueError before any work for bad arguments (a prompt + max_new_tokens - 1 beyond the KV cache, a
        prompt + max_new_tokens beyond the model's max_position_embeddings) or a model moved to another
        device since ``Engine(model)`` (a cast is followed: see ``_follow_weights``; with ``Engine(dtype=)``
        weights of another dtype are a ValueError instead), RuntimeError for
        non-finite logits; an exception mid-generation releases every KV block this call took.
        """
        self._follow_weights()
        prompts = arguments.prompt_lists(prompts)
        capacity = f"{self.cache.num_blocks} blocks x {self.block_size} = {self.cache.capacity_tokens} tokens"
        n, params = arguments.validate(self.args, self.cache.capacity_tokens, capacity, prompts, n, max_new_tokens,
                                       temperature, top_p, top_k, stop_token_ids)
        seeds = arguments.seeds(seed, len(prompts) * n)
        if not prompts:  # a rank with no prompt this step; the block-table width below needs a longest prompt
            return []
        # every row holds at most the blocks of its longest prompt + max_new_tokens
        self.block_table.reset(self.cache.blocks_for(max(len(p) for p in prompts) + params.max_new_tokens))
        scheduler = Scheduler(self.cache.allocator, block_size=self.block_size,
                              max_batch_tokens=self.max_batch_tokens, max_num_seqs=self._table_rows,
                              block_table=self.block_table)
        outputs: list[list[Sequence]] = []
        arrival = 0
        for i, prompt in enumerate(prompts):
            # a group shares the prompt's full blocks except the one holding the last token (see kv_cache.py)
            prefix_len = self.block_size * ((len(prompt) - 1) // self.block_size) if n > 1 else 0
            job = None
            if prefix_len > 0:
                job = Sequence(arrival, prompt[:prefix_len], prefix_len, is_prefix_job=True,
                               name=f"prompts[{i}] shared prefix")
                scheduler.add(job)
                arrival += 1
            group = []
            for j in range(n):
                seq = Sequence(arrival, list(prompt), len(prompt), prefix_job=job,
                               random=SequenceRandom(seeds[i * n + j]), name=f"prompts[{i}] sample {j}")
                arrival += 1
                group.append(seq)
                scheduler.add(seq)
            if job is not None:
                job.samples = group
            outputs.append(group)
        if self.graphs is not None:
            self.graphs.check_weights()
        start = time.perf_counter()
        generated = 0
        finished = False
        try:
            while scheduler.has_work:
                chunks = scheduler.schedule()
                # every block of the step is allocated now; after it, the sequences that finished have released
                # theirs (read only after the step, a one-token generate peaked at 0 blocks used)
                self._record_peaks()
                generated += self._step(scheduler, chunks, params)
                self._record_peaks()  # a prefix job that finished in the step has shared its blocks
                self._stats["steps"] += 1
            finished = True
        finally:
            # The allocator outlives this call: an exception mid-step (Ctrl-C, OOM, non-finite logits) must
            # not leave its sequences' blocks allocated, or every later call finds the cache full.
            # After a normal return every sequence has already released its blocks.
            if not finished:
                scheduler.abort()
            if finished and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # not after a failure: a CUDA error would replace it
            # a failed call's tokens and time count too, as its steps do (they counted steps alone)
            seconds = time.perf_counter() - start
            self._stats["preemptions"] += scheduler.num_preemptions
            self._stats["generated_tokens"] += generated
            self._stats["generate_seconds"] += seconds
            self._stats["last_tokens_per_s"] = generated / seconds if seconds else 0.0
        return [[Completion(s.generated, s.logprobs, s.finish_reason) for s in group] for group in outputs]

    def _record_peaks(self) -> None:
        """Fold the blocks used and shared now into the stats' peaks."""
        alloc = self.cache.allocator
        self._stats["max_blocks_used"] = max(self._stats["max_blocks_used"], alloc.num_used)
        self._stats["max_blocks_shared"] = max(self._stats["max_blocks_shared"], alloc.num_shared)

    def _follow_weights(self) -> None:
        """Keep the KV cache in the model's current dtype; ValueError if the model moved to another device, or
        when ``Engine(dtype=)`` was given and the weights are not in that dtype.

        Without this, a model cast after ``Engine(model)`` failed mid-step inside attention (k/v and cache
        dtypes differ). Between calls no sequence holds a block, so the cache can be rebuilt: it keeps its
        bytes (fp32 -> bf16 doubles the blocks, bf16 -> fp32 halves them), so a cast never needs more memory
        than was budgeted, and captured CUDA graphs (which point into the old cache) are dropped. A device
        move is refused instead: the budget was measured on the old device.
        """
        weight = self.model.lm_head_weight
        if weight.device != self.device:
            raise ValueError(f"the model's weights are now on {weight.device}, but this Engine's KV cache is on "
                             f"{self.device} (Engine(model) sizes its cache for one device); build a new Engine "
                             "after model.to(device)")
        if self._pinned_dtype is not None and weight.dtype != self._pinned_dtype:
            # following the weights here silently undid the option: an fp32 model with dtype=bfloat16 got an
            # fp32 cache of half the blocks (64 -> 32) on its first generate
            raise ValueError(f"Engine(dtype={self._pinned_dtype}) runs on weights of that dtype (FSDP2 gathers fp32 "
                             f"masters in it: generate inside the gather), but the model's weights are "
                             f"{weight.dtype}; cast the model, or build the Engine without dtype= to follow its "
                             "weights' dtype")
        if weight.dtype != self.dtype:
            budget = self.cache.num_blocks * self._bytes_per_block()
            self.cache = self.backend = self.graphs = None  # free the old cache before allocating the new one
            self.dtype = weight.dtype
            self._build_cache(max(1, budget // self._bytes_per_block()))
            self.block_table.table.zero_()  # stale entries must stay block ids of the new (maybe smaller) cache

    # -- one step -----------------------------------------------------------------------------------
    def _step(self, scheduler: Scheduler, chunks: list[Chunk], params: SamplingParams) -> int:
        """Run the chunks' forward, sample due tokens, update sequences; returns tokens generated."""
        due = [c.seq for c in chunks if c.samples_next_token]
        logits, step = self._forward(chunks, due, params)
        for chunk in chunks:
            scheduler.advance(chunk)
            if chunk.seq.is_prefix_job and chunk.seq.num_remaining == 0:
                scheduler.finish_prefix(chunk.seq)
        if not due:
            return 0
        tokens, logprobs = sample(logits, params, [s.random for s in due], [s.name for s in due],
                                  uniforms=step.uniforms)
        stop = params.stop_token_ids
        for seq, token, logprob in zip(due, tokens.tolist(), logprobs.tolist(), strict=True):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            if token in stop:
                scheduler.finish(seq, "stop")
            elif len(seq.token_ids) - seq.prompt_len >= params.max_new_tokens:
                scheduler.finish(seq, "length")
        return len(due)

    def _forward(self, chunks: list[Chunk], due: list[Sequence], params: SamplingParams):
        """Logits [S, V] of the sampling rows of ``due`` (the chunks' sequences that sample; None when none
        does) and the step's inputs."""
        # drawn before the forward so that they travel with the step's other inputs; a sequence draws once
        # per token it samples, exactly as when sample() drew them (the seed contract: see sampler.py)
        uniforms = None if params.greedy or not due else [s.random.uniform() for s in due]
        # prepare_step runs a pure-decode step with shared prompt blocks as a cascade step
        cascade = any(c.seq.num_shared_blocks for c in chunks)
        step = prepare_step(chunks, self.block_table, self.block_size, self.staging, cascade=cascade,
                            uniforms=uniforms)
        if step.mode != "varlen" and self.graphs is not None:
            logits = self.graphs.run(step)
            if logits is not None:
                return (logits if step.sample_rows is None else logits[step.sample_rows]), step
        meta = step.metadata()
        self.backend.set_step(meta)
        hidden = self.model(step.input_ids, position_ids=step.positions, cu_seqlens=step.cu_seqlens,
                            attn=self.backend, max_seqlen=meta.max_seqlen_q)
        if step.sample_rows is not None and step.sample_rows.numel() == 0:
            return None, step
        # sample_rows None: every token samples (a decode step without a prefix job), so no gather
        rows = hidden if step.sample_rows is None else hidden[step.sample_rows]
        return lm_head_logits(rows, self.model.lm_head_weight), step

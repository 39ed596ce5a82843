"""Continuous batching: which sequences run in the next forward step, and how many of their tokens.

Each step has a token budget (``max_batch_tokens``). Running sequences go first, oldest first: a
decoding sequence takes one token, a prefilling one takes as many of its remaining prompt tokens as the
budget allows (chunked prefill, so a long prompt never blocks the decoders for a whole step). What is
left of the budget admits waiting sequences, oldest first.

Out of blocks: the youngest running sequence is preempted: its blocks are released and it goes back to
the waiting queue with its tokens (prompt + generated so far), to be recomputed when it is admitted
again. Recomputation draws no random numbers (see ``sampler.py``), so a preempted sequence produces
exactly the tokens it would have produced otherwise. The oldest running sequence can always progress:
``generate`` rejects any request that would not fit into the cache alone, and when the oldest one is
starved by prompt blocks that waiting group members hold, those holdings are dropped too.

Group-shared prompts: a ``Sequence`` with ``is_prefix_job`` computes the full blocks of a prompt once;
when it is done its blocks are shared by the group's samples (``finish_prefix``), which then start with
those tokens already computed. A sample that is preempted later gives up its share and recomputes its
whole context alone.

Block table: with a ``BlockTable`` (``block_table.py``) every running sequence owns a row; admission
acquires it (writing the blocks a sample already shares), each allocated block writes one entry, and
leaving the running set (finish, preemption, a finished prefix job) frees it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .block_table import BlockTable
from .kv_cache import BlockAllocator
from .sampler import SequenceRandom


@dataclass(eq=False)
class Sequence:
    """One completion being generated (or, with ``is_prefix_job``, a group's shared prompt prefix)."""

    arrival: int
    """Admission order; a larger value is younger (preempted first)."""
    token_ids: list[int]
    """Prompt followed by the generated tokens (for a prefix job: the shared prefix only)."""
    prompt_len: int
    is_prefix_job: bool = False
    prefix_job: Sequence | None = None
    """For a group sample: the job computing the shared prefix; the sample waits until it is done."""
    samples: list[Sequence] = field(default_factory=list)
    """For a prefix job: the samples that will share its blocks."""
    random: SequenceRandom | None = None
    num_computed: int = 0
    """Leading tokens whose K and V are in the cache."""
    blocks: list[int] = field(default_factory=list)
    num_shared_blocks: int = 0
    """Leading entries of ``blocks`` that are the group's shared prompt blocks (0: shares nothing)."""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    name: str = ""
    """How errors name it (``generate`` sets "prompts[i] sample j")."""
    row: int = -1
    """Its row of the engine's ``BlockTable`` while it runs (-1: none)."""

    @property
    def num_remaining(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def ready(self) -> bool:
        """False while the shared prefix this sample builds on is still being computed."""
        return self.prefix_job is None or self.prefix_job.finish_reason is not None


@dataclass
class Chunk:
    """``length`` tokens of ``seq`` starting at ``start`` are computed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples_next_token(self) -> bool:
        return not self.seq.is_prefix_job and self.start + self.length == len(self.seq.token_ids)


class Scheduler:
    """Decides each step's chunks under a token budget and owns the block bookkeeping of sequences."""

    def __init__(self, allocator: BlockAllocator, *, block_size: int, max_batch_tokens: int, max_num_seqs: int,
                 block_table: BlockTable | None = None):
        if block_table is not None and block_table.num_rows < max_num_seqs:
            raise ValueError(f"block_table has {block_table.num_rows} rows but max_num_seqs={max_num_seqs} "
                             "sequences can run at once")
        self.allocator = allocator
        self.block_table = block_table
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: list[Sequence] = []  # sorted by arrival
        self.running: list[Sequence] = []  # sorted by arrival
        self.num_preemptions = 0

    # -- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        bisect.insort(self.waiting, seq, key=lambda s: s.arrival)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        total = -(-(seq.num_computed + num_tokens) // self.block_size)
        return max(0, total - len(seq.blocks))

    def _grow(self, seq: Sequence, need: int) -> None:
        """Allocate ``need`` blocks at the end of ``seq``'s list (and of its block-table row)."""
        for _ in range(need):
            block = self.allocator.allocate()
            if self.block_table is not None and seq.row >= 0:
                self.block_table.write(seq.row, len(seq.blocks), block)
            seq.blocks.append(block)

    def _release(self, seq: Sequence) -> None:
        if self.block_table is not None:
            self.block_table.release(seq)
        self.allocator.release_all(seq.blocks)
        seq.blocks = []
        seq.num_shared_blocks = 0
        seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.num_preemptions += 1
        self.add(seq)

    def _drop_waiting_holdings(self) -> bool:
        """Free blocks held by waiting sequences (shared prompt blocks of samples not yet running)."""
        for seq in reversed(self.waiting):
            if seq.blocks:
                self._release(seq)
                return True
        return False

    # -- the policy ------------------------------------------------------------------------------
    def schedule(self) -> list[Chunk]:
        """The chunks of the next step (empty only when there is no work left)."""
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            length = min(seq.num_remaining, budget)
            need = self._blocks_needed(seq, length)
            while need > self.allocator.num_free:
                victim = self.running[-1]
                if victim is not seq:
                    self._preempt(victim)
                    preempted = True
                elif index == 0 and self._drop_waiting_holdings():
                    continue
                else:
                    break
            if need > self.allocator.num_free:
                # seq itself is the youngest left and cannot grow: it waits for recomputation
                self._preempt(seq)
                preempted = True
                break
            self._grow(seq, need)
            chunks.append(Chunk(seq, seq.num_computed, length))
            budget -= length
            index += 1
        if not preempted:
            self._admit(chunks, budget)
        if not chunks and self.has_work:
            raise RuntimeError("scheduler made no progress; the cache is smaller than one request needs")
        return chunks

    def _admit(self, chunks: list[Chunk], budget: int) -> None:
        admitted = []
        for seq in self.waiting:
            if budget <= 0 or len(self.running) + len(admitted) >= self.max_num_seqs:
                break
            if not seq.ready:
                continue
            length = min(seq.num_remaining, budget)
            need = self._blocks_needed(seq, length)
            # keep one free block per running sequence so that decoders admitted earlier do not get
            # preempted on their next block boundary by a prompt admitted now
            reserve = len(self.running) + len(admitted) if self.running or admitted else 0
            while need + reserve > self.allocator.num_free and not chunks and self._drop_waiting_holdings():
                # nothing runs at all: prompt blocks held by waiting samples are the only memory left
                length = min(seq.num_remaining, budget)
                need = self._blocks_needed(seq, length)
            if need + reserve > self.allocator.num_free:
                break
            if self.block_table is not None:
                self.block_table.acquire(seq)
            self._grow(seq, need)
            chunks.append(Chunk(seq, seq.num_computed, length))
            admitted.append(seq)
            budget -= length
        for seq in admitted:
            self.waiting.remove(seq)
            bisect.insort(self.running, seq, key=lambda s: s.arrival)

    def abort(self) -> None:
        """Drop every running and waiting sequence and free every block of the allocator (a failed call).

        The allocator belongs to the engine and outlives this scheduler, and between generate calls no
        sequence holds a block, so freeing all of them is exact. Releasing each sequence's blocks instead
        leaked a block that an interrupt caught between its allocation and its recording, and raised
        "double free" (hiding the original exception) for one caught inside a release.
        """
        for seq in self.running + self.waiting:
            seq.blocks = []
            seq.num_shared_blocks = 0
        self.running.clear()
        self.waiting.clear()
        self.allocator.reset()

    # -- after the step --------------------------------------------------------------------------
    def advance(self, chunk: Chunk) -> None:
        """Record that the chunk's tokens are now in the cache."""
        chunk.seq.num_computed = chunk.start + chunk.length

    def finish(self, seq: Sequence, reason: str) -> None:
        """A completion is done: release its blocks."""
        seq.finish_reason = reason
        self.running.remove(seq)
        self._release(seq)

    def finish_prefix(self, job: Sequence) -> None:
        """A shared prefix is computed: every sample of its group takes a reference to its blocks."""
        job.finish_reason = "prefix"
        self.running.remove(job)
        for sample in job.samples:
            for block in job.blocks:
                self.allocator.share(block)
            sample.blocks = list(job.blocks)
            sample.num_shared_blocks = len(job.blocks)
            sample.num_computed = job.num_computed
        self._release(job)

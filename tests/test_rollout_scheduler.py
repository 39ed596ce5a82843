"""Scheduler policy out of blocks: the youngest running sequence is preempted (issue #5), and admission keeps
one free block per running sequence so that a new prompt does not force the next decode step to preempt."""

from r1fast.rollout.kv_cache import BlockAllocator
from r1fast.rollout.scheduler import Scheduler, Sequence

BLOCK = 4


def _scheduler(num_blocks: int, *prompt_lens: int) -> tuple[Scheduler, list[Sequence]]:
    sched = Scheduler(BlockAllocator(num_blocks), block_size=BLOCK, max_batch_tokens=64, max_num_seqs=8)
    seqs = [Sequence(arrival=i, token_ids=list(range(n)), prompt_len=n) for i, n in enumerate(prompt_lens)]
    for seq in seqs:
        sched.add(seq)
    return sched, seqs


def _step(sched: Scheduler) -> list[Sequence]:
    """Run one step as the engine does: record the computed tokens, append one sampled token to each."""
    chunks = sched.schedule()
    for chunk in chunks:
        sched.advance(chunk)
        if chunk.samples_next_token:
            chunk.seq.token_ids.append(7)
    return [chunk.seq for chunk in chunks]


def test_out_of_blocks_preempts_the_youngest_running_sequence():
    sched, (old, mid, young) = _scheduler(5, BLOCK, BLOCK - 1, BLOCK)
    assert _step(sched) == [old, mid, young]  # one block each; two stay free (admission reserve)
    assert _step(sched) == [old, mid, young]  # old and young take their second blocks: none is left
    # mid's fifth token needs a block: the youngest running sequence gives up its two, not the oldest
    assert _step(sched) == [old, mid]
    assert sched.running == [old, mid] and sched.waiting == [young] and sched.num_preemptions == 1
    assert young.blocks == [] and young.num_computed == 0 and young.token_ids == list(range(BLOCK)) + [7, 7]
    assert len(old.blocks) == len(mid.blocks) == 2 and sched.allocator.num_free == 1


def test_a_sequence_that_cannot_grow_preempts_itself_when_it_is_the_youngest():
    sched, (old, young) = _scheduler(3, BLOCK, BLOCK)
    assert _step(sched) == [old, young]
    assert _step(sched) == [old]  # old takes the last free block; young would have to evict old: it yields
    assert sched.waiting == [young] and old.num_computed == BLOCK + 1 and sched.num_preemptions == 1


def test_admission_keeps_a_free_block_per_running_sequence():
    sched, (first, second) = _scheduler(2, BLOCK, BLOCK)
    # the second prompt's block would leave nothing for the first one's next token: it waits
    assert _step(sched) == [first]
    assert sched.waiting == [second] and sched.allocator.num_free == 1
    assert _step(sched) == [first] and sched.num_preemptions == 0  # first grows into the reserved block

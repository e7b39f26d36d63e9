"""Scheduler and block pool with a fake runner: joins, leaves, chunked prefill, preemption."""

import random

import pytest

from grok1.engine.kv_cache import BlockPool, BlockPoolError, slot_of
from grok1.engine.scheduler import Scheduler, Sequence, Status


def run_fake(sched: Scheduler, seqs: dict, targets: dict, max_steps: int = 2000):
    """Drive the scheduler like the engine: the fake model emits token 7 per sampled row.
    Returns per-step chunk lists."""
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return steps
        out = sched.schedule()
        steps.append(out)
        for ch in out.chunks:
            # the chunk is exactly the next uncomputed tokens, and its blocks are allocated
            assert ch.start == ch.seq.num_computed
            assert len(ch.seq.block_ids) * sched.pool.block_size >= ch.start + ch.num_tokens
            ch.seq.num_computed += ch.num_tokens
        for ch in out.chunks:
            if ch.needs_sample:
                ch.seq.token_ids.append(7)
                if ch.seq.num_generated >= targets[ch.seq.request_id]:
                    sched.finish(ch.seq)
    raise AssertionError("scheduler did not finish")


def test_block_pool_allocates_distinct_blocks_and_rejects_double_free():
    pool = BlockPool(5, 4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and 0 not in a and pool.num_free == 2
    pool.free(a[:1])
    with pytest.raises(BlockPoolError, match="freed but not allocated"):
        pool.free(a[:1])
    with pytest.raises(BlockPoolError, match="asked for 9"):
        pool.allocate(9)
    assert slot_of([5, 9], 6, 4) == 9 * 4 + 2


def test_chunked_prefill_keeps_decodes_running():
    pool = BlockPool(100, 4)
    s = Scheduler(pool, max_batch_size=8, max_num_batched_tokens=10)
    short = Sequence("short", [1, 2, 3], 3)
    s.add(short)
    s.schedule()
    short.num_computed = 3
    short.token_ids.append(5)
    long = Sequence("long", list(range(1, 40)), 39)
    s.add(long)
    out = s.schedule()
    # the decode is scheduled first with 1 token, the long prompt gets the rest of the budget
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("short", 1), ("long", 9)]
    assert out.chunks[0].needs_sample and not out.chunks[1].needs_sample


def test_requests_joining_and_leaving_all_finish_with_their_token_counts():
    rng = random.Random(0)
    pool = BlockPool(64, 4)
    s = Scheduler(pool, max_batch_size=5, max_num_batched_tokens=16)
    seqs, targets = {}, {}
    for i in range(12):
        n = rng.randint(1, 30)
        seqs[f"r{i}"] = Sequence(f"r{i}", [rng.randint(3, 99) for _ in range(n)], n)
        targets[f"r{i}"] = rng.randint(1, 12)
        s.add(seqs[f"r{i}"])
    steps = run_fake(s, seqs, targets)
    for rid, seq in seqs.items():
        assert seq.status is Status.FINISHED and seq.num_generated == targets[rid]
    assert max(len(o.chunks) for o in steps) <= 5
    assert all(o.num_tokens <= 16 for o in steps)
    assert pool.num_used == 0


def test_full_cache_preempts_newest_and_recomputes_without_losing_tokens():
    pool = BlockPool(12, 4)  # 48 positions for four requests that want up to 30 each
    s = Scheduler(pool, max_batch_size=4, max_num_batched_tokens=64)
    seqs, targets = {}, {}
    for i in range(4):
        seqs[f"r{i}"] = Sequence(f"r{i}", list(range(3, 13)), 10)
        targets[f"r{i}"] = 20
        s.add(seqs[f"r{i}"])
    steps = run_fake(s, seqs, targets)
    preempted = [rid for o in steps for rid in o.preempted]
    assert preempted, "the cache was too small: something must have been preempted"
    assert s.num_preempted_total == len(preempted)
    for seq in seqs.values():  # nothing lost: every request got all its tokens
        assert seq.num_generated == 20 and seq.token_ids[:10] == list(range(3, 13))
    # a preempted request is recomputed from prompt + generated tokens in one chunk
    victim = seqs[preempted[0]]
    assert victim.num_preemptions >= 1
    assert pool.num_used == 0


def test_finish_of_waiting_request_frees_nothing_twice():
    pool = BlockPool(4, 4)
    s = Scheduler(pool, max_batch_size=1, max_num_batched_tokens=8)
    a, b = Sequence("a", [3, 4], 2), Sequence("b", [5], 1)
    s.add(a)
    s.add(b)
    s.schedule()  # a runs, b waits (batch size 1)
    s.finish(b)
    s.finish(a)
    assert pool.num_used == 0 and not s.has_unfinished()

"""The runner's device block tables (DeviceBlockTables) stay equal to tables built from scratch
each step, through growth, preemption onto other blocks, finished sequences and row reuse."""

import random

import torch

from grok1.engine.kv_cache import BlockPool
from grok1.engine.runner import DeviceBlockTables
from grok1.engine.scheduler import Scheduler, Sequence


def fresh_table(seqs, P):
    """What the runner sent before: each sequence's block ids, zeros after."""
    table = torch.zeros(len(seqs), P, dtype=torch.int32)
    for b, seq in enumerate(seqs):
        table[b, :len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
    return table


def apply(tables: DeviceBlockTables, seqs) -> tuple[torch.Tensor, int]:
    """The batch's table as the runner gathers it, and how many entries the step sent."""
    rows, updates = tables.rows(seqs)
    u = torch.tensor(updates, dtype=torch.long).view(3, -1)
    tables.table_SP.index_put_((u[0], u[1]), u[2].int())
    assert 0 not in rows  # row 0 is the padded graph rows' scratch row
    return tables.table_SP[torch.tensor(rows, dtype=torch.long)], u.shape[1]


def test_rows_track_a_scheduler_with_preemption_and_finished_requests():
    rng = random.Random(0)
    pool = BlockPool(12, 4)
    sched = Scheduler(pool, max_batch_size=4, max_num_batched_tokens=10)
    P = 10
    tables = DeviceBlockTables(2, P, "cpu")  # fewer rows than running requests: rows grow
    targets = {}
    for i in range(9):
        seq = Sequence(f"r{i}", [rng.randrange(3, 100) for _ in range(rng.randrange(1, 18))], 0)
        seq.num_prompt_tokens = len(seq.token_ids)
        targets[seq.request_id] = rng.randrange(1, 12)
        sched.add(seq)
    sent, steps = [], 0
    while sched.has_unfinished():
        out = sched.schedule()
        seqs = [ch.seq for ch in out.chunks]
        got, n = apply(tables, seqs)
        assert torch.equal(got, fresh_table(seqs, P)), f"step {steps}"
        sent.append(n)
        for ch in out.chunks:
            ch.seq.num_computed += ch.num_tokens
            if ch.needs_sample:
                ch.seq.token_ids.append(7)
                if ch.seq.num_generated >= targets[ch.seq.request_id]:
                    sched.finish(ch.seq)
        steps += 1
    assert sched.num_preempted_total > 0 and tables.table_SP.shape[0] > 3
    # decode steps mostly send nothing: a row changes only when its sequence takes a block
    assert sent.count(0) > 0


def test_a_reused_row_is_cleared_past_its_new_sequence():
    tables = DeviceBlockTables(1, 6, "cpu")
    long_seq, short_seq = Sequence("a", [1] * 20, 20), Sequence("b", [1] * 3, 3)
    long_seq.block_ids, short_seq.block_ids = [5, 9, 2, 7, 4], [9]
    apply(tables, [long_seq])
    got, n = apply(tables, [short_seq])  # takes the long one's row: 1 id and 4 zeros sent
    assert torch.equal(got, torch.tensor([[9, 0, 0, 0, 0, 0]], dtype=torch.int32)) and n == 5
    got, n = apply(tables, [short_seq])
    assert n == 0


def test_a_padded_decode_batch_holds_what_the_graph_rows_held_before():
    """runner.prepare(pad_to=bucket), which the CUDA-graph path copies into its static batch:
    each row's last token, position, slot and block table, then rows of token 0 at slot 0 with
    a table of zeros (scratch block 0), as the per-row loop built them."""
    from grok1 import random_weights
    from grok1.engine.kv_cache import slot_of
    from grok1.engine.runner import ModelRunner
    from grok1.engine.scheduler import ScheduledChunk

    model = random_weights("tiny", quantized=False)
    runner = ModelRunner(model, num_blocks=40, block_size=4, max_model_len=32, max_batch_size=8)
    rng = random.Random(1)
    pool = BlockPool(40, 4)
    chunks = []
    for i, n in enumerate((5, 12, 1)):
        seq = Sequence(f"r{i}", [rng.randrange(3, 200) for _ in range(n)], n, num_computed=n - 1)
        seq.block_ids = pool.allocate(pool.blocks_for(n))
        chunks.append(ScheduledChunk(seq, n - 1, 1))
    for step in range(6):  # rows cross into new blocks on the way
        batch = runner.prepare(chunks, pad_to=8)
        seqs = [ch.seq for ch in chunks]
        assert batch.tokens_M.tolist() == [s.token_ids[-1] for s in seqs] + [0] * 5
        assert batch.positions_M.tolist() == [ch.start for ch in chunks] + [0] * 5
        assert batch.slots_M.tolist() == [slot_of(s.block_ids, ch.start, 4)
                                          for s, ch in zip(seqs, chunks)] + [0] * 5
        want = torch.cat([fresh_table(seqs, 8), torch.zeros(5, 8, dtype=torch.int32)])
        assert torch.equal(batch.block_table_BP, want), step
        for i, seq in enumerate(seqs):
            seq.token_ids.append(rng.randrange(3, 200))
            seq.num_computed += 1
            if len(seq.block_ids) * 4 < len(seq.token_ids):
                seq.block_ids += pool.allocate(1)
            chunks[i] = ScheduledChunk(seq, len(seq.token_ids) - 1, 1)

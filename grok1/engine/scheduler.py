"""Continuous batching: which requests run this step, with how many tokens each.

No torch here; tests drive it with a fake runner. Policy (one `schedule()` per engine step):
1. Running requests, oldest first, each get what they still need (1 token when decoding, else a
   prefill chunk), within a token budget: chunked prefill, so a long prompt never stalls decodes.
2. When a running request needs a KV block and none is free, the newest running request is
   preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
   from its prompt plus the tokens it already produced (never lost, never a crash).
3. Waiting requests are admitted, oldest first, while the budget, batch slots and blocks allow
   (none in a step that preempted: the cache is full).
A request is sampled from only in a step where its chunk reaches the end of its known tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from grok1.engine.kv_cache import BlockPool


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens and cache state. `token_ids` = prompt + generated so far."""
    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int = 0           # positions already in the KV cache
    block_ids: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    num_preemptions: int = 0
    wants_prompt_logits: bool = False  # the runner returns the logits of every prompt position
    adapter: int = 0  # the LoRA adapter its tokens run through (grok1.lora; 0: none)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclasses.dataclass
class ScheduledChunk:
    """Tokens token_ids[start:start + num_tokens] of `seq` go through the model this step."""
    seq: Sequence
    start: int
    num_tokens: int

    @property
    def needs_sample(self) -> bool:
        return self.start + self.num_tokens == len(self.seq.token_ids)

    @property
    def prompt_logit_positions(self) -> range:
        """Positions of this chunk whose logits score a prompt token (position p scores token
        p + 1), for a sequence that wants them; empty otherwise."""
        if not self.seq.wants_prompt_logits:
            return range(0)
        return range(self.start, min(self.start + self.num_tokens,
                                     self.seq.num_prompt_tokens - 1))


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        return all(c.num_tokens == 1 for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, *, max_batch_size: int, max_num_batched_tokens: int):
        if max_batch_size < 1 or max_num_batched_tokens < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_num_batched_tokens="
                             f"{max_num_batched_tokens}: both must be >= 1")
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preempted_total = 0

    # ---- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a running or waiting request and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status = Status.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self._grow(seq, n):
                victim = self.running[-1]  # newest; may be seq itself
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, seq.num_computed, n))
                budget -= n
                i += 1
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.max_batch_size):
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
        return SchedulerOutput(chunks, preempted)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Allocate the blocks `seq` needs to hold n more positions; False if too few are free."""
        need = self.pool.blocks_for(seq.num_computed + n) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed = 0  # recomputed later from prompt + generated tokens
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted_total += 1

    def _free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []

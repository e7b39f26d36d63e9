"""The golden cases through the engine's runner: paged KV cache, prefill and decode (CUDA graphs
on a GPU), judged by golden/README.md's criteria (grok1.golden).

The runner is driven teacher-forced, so every position's logits come from the engine itself:
- `full`, `padded` (prefill path): every prefix of each golden row as its own sequence, all in
  one varlen prefill step; the last position of prefix k is the golden row's position k - 1.
- `full_decode`, `padded_decode` (decode path): the rows' first tokens prefilled, then one token
  a step for every row at once (a decode batch, replayed from a CUDA graph on a GPU).
- `prefill`, `decode`: the golden's own cache case: its real prompt in one prefill chunk, then
  its 8 tokens one at a time.
Only non-pad positions count (the README). Shape letters as in grok1.engine.runner.
"""

from __future__ import annotations

import torch

from grok1.engine.kv_cache import BlockPool
from grok1.engine.runner import ModelRunner
from grok1.engine.scheduler import ScheduledChunk, Sequence
from grok1.golden import Pairs
from grok1.model import Grok1

BLOCK_SIZE = 16


class _Driver:
    """Sequences with blocks from one pool, stepped through the runner by hand."""

    def __init__(self, runner: ModelRunner, pool: BlockPool):
        self.runner, self.pool = runner, pool

    def new(self, rid: str, tokens: list[int]) -> Sequence:
        seq = Sequence(rid, list(tokens), len(tokens))
        seq.block_ids = self.pool.allocate(self.pool.blocks_for(64))  # room to decode
        return seq

    def step(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [R, V] f32 on the CPU for the chunks (each ends its known tokens)."""
        return self.runner.execute(chunks).float().cpu()

    def free(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.pool.free(seq.block_ids)


def engine_runner(model: Grok1, *, num_blocks: int = 160, use_cuda_graphs: bool = True
                  ) -> ModelRunner:
    return ModelRunner(model, num_blocks=num_blocks, block_size=BLOCK_SIZE,
                       max_model_len=64, max_batch_size=64, use_cuda_graphs=use_cuda_graphs)


def _teacher_forced(drive: _Driver, name: str, tokens: list[list[int]], real: list[int]
                    ) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per row b, the logits [V] of its first real[b] positions twice: through the prefill path
    (each prefix its own sequence, one varlen step per row) and the decode path (the rows' first
    tokens prefilled, then one token a step for every row at once)."""
    prefill: list[list[torch.Tensor]] = []
    for b, row in enumerate(tokens):
        seqs = [drive.new(f"{name}{b}.{k}", row[:k]) for k in range(1, real[b] + 1)]
        logits = drive.step([ScheduledChunk(s, 0, len(s.token_ids)) for s in seqs])
        prefill.append(list(logits[:real[b]]))
        drive.free(seqs)
    seqs = [drive.new(f"{name}{b}.d", row[:1]) for b, row in enumerate(tokens)]
    decode: list[list[torch.Tensor]] = [[] for _ in tokens]
    for t in range(max(real)):
        live = [b for b in range(len(tokens)) if t < real[b]]
        for b in live:
            if t > 0:
                seqs[b].token_ids.append(tokens[b][t])
        logits = drive.step([ScheduledChunk(seqs[b], t, 1) for b in live])
        for i, b in enumerate(live):
            decode[b].append(logits[i])
    drive.free(seqs)
    return prefill, decode


def engine_rows_logits(runner: ModelRunner, tokens_BT: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] f32 at every position of each row (no padding), through the runner's
    prefill path and its decode path (`_teacher_forced`): the Grok-2 golden's judge input."""
    drive = _Driver(runner, BlockPool(runner.k_cache.shape[1] - 1, runner.block_size))
    rows = tokens_BT.tolist()
    prefill, decode = _teacher_forced(drive, "row", rows, [len(r) for r in rows])
    return (torch.stack([torch.stack(r) for r in prefill]),
            torch.stack([torch.stack(r) for r in decode]))


def engine_golden_pairs(runner: ModelRunner, golden: dict, pad_token: int = 0) -> Pairs:
    """(engine logits, golden logits) per meaningful position of each case (module doc)."""
    pool = BlockPool(runner.k_cache.shape[1] - 1, runner.block_size)
    drive = _Driver(runner, pool)
    rows = {"full": (golden["full_tokens"].tolist(), golden["full_logits"]),
            "padded": (golden["padded_tokens"].tolist(), golden["padded_logits"])}
    pairs: Pairs = {}
    for case, (tokens, ref) in rows.items():
        ref = torch.as_tensor(ref).float()
        real = [sum(t != pad_token for t in row) if case == "padded" else len(row)
                for row in tokens]
        prefill, decode = _teacher_forced(drive, case, tokens, real)
        pairs[case] = [(prefill[b][k], ref[b, k]) for b in range(len(tokens))
                       for k in range(real[b])]
        pairs[f"{case}_decode"] = [(decode[b][k], ref[b, k]) for b in range(len(tokens))
                                   for k in range(real[b])]
    # the golden's own cache case: prefill its real prompt, then its decode tokens
    length = int(golden["prefill_length"][0])
    seq = drive.new("prefill", golden["prefill_tokens"][0, :length].tolist())
    logits = drive.step([ScheduledChunk(seq, 0, length)])
    pairs["prefill"] = [(logits[0], torch.as_tensor(golden["prefill_last_logits"]).float()[0, 0])]
    decode_ref = torch.as_tensor(golden["decode_logits"]).float()
    pairs["decode"] = []
    for i, token in enumerate(golden["decode_tokens"].tolist()):
        seq.token_ids.append(int(token))
        logits = drive.step([ScheduledChunk(seq, len(seq.token_ids) - 1, 1)])
        pairs["decode"].append((logits[0], decode_ref[i]))
    drive.free([seq])
    return pairs

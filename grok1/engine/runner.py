"""Runs scheduled chunks through the model over the paged KV cache.

The model runs its own layers (`Grok1.run_layers`); `PagedContext` tells them where the tokens
sit (flattened tokens of many sequences at different positions, no padding, a paged cache) and
runs each step with a grok1.ops call, which falls back to its twin on CPU. On CUDA the quantized
attention Linears and the MoE are swapped for kernel-backed modules holding the same tensors
(`apply_kernels`). Decode-only steps of up to `max_graph_batch` sequences replay a CUDA graph
captured per batch-size bucket.

Shape letters: M new tokens (all sequences), B sequences, P pages (blocks), D emb_size, N/K heads,
H head size, V vocab, R rows that need logits.
"""

from __future__ import annotations

import dataclasses

import torch

from grok1.engine.scheduler import ScheduledChunk, Sequence
from grok1.model import (
    BF16,
    ForwardContext,
    Grok1,
    Linear,
    MoE,
    PartialSums,
    RMSNorm,
    rope_cos_sin,
)
from grok1.ops.attention import AttentionMath, AttentionPlan, paged_attention, plan_attention
from grok1.ops.linear import QuantLinear, project_many
from grok1.ops.moe import FusedMoE
from grok1.ops.rmsnorm import add_rms_norm, rms_norm_op
from grok1.ops.rope import rope_and_cache
from grok1.sampling import rows_to_device

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def apply_kernels(model: Grok1) -> Grok1:
    """Swap the plain quantized Linears and MoEs for kernel-backed modules, in place; parameter
    and buffer names stay the same. Subclasses (grok1.parallel's) run their kernels already.
    The kernels take every weight format (bf16 for the fused MoE; int8, int4, fp8 for both)."""
    for layer in model.layers:
        moe = layer.moe  # experts carrying LoRA adapters (grok1.lora) stay on the plain path
        if type(moe) is MoE and all(type(w) is Linear for w in (moe.w_gate, moe.w_up, moe.w_down)):
            layer.moe = FusedMoE(layer.moe)
        for name in ("wq", "wk", "wv", "wo"):
            lin = getattr(layer.attn, name)
            if type(lin) is Linear and lin.weights is not None:
                setattr(layer.attn, name, QuantLinear(lin))
    return model


@dataclasses.dataclass
class Batch:
    # token ids, positions and cache slots of the new tokens as one tensor: a graph's static
    # batch takes a step's in one copy
    inputs_3M: torch.Tensor
    block_table_BP: torch.Tensor
    plan: AttentionPlan | None  # None: a graph's batch (its static batch holds the plan)
    logit_rows_R: torch.Tensor

    @property
    def tokens_M(self) -> torch.Tensor:
        return self.inputs_3M[0]

    @property
    def positions_M(self) -> torch.Tensor:
        return self.inputs_3M[1]

    @property
    def slots_M(self) -> torch.Tensor:
        return self.inputs_3M[2]


class DeviceBlockTables:
    """The block tables of the sequences run lately, kept on the device across steps: a row
    per sequence holding its block ids (0 past its end), row 0 all zeros (padded graph rows
    read scratch block 0 through it). A step sends only the entries that differ from what a
    row holds (in decode: the rows that crossed into a new block), not every sequence's table.
    A row is compared with its sequence's block ids every step (a list comparison in C), so a
    sequence preempted and rescheduled on other blocks, or a reused row, is rewritten."""

    def __init__(self, num_rows: int, blocks_per_seq: int, device: torch.device):
        self.table_SP = torch.zeros(num_rows + 1, blocks_per_seq, dtype=torch.int32,
                                    device=device)
        # sequence -> (its row, the ids the row holds); free rows with the ids they still hold
        self._held: dict[Sequence, tuple[int, list[int]]] = {}
        self._free: list[tuple[int, list[int]]] = [(r, []) for r in range(num_rows, 0, -1)]

    def rows(self, seqs: list[Sequence]) -> tuple[list[int], list[int]]:
        """Each sequence's row [B], and the updates that bring the rows up to date as one flat
        list: U row indices, U column indices, U block ids."""
        rows, upd_rows, upd_cols, upd_ids = [], [], [], []
        for seq in seqs:
            row, have = self._held.get(seq) or self._take_row(seq, seqs)
            ids, n = seq.block_ids, len(have)
            start = n if ids[:n] == have else 0  # new blocks appended, or the row rewritten
            if start < len(ids) or len(ids) < n:
                cols = range(start, max(len(ids), n))
                upd_rows += [row] * len(cols)
                upd_cols += cols
                upd_ids += ids[start:] + [0] * (n - len(ids))  # and zeros over a longer past
                self._held[seq] = (row, list(ids))
            rows.append(row)
        return rows, upd_rows + upd_cols + upd_ids

    def _take_row(self, seq: Sequence, step: list[Sequence]) -> tuple[int, list[int]]:
        if not self._free:  # the rows of sequences not in this step (finished ones among them)
            keep = set(step)
            for old in [s for s in self._held if s not in keep]:
                self._free.append(self._held.pop(old))
        if not self._free:  # more sequences in one step than rows: grow
            S = self.table_SP.shape[0]
            self.table_SP = torch.cat([self.table_SP, torch.zeros_like(self.table_SP[1:])])
            self._free = [(r, []) for r in range(2 * S - 2, S - 1, -1)]
        self._held[seq] = self._free.pop()
        return self._held[seq]


@dataclasses.dataclass
class PendingResidual:
    """h + out_norm(a), left for the norm that reads it next: `PagedContext.norm` computes
    both in one fused pass (grok1.ops.rmsnorm.add_rms_norm) and keeps the sum in `h`."""
    h_prev: torch.Tensor
    a: torch.Tensor | PartialSums
    out_norm: RMSNorm
    h: torch.Tensor | None = None


class PagedContext(ForwardContext):
    """The engine's forward context: a batch of flattened tokens over the paged KV cache, each
    step a grok1.ops kernel. Residual adds are fused with the norm after them. Grok-2's
    features come from the config: RoPE base, attention cap, temperature and rounding points,
    pad keys visible, the norms' eps (the MoE's router cap, GELU and rounding are its own)."""

    def __init__(self, runner: ModelRunner, batch: Batch):
        self.runner, self.batch = runner, batch
        c = runner.config
        cos, sin = rope_cos_sin(batch.positions_M[None], c.key_size, c.rope_theta)
        self.cos_MH, self.sin_MH = cos[0], sin[0]
        self.math = AttentionMath.from_config(c)
        self.temperature_M = self.math.temperature(batch.positions_M)  # once for every layer
        self.eps = c.rms_norm_eps
        # the reference hides pad keys (SPEC 2.2); SGLang's Grok-2 does not (grok2 SPEC 2.4)
        self.real_slots = runner.real_slots if c.mask_pad_keys else None

    def project(self, x: torch.Tensor, linears: tuple[torch.nn.Module, ...]):
        # q/k/v in one launch at one row, as K-split partial sums that the rope sums
        return project_many(x, list(linears))

    def attention(self, layer: int, q, k, v, multiplier: float) -> torch.Tensor:
        r, b = self.runner, self.batch
        q = rope_and_cache(q, k, v, self.cos_MH, self.sin_MH, r.k_cache[layer], r.v_cache[layer],
                           b.slots_M)
        return paged_attention(q, r.k_cache[layer], r.v_cache[layer], b.block_table_BP,
                               b.positions_M, b.plan, multiplier, self.real_slots, self.math,
                               self.temperature_M)

    def norm(self, h: torch.Tensor | PendingResidual, norm: RMSNorm) -> torch.Tensor:
        if isinstance(h, PendingResidual):
            h.h, x = add_rms_norm(h.h_prev, h.a, h.out_norm.scale, norm.scale, self.eps)
            return x
        return rms_norm_op(h, norm.scale, self.eps)

    def residual(self, h: torch.Tensor | PendingResidual, a: torch.Tensor | PartialSums,
                 out_norm: RMSNorm) -> PendingResidual:
        return PendingResidual(self._value(h), a, out_norm)

    @staticmethod
    def _value(h: torch.Tensor | PendingResidual) -> torch.Tensor:
        if not isinstance(h, PendingResidual):
            return h
        if h.h is None:  # the layers norm every residual before the next one (model.py)
            raise RuntimeError("PagedContext: a residual was read before the norm that computes it")
        return h.h


class ModelRunner:
    def __init__(self, model: Grok1, *, num_blocks: int, block_size: int, max_model_len: int,
                 max_batch_size: int, use_cuda_graphs: bool = True):
        self.model = model
        # a tensor-parallel rank's attention holds fewer heads (grok1.parallel: local_config)
        self.config = c = model.local_config
        self.device = model.embed.device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.block_tables = DeviceBlockTables(max_batch_size, self.max_blocks_per_seq,
                                              self.device)
        if self.device.type == "cuda":
            apply_kernels(model)
        # block 0 is scratch (padded graph rows write there); the pool hands out 1..num_blocks
        shape = (c.num_layers, num_blocks + 1, block_size, c.num_kv_heads, c.key_size)
        self.k_cache = torch.zeros(shape, dtype=BF16, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=BF16, device=self.device)
        # 1 where the token written at a cache slot is real, 0 for the pad token: the reference
        # masks pad keys (SPEC 2.2). One flag per slot serves every layer.
        self.real_slots = torch.zeros((num_blocks + 1) * block_size, dtype=torch.int8,
                                      device=self.device)
        kernels_ok = all(isinstance(layer.moe, FusedMoE) and layer.moe.kernel_ok
                         for layer in model.layers)
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda" and kernels_ok
        self.graph_buckets = [b for b in GRAPH_BUCKETS if b <= max_batch_size]
        if self.use_graphs and max_batch_size not in self.graph_buckets and max_batch_size <= 256:
            self.graph_buckets.append(max_batch_size)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}
        self._graph_pool = None

    # ---- host-side batch preparation ------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk], pad_to: int = 0) -> Batch:
        """The batch of these chunks; its logit rows are the sampled rows (one per chunk with
        needs_sample, in order), then the prompt-logit rows (ScheduledChunk.
        prompt_logit_positions, chunk by chunk). `pad_to` (a graph's bucket) adds rows of token
        0 at slot 0 with a table of zeros (scratch block 0), and leaves the plan and logit rows
        out (the graph has its own). The host builds flat lists (no torch call per sequence)
        and sends them in one copy that does not wait for the GPU (grok1.sampling.
        rows_to_device); the block tables stay on the device (`DeviceBlockTables`)."""
        rows_B, updates = self.block_tables.rows([ch.seq for ch in chunks])
        tokens, positions, slots, query_start, logit_rows, prompt_rows = [], [], [], [0], [], []
        bs = self.block_size
        for ch in chunks:
            end, ids = ch.start + ch.num_tokens, ch.seq.block_ids
            tokens += ch.seq.token_ids[ch.start:end]
            positions += range(ch.start, end)
            slots += (ids[p // bs] * bs + p % bs for p in range(ch.start, end))
            query_start.append(query_start[-1] + ch.num_tokens)
            if ch.needs_sample:
                logit_rows.append(query_start[-1] - 1)
            prompt_rows += (query_start[-2] + p - ch.start for p in ch.prompt_logit_positions)
        pad = [0] * max(pad_to - len(chunks), 0)  # row 0 of the tables is all scratch block 0
        M, B = len(tokens) + len(pad), len(rows_B) + len(pad)
        flat = rows_to_device(tokens + pad + positions + pad + slots + pad + rows_B + pad
                              + logit_rows + prompt_rows + updates, self.device)
        inputs_3M, rows_B_, logit_rows_R, updates_3U = flat.split(
            [3 * M, B, len(logit_rows + prompt_rows), len(updates)])
        table = self.block_tables.table_SP
        if updates:
            u = updates_3U.view(3, -1)
            table.index_put_((u[0], u[1]), u[2].to(table.dtype))
        plan = None
        if not pad_to:
            c = self.config
            plan = plan_attention(query_start, c.num_kv_heads, c.q_per_kv, self.device,
                                  max_kv_len=max(ch.start + ch.num_tokens for ch in chunks))
        return Batch(inputs_3M.view(3, M), table.index_select(0, rows_B_), plan, logit_rows_R)

    # ---- the forward ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [R, V] (f32 copies of the bf16 logits) for the rows that need them."""
        model = self.model
        self.real_slots[batch.slots_M] = (batch.tokens_M != self.config.pad_token).to(torch.int8)
        x = model.run_layers(model.embed_tokens(batch.tokens_M), PagedContext(self, batch))
        return model.unembed(x[batch.logit_rows_R]).float()

    def execute(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Run one step; logits [R, V] f32 for the chunks with needs_sample, in order, then
        those of their prompt_logit_positions (see prepare)."""
        B = len(chunks)
        # a graph returns one row per sequence: a one-token chunk scoring a prompt token runs eager
        if self.use_graphs and all(ch.num_tokens == 1 and not ch.prompt_logit_positions
                                   for ch in chunks) and \
                B <= max(self.graph_buckets, default=0):
            return self._replay(chunks)
        return self.forward(self.prepare(chunks))

    # ---- CUDA graphs for decode -------------------------------------------------------------
    def _static_batch(self, bucket: int) -> Batch:
        dev = self.device
        c = self.config
        plan = plan_attention(list(range(bucket + 1)), c.num_kv_heads, c.q_per_kv, dev,
                              max_kv_len=self.max_blocks_per_seq * self.block_size)
        return Batch(torch.zeros(3, bucket, dtype=torch.long, device=dev),
                     torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
                     plan, torch.arange(bucket, device=dev))

    def capture(self, bucket: int) -> None:
        """Capture the decode forward for `bucket` sequences (padded rows use scratch block 0)."""
        static = self._static_batch(bucket)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                self.forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = self.forward(static)
        self._graph_pool = graph.pool()
        self._graphs[bucket] = (graph, static, out)

    def free_graphs(self) -> None:
        """Drop the captured graphs (before destroy_process_group: graphs holding captured NCCL
        calls hang it); later decode steps capture again."""
        self._graphs.clear()
        self._graph_pool = None

    def capture_all(self) -> None:
        for bucket in sorted(self.graph_buckets, reverse=True):  # largest first: shared pool
            if bucket not in self._graphs:
                self.capture(bucket)

    def _replay(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        B = len(chunks)
        bucket = next(b for b in sorted(self.graph_buckets) if b >= B)
        if bucket not in self._graphs:
            self.capture(bucket)
        graph, static, out = self._graphs[bucket]
        batch = self.prepare(chunks, pad_to=bucket)
        static.inputs_3M.copy_(batch.inputs_3M)  # the graph reads these tensors
        static.block_table_BP.copy_(batch.block_table_BP)
        graph.replay()
        return out[:B]

"""Runs scheduled chunks through the model over the paged KV cache.

The model is used as it is, through its own modules and parameter names; on CUDA the quantized
attention Linears and the MoE are swapped for kernel-backed modules holding the same tensors
(`apply_kernels`). The varlen forward below is `Grok1.forward` rewritten for flattened tokens of
many sequences at different positions (no padding), with each sublayer a grok1.ops call that falls
back to its twin on CPU. Decode-only steps of up to `max_graph_batch` sequences replay a CUDA
graph captured per batch-size bucket.

Shape letters: M new tokens (all sequences), B sequences, P pages (blocks), D emb_size, N/K heads,
H head size, V vocab, R rows that need logits.
"""

from __future__ import annotations

import dataclasses

import torch

from grok1.engine.kv_cache import slot_of
from grok1.engine.scheduler import ScheduledChunk
from grok1.model import BF16, Grok1, Linear, rope_cos_sin
from grok1.ops.attention import AttentionPlan, paged_attention, plan_attention
from grok1.ops.linear import Int8Linear, project_many
from grok1.ops.moe import FusedMoE
from grok1.ops.rmsnorm import add_rms_norm, rms_norm_op
from grok1.ops.rope import rope_and_cache

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)


def apply_kernels(model: Grok1) -> Grok1:
    """Swap in the kernel-backed modules, in place; parameter/buffer names stay the same."""
    for layer in model.layers:
        if not isinstance(layer.moe, FusedMoE) and not getattr(layer.moe, "kernel_backed", False):
            layer.moe = FusedMoE.like(layer.moe)  # (grok1.parallel's modules run kernels already)
        for name in ("wq", "wk", "wv", "wo"):
            lin = getattr(layer.attn, name)
            if isinstance(lin, Linear) and lin.quantized and not getattr(lin, "kernel_backed", False):
                setattr(layer.attn, name, Int8Linear(lin))
    return model


def partial_sums(module: torch.nn.Module, x_MD: torch.Tensor) -> torch.Tensor:
    """module(x) in a form grok1.ops.rmsnorm.add_rms_norm takes: f32 partial sums where the
    kernel-backed module offers them (saves the launches that sum and round), else bf16."""
    fn = getattr(module, "partial_sums", None)
    return fn(x_MD) if fn is not None else module(x_MD)


@dataclasses.dataclass
class Batch:
    tokens_M: torch.Tensor
    positions_M: torch.Tensor
    slots_M: torch.Tensor
    block_table_BP: torch.Tensor
    plan: AttentionPlan
    logit_rows_R: torch.Tensor


class ModelRunner:
    def __init__(self, model: Grok1, *, num_blocks: int, block_size: int, max_model_len: int,
                 max_batch_size: int, use_cuda_graphs: bool = True):
        self.model = model
        # a tensor-parallel rank's attention holds fewer heads (grok1.parallel: local_config)
        self.config = c = getattr(model, "local_config", model.config)
        self.device = model.embed.device
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
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
        kernels_ok = all(getattr(layer.moe, "_kernel_ok", False) for layer in model.layers)
        self.use_graphs = use_cuda_graphs and self.device.type == "cuda" and kernels_ok
        self.graph_buckets = [b for b in GRAPH_BUCKETS if b <= max_batch_size]
        if self.use_graphs and max_batch_size not in self.graph_buckets and max_batch_size <= 256:
            self.graph_buckets.append(max_batch_size)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, Batch, torch.Tensor]] = {}
        self._graph_pool = None

    # ---- host-side batch preparation ------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk]) -> Batch:
        """The batch of these chunks; its logit rows are the sampled rows (one per chunk with
        needs_sample, in order), then the prompt-logit rows (ScheduledChunk.
        prompt_logit_positions, chunk by chunk)."""
        tokens, positions, slots, query_start, rows = [], [], [], [0], []
        prompt_rows = []
        table = torch.zeros(len(chunks), self.max_blocks_per_seq, dtype=torch.int32)
        for b, ch in enumerate(chunks):
            seq = ch.seq
            tokens += seq.token_ids[ch.start:ch.start + ch.num_tokens]
            span = range(ch.start, ch.start + ch.num_tokens)
            positions += span
            slots += [slot_of(seq.block_ids, p, self.block_size) for p in span]
            query_start.append(query_start[-1] + ch.num_tokens)
            table[b, :len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
            if ch.needs_sample:
                rows.append(query_start[-1] - 1)
            prompt_rows += (query_start[-2] + p - ch.start for p in ch.prompt_logit_positions)
        dev = self.device
        max_kv = max(ch.start + ch.num_tokens for ch in chunks)
        c = self.config
        return Batch(torch.tensor(tokens, device=dev), torch.tensor(positions, device=dev),
                     torch.tensor(slots, device=dev), table.to(dev),
                     plan_attention(query_start, c.num_kv_heads, c.q_per_kv, dev,
                                    max_kv_len=max_kv),
                     torch.tensor(rows + prompt_rows, dtype=torch.long, device=dev))

    # ---- the forward ----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [R, V] (f32 copies of the bf16 logits) for the rows that need them."""
        model, c = self.model, self.config
        M = batch.tokens_M.shape[0]
        h = model.embed[batch.tokens_M].to(BF16) * model.embedding_multiplier
        cos, sin = rope_cos_sin(batch.positions_M[None], c.key_size)
        cos, sin = cos[0], sin[0]
        layers = model.layers
        self.real_slots[batch.slots_M] = (batch.tokens_M != c.pad_token).to(torch.int8)
        x = rms_norm_op(h, layers[0].attn_norm.scale)
        for i, layer in enumerate(layers):
            attn = layer.attn
            # q/k/v in one launch at one row, as K-split partial sums that the rope sums
            q, k, v = project_many(x, [attn.wq, attn.wk, attn.wv])
            q = q.view(-1, M, c.num_q_heads, c.key_size)
            k = k.view(-1, M, c.num_kv_heads, c.key_size)
            v = v.view(-1, M, c.num_kv_heads, c.key_size)
            q = rope_and_cache(q, k, v, cos, sin, self.k_cache[i], self.v_cache[i],
                               batch.slots_M)
            o = paged_attention(q, self.k_cache[i], self.v_cache[i], batch.block_table_BP,
                                batch.positions_M, batch.plan, c.attn_output_multiplier,
                                self.real_slots)
            # the projections' outputs go to the fused residual norm unsummed (it sums them)
            h, x = add_rms_norm(h, partial_sums(attn.wo, o), layer.attn_out_norm.scale,
                                layer.moe_norm.scale)
            y = partial_sums(layer.moe, x)
            w_next = layers[i + 1].attn_norm.scale if i + 1 < len(layers) else model.norm.scale
            h, x = add_rms_norm(h, y, layer.moe_out_norm.scale, w_next)
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
        return Batch(torch.zeros(bucket, dtype=torch.long, device=dev),
                     torch.zeros(bucket, dtype=torch.long, device=dev),
                     torch.zeros(bucket, dtype=torch.long, device=dev),
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
        tokens = torch.zeros(bucket, dtype=torch.long)
        positions = torch.zeros(bucket, dtype=torch.long)
        slots = torch.zeros(bucket, dtype=torch.long)
        table = torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32)
        for b, ch in enumerate(chunks):
            seq = ch.seq
            tokens[b] = seq.token_ids[ch.start]
            positions[b] = ch.start
            slots[b] = slot_of(seq.block_ids, ch.start, self.block_size)
            table[b, :len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        static.tokens_M.copy_(tokens, non_blocking=True)
        static.positions_M.copy_(positions, non_blocking=True)
        static.slots_M.copy_(slots, non_blocking=True)
        static.block_table_BP.copy_(table, non_blocking=True)
        graph.replay()
        return out[:B]

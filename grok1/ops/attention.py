"""Attention over a paged KV cache, prefill chunks and decode in one kernel (GQA, c*tanh cap).

Twin: `grok1.model.attention_ref` on K/V gathered from the pages (`paged_attention_ref`).
Layout: q [M, N, H] for the M new tokens of all sequences (flattened, sequence by sequence);
K/V caches [P, PAGE, K, H] (one layer), a token at position s of sequence b lives in page
block_table[b, s // PAGE], row s % PAGE. The new tokens' K/V must already be written. Query token
i of sequence b sits at positions[i] and sees the keys 0..positions[i] (causal within chunks)
whose token is not the pad token: `real_slots` holds one flag per cache slot (page * PAGE +
row), nonzero where the token written there is real, as the reference's key mask
`tokens > pad` (SPEC 2.2). A query with no visible key at all (a prompt that starts with pad
tokens) gets a zero output: the reference averages v over its whole zero-padded cache there,
which is ~0 and depends on the padding, so no engine can match it exactly.
Scores: bf16 q.k, times the multiplier in f32, then 30*tanh(s/30), as the reference (SPEC 2.5).
Grok-2 (`AttentionMath` from its config, grok2 SPEC 2.4): its cap, each query's temperature after
the cap (`model.attention_temperature` of its position), and SGLang's rounding points (f32
scores; exp(s - max) rounded unnormalised for p @ v, divided by the f32 row sum after).

Shape letters: M new tokens, B sequences, N query heads, K kv heads, G = N // K, H head size,
P pages, S keys.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from grok1.model import SOFTCAP, attention_ref, attention_temperature
from grok1.ops._triton import NUM_SMS_GUESS, cdiv, interpreting, next_pow2, use_kernel


@dataclasses.dataclass
class AttentionPlan:
    """How the kernel's programs map onto sequences; built once per step, shared by layers."""
    query_start_B1: list[int]          # host copy, for the twin
    qblock_seq: torch.Tensor           # [QB] int32: sequence of each query block
    qblock_tok0: torch.Tensor          # [QB] int32: its first token (index into M)
    query_end_B: torch.Tensor          # [B] int32: one past each sequence's last token
    block_t: int                       # query tokens per program
    splits: int                        # key splits (decode at long context)


def plan_attention(query_start_B1: list[int], num_kv_heads: int, q_per_kv: int,
                   device: torch.device | str, *, splits: int | None = None,
                   max_kv_len: int = 0, block_t: int | None = None) -> AttentionPlan:
    """Plan for sequences whose new tokens are query_start[b]:query_start[b+1]; `block_t`
    query tokens per program instead of the default (bench/attention.py)."""
    q_lens = [e - s for s, e in itertools.pairwise(query_start_B1)]
    decode = max(q_lens) == 1
    # query tokens per program: 4 in prefill (bench/attention.py, H200: 1024 tokens 1093 us at
    # 16, 691 us at 4); tl.dot needs 16 rows (tokens x padded heads)
    block_t = block_t or max(2 if decode else 4, cdiv(16, _g_pad(q_per_kv)))
    seq, tok0 = [], []
    for b, (s, n) in enumerate(zip(query_start_B1[:-1], q_lens)):
        for t in range(0, n, block_t):
            seq.append(b)
            tok0.append(s + t)
    if splits is None:
        want = cdiv(NUM_SMS_GUESS, len(seq) * num_kv_heads)  # the only use of the SM count
        # ~128 keys a split (bench/attention.py, H200, batch 1: 4 splits at 512 keys, 16 at 4096)
        splits = max(1, min(16, want, cdiv(max_kv_len, 128))) if decode else 1

    def as_i32(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.int32, device=device)
    return AttentionPlan(list(query_start_B1), as_i32(seq), as_i32(tok0),
                         as_i32(query_start_B1[1:]), block_t, splits)


@dataclasses.dataclass(frozen=True)
class AttentionMath:
    """What the scores go through besides the multiplier: Grok-1's defaults, or a config's
    (`from_config`: Grok-2's cap, temperature length and SGLang's rounding points)."""
    softcap: float = SOFTCAP           # c of c * tanh(s / c); 0: none
    temperature_len: int = 0           # L of the query temperature log2(n) / log2(L); 0: none
    rounding: str = "jax"              # "jax" (the reference's) or "sglang"

    @classmethod
    def from_config(cls, config) -> AttentionMath:
        return cls(config.attn_logit_softcap, config.attn_temperature_len, config.rounding)

    def temperature(self, positions: torch.Tensor) -> torch.Tensor | None:
        """f32 per query (the model's function), or None without a temperature."""
        if not self.temperature_len:
            return None
        return attention_temperature(positions, self.temperature_len)


GROK1_ATTENTION = AttentionMath()


def _g_pad(G: int) -> int:
    return next_pow2(G, at_least=2)


def paged_attention_ref(q_MNH: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_table_BP: torch.Tensor, positions_M: torch.Tensor,
                        plan: AttentionPlan, multiplier: float,
                        real_slots: torch.Tensor | None = None,
                        math: AttentionMath = GROK1_ATTENTION) -> torch.Tensor:
    """The twin: per sequence, gather its keys and call model.attention_ref. -> [M, N*H] bf16.
    `real_slots` [P * PAGE] (nonzero = real token) masks pad keys; None: every key is real."""
    M, N, H = q_MNH.shape
    page = k_cache.shape[1]
    K = k_cache.shape[2]
    k_flat, v_flat = k_cache.reshape(-1, K, H), v_cache.reshape(-1, K, H)
    out = torch.empty(M, N * H, dtype=q_MNH.dtype, device=q_MNH.device)
    qs = plan.query_start_B1
    for b in range(len(qs) - 1):
        if qs[b + 1] == qs[b]:
            continue
        pos_T = positions_M[qs[b]:qs[b + 1]]
        S = int(pos_T.max()) + 1
        s_S = torch.arange(S, device=q_MNH.device)
        slots = block_table_BP[b, s_S // page].long() * page + s_S % page
        mask_1TS = (s_S[None, :] <= pos_T[:, None])[None]
        if real_slots is not None:
            mask_1TS = mask_1TS & (real_slots.reshape(-1)[slots] != 0)[None, None]
        temperature = math.temperature(pos_T[None])
        o = attention_ref(q_MNH[None, qs[b]:qs[b + 1]], k_flat[slots][None],
                          v_flat[slots][None], mask_1TS, multiplier, math.softcap, temperature,
                          math.rounding)[0]
        out[qs[b]:qs[b + 1]] = o * mask_1TS[0].any(-1, keepdim=True)  # no visible key: 0
    return out


def paged_attention(q_MNH: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_table_BP: torch.Tensor, positions_M: torch.Tensor,
                    plan: AttentionPlan, multiplier: float,
                    real_slots: torch.Tensor | None = None,
                    math: AttentionMath = GROK1_ATTENTION,
                    temperature_M: torch.Tensor | None = None,
                    tiles: dict | None = None) -> torch.Tensor:
    """[M, N*H] bf16; the Triton kernel on CUDA, else the twin. `temperature_M`: the queries'
    `math.temperature(positions_M)`, when the caller has it already (one per step, not per
    layer). `tiles`: launch choices over the defaults (BLOCK_S keys per step, W warps, S
    stages; bench/attention.py), never the numerics."""
    if math.rounding not in ("jax", "sglang"):
        raise ValueError(f"paged_attention: rounding={math.rounding!r}: expected 'jax' or 'sglang'")
    if not use_kernel(q_MNH):
        return paged_attention_ref(q_MNH, k_cache, v_cache, block_table_BP, positions_M, plan,
                                   multiplier, real_slots, math)
    if math.temperature_len and temperature_M is None:
        temperature_M = math.temperature(positions_M)
    from grok1.ops.attention_triton import paged_attention_kernel
    M, N, H = q_MNH.shape
    _, page, K, _ = k_cache.shape
    G = N // K
    g_pad = _g_pad(G)
    block_t = plan.block_t
    h_pad = next_pow2(H, at_least=16)
    q = q_MNH.contiguous()
    out = torch.empty(M, N, H, dtype=q.dtype, device=q.device)
    splits = plan.splits
    if splits > 1:  # the splits' f32 sums, and each split's row maximum and denominator
        part = torch.empty(splits, M, N, H, dtype=torch.float32, device=q.device)
        stats = torch.empty(splits, 2, M, N, dtype=torch.float32, device=q.device)
    else:
        part = stats = out
    rows = block_t * g_pad
    # bench/attention.py (H200): decode with key splits (few sequences) 128 keys a step and 8
    # warps (batch 1, 512 keys: 33.6 -> 15.6 us with the splits above); decode of many
    # sequences 64 and 4 (batch 64); prefill 32 and 4 at 32 rows
    if plan.splits > 1:
        launch = {"BLOCK_S": 128, "W": 8}
    elif rows <= 32:
        launch = {"BLOCK_S": 64 if block_t <= 2 else 32, "W": 4}
    else:
        launch = {"BLOCK_S": 32, "W": 8}
    launch = {"S": 2, **launch, **(tiles or {})}
    grid = (plan.qblock_seq.numel(), K, splits)
    for phase in (1, 2) if splits > 1 else (0,):  # see attention_triton's PHASE
        paged_attention_kernel[grid](
            q, k_cache, v_cache, out, part, stats, block_table_BP, positions_M,
            real_slots if real_slots is not None else positions_M,
            plan.qblock_seq, plan.qblock_tok0, plan.query_end_B, M, block_table_BP.stride(0),
            temperature_M if temperature_M is not None else positions_M,
            float(multiplier), N=N, KV=K, H=H, H_PAD=h_pad, G=G, G_PAD=g_pad, BLOCK_T=block_t,
            BLOCK_S=launch["BLOCK_S"], PAGE=page, SPLITS=splits, F32=interpreting(),
            MASK_PAD=real_slots is not None, CAP=float(math.softcap),
            TEMPERATURE=bool(math.temperature_len), SGLANG=math.rounding == "sglang",
            PHASE=phase, num_warps=launch["W"], num_stages=launch["S"])
    if splits > 1:  # one launch instead of the five of torch's sums, where and division
        from grok1.ops.attention_triton import attention_combine_kernel
        rows_total, block_r = M * N, 16
        attention_combine_kernel[(cdiv(rows_total, block_r),)](
            part, out, rows_total, SPLITS=splits, H=H, H_PAD=h_pad, BLOCK_R=block_r,
            num_warps=4)
    return out.view(M, N * H)

"""Triton kernel of paged GQA attention with the c*tanh soft-cap (see grok1.ops.attention).

One program serves one kv head for BLOCK_T query tokens of one sequence, all G query heads of
that kv head at once (rows r = t * G_PAD + g), and one slice (split) of the keys. As the
reference, p = softmax(s) = exp(s - max) / sum is rounded to bf16 *after* normalising, so each
program first finds the row's maximum and denominator over all of its keys (a first, cheap
pass over K), then multiplies bf16(p) by V; the splits' f32 sums combine by a plain sum.
PHASE splits that first pass in two launches when the keys are split (decode): 1, each program
stores its split's maximum and denominator; 2, each program combines every split's, then runs
the second pass. Otherwise (PHASE 0) every split's program would read all keys twice over.
MASK_PAD: keys whose slot flag in real_ptr is 0 (pad tokens) are hidden; a row with no visible
key stores 0.
CAP (0: none), TEMPERATURE (a per-query f32 factor after the cap, from temp_ptr) and SGLANG
(f32 scores; p = bf16(exp(s - max)) unnormalised into p @ v, then divided by the f32 row sum)
are Grok-2's (grok2 SPEC 2.4).
"""

import triton
import triton.language as tl

from grok1.ops.dot_triton import div, dot, exp, tanh


@triton.jit
def paged_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, part_ptr, stats_ptr, block_table_ptr,
                           positions_ptr, real_ptr, qblock_seq_ptr, qblock_tok0_ptr, query_end_ptr,
                           M, stride_bt, temp_ptr, multiplier,
                           N: tl.constexpr, KV: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr,
                           G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_S: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr,
                           F32: tl.constexpr, MASK_PAD: tl.constexpr, CAP: tl.constexpr,
                           TEMPERATURE: tl.constexpr, SGLANG: tl.constexpr,
                           PHASE: tl.constexpr):
    qb = tl.program_id(0)
    kh = tl.program_id(1)
    sp = tl.program_id(2)
    R: tl.constexpr = BLOCK_T * G_PAD
    b = tl.load(qblock_seq_ptr + qb)
    tok0 = tl.load(qblock_tok0_ptr + qb)
    qend = tl.load(query_end_ptr + b)
    r = tl.arange(0, R)
    tok = tok0 + r // G_PAD
    g = r % G_PAD
    row_ok = (tok < qend) & (g < G)
    head = kh * G + g
    h = tl.arange(0, H_PAD)
    pos = tl.load(positions_ptr + tok, mask=row_ok, other=-1).to(tl.int32)
    q = tl.load(q_ptr + (tok.to(tl.int64) * N + head)[:, None] * H + h[None, :],
                mask=row_ok[:, None] & (h[None, :] < H), other=0.0)
    if TEMPERATURE:
        temp = tl.load(temp_ptr + tok, mask=row_ok, other=1.0)
    else:
        temp = tl.full([R], 1.0, dtype=tl.float32)
    kv_len = tl.max(pos, 0) + 1
    per = tl.cdiv(tl.cdiv(kv_len, SPLITS), BLOCK_S) * BLOCK_S
    lo = sp * per
    hi = tl.minimum(lo + per, kv_len)
    # Pass 1: the row's maximum and softmax denominator over every visible key (all splits:
    # each program needs both to form p = exp(s - max) / sum before its bf16 rounding, as
    # torch's and the reference's softmax do).
    stat_off = tok.to(tl.int64) * N + head  # [SPLITS, 2, M * N] f32: max, then denominator
    if PHASE == 0:
        m_R, l_R = _row_stats(q, k_ptr, real_ptr, block_table_ptr, b, stride_bt, kh, h, pos, 0,
                              kv_len, multiplier, temp, R, KV, H, BLOCK_S, PAGE, F32, MASK_PAD,
                              CAP, TEMPERATURE, SGLANG)
    elif PHASE == 1:  # this split's keys only; phase 2 combines the splits'
        m_R, l_R = _row_stats(q, k_ptr, real_ptr, block_table_ptr, b, stride_bt, kh, h, pos, lo,
                              hi, multiplier, temp, R, KV, H, BLOCK_S, PAGE, F32, MASK_PAD, CAP,
                              TEMPERATURE, SGLANG)
        stats = stats_ptr + sp.to(tl.int64) * 2 * M * N + stat_off
        tl.store(stats, m_R, mask=row_ok)
        tl.store(stats + M * N, l_R, mask=row_ok)
        return
    else:
        m_R = tl.full([R], -1e30, dtype=tl.float32)
        for i in tl.static_range(SPLITS):
            m_R = tl.maximum(m_R, tl.load(stats_ptr + i * 2 * M * N + stat_off, mask=row_ok,
                                          other=-1e30))
        l_R = tl.zeros([R], dtype=tl.float32)
        for i in tl.static_range(SPLITS):
            m_i = tl.load(stats_ptr + i * 2 * M * N + stat_off, mask=row_ok, other=-1e30)
            l_i = tl.load(stats_ptr + (i * 2 + 1) * M * N + stat_off, mask=row_ok, other=0.0)
            l_R += l_i * exp(m_i - m_R)
    l_R = tl.where(l_R > 0, l_R, 1.0)  # a row with no visible key: p = 0, output 0
    # Pass 2: this split's keys, p = bf16(exp(s - max) / sum) times v, accumulated in f32
    acc = tl.zeros([R, H_PAD], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        sc, visible, slot, kv_off, s_ok = _scores(q, k_ptr, real_ptr, block_table_ptr, b,
                                                  stride_bt, kh, h, pos, s0, hi, multiplier,
                                                  temp, R, KV, H, BLOCK_S, PAGE, F32, MASK_PAD,
                                                  CAP, TEMPERATURE, SGLANG)
        e = tl.where(visible, exp(sc - m_R[:, None]), 0.0)
        if SGLANG:  # unnormalised; divided by the row sum below
            p = e
        else:
            p = div(e, l_R[:, None])
        v = tl.load(v_ptr + kv_off[:, None] + h[None, :],
                    mask=s_ok[:, None] & (h[None, :] < H), other=0.0)
        acc = dot(p.to(tl.bfloat16), v, acc, F32)
    if SGLANG:
        acc = div(acc, l_R[:, None])
    out_off = (tok.to(tl.int64) * N + head)[:, None] * H + h[None, :]
    out_mask = row_ok[:, None] & (h[None, :] < H)
    if SPLITS == 1:
        tl.store(o_ptr + out_off, acc.to(tl.bfloat16), mask=out_mask)
    else:
        tl.store(part_ptr + sp.to(tl.int64) * M * N * H + out_off, acc, mask=out_mask)


@triton.jit
def _row_stats(q, k_ptr, real_ptr, block_table_ptr, b, stride_bt, kh, h, pos, lo, hi,
               multiplier, temp, R: tl.constexpr, KV: tl.constexpr, H: tl.constexpr,
               BLOCK_S: tl.constexpr, PAGE: tl.constexpr, F32: tl.constexpr,
               MASK_PAD: tl.constexpr, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
               SGLANG: tl.constexpr):
    """Each row's maximum score and sum of exp(s - max) over its visible keys lo..hi-1, in
    f32 (online: the sum rescaled as the maximum grows). The running maximum starts far below
    any score (the cap bounds Grok-1's at -30, not a temperature's or an uncapped one's)."""
    m_R = tl.full([R], -1e30, dtype=tl.float32)
    l_R = tl.zeros([R], dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        sc, visible, slot, kv_off, s_ok = _scores(q, k_ptr, real_ptr, block_table_ptr, b,
                                                  stride_bt, kh, h, pos, s0, hi, multiplier,
                                                  temp, R, KV, H, BLOCK_S, PAGE, F32, MASK_PAD,
                                                  CAP, TEMPERATURE, SGLANG)
        m_new = tl.maximum(m_R, tl.max(tl.where(visible, sc, -1e30), 1))
        e = tl.where(visible, exp(sc - m_new[:, None]), 0.0)
        l_R = l_R * exp(m_R - m_new) + tl.sum(e, 1)
        m_R = m_new
    return m_R, l_R


@triton.jit
def _scores(q, k_ptr, real_ptr, block_table_ptr, b, stride_bt, kh, h, pos, s0, end, multiplier,
            temp, R: tl.constexpr, KV: tl.constexpr, H: tl.constexpr, BLOCK_S: tl.constexpr,
            PAGE: tl.constexpr, F32: tl.constexpr, MASK_PAD: tl.constexpr, CAP: tl.constexpr,
            TEMPERATURE: tl.constexpr, SGLANG: tl.constexpr):
    """Scores [R, BLOCK_S] for keys s0.. (< end): CAP * tanh(bf16(q.k) * multiplier / CAP) in
    f32 as the reference and torch compute it (SPEC 2.5: correctly rounded division,
    libdevice's tanh; SGLANG: q.k not rounded), times the query's temperature, and which are
    visible; also the keys' cache offsets and validity."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_ok = s < end
    page = tl.load(block_table_ptr + b * stride_bt + s // PAGE, mask=s_ok, other=0)
    slot = page.to(tl.int64) * PAGE + s % PAGE
    kv_off = slot * (KV * H) + kh * H
    k_t = tl.load(k_ptr + kv_off[None, :] + h[:, None], mask=s_ok[None, :] & (h[:, None] < H),
                  other=0.0)
    sc = dot(q, k_t, tl.zeros([R, BLOCK_S], dtype=tl.float32), F32)
    if not SGLANG:
        sc = sc.to(tl.bfloat16).to(tl.float32)  # bf16 QK^T (SPEC 2.5)
    sc = sc * multiplier  # f32 scale
    if CAP != 0.0:
        sc = CAP * tanh(div(sc, CAP))
    if TEMPERATURE:  # after the cap (grok2 SPEC 2.4 step 5)
        sc = sc * temp[:, None]
    visible = (s[None, :] <= pos[:, None]) & s_ok[None, :]
    if MASK_PAD:
        real = tl.load(real_ptr + slot, mask=s_ok, other=0)
        visible = visible & (real != 0)[None, :]
    return sc, visible, slot, kv_off, s_ok


@triton.jit
def attention_combine_kernel(part_ptr, o_ptr, ROWS, SPLITS: tl.constexpr, H: tl.constexpr,
                             H_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    """o[row] = bf16(sum_s part[s, row]) for BLOCK_R (token, head) rows per program: the key
    splits' f32 sums of bf16(p) v [SPLITS, ROWS, H], p already normalised by the whole row's
    denominator (each split computed it), so the sum is one f32 accumulation, rounded once."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.arange(0, H_PAD)
    ok = (r < ROWS)[:, None] & (h[None, :] < H)
    off = r.to(tl.int64)[:, None] * H + h[None, :]
    acc = tl.zeros([BLOCK_R, H_PAD], dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(part_ptr + s * ROWS * H + off, mask=ok, other=0.0)
    tl.store(o_ptr + off, acc.to(tl.bfloat16), mask=ok)

"""Triton kernels of the fused MoE (imported lazily by grok1.ops.moe; see that file's contract).

Shape letters: P (token, slot) pairs = M * A, D emb_size, F expert width, E experts,
BM rows (pairs) per block. Weights are stored [E, in, out] (x @ W), bf16 or quantized (int8,
int4 packed [E, in / 2, out], fp8) with bf16 scales [E, G, out]: the constexpr WFMT picks the
tile loader (grok1.ops.dot_triton), the kernels are the same for every format. The GEMMs
compute the transposed product (W^T x^T) so the dequantized weight tile is the left operand (it
may stay in registers) and a small pair count is the narrow side.
"""

import triton
import triton.language as tl

from grok1.ops.dot_triton import (
    dequant_bf16,
    dequant_f32,
    dequant_t_bf16,
    dot,
    erf,
    i8_to_f32,
    int4_pair_bf16,
    row0,
    stored_rows,
    tanh,
    to_bf16,
    w_offsets,
)


@triton.jit
def _gelu_glu(acc_g, acc_u, ERF: tl.constexpr, SGLANG: tl.constexpr):
    """gelu(bf16(g)) * bf16(u) in f32 from the f32 sums: the reference's projections are bf16.
    GELU tanh-approximate (the reference's), or exact with ERF (Grok-2's); SGLANG rounds the
    product to bf16, as its gelu_and_mul stores it (grok2 SPEC 2.5)."""
    g = to_bf16(acc_g).to(tl.float32)
    u = to_bf16(acc_u).to(tl.float32)
    if ERF:  # torch's order (GeluCUDAKernelImpl, approximate="none")
        act = g * 0.5 * (1.0 + erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))  # torch's order (GeluCUDAKernel)
        act = 0.5 * g * (1.0 + tanh(inner))
    h = act * u
    if SGLANG:
        h = to_bf16(h).to(tl.float32)
    return h


@triton.jit
def moe_align_kernel(ids_ptr, sorted_ids_ptr, block_expert_ptr, P, NUM_SLOTS, NUM_BLOCKS,
                     E: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr, CHUNK: tl.constexpr):
    """One program: pairs sorted by expert, each expert's run padded to BM with the sentinel P;
    block_expert[b] = the expert of rows b*BM.., or -1 past the last used block. Pairs whose id
    is outside 0..E-1 (-1: an expert held by another rank) are left out."""
    e_r = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        onehot = ((ids[:, None] == e_r[None, :]) & (e_r[None, :] < E)).to(tl.int32)
        counts += tl.sum(onehot, 0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    starts = ends - padded
    for s0 in range(0, NUM_SLOTS, CHUNK):
        offs = s0 + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + P, mask=offs < NUM_SLOTS)
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        e_of = tl.sum((ends[None, :] <= (b * BM)[:, None]).to(tl.int32), 1)
        e_of = tl.where(e_of >= E, -1, e_of)
        tl.store(block_expert_ptr + b, e_of, mask=b < NUM_BLOCKS)
    tl.debug_barrier()  # the sentinel fill above must land before the scatter below
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1)
        onehot = ((ids[:, None] == e_r[None, :]) & (e_r[None, :] < E)).to(tl.int32)
        incl = tl.cumsum(onehot, 0)
        rank = tl.sum((incl - 1 + running[None, :]) * onehot, 1)
        base = tl.sum(starts[None, :] * onehot, 1)
        tl.store(sorted_ids_ptr + base + rank, offs, mask=(offs < P) & (ids >= 0) & (ids < E))
        running += tl.sum(onehot, 0)


@triton.jit
def _tile_scales(s_ptr, k0, n, N, GROUP_K, NUM_GROUPS, EVEN_N: tl.constexpr):
    """The bf16 scales [BN] of the K tile starting at k0 (BK divides GROUP_K, so one scale row
    serves the whole tile; tiles past K are masked to 0 anyway)."""
    grp = tl.minimum(k0 // GROUP_K, NUM_GROUPS - 1)
    if EVEN_N:
        return tl.load(s_ptr + grp * N + n)
    return tl.load(s_ptr + grp * N + n, mask=n < N, other=0)


@triton.jit
def _int4_rows(ptr, idx, r, K, ok):
    """Rows 2r and 2r + 1 of the [*, K] rows `idx` of ptr, transposed: two [len(r), BM] tiles
    (0 where not ok or past K), the even and odd inputs an int4 tile's two nibbles multiply."""
    rows = ptr + idx[None, :].to(tl.int64) * K + 2 * r[:, None]
    mask = ok[None, :] & (2 * r[:, None] < K)
    return tl.load(rows, mask=mask, other=0.0), tl.load(rows + 1, mask=mask, other=0.0)


@triton.jit
def _load_w_t(w_ptr, s_ptr, k0, n, K, N, GROUP_K, NUM_GROUPS, WFMT: tl.constexpr,
              SCALED: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
              MAGIC: tl.constexpr = False):
    """W^T tile [BN, BK] in bf16: W[k0:k0+BK, n] of a [K, N] matrix stored in format WFMT;
    quantized tiles are scaled by their group's bf16 scales, rounded once to bf16
    (= quant.dequantize_as, exactly). SCALED False: int8 values unscaled (exact_int8_products,
    whose caller scales the f32 sums)."""
    kk = k0 + tl.arange(0, BK)
    ptrs = w_ptr + w_offsets(kk[None, :], n[:, None], N, WFMT)
    if EVEN_K and EVEN_N:
        w = tl.load(ptrs)
    else:
        w = tl.load(ptrs, mask=(kk[None, :] < K) & (n[:, None] < N), other=0)
    if WFMT != 0 and SCALED:
        s = _tile_scales(s_ptr, k0, n, N, GROUP_K, NUM_GROUPS, EVEN_N).to(tl.float32)
        w = dequant_t_bf16(w, kk, s, WFMT)
    elif MAGIC:  # int8 scaled later (LATE), converted without the int -> float unit
        w = i8_to_f32(w, True).to(tl.bfloat16)
    else:  # bf16 weights, or int8 scaled later (LATE): int8 -> bf16 is exact
        w = w.to(tl.float32).to(tl.bfloat16)
    return w


@triton.jit
def moe_gate_up_kernel(x_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, sorted_ids_ptr,
                       block_expert_ptr, P, D, F, GROUP_K, NUM_GROUPS,
                       A: tl.constexpr, WFMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                       F32: tl.constexpr, LATE: tl.constexpr, ERF: tl.constexpr,
                       SGLANG: tl.constexpr, MAGIC: tl.constexpr = False,
                       I4PAIR: tl.constexpr = False):
    """h[pair, n] = gelu(bf16(x @ Wg)) * bf16(x @ Wu) in f32 (SPEC 2.6) for the pairs of one
    block, one expert; x [M, D] bf16 (token = pair // A), Wg/Wu [E, D, F], h [P, F] f32.
    I4PAIR (int4): each byte loaded once, its nibbles against x's even and odd rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BM + tl.arange(0, BM))
    valid = pair < P
    tok = tl.where(valid, pair // A, 0)
    n = pid_n * BN + tl.arange(0, BN)
    e64 = e.to(tl.int64)
    wg_ptr += e64 * stored_rows(D, WFMT) * F
    wu_ptr += e64 * stored_rows(D, WFMT) * F
    sg_ptr += e64 * NUM_GROUPS * F
    su_ptr += e64 * NUM_GROUPS * F
    acc_g = tl.zeros([BN, BM], dtype=tl.float32)
    acc_u = tl.zeros([BN, BM], dtype=tl.float32)
    for grp in range(NUM_GROUPS if LATE else 1):
        part_g = tl.zeros([BN, BM], dtype=tl.float32)
        part_u = tl.zeros([BN, BM], dtype=tl.float32)
        k_lo = grp * GROUP_K if LATE else 0
        k_hi = tl.minimum(k_lo + GROUP_K, D) if LATE else D
        for k0 in range(k_lo, k_hi, BK):
            if I4PAIR:  # int4: BK / 2 byte rows loaded once, against x's even and odd rows
                r = k0 // 2 + tl.arange(0, BK // 2)
                r_ok = 2 * r < D
                x_e, x_o = _int4_rows(x_ptr, tok, r, D, valid)
                s_g = _tile_scales(sg_ptr, k0, n, F, GROUP_K, NUM_GROUPS, EVEN_N)
                s_u = _tile_scales(su_ptr, k0, n, F, GROUP_K, NUM_GROUPS, EVEN_N)
                g_e, g_o = int4_pair_bf16(wg_ptr, r, n, F, r_ok, n < F, s_g, EVEN_K and EVEN_N,
                                          True)
                part_g = dot(g_o, x_o, dot(g_e, x_e, part_g, F32), F32)
                u_e, u_o = int4_pair_bf16(wu_ptr, r, n, F, r_ok, n < F, s_u, EVEN_K and EVEN_N,
                                          True)
                part_u = dot(u_o, x_o, dot(u_e, x_e, part_u, F32), F32)
            else:
                kk = k0 + tl.arange(0, BK)
                x_t = tl.load(x_ptr + tok[None, :].to(tl.int64) * D + kk[:, None],
                              mask=valid[None, :] & (kk[:, None] < D), other=0.0)
                wg = _load_w_t(wg_ptr, sg_ptr, k0, n, D, F, GROUP_K, NUM_GROUPS, WFMT, not LATE,
                               BK, EVEN_K, EVEN_N, MAGIC)
                part_g = dot(wg, x_t, part_g, F32)
                wu = _load_w_t(wu_ptr, su_ptr, k0, n, D, F, GROUP_K, NUM_GROUPS, WFMT, not LATE,
                               BK, EVEN_K, EVEN_N, MAGIC)
                part_u = dot(wu, x_t, part_u, F32)
        if LATE:  # int8 values exact in bf16; the group's scale applied to the f32 sum
            acc_g += part_g * tl.load(sg_ptr + grp * F + n, mask=n < F, other=0.0).to(tl.float32)[:, None]
            acc_u += part_u * tl.load(su_ptr + grp * F + n, mask=n < F, other=0.0).to(tl.float32)[:, None]
        else:
            acc_g += part_g
            acc_u += part_u
    h = _gelu_glu(acc_g, acc_u, ERF, SGLANG)
    ptrs = h_ptr + pair[None, :].to(tl.int64) * F + n[:, None]
    tl.store(ptrs, h, mask=valid[None, :] & (n[:, None] < F))


@triton.jit
def _dot_f32_cols(w, h_t, acc, F32: tl.constexpr):
    """acc + w @ h_t for f32 columns h_t on the tensor cores: h_t as bf16 hi + lo, two MMAs."""
    h_hi = h_t.to(tl.bfloat16)
    h_lo = (h_t - h_hi.to(tl.float32)).to(tl.bfloat16)
    return dot(w, h_lo, dot(w, h_hi, acc, F32), F32)


@triton.jit
def moe_down_kernel(h_ptr, wd_ptr, sd_ptr, gates_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
                    P, D, F, GROUP_K, NUM_GROUPS, K_PER_SPLIT,
                    WFMT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, F32: tl.constexpr,
                    LATE: tl.constexpr, SGLANG: tl.constexpr, MAGIC: tl.constexpr = False,
                    I4PAIR: tl.constexpr = False):
    """out[split, pair, n] = bf16(gate[pair]) * (h[pair, ks] @ Wd[e, ks, n]) over this split's
    ks (the reference rounds the gate to bf16; SGLANG keeps it f32); h [P, F] f32, Wd [E, F, D], gates [P] f32,
    out [SPLIT, P, D] f32. The reference's down-projection is an f32 dot of f32 h: the tensor
    cores take h as bf16 hi + bf16 lo (h to about 16 bits, 2^-17 relative), two MMAs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BM + tl.arange(0, BM))
    valid = pair < P
    safe = tl.where(valid, pair, 0).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    e64 = e.to(tl.int64)
    wd_ptr += e64 * stored_rows(F, WFMT) * D
    sd_ptr += e64 * NUM_GROUPS * D
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = k_lo + K_PER_SPLIT
    g_lo = k_lo // GROUP_K if LATE else 0
    g_hi = tl.minimum(tl.cdiv(k_hi, GROUP_K), NUM_GROUPS) if LATE else 1
    for grp in range(g_lo, g_hi):
        part = tl.zeros([BN, BM], dtype=tl.float32)
        a = tl.maximum(grp * GROUP_K, k_lo) if LATE else k_lo
        z = tl.minimum((grp + 1) * GROUP_K, k_hi) if LATE else k_hi
        for k0 in range(a, z, BK):
            if I4PAIR:  # int4: BK / 2 byte rows loaded once, against h's even and odd rows
                r = k0 // 2 + tl.arange(0, BK // 2)
                r_ok = 2 * r < F
                h_e, h_o = _int4_rows(h_ptr, safe, r, F, valid)
                s_d = _tile_scales(sd_ptr, k0, n, D, GROUP_K, NUM_GROUPS, EVEN_N)
                w_e, w_o = int4_pair_bf16(wd_ptr, r, n, D, r_ok, n < D, s_d, EVEN_K and EVEN_N,
                                          True)
                part = _dot_f32_cols(w_e, h_e, part, F32)
                part = _dot_f32_cols(w_o, h_o, part, F32)
            else:
                kk = k0 + tl.arange(0, BK)
                h_t = tl.load(h_ptr + safe[None, :] * F + kk[:, None],
                              mask=valid[None, :] & (kk[:, None] < F), other=0.0)
                w = _load_w_t(wd_ptr, sd_ptr, k0, n, F, D, GROUP_K, NUM_GROUPS, WFMT, not LATE,
                              BK, EVEN_K, EVEN_N, MAGIC)
                part = _dot_f32_cols(w, h_t, part, F32)
        if LATE:
            acc += part * tl.load(sd_ptr + grp * D + n, mask=n < D, other=0.0).to(tl.float32)[:, None]
        else:
            acc += part
    gate = tl.load(gates_ptr + safe, mask=valid, other=0.0)
    if not SGLANG:
        gate = gate.to(tl.bfloat16).to(tl.float32)
    acc = acc * gate[None, :]
    ptrs = out_ptr + pid_k.to(tl.int64) * P * D + safe[None, :] * D + n[:, None]
    tl.store(ptrs, acc, mask=valid[None, :] & (n[:, None] < D))


# ---- decode: GEMV kernels (one program row per (token, slot) pair, no tensor cores) ---------
# At a pair or two per expert the MMA tiles are mostly padding and the int8 -> bf16 conversion
# for the tensor cores costs more than the FMAs: these stream each selected expert's weight with
# 16-byte loads, dequantizes them as the reference (bf16(w * s)) and accumulates the products
# in an f32 [BK, BN] tile, reduced over BK once per chunk.


@triton.jit
def moe_gemv_gate_up_kernel(x_ptr, ids_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, P, D, F,
                            GROUP_K, NUM_GROUPS, CHUNK, K_PER_SPLIT, A: tl.constexpr,
                            WFMT: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                            BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                            DEQUANT: tl.constexpr, ERF: tl.constexpr, SGLANG: tl.constexpr):
    """SPLIT == 1: h[p, n] = gelu(bf16(x[p // A] @ Wg[e])) * bf16(x[p // A] @ Wu[e]) in f32,
    e = ids[p], h [P, F] f32. SPLIT > 1: the f32 partial sums of this split's K range,
    h [SPLIT, P, 2, F] (gate then up), finished by moe_gelu_combine_kernel: at a narrow
    (tensor-parallel shard) F the column tiles alone leave most SMs idle.
    Grid (P, cdiv(F, BN), SPLIT). Weights dequantized as the reference, bf16(w * s); products
    accumulate in an f32 [BK, BN] tile, reduced every CHUNK rows (CHUNK divides GROUP_K, or is K_PER_SPLIT when NUM_GROUPS is 1;
    BK divides CHUNK; CHUNK divides K_PER_SPLIT)."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e64 = tl.load(ids_ptr + p).to(tl.int64)
    tok = p // A
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < F
    wg_ptr += e64 * stored_rows(D, WFMT) * F
    wu_ptr += e64 * stored_rows(D, WFMT) * F
    sg_ptr += e64 * NUM_GROUPS * F
    su_ptr += e64 * NUM_GROUPS * F
    x_ptr += tok.to(tl.int64) * D
    acc_g = tl.zeros([BN], dtype=tl.float32)
    acc_u = tl.zeros([BN], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for c1 in range(0, K_PER_SPLIT, CHUNK):  # the last split may run past D: masked
        k1 = k_lo + c1
        if WFMT != 0:  # a chunk lies in one scale group
            grp = k1 // GROUP_K
            s_ok = n_ok & (k1 < D)
            s_g = tl.load(sg_ptr + grp * F + n, mask=s_ok, other=0.0).to(tl.float32)
            s_u = tl.load(su_ptr + grp * F + n, mask=s_ok, other=0.0).to(tl.float32)
        part_g = tl.zeros([BK, BN], dtype=tl.float32)
        part_u = tl.zeros([BK, BN], dtype=tl.float32)
        for c0 in range(0, CHUNK, BK):
            kk = k1 + c0 + tl.arange(0, BK)
            offs = w_offsets(kk[:, None], n[None, :], F, WFMT)
            if EVEN_K and EVEN_N:
                xk = tl.load(x_ptr + kk).to(tl.float32)
                wg = tl.load(wg_ptr + offs)
                wu = tl.load(wu_ptr + offs)
            else:
                k_ok = kk < D
                xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                wg = tl.load(wg_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                wu = tl.load(wu_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            if WFMT != 0:  # the reference's weights, bf16(w * s) (SPEC 3)
                part_g += dequant_f32(wg, kk, s_g, WFMT, DEQUANT) * xk[:, None]
                part_u += dequant_f32(wu, kk, s_u, WFMT, DEQUANT) * xk[:, None]
            else:
                part_g += wg.to(tl.float32) * xk[:, None]
                part_u += wu.to(tl.float32) * xk[:, None]
        acc_g += tl.sum(part_g, 0)
        acc_u += tl.sum(part_u, 0)
    if SPLIT == 1:
        tl.store(h_ptr + p.to(tl.int64) * F + n, _gelu_glu(acc_g, acc_u, ERF, SGLANG), mask=n_ok)
    else:
        row = h_ptr + ((pid_k * P + p) * 2).to(tl.int64) * F
        tl.store(row + n, acc_g, mask=n_ok)
        tl.store(row + F + n, acc_u, mask=n_ok)


# The same GEMV contract on the tensor cores (MoeTiles.GMMA): each pair's x is the left operand
# padded to 16 rows (row 0 real) and the dequantized tile bf16(w * s) [BK, BN] the right one,
# loaded as stored (N contiguous); the MMA sums the exact bf16 products in f32, as XLA's dot.
# At the reference's rounding the per-element FMAs of the kernels above are ALU-bound; here the
# ALU only dequantizes (bench/moe_xw_experiment.py at bddc82d: 73 % of copy for gate/up).


@triton.jit
def _dot_f32_rows(hk, w, acc, F32: tl.constexpr):
    """acc + hk @ w for f32 rows hk on the tensor cores: hk as bf16 hi + lo, two MMAs."""
    h_hi = hk.to(tl.bfloat16)
    h_lo = (hk - h_hi.to(tl.float32)).to(tl.bfloat16)
    return dot(h_lo, w, dot(h_hi, w, acc, F32), F32)


@triton.jit
def moe_mma_gemv_gate_up_kernel(x_ptr, ids_ptr, wg_ptr, wu_ptr, sg_ptr, su_ptr, h_ptr, P, D, F,
                                GROUP_K, NUM_GROUPS, CHUNK, K_PER_SPLIT, A: tl.constexpr,
                                WFMT: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                                BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                                ERF: tl.constexpr, SGLANG: tl.constexpr, F32: tl.constexpr):
    """moe_gemv_gate_up_kernel's contract (grid, outputs, CHUNK) on the tensor cores."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e64 = tl.load(ids_ptr + p).to(tl.int64)
    tok = p // A
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < F
    wg_ptr += e64 * stored_rows(D, WFMT) * F
    wu_ptr += e64 * stored_rows(D, WFMT) * F
    sg_ptr += e64 * NUM_GROUPS * F
    su_ptr += e64 * NUM_GROUPS * F
    x_ptr += tok.to(tl.int64) * D
    acc_g = tl.zeros([16, BN], dtype=tl.float32)
    acc_u = tl.zeros([16, BN], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for c1 in range(0, K_PER_SPLIT, CHUNK):  # the last split may run past D: masked
        k1 = k_lo + c1
        if WFMT != 0:  # a chunk lies in one scale group
            grp = k1 // GROUP_K
            s_ok = n_ok & (k1 < D)
            s_g = tl.load(sg_ptr + grp * F + n, mask=s_ok, other=0.0).to(tl.float32)
            s_u = tl.load(su_ptr + grp * F + n, mask=s_ok, other=0.0).to(tl.float32)
        for c0 in range(0, CHUNK, BK):
            if WFMT == 2:  # int4: BK / 2 byte rows, each x's rows 2r and 2r + 1 (int4_pair_bf16)
                r = (k1 + c0) // 2 + tl.arange(0, BK // 2)
                r_ok = 2 * r < D
                x_even = row0(x_ptr, 2 * r, r_ok, 16)
                x_odd = row0(x_ptr, 2 * r + 1, r_ok, 16)
                g_even, g_odd = int4_pair_bf16(wg_ptr, r, n, F, r_ok, n_ok, s_g, EVEN_K and EVEN_N)
                u_even, u_odd = int4_pair_bf16(wu_ptr, r, n, F, r_ok, n_ok, s_u, EVEN_K and EVEN_N)
                acc_g = dot(x_odd, g_odd, dot(x_even, g_even, acc_g, F32), F32)
                acc_u = dot(x_odd, u_odd, dot(x_even, u_even, acc_u, F32), F32)
            else:
                kk = k1 + c0 + tl.arange(0, BK)
                offs = w_offsets(kk[:, None], n[None, :], F, WFMT)
                k_ok = kk < D
                xk = row0(x_ptr, kk, k_ok, 16)
                if EVEN_K and EVEN_N:
                    wg = tl.load(wg_ptr + offs)
                    wu = tl.load(wu_ptr + offs)
                else:
                    wg = tl.load(wg_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                    wu = tl.load(wu_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                if WFMT != 0:  # the reference's weights, bf16(w * s) (SPEC 3)
                    wg = dequant_bf16(wg, kk, s_g, WFMT)
                    wu = dequant_bf16(wu, kk, s_u, WFMT)
                acc_g = dot(xk, wg, acc_g, F32)
                acc_u = dot(xk, wu, acc_u, F32)
    g = tl.sum(acc_g, 0)  # rows 1.. are 0
    u = tl.sum(acc_u, 0)
    if SPLIT == 1:
        tl.store(h_ptr + p.to(tl.int64) * F + n, _gelu_glu(g, u, ERF, SGLANG), mask=n_ok)
    else:
        row = h_ptr + ((pid_k * P + p) * 2).to(tl.int64) * F
        tl.store(row + n, g, mask=n_ok)
        tl.store(row + F + n, u, mask=n_ok)


@triton.jit
def moe_mma_gemv_down_kernel(h_ptr, ids_ptr, wd_ptr, sd_ptr, gates_ptr, out_ptr, P, D, F,
                             GROUP_K, NUM_GROUPS, CHUNK, K_PER_SPLIT, WFMT: tl.constexpr,
                             BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                             EVEN_N: tl.constexpr, SGLANG: tl.constexpr, F32: tl.constexpr):
    """moe_gemv_down_kernel's contract on the tensor cores; the f32 h enters as bf16 hi + lo
    (two MMAs, as moe_down_kernel)."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e64 = tl.load(ids_ptr + p).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < D
    wd_ptr += e64 * stored_rows(F, WFMT) * D
    sd_ptr += e64 * NUM_GROUPS * D
    h_ptr += p.to(tl.int64) * F
    acc = tl.zeros([16, BN], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for c1 in range(0, K_PER_SPLIT, CHUNK):  # the last split may run past F: masked
        k1 = k_lo + c1
        if WFMT != 0:  # a chunk lies in one scale group
            grp = k1 // GROUP_K
            s_d = tl.load(sd_ptr + grp * D + n, mask=n_ok & (k1 < F), other=0.0).to(tl.float32)
        for c0 in range(0, CHUNK, BK):
            if WFMT == 2:  # int4: BK / 2 byte rows, each h's rows 2r and 2r + 1 (int4_pair_bf16)
                r = (k1 + c0) // 2 + tl.arange(0, BK // 2)
                r_ok = 2 * r < F
                w_even, w_odd = int4_pair_bf16(wd_ptr, r, n, D, r_ok, n_ok, s_d, EVEN_K and EVEN_N)
                acc = _dot_f32_rows(row0(h_ptr, 2 * r, r_ok, 16), w_even, acc, F32)
                acc = _dot_f32_rows(row0(h_ptr, 2 * r + 1, r_ok, 16), w_odd, acc, F32)
            else:
                kk = k1 + c0 + tl.arange(0, BK)
                offs = w_offsets(kk[:, None], n[None, :], D, WFMT)
                k_ok = kk < F
                if EVEN_K and EVEN_N:
                    w = tl.load(wd_ptr + offs)
                else:
                    w = tl.load(wd_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
                if WFMT != 0:  # the reference's weights, bf16(w * s), times f32 h (SPEC 2.6, 3)
                    w = dequant_bf16(w, kk, s_d, WFMT)
                acc = _dot_f32_rows(row0(h_ptr, kk, k_ok, 16), w, acc, F32)
    out = tl.sum(acc, 0)
    gate = tl.load(gates_ptr + p)
    if not SGLANG:
        gate = gate.to(tl.bfloat16).to(tl.float32)
    tl.store(out_ptr + (pid_k.to(tl.int64) * P + p) * D + n, out * gate, mask=n_ok)


@triton.jit
def moe_gelu_combine_kernel(part_ptr, h_ptr, P, F, SPLIT: tl.constexpr, BN: tl.constexpr,
                            ERF: tl.constexpr, SGLANG: tl.constexpr):
    """h[p, n] = gelu(bf16(sum_s g)) * bf16(sum_s u) (f32) from the split-K partials
    part [SPLIT, P, 2, F] f32 of moe_gemv_gate_up_kernel; grid (P, cdiv(F, BN))."""
    p = tl.program_id(0)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = n < F
    g = tl.zeros([BN], dtype=tl.float32)
    u = tl.zeros([BN], dtype=tl.float32)
    for s in range(SPLIT):
        row = part_ptr + ((s * P + p) * 2).to(tl.int64) * F
        g += tl.load(row + n, mask=n_ok, other=0.0)
        u += tl.load(row + F + n, mask=n_ok, other=0.0)
    tl.store(h_ptr + p.to(tl.int64) * F + n, _gelu_glu(g, u, ERF, SGLANG), mask=n_ok)


@triton.jit
def moe_gemv_down_kernel(h_ptr, ids_ptr, wd_ptr, sd_ptr, gates_ptr, out_ptr, P, D, F, GROUP_K,
                         NUM_GROUPS, CHUNK, K_PER_SPLIT, WFMT: tl.constexpr, BN: tl.constexpr,
                         BK: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
                         DEQUANT: tl.constexpr, SGLANG: tl.constexpr):
    """out[split, p, n] = bf16(gate[p]) * (h[p, ks] @ Wd[e, ks, n]) over this split's ks, e = ids[p],
    h f32 (SGLANG: the f32 gate); grid (P, cdiv(D, BN), SPLIT). CHUNK as in moe_gemv_gate_up_kernel."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    e64 = tl.load(ids_ptr + p).to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < D
    wd_ptr += e64 * stored_rows(F, WFMT) * D
    sd_ptr += e64 * NUM_GROUPS * D
    h_ptr += p.to(tl.int64) * F
    acc = tl.zeros([BN], dtype=tl.float32)
    k_lo = pid_k * K_PER_SPLIT
    for c1 in range(0, K_PER_SPLIT, CHUNK):  # the last split may run past F: masked
        k1 = k_lo + c1
        if WFMT != 0:  # a chunk lies in one scale group
            grp = k1 // GROUP_K
            s_d = tl.load(sd_ptr + grp * D + n, mask=n_ok & (k1 < F), other=0.0).to(tl.float32)
        part = tl.zeros([BK, BN], dtype=tl.float32)
        for c0 in range(0, CHUNK, BK):
            kk = k1 + c0 + tl.arange(0, BK)
            offs = w_offsets(kk[:, None], n[None, :], D, WFMT)
            if EVEN_K and EVEN_N:
                hk = tl.load(h_ptr + kk)
                w = tl.load(wd_ptr + offs)
            else:
                k_ok = kk < F
                hk = tl.load(h_ptr + kk, mask=k_ok, other=0.0)
                w = tl.load(wd_ptr + offs, mask=k_ok[:, None] & n_ok[None, :], other=0)
            if WFMT != 0:  # the reference's weights, bf16(w * s), times f32 h (SPEC 2.6, 3)
                part += dequant_f32(w, kk, s_d, WFMT, DEQUANT) * hk[:, None]
            else:
                part += w.to(tl.float32) * hk[:, None]
        acc += tl.sum(part, 0)
    gate = tl.load(gates_ptr + p)
    if not SGLANG:
        gate = gate.to(tl.bfloat16).to(tl.float32)
    acc = acc * gate
    tl.store(out_ptr + (pid_k.to(tl.int64) * P + p) * D + n, acc, mask=n_ok)

// LoRA on the experts (SPEC §7) on the device: the slot table the kernels take by value, and
// the expand step a GEMM epilogue calls per accumulator element (moe_gemm.cu today; another
// GEMM kernel calls the same fm_lora_delta). The map and shrink kernels are in moe_lora.cu.
//
// The slot table is part of a __grid_constant__ kernel parameter: a run uploads nothing, and a
// CUDA graph replays the table as it was at capture (slot changes need a new capture), while
// the token → adapter map and the intermediates are device memory read at replay
// [TAG_LORA_TABLE_BY_VALUE].
//
// Compile-time: FM_DTYPE (the layer's), FM_LORA_SLOTS (the most slots a CUDA LoRA run takes),
// and, where src/backend/cuda/lora.rs passes them, the byte sizes of the parameter structs
// it mirrors (FM_LORA_*_BYTES), checked here so the two sides cannot drift apart.
#pragma once
#include "common.cuh"

#ifndef FM_LORA_SLOTS
#error "FM_LORA_SLOTS must be defined (src/backend/cuda/lora.rs)"
#endif

// One slot's weight for one stage: A [E or 1, rows, cols] for a shrink, B [E or 1, n, r] for
// an expand. Null where the slot gives no delta (never set, cleared or disabled).
struct FmLoraSlot {
    const void* w;
    float scaling;     // s_a: multiplies B's product (expand only)
    int shared_outer;  // expert dimension 1: every expert reads w's first matrix
};

struct FmLoraTable {
    FmLoraSlot slot[FM_LORA_SLOTS];
};

// Which half of a gated GEMM1 intermediate a row of B_gate_up multiplies (SPEC §7: rows of the
// gate take t[0, r), rows of the up part t[r, 2r), in w13's layout).
#define FM_LORA_SPLIT_NONE 0         // non-gated GEMM1, and GEMM2: t[0, r) for every row
#define FM_LORA_SPLIT_HALVES 1       // rows >= half are up rows
#define FM_LORA_SPLIT_INTERLEAVED 2  // odd rows are up rows

// What the epilogue of an FM_LORA GEMM needs: s_a · B[a, e][col, :] · t[route, half(col)].
struct FmLoraExpand {
    FmLoraTable b;          // GEMM1: gate_up_b [E, N1, r]; GEMM2: down_b [E or 1, H, r]
    const int* token_slot;  // [M]: each token's active slot, -1 for none (moe_lora_map)
    const float* t;         // [numel, t_stride]: the shrink's rounded intermediates, by route
    int top_k;
    int n;         // rows of B per expert: the GEMM's n (N1 or H)
    int rank;      // r: columns of B
    int t_stride;  // 2r for a gated GEMM1, else r
    int split;     // FM_LORA_SPLIT_*
    int half;      // with FM_LORA_SPLIT_HALVES: the first up row (I)
};

#ifdef FM_LORA_EXPAND_BYTES
static_assert(sizeof(FmLoraExpand) == FM_LORA_EXPAND_BYTES,
              "FmLoraExpand must mirror ExpandParams in src/backend/cuda/lora.rs");
#endif

#ifdef FM_DTYPE
// The halves of a word of two 16-bit elements, as f32 (the lower address is the low half).
__device__ __forceinline__ float fm_lo16(unsigned w) {
#if FM_DTYPE == 1
    return fm_f16_to_f32((fm_u16)(w & 0xffffu));
#else
    return __uint_as_float(w << 16);
#endif
}
__device__ __forceinline__ float fm_hi16(unsigned w) {
#if FM_DTYPE == 1
    return fm_f16_to_f32((fm_u16)(w >> 16));
#else
    return __uint_as_float(w & 0xffff0000u);
#endif
}

// Elements of the layer dtype in one 16-byte load.
#define FM_LORA_VEC (16 / (int)sizeof(fm_t))

// dst[0, FM_LORA_VEC) = the 16 bytes at p (16-byte aligned) as f32.
__device__ __forceinline__ void fm_lora_load16(const fm_t* p, float (&dst)[FM_LORA_VEC]) {
#if FM_DTYPE == 0
    const float4 v = *(const float4*)p;
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
#else
    const uint4 v = *(const uint4*)p;
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        dst[2 * i] = fm_lo16(w[i]);
        dst[2 * i + 1] = fm_hi16(w[i]);
    }
#endif
}

// Whether output column `col` takes the up half of t (SPEC §7's split of a gated GEMM1).
__device__ __forceinline__ bool fm_lora_is_up(const FmLoraExpand& L, int col) {
    return L.split == FM_LORA_SPLIT_HALVES ? col >= L.half
           : L.split == FM_LORA_SPLIT_INTERLEAVED ? (col & 1) != 0
                                                  : false;
}

// The LoRA delta of one accumulator element of an FM_LORA GEMM: tile row `route` (the flat
// route id m·K + k) and output column `col` of expert `expert`. 0 where the route's token has
// no active slot. The caller adds it to the f32 accumulator before the bias, the router weight
// and the rounding, as the CPU stage does (src/backend/cpu/lora.rs).
__device__ __forceinline__ float fm_lora_delta(const FmLoraExpand& L, int route, int expert,
                                               int col) {
    const int a = L.token_slot[route / L.top_k];
    if (a < 0) return 0.0f;
    const FmLoraSlot& s = L.b.slot[a];
    if (s.w == nullptr) return 0.0f;  // the map resolves inactive slots to -1 already
    const int e = s.shared_outer ? 0 : expert;
    const fm_t* b = (const fm_t*)s.w + ((fm_i64)e * L.n + col) * L.rank;
    const bool up = fm_lora_is_up(L, col);
    const float* t = L.t + (fm_i64)route * L.t_stride + (up ? L.rank : 0);
    float sum = 0.0f;
    const bool vec = L.rank % FM_LORA_VEC == 0 &&
                     (((unsigned long long)b | (unsigned long long)t) & 15ull) == 0;
    if (vec) {
        for (int q = 0; q < L.rank; q += FM_LORA_VEC) {
            float bv[FM_LORA_VEC];
            fm_lora_load16(b + q, bv);
#pragma unroll
            for (int v = 0; v < FM_LORA_VEC; v += 4) {
                const float4 tv = *(const float4*)(t + q + v);
                sum += bv[v] * tv.x + bv[v + 1] * tv.y + bv[v + 2] * tv.z + bv[v + 3] * tv.w;
            }
        }
    } else {
        for (int q = 0; q < L.rank; ++q) sum += fm_load(b[q]) * t[q];
    }
    return s.scaling * sum;
}

#if FM_DTYPE != 0
// The route's active slot whose B this expand has (-1: none, or no route).
__device__ __forceinline__ int fm_lora_slot_of(const FmLoraExpand& L, int route) {
    if (route < 0) return -1;
    const int a = L.token_slot[route / L.top_k];
    return a >= 0 && L.b.slot[a].w != nullptr ? a : -1;
}

// Two elements of the layer dtype packed as an MMA operand word (the lower k in the low half).
__device__ __forceinline__ unsigned fm_lora_pack(float lo, float hi) {
    return (unsigned)fm_store(lo) | ((unsigned)fm_store(hi) << 16);
}

// One A fragment of t (rows lo and hi, ranks k0 + 2·(lane%4) + {0, 1, 8, 9}) at offset `off`
// into each route's t row; zero for a row whose slot is not `a`, and past the rank. t holds
// values already rounded to the layer dtype, so the repacking is exact.
__device__ __forceinline__ void fm_lora_t_frag(const FmLoraExpand& L, int route_lo,
                                               int route_hi, bool lo_on, bool hi_on, int off,
                                               int k0, unsigned (&a)[4]) {
    const int k = k0 + 2 * (threadIdx.x % 4);
    float v[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool on = h == 0 ? lo_on : hi_on;
        const float* t = L.t + (fm_i64)(h == 0 ? route_lo : route_hi) * L.t_stride + off;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int kq = k + (q / 2) * 8 + (q % 2);
            v[h][q] = on && kq < L.rank ? t[kq] : 0.0f;
        }
    }
    a[0] = fm_lora_pack(v[0][0], v[0][1]);
    a[1] = fm_lora_pack(v[1][0], v[1][1]);
    a[2] = fm_lora_pack(v[0][2], v[0][3]);
    a[3] = fm_lora_pack(v[1][2], v[1][3]);
}

// Adds the LoRA delta s_a · B[a, e][col, :] · t[route, half(col)] to a warp's accumulator
// fragments in mma.sync's m16n8 C layout, which wgmma's accumulators share: this lane holds
// tile rows whose routes are route_lo and route_hi (8 apart), and, for j < NJ, columns
// col0 + 8j + 2·(lane%4) + {0, 1} in acc[4j + {0, 1}] (row lo) and acc[4j + {2, 3}] (row hi);
// col0 is the warp's first column. Every lane of the warp calls it (the MMAs are warp-wide).
//
// A tile's rows may belong to different adapters, so it runs once per distinct active slot
// among the warp's 16 rows, with the rows of other slots zeroed in t's fragment: per slot and
// 16 ranks, one m16n8k16 MMA per 8 columns (two for a split gated GEMM1, one per half of t).
// The per-element expand it replaces read B and t (96 bytes at r = 16) per output element
// and tripled the GEMMs' time at Qwen3 M = 1024 (ncu).
//
// PAIRED (a GEMM1 with the activation fused, halves layout): tile column n is W row
// n / 2 + (n odd) · I, so B's row is that and odd columns are the up half.
template <int NJ, bool PAIRED>
__device__ __forceinline__ void fm_lora_expand_frags(const FmLoraExpand& L, int route_lo,
                                                     int route_hi, int expert, int col0,
                                                     float* acc) {
    const int lane = threadIdx.x % 32;
    const int a_lo = fm_lora_slot_of(L, route_lo), a_hi = fm_lora_slot_of(L, route_hi);
    const bool split = L.split != FM_LORA_SPLIT_NONE;
    int pending_lo = a_lo, pending_hi = a_hi;  // -1 once this lane's row is done
    for (;;) {
        const int mine = min(pending_lo < 0 ? FM_LORA_SLOTS : pending_lo,
                             pending_hi < 0 ? FM_LORA_SLOTS : pending_hi);
        const int a = __reduce_min_sync(FM_FULL_MASK, mine);
        if (a >= FM_LORA_SLOTS) break;
        if (pending_lo == a) pending_lo = -1;
        if (pending_hi == a) pending_hi = -1;
        const FmLoraSlot& s = L.b.slot[a];
        const fm_t* b = (const fm_t*)s.w + (fm_i64)(s.shared_outer ? 0 : expert) * L.n * L.rank;
        const bool pairs = (L.rank % 2 == 0) && (((unsigned long long)b & 3ull) == 0);
        for (int k0 = 0; k0 < L.rank; k0 += 16) {
            unsigned t_gate[4], t_up[4];
            fm_lora_t_frag(L, route_lo, route_hi, a_lo == a, a_hi == a, 0, k0, t_gate);
            if (split) fm_lora_t_frag(L, route_lo, route_hi, a_lo == a, a_hi == a, L.rank, k0, t_up);
            const int kb = k0 + 2 * (lane % 4);
#pragma unroll
            for (int j = 0; j < NJ; ++j) {
                // B's fragment: column col0 + 8j + lane/4 of the output, ranks kb + {0, 1, 8, 9}
                const int n = col0 + 8 * j + lane / 4;
                unsigned bw[2] = {0u, 0u};
                if (n < L.n) {
                    const int b_row = PAIRED ? (n >> 1) + (n & 1) * L.half : n;
                    const fm_t* row = b + (fm_i64)b_row * L.rank;
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int k = kb + 8 * h;
                        if (pairs && k + 1 < L.rank)
                            bw[h] = *(const unsigned*)(row + k);
                        else if (k < L.rank)
                            bw[h] = (unsigned)row[k] | (k + 1 < L.rank ? (unsigned)row[k + 1] << 16 : 0u);
                    }
                }
                float d_gate[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d_up[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                fm_mma(d_gate, t_gate, bw[0], bw[1]);
                if (split) fm_mma(d_up, t_up, bw[0], bw[1]);
                const int c = col0 + 8 * j + 2 * (lane % 4);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const bool up = PAIRED ? (q % 2) == 1 : split && fm_lora_is_up(L, c + (q % 2));
                    acc[4 * j + q] += s.scaling * (up ? d_up[q] : d_gate[q]);
                }
            }
        }
    }
}
#endif  // FM_DTYPE != 0

#endif  // FM_DTYPE

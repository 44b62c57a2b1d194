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
// into each row's t (t_lo, t_hi: the rows of L.t, or their copies in shared memory); zero for
// a row that is off, and past the rank. t holds values
// already rounded to the layer dtype, so the repacking is exact. PAIRS: r even and t 8-byte
// aligned, so ranks k, k + 1 (k even) are one float2 with one predicate: half the loads.
template <bool PAIRS>
__device__ __forceinline__ void fm_lora_t_frag(const FmLoraExpand& L, const float* t_lo,
                                               const float* t_hi, bool lo_on, bool hi_on,
                                               int off, int k0, unsigned (&a)[4]) {
    const int k = k0 + 2 * (threadIdx.x % 4);
    float v[2][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bool on = h == 0 ? lo_on : hi_on;
        const float* t = (h == 0 ? t_lo : t_hi) + off;
#pragma unroll
        for (int q = 0; q < 4; q += 2) {
            const int kq = k + (q / 2) * 8;
            if (PAIRS) {
                const float2 w = on && kq < L.rank ? *(const float2*)(t + kq) : float2{0.0f, 0.0f};
                v[h][q] = w.x;
                v[h][q + 1] = w.y;
            } else {
                v[h][q] = on && kq < L.rank ? t[kq] : 0.0f;
                v[h][q + 1] = on && kq + 1 < L.rank ? t[kq + 1] : 0.0f;
            }
        }
    }
    a[0] = fm_lora_pack(v[0][0], v[0][1]);
    a[1] = fm_lora_pack(v[1][0], v[1][1]);
    a[2] = fm_lora_pack(v[0][2], v[0][3]);
    a[3] = fm_lora_pack(v[1][2], v[1][3]);
}

// An expand pass (one slot, 16 ranks) is a list of m16n8k16 MMAs, its units. Without PAIRED,
// unit u is fragment j = u: B's columns col0 + 8j + {0..7}, and with a split gated GEMM1 two
// MMAs (one per half of t) whose outputs it picks per column. With PAIRED, units 2P and 2P + 1
// are the gate and the up MMA of fragments 2P and 2P + 1: block column 2p + f is the tile's
// column col0 + 8(2P + f) + 2p (gate) or that + 1 (up), so every output is used and a pass
// takes half the MMAs. Each output element is still its own dot product of the same t row and
// B row, so the values do not change.
#define FM_LORA_UNITS(NJ, PAIRED) ((PAIRED) ? 2 * (((NJ) + 1) / 2) : (NJ))

// GEMM2's expand has one half of t (SPLIT_NONE) at compile time: no up MMAs, no registers
// for their outputs.
#if defined(FM_GEMM_MODE) && FM_GEMM_MODE == 2
#define FM_LORA_ONE_HALF 1
#else
#define FM_LORA_ONE_HALF 0
#endif

// How many units load their B words together before their MMAs: one L2 round trip per chunk
// (the first with t's loads) instead of one per fragment (ncu: the serialized loads cost
// ~150 µs per GEMM at Qwen3 M = 1024). The most that keep the wgmma 64×128 LoRA GEMMs at
// ≤ 168 registers, so 3 CTAs per SM (ptxas, sm_90a: GEMM1 and GEMM2 168 at 6; at 8 GEMM1
// 192, GEMM2 179).
#ifndef FM_LORA_EXPAND_CHUNK
#define FM_LORA_EXPAND_CHUNK 6
#endif

// This lane's B words of units [u0, u0 + C) (those < U): column lane/4 of each unit's block,
// ranks kb + {0, 1} and kb + {8, 9}; zero past the rank and for columns past n. Predicated
// loads, no branch, so a chunk's loads issue back to back. WORDS: r even and B 4-byte
// aligned (and t 8-byte aligned, fm_lora_t_frag), a word per two ranks (kb is even, so
// kb + 1 < r is kb < r); else 16-bit loads.
template <int NJ, bool PAIRED, bool WORDS, int C>
__device__ __forceinline__ void fm_lora_b_frags(const FmLoraExpand& L, const fm_t* b, int col0,
                                                int u0, int kb, unsigned (&bw)[C][2]) {
    const int g = threadIdx.x % 32 / 4;
    // The lane's tile column and B row in unit 0; a unit further is a uniform step, so one
    // lane pointer serves them all (per-unit 64-bit row offsets cost ~50 registers).
    const int col = PAIRED ? col0 + 8 * (g & 1) + 2 * (g >> 1) : col0 + g;
    const fm_t* row0 = b + (fm_i64)(PAIRED ? col / 2 : col) * L.rank;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int u = u0 + c;
        bool on;
        const fm_t* row;
        if (PAIRED) {  // fragment 2(u/2) + (g & 1); the up unit's row is I further
            on = u < FM_LORA_UNITS(NJ, PAIRED) && 2 * (u / 2) + (g & 1) < NJ &&
                 col + 16 * (u / 2) < L.n;
            row = row0 + (fm_i64)(8 * (u / 2) + (u % 2) * L.half) * L.rank;
        } else {
            on = u < NJ && col + 8 * u < L.n;
            row = row0 + (fm_i64)(8 * u) * L.rank;
        }
        // An element that is off loads b[0] (always there) and is zeroed: a load or address
        // computed under a predicate leaves its register live back to the kernel's start in
        // ptxas's allocation, which cost ~50 registers across the main loop.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int k = kb + 8 * h;
            if (WORDS) {
                const bool ok = on && k + 1 < L.rank;
                const unsigned w = *(const unsigned*)(ok ? row + k : b);
                bw[c][h] = ok ? w : 0u;
            } else {
                const bool ok_lo = on && k < L.rank, ok_hi = on && k + 1 < L.rank;
                const unsigned lo = (unsigned)*(ok_lo ? row + k : b);
                const unsigned hi = (unsigned)*(ok_hi ? row + k + 1 : b);
                bw[c][h] = (ok_lo ? lo : 0u) | (ok_hi ? hi : 0u) << 16;
            }
        }
    }
}

// Where an expand pass finds B with FM_LORA_B_SMEM (fm_lora_stage_b): the CTA's copy of its
// tile's B rows, row j of a slot's tile holding B's row for tile column j (fm_w_row), `pitch`
// bytes apart. Null `tile`: B is read from global memory.
struct FmLoraBTile {
    const unsigned char* tile;  // the first slot's tile (generic address of shared memory)
    int pitch;       // bytes between rows
    int slot_bytes;  // bytes between slots' tiles
    int n0;          // the tile's first column
    // this lane's two rows of t (rows lo and hi) in shared memory; null: from L.t
    const float* t_lo;
    const float* t_hi;
};

// fm_lora_b_frags from the CTA's shared copy: the same words, the same zeros.
template <int NJ, bool PAIRED, int C>
__device__ __forceinline__ void fm_lora_b_frags_shared(const FmLoraExpand& L,
                                                       const FmLoraBTile& bt, int col0, int u0,
                                                       int kb, unsigned (&bw)[C][2]) {
    const int g = threadIdx.x % 32 / 4;
    const int col = PAIRED ? col0 + 8 * (g & 1) + 2 * (g >> 1) : col0 + g;
    const int j0 = col - bt.n0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
        const int u = u0 + c;
        bool on;
        int j;  // the tile column whose W row (and so B row) this unit's word comes from
        if (PAIRED) {
            on = u < FM_LORA_UNITS(NJ, PAIRED) && 2 * (u / 2) + (g & 1) < NJ &&
                 col + 16 * (u / 2) < L.n;
            j = j0 + 16 * (u / 2) + u % 2;
        } else {
            on = u < NJ && col + 8 * u < L.n;
            j = j0 + 8 * u;
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int k = kb + 8 * h;
            const bool ok = on && k + 1 < L.rank;
            const unsigned w = *(const unsigned*)(bt.tile + (ok ? j * bt.pitch + 2 * k : 0));
            bw[c][h] = ok ? w : 0u;
        }
    }
}

// One expand pass (slot a, whose B is at b; ranks k0 + [0, 16)) over the warp's units, C at a
// time: the chunk's B loads, then its MMAs, acc += s · the outputs (fm_lora_expand_frags).
// t's rows: with SHARED the CTA's copies (bt), else the routes' rows of L.t, addressed here
// as before the shared path existed (hoisted out of the slot loop, the two 64-bit pointers
// cost the mma.sync GEMMs registers; Qwen3 M = 64 ran 1.5 % slower).
template <int NJ, bool PAIRED, bool WORDS, bool SHARED, int C>
__device__ __forceinline__ void fm_lora_pass(const FmLoraExpand& L, int route_lo, int route_hi,
                                             bool lo_on, bool hi_on, const fm_t* b,
                                             const FmLoraBTile& bt, int col0, int k0,
                                             bool split, float scaling, float* acc) {
    constexpr int U = FM_LORA_UNITS(NJ, PAIRED);
    const int lane = threadIdx.x % 32;
    const float* t_lo = SHARED ? bt.t_lo : L.t + (fm_i64)route_lo * L.t_stride;
    const float* t_hi = SHARED ? bt.t_hi : L.t + (fm_i64)route_hi * L.t_stride;
    // t's loads in the same block as the first chunk's, so that they are in flight together
    unsigned t_gate[4], t_up[4];
    fm_lora_t_frag<WORDS>(L, t_lo, t_hi, lo_on, hi_on, 0, k0, t_gate);
    fm_lora_t_frag<WORDS>(L, t_lo, t_hi, split && lo_on, split && hi_on, L.rank, k0, t_up);
    const int kb = k0 + 2 * (lane % 4);
#pragma unroll
    for (int u0 = 0; u0 < U; u0 += C) {
        // A chunk whose columns are all past n has nothing to add. The test also makes each
        // chunk a block of its own: ptxas otherwise moves every chunk's loads ahead of the
        // pass's MMAs, all their words live at once.
        if (u0 > 0 && col0 + 8 * (PAIRED ? u0 & ~1 : u0) >= L.n) break;
        unsigned bw[C][2];
        if (SHARED)
            fm_lora_b_frags_shared<NJ, PAIRED, C>(L, bt, col0, u0, kb, bw);
        else
            fm_lora_b_frags<NJ, PAIRED, WORDS, C>(L, b, col0, u0, kb, bw);
#pragma unroll
        for (int c = 0; c < C; ++c) {
            const int u = u0 + c;
            if (u >= U) break;
            if (PAIRED) {
                // d: row lo of fragments 2P, 2P + 1, then row hi of both; h: gate 0, up 1
                const int P = u / 2, h = u % 2;
                float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                fm_mma(d, h == 0 ? t_gate : t_up, bw[c][0], bw[c][1]);
#pragma unroll
                for (int f = 0; f < 2; ++f) {
                    const int j = 2 * P + f;
                    if (j >= NJ) break;
                    acc[4 * j + h] += scaling * d[f];
                    acc[4 * j + 2 + h] += scaling * d[2 + f];
                }
            } else {
                const int j = u;
                float d_gate[4] = {0.0f, 0.0f, 0.0f, 0.0f}, d_up[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                fm_mma(d_gate, t_gate, bw[c][0], bw[c][1]);
                if (split) fm_mma(d_up, t_up, bw[c][0], bw[c][1]);
                const int col = col0 + 8 * j + 2 * (lane % 4);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const bool up = split && fm_lora_is_up(L, col + (q % 2));
                    acc[4 * j + q] += scaling * (up ? d_up[q] : d_gate[q]);
                }
            }
        }
    }
}

// Adds the LoRA delta s_a · B[a, e][col, :] · t[route, half(col)] to a warp's accumulator
// fragments in mma.sync's m16n8 C layout, which wgmma's accumulators share: this lane holds
// tile rows whose routes are route_lo and route_hi (8 apart), and, for j < NJ, columns
// col0 + 8j + 2·(lane%4) + {0, 1} in acc[4j + {0, 1}] (row lo) and acc[4j + {2, 3}] (row hi);
// col0 is the warp's first column. Every lane of the warp calls it (the MMAs are warp-wide).
//
// A tile's rows may belong to different adapters, so it runs once per distinct active slot
// among the warp's 16 rows, with the rows of other slots zeroed in t's fragment: per slot and
// 16 ranks, one pass of MMAs over the warp's columns (FM_LORA_UNITS).
// The per-element expand it replaces read B and t (96 bytes at r = 16) per output element
// and tripled the GEMMs' time at Qwen3 M = 1024 (ncu).
//
// PAIRED (a GEMM1 with the activation fused, halves layout, so split): tile column n is W
// row n / 2 + (n odd) · I, so B's row is that and odd columns are the up half.
//
// a_lo, a_hi: the rows' slots (fm_lora_slot_of). With `batch`, the slots in it only; with bt.tile set (fm_lora_stage_b), B from there: slot
// a's tile is the popc(batch below a)-th.
template <int NJ, bool PAIRED>
__device__ __forceinline__ void fm_lora_expand_frags(const FmLoraExpand& L, int route_lo,
                                                     int route_hi, int a_lo, int a_hi,
                                                     int expert, int col0, float* acc,
                                                     const FmLoraBTile& bt, fm_u64 batch) {
    constexpr int U = FM_LORA_UNITS(NJ, PAIRED);
    // a unit of a split GEMM1 without PAIRED holds two MMAs' outputs (a third of the chunk:
    // at half, the interleaved f16 64×64 mma.sync GEMM1 spilled)
    constexpr int C0 =
        PAIRED || FM_LORA_ONE_HALF ? FM_LORA_EXPAND_CHUNK : FM_LORA_EXPAND_CHUNK / 3;
    constexpr int C = U < C0 ? U : C0;
    // the 16-bit path has twice the loads per unit: half the chunk keeps this rare path from
    // setting the kernel's register count
    constexpr int C_HALVES = (C + 1) / 2;
    const bool split = PAIRED || (!FM_LORA_ONE_HALF && L.split != FM_LORA_SPLIT_NONE);
    // -1 once this lane's row is done, or where its slot is not in the batch
    int pending_lo = a_lo >= 0 && (batch >> a_lo & 1) ? a_lo : -1;
    int pending_hi = a_hi >= 0 && (batch >> a_hi & 1) ? a_hi : -1;
    for (;;) {
        const int mine = min(pending_lo < 0 ? FM_LORA_SLOTS : pending_lo,
                             pending_hi < 0 ? FM_LORA_SLOTS : pending_hi);
        const int a = __reduce_min_sync(FM_FULL_MASK, mine);
        if (a >= FM_LORA_SLOTS) break;
        if (pending_lo == a) pending_lo = -1;
        if (pending_hi == a) pending_hi = -1;
        const FmLoraSlot& s = L.b.slot[a];
        const fm_t* b = (const fm_t*)s.w + (fm_i64)(s.shared_outer ? 0 : expert) * L.n * L.rank;
        if (bt.tile != nullptr) {  // fm_lora_stage_b checked what the word loads need
            FmLoraBTile slot_tile = bt;
            slot_tile.tile += __popcll(batch & ((1ull << a) - 1)) * bt.slot_bytes;
            for (int k0 = 0; k0 < L.rank; k0 += 16)
                fm_lora_pass<NJ, PAIRED, true, true, C>(L, route_lo, route_hi, a_lo == a,
                                                        a_hi == a, b, slot_tile, col0, k0, split,
                                                        s.scaling, acc);
            continue;
        }
        const bool words = L.rank % 2 == 0 && ((unsigned long long)b & 3ull) == 0 &&
                           ((unsigned long long)L.t & 7ull) == 0;
        for (int k0 = 0; k0 < L.rank; k0 += 16) {
            if (words)
                fm_lora_pass<NJ, PAIRED, true, false, C>(L, route_lo, route_hi, a_lo == a,
                                                         a_hi == a, b, bt, col0, k0, split,
                                                         s.scaling, acc);
            else
                fm_lora_pass<NJ, PAIRED, false, false, C_HALVES>(L, route_lo, route_hi,
                                                                 a_lo == a, a_hi == a, b, bt,
                                                                 col0, k0, split, s.scaling,
                                                                 acc);
        }
    }
}

template <int NJ, bool PAIRED>
__device__ __forceinline__ void fm_lora_expand_frags(const FmLoraExpand& L, int route_lo,
                                                     int route_hi, int expert, int col0,
                                                     float* acc) {
    fm_lora_expand_frags<NJ, PAIRED>(L, route_lo, route_hi, fm_lora_slot_of(L, route_lo),
                                     fm_lora_slot_of(L, route_hi), expert, col0, acc,
                                     FmLoraBTile{nullptr, 0, 0, 0, nullptr, nullptr}, ~0ull);
}
#endif  // FM_DTYPE != 0

#endif  // FM_DTYPE

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
    const bool up = L.split == FM_LORA_SPLIT_HALVES        ? col >= L.half
                    : L.split == FM_LORA_SPLIT_INTERLEAVED ? (col & 1) != 0
                                                           : false;
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

#endif  // FM_DTYPE

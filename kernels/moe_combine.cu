// The last step of SPEC §2. moe_combine: out[m] = round(rsf * sum over k = 0..K-1 of
// y[m, k]), the sum in f32 in k order (deterministic), dropped routes adding nothing.
// moe_zero_dropped (no_combine): the rows of dropped routes, which GEMM2 never writes, become
// zeros. Grid: x = token (route), the batch's M (or M·K) [TAG_GRAPH_SAFE]; y = a chunk of
// blockDim.x · FM_ROW_ITEMS columns.
//
// moe_combine's thread takes FM_ROW_ITEMS consecutive columns, 16-byte loads where the rows
// allow, and reads up to FM_COMBINE_ROUTES routes before it adds any: at decode a token's
// combine is a few hundred threads, and its time is the round trips a thread waits for.
//
// Compile-time variant: FM_DTYPE, FM_ROW_ITEMS.
#include "common.cuh"

struct FmCombineParams {
    const void* y;          // [numel, hidden] (GEMM2's rounded route outputs)
    const int* route_slot;  // [numel]: -1 where the route was dropped
    void* out;              // [M, hidden] (may be hidden itself when inplace)
    int top_k, hidden;
    float rsf;
};

// One thread's FM_ROW_ITEMS columns of a row, as 16-byte words or as elements.
union FmRowPiece {
    uint4 words[FM_ROW_ITEMS * sizeof(fm_t) / 16];
    fm_t items[FM_ROW_ITEMS];
};
static_assert(FM_ROW_ITEMS * sizeof(fm_t) % 16 == 0, "a thread's columns are whole 16-byte words");

// Routes read before they are added: 128 bytes of loads in flight per thread (8 bf16 routes,
// 4 f32 ones), which fits the 64 registers of a 1024-thread block without spilling.
#define FM_COMBINE_ROUTES (128 / (FM_ROW_ITEMS * (int)sizeof(fm_t)))

__device__ __forceinline__ bool fm_aligned16(const void* p) {
    return ((unsigned long long)p & 15) == 0;
}

// The piece at `src`: whole words where `whole`, else the first `n` elements (n < FM_ROW_ITEMS).
__device__ __forceinline__ FmRowPiece fm_load_piece(const fm_t* src, bool whole, int n) {
    FmRowPiece piece;
    if (whole) {
#pragma unroll
        for (int w = 0; w < FM_ROW_ITEMS * (int)sizeof(fm_t) / 16; ++w)
            piece.words[w] = ((const uint4*)src)[w];
    } else {
#pragma unroll
        for (int t = 0; t < FM_ROW_ITEMS; ++t) piece.items[t] = t < n ? src[t] : fm_store(0.0f);
    }
    return piece;
}

extern "C" __global__ void __launch_bounds__(1024) moe_combine(const FmCombineParams p) {
    fm_pdl_wait();  // GEMM2's rows (tile.pdl)
    const int m = blockIdx.x;
    const int h0 = (blockIdx.y * blockDim.x + threadIdx.x) * FM_ROW_ITEMS;
    if (h0 >= p.hidden) return;
    const int n = min(FM_ROW_ITEMS, p.hidden - h0);
    const fm_t* __restrict__ y = (const fm_t*)p.y + (fm_i64)m * p.top_k * p.hidden + h0;
    const int* __restrict__ slots = p.route_slot + (fm_i64)m * p.top_k;
    fm_t* __restrict__ out = (fm_t*)p.out + (fm_i64)m * p.hidden + h0;
    // Every route's row starts 16-byte aligned when the first does and a row is whole words.
    const bool whole = n == FM_ROW_ITEMS && (p.hidden * sizeof(fm_t)) % 16 == 0 &&
                       fm_aligned16(y) && fm_aligned16(out);
    float sum[FM_ROW_ITEMS];
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) sum[t] = 0.0f;
    for (int k0 = 0; k0 < p.top_k; k0 += FM_COMBINE_ROUTES) {
        bool live[FM_COMBINE_ROUTES];
#pragma unroll
        for (int j = 0; j < FM_COMBINE_ROUTES; ++j)
            live[j] = k0 + j < p.top_k && slots[k0 + j] >= 0;
        FmRowPiece piece[FM_COMBINE_ROUTES];
#pragma unroll
        for (int j = 0; j < FM_COMBINE_ROUTES; ++j)
            if (live[j]) piece[j] = fm_load_piece(y + (fm_i64)(k0 + j) * p.hidden, whole, n);
#pragma unroll
        for (int j = 0; j < FM_COMBINE_ROUTES; ++j)
            if (live[j]) {
#pragma unroll
                for (int t = 0; t < FM_ROW_ITEMS; ++t) sum[t] += fm_load(piece[j].items[t]);
            }
    }
    FmRowPiece result;
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) result.items[t] = fm_store(p.rsf * sum[t]);
    if (whole) {
#pragma unroll
        for (int w = 0; w < FM_ROW_ITEMS * (int)sizeof(fm_t) / 16; ++w)
            ((uint4*)out)[w] = result.words[w];
    } else {
#pragma unroll
        for (int t = 0; t < FM_ROW_ITEMS; ++t)
            if (t < n) out[t] = result.items[t];
    }
}

struct FmZeroParams {
    const int* route_slot;  // [numel]
    void* out;              // [numel, hidden]
    int hidden;
};

extern "C" __global__ void __launch_bounds__(1024) moe_zero_dropped(const FmZeroParams p) {
    fm_pdl_wait();  // the route slots, and GEMM2 before the rows it skipped (tile.pdl)
    const int r = blockIdx.x;
    if (p.route_slot[r] >= 0) return;
    fm_t* out = (fm_t*)p.out + (fm_i64)r * p.hidden;
    const int h0 = blockIdx.y * blockDim.x * FM_ROW_ITEMS + threadIdx.x;
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) {
        const int h = h0 + t * blockDim.x;
        if (h < p.hidden) out[h] = fm_store(0.0f);
    }
}

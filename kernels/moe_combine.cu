// The last step of SPEC §2. moe_combine: out[m] = round(rsf * sum over k = 0..K-1 of
// y[m, k]), the sum in f32 in k order (deterministic), dropped routes adding nothing.
// moe_zero_dropped (no_combine): the rows of dropped routes, which GEMM2 never writes, become
// zeros. Grid: x = token (route), the batch's M (or M·K) [TAG_GRAPH_SAFE]; y = a chunk of
// blockDim.x · FM_ROW_ITEMS columns, each thread FM_ROW_ITEMS columns a block apart, so that
// one token's row is many independent loads rather than a few hundred serial ones.
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

extern "C" __global__ void __launch_bounds__(1024) moe_combine(const FmCombineParams p) {
    const int m = blockIdx.x;
    const int h0 = blockIdx.y * blockDim.x * FM_ROW_ITEMS + threadIdx.x;
    const fm_t* __restrict__ y = (const fm_t*)p.y + (fm_i64)m * p.top_k * p.hidden;
    const int* __restrict__ slots = p.route_slot + (fm_i64)m * p.top_k;
    float sum[FM_ROW_ITEMS];
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) sum[t] = 0.0f;
    for (int k = 0; k < p.top_k; ++k) {
        if (slots[k] < 0) continue;
        const fm_t* __restrict__ yk = y + (fm_i64)k * p.hidden;
#pragma unroll
        for (int t = 0; t < FM_ROW_ITEMS; ++t) {
            const int h = h0 + t * blockDim.x;
            if (h < p.hidden) sum[t] += fm_load(yk[h]);
        }
    }
    fm_t* __restrict__ out = (fm_t*)p.out + (fm_i64)m * p.hidden;
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) {
        const int h = h0 + t * blockDim.x;
        if (h < p.hidden) out[h] = fm_store(p.rsf * sum[t]);
    }
}

struct FmZeroParams {
    const int* route_slot;  // [numel]
    void* out;              // [numel, hidden]
    int hidden;
};

extern "C" __global__ void __launch_bounds__(1024) moe_zero_dropped(const FmZeroParams p) {
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

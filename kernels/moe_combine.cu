// The last step of SPEC §2. moe_combine: out[m] = round(rsf * sum over k = 0..K-1 of
// y[m, k]), the sum in f32 in k order (deterministic), dropped routes adding nothing.
// moe_zero_dropped (no_combine): the rows of dropped routes, which GEMM2 never writes, become
// zeros. One CTA per token (per route); the grid is the batch's M (or M·K) [TAG_GRAPH_SAFE].
//
// Compile-time variant: FM_DTYPE.
#include "common.cuh"

struct FmCombineParams {
    const void* y;          // [numel, hidden] (GEMM2's rounded route outputs)
    const int* route_slot;  // [numel]: -1 where the route was dropped
    void* out;              // [M, hidden] (may be hidden itself when inplace)
    int top_k, hidden;
    float rsf;
};

extern "C" __global__ void __launch_bounds__(256) moe_combine(const FmCombineParams p) {
    const int m = blockIdx.x;
    const fm_t* y = (const fm_t*)p.y + (fm_i64)m * p.top_k * p.hidden;
    fm_t* out = (fm_t*)p.out + (fm_i64)m * p.hidden;
    for (int h = threadIdx.x; h < p.hidden; h += blockDim.x) {
        float sum = 0.0f;
        for (int k = 0; k < p.top_k; ++k)
            if (p.route_slot[m * p.top_k + k] >= 0) sum += fm_load(y[(fm_i64)k * p.hidden + h]);
        out[h] = fm_store(p.rsf * sum);
    }
}

struct FmZeroParams {
    const int* route_slot;  // [numel]
    void* out;              // [numel, hidden]
    int hidden;
};

extern "C" __global__ void __launch_bounds__(256) moe_zero_dropped(const FmZeroParams p) {
    const int r = blockIdx.x;
    if (p.route_slot[r] >= 0) return;
    fm_t* out = (fm_t*)p.out + (fm_i64)r * p.hidden;
    for (int h = threadIdx.x; h < p.hidden; h += blockDim.x) out[h] = fm_store(0.0f);
}

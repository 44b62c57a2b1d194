// The activation of SPEC §3 between the GEMMs: a[slot, j] = round(act(g1[slot, ...])), f32
// math on the rounded GEMM1 output, the same formulas as src/activation.rs line by line.
// Grid: x = slot, y = a chunk of blockDim.x · FM_ROW_ITEMS columns; each thread takes
// FM_ROW_ITEMS columns a block apart, so its loads are independent and coalesced (one column
// per thread left a single token's row to a few hundred serial loads). Slots past num_padded
// or holding no route exit at once [TAG_GRAPH_SAFE].
//
// Compile-time variant: FM_DTYPE, FM_ACT and FM_GATED (act.cuh), FM_INTERLEAVED (gate/up
// rows 2j, 2j+1 instead of j, I + j), FM_ROW_ITEMS.
#include "common.cuh"
#include "act.cuh"

struct FmActParams {
    const void* g1;               // [capacity, n1]
    void* act;                    // [capacity, inter]
    const int* sorted_route_ids;  // [capacity]
    const int* num_padded;        // [1]
    int numel, inter;
    float alpha, limit;
};

extern "C" __global__ void __launch_bounds__(1024) moe_act(const FmActParams p) {
    fm_pdl_wait();  // GEMM1's rows (tile.pdl)
    fm_pdl_launch_dependents();
    const int slot = blockIdx.x;
    if (slot >= *p.num_padded || p.sorted_route_ids[slot] >= p.numel) return;
    const int j0 = blockIdx.y * blockDim.x * FM_ROW_ITEMS + threadIdx.x;
    fm_t* __restrict__ out = (fm_t*)p.act + (fm_i64)slot * p.inter;
#if FM_GATED
    const fm_t* __restrict__ g1 = (const fm_t*)p.g1 + (fm_i64)slot * 2 * p.inter;
#else
    const fm_t* __restrict__ g1 = (const fm_t*)p.g1 + (fm_i64)slot * p.inter;
#endif
    float g[FM_ROW_ITEMS], u[FM_ROW_ITEMS];
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) {
        const int j = j0 + t * blockDim.x;
        g[t] = u[t] = 0.0f;
        if (j >= p.inter) continue;
#if FM_GATED && FM_INTERLEAVED
        g[t] = fm_load(g1[2 * j]);
        u[t] = fm_load(g1[2 * j + 1]);
#elif FM_GATED
        g[t] = fm_load(g1[j]);
        u[t] = fm_load(g1[p.inter + j]);
#else
        g[t] = fm_load(g1[j]);
#endif
    }
#pragma unroll
    for (int t = 0; t < FM_ROW_ITEMS; ++t) {
        const int j = j0 + t * blockDim.x;
        if (j >= p.inter) continue;
#if FM_GATED
        out[j] = fm_store(fm_act(g[t], u[t], p.alpha, p.limit));
#else
        out[j] = fm_store(fm_act(g[t]));
#endif
    }
}

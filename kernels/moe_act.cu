// The activation of SPEC §3 between the GEMMs: a[slot, j] = round(act(g1[slot, ...])), f32
// math on the rounded GEMM1 output, the same formulas as src/activation.rs line by line.
// Grid: x = slot, y = a chunk of blockDim.x · FM_ROW_ITEMS columns; each thread takes
// FM_ROW_ITEMS columns a block apart, so its loads are independent and coalesced (one column
// per thread left a single token's row to a few hundred serial loads). Slots past num_padded
// or holding no route exit at once [TAG_GRAPH_SAFE].
//
// Compile-time variant: FM_DTYPE, FM_ACT (src/activation.rs order: 0 silu, 1 gelu,
// 2 gelu_tanh, 3 swiglu_oai, 4 silu_clamp, 5 silu_preclamp, 6 relu2), FM_GATED,
// FM_INTERLEAVED (gate/up rows 2j, 2j+1 instead of j, I + j), FM_ROW_ITEMS.
#include "common.cuh"

struct FmActParams {
    const void* g1;               // [capacity, n1]
    void* act;                    // [capacity, inter]
    const int* sorted_route_ids;  // [capacity]
    const int* num_padded;        // [1]
    int numel, inter;
    float alpha, limit;
};

__device__ __forceinline__ float fm_silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float fm_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float fm_gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}
__device__ __forceinline__ float fm_gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.79788456f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float fm_clamp(float x, float lo, float hi) {
    return fminf(fmaxf(x, lo), hi);
}

#if FM_GATED
__device__ __forceinline__ float fm_act(float g, float u, float alpha, float limit) {
#if FM_ACT == 0
    return fm_silu(g) * u;
#elif FM_ACT == 1
    return fm_gelu_erf(g) * u;
#elif FM_ACT == 2
    return fm_gelu_tanh(g) * u;
#elif FM_ACT == 3
    const float gc = fminf(g, limit);
    const float uc = fm_clamp(u, -limit, limit);
    return gc * fm_sigmoid(alpha * gc) * (uc + 1.0f);
#elif FM_ACT == 4
    return fminf(fm_silu(g), limit) * fm_clamp(u, -limit, limit);
#elif FM_ACT == 5
    return fm_silu(fminf(g, limit)) * fm_clamp(u, -limit, limit);
#else
#error "this activation is not gated"
#endif
}
#else
__device__ __forceinline__ float fm_act(float x) {
#if FM_ACT == 0
    return fm_silu(x);
#elif FM_ACT == 1
    return fm_gelu_erf(x);
#elif FM_ACT == 6
    const float r = fmaxf(x, 0.0f);
    return r * r;
#else
#error "this activation is not non-gated"
#endif
}
#endif

extern "C" __global__ void __launch_bounds__(1024) moe_act(const FmActParams p) {
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

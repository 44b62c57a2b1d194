// The activations of SPEC §3 in f32, the same formulas as src/activation.rs line by line:
// moe_act.cu applies them between the GEMMs, and GEMM1 in its epilogue where it fuses them
// (moe_gemm.cu, FM_FUSED_ACT).
//
// Compile-time: FM_ACT (src/activation.rs order: 0 silu, 1 gelu, 2 gelu_tanh, 3 swiglu_oai,
// 4 silu_clamp, 5 silu_preclamp, 6 relu2) and FM_GATED.
#pragma once

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

// Helpers every fusedmoe kernel shares. No CUDA toolkit header is included: NVRTC declares the
// intrinsics used here (__ballot_sync, __popc, atomicAdd, expf, erff, tanhf) itself, and the
// 16-bit float conversions are written in PTX.
#pragma once

#define FM_FULL_MASK 0xffffffffu

typedef unsigned short fm_u16;
typedef long long fm_i64;
typedef unsigned long long fm_u64;

// Lanes below this one in the warp: for stable compaction with a ballot.
__device__ __forceinline__ unsigned fm_lanes_below(unsigned lane) {
    return (1u << lane) - 1u;
}

// ---------------------------------------------------------------- element types
// FM_DTYPE picks the layer's element type: 0 f32, 1 f16, 2 bf16 (src/dtype.rs's order).
// `fm_t` is its storage type; fm_load/fm_store convert to and from f32, rounding to nearest
// even as the CPU reference's `round` does.

__device__ __forceinline__ float fm_bf16_to_f32(fm_u16 x) {
    return __uint_as_float(((unsigned)x) << 16);
}
__device__ __forceinline__ fm_u16 fm_f32_to_bf16(float x) {
    fm_u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float fm_f16_to_f32(fm_u16 x) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
    return r;
}
__device__ __forceinline__ fm_u16 fm_f32_to_f16(float x) {
    fm_u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}

// Reads element `i` of a float array of the given kind (0 f32, 1 f16, 2 bf16) as f32: biases
// and router weights come as f32 or as the layer dtype.
__device__ __forceinline__ float fm_read_as_f32(const void* p, fm_i64 i, int kind) {
    if (kind == 0) return ((const float*)p)[i];
    const fm_u16 x = ((const fm_u16*)p)[i];
    return kind == 1 ? fm_f16_to_f32(x) : fm_bf16_to_f32(x);
}

#ifdef FM_DTYPE
#if FM_DTYPE == 0
typedef float fm_t;
__device__ __forceinline__ float fm_load(fm_t x) { return x; }
__device__ __forceinline__ fm_t fm_store(float x) { return x; }
#elif FM_DTYPE == 1
typedef fm_u16 fm_t;
__device__ __forceinline__ float fm_load(fm_t x) { return fm_f16_to_f32(x); }
__device__ __forceinline__ fm_t fm_store(float x) { return fm_f32_to_f16(x); }
#elif FM_DTYPE == 2
typedef fm_u16 fm_t;
__device__ __forceinline__ float fm_load(fm_t x) { return fm_bf16_to_f32(x); }
__device__ __forceinline__ fm_t fm_store(float x) { return fm_f32_to_bf16(x); }
#else
#error "FM_DTYPE must be 0 (f32), 1 (f16) or 2 (bf16)"
#endif
#endif

// ---------------------------------------------------------------- async copies and mma

// 16 bytes global -> shared, zero-filled where `valid` is false (nothing is read then).
__device__ __forceinline__ void fm_cp_async16(void* smem, const void* gmem, bool valid) {
    const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
}
// Asks L2 for the 128-byte line holding p and to keep it ahead of lines streamed at normal
// priority (evict_last): nothing waits for it.
__device__ __forceinline__ void fm_prefetch_l2(const void* p) {
    asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void fm_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void fm_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void fm_ldmatrix_x4(unsigned (&r)[4], const void* smem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}
__device__ __forceinline__ void fm_ldmatrix_x2(unsigned (&r)[2], const void* smem) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(a));
}

#if defined(FM_DTYPE) && FM_DTYPE != 0
// c += a · b on the tensor cores, m16n8k16 in the layer's 16-bit type: a is the row-major
// 16x16 fragment, b0/b1 the column-major 16x8 one, c the 16x8 f32 accumulator (PTX ISA,
// "Matrix Fragments for mma.m16n8k16").
__device__ __forceinline__ void fm_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                       unsigned b1) {
#if FM_DTYPE == 2
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}
#endif

// ---------------------------------------------------------------- programmatic dependent launch
// The host may launch a kernel as a programmatic dependent of the one before it in the stream
// (sm_90, option tile.pdl): it can then start while that one still runs. fm_pdl_wait()
// returns once the kernels before it have finished and their writes are visible, so it comes
// before the first read of anything they write; what comes before it may read only what was
// complete before this launch (the layer's weights, and the align step's arrays, which the
// first dependent waits for before it lets the next start). fm_pdl_launch_dependents() lets
// the next dependent start. In a kernel not launched so, or before sm_90, both do nothing.
__device__ __forceinline__ void fm_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void fm_pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

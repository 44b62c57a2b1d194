// The Hopper main loop of moe_gemm (FM_WGMMA 1, sm_90a only; included by moe_gemm.cu, whose
// block walk, row table and epilogue it shares). Each warpgroup (4 warps) issues
// wgmma.mma_async for a 64-row slab of the tile; both operands are read from shared memory,
// where they sit K-major in the 128-byte swizzle. They arrive by the same 16-byte cp.async
// loads as the mma.sync path: A rows are gathered slot by slot through sorted_route_ids, a
// gather the tensor copy engine cannot do on sm_90.
//
// Layout: FM_BK is 64, so a tile row is 128 bytes, one swizzle row; the 16-byte chunk c of
// tile row r sits at chunk c ^ (r % 8), and the pattern repeats every 8 rows (1024 bytes),
// so every stage starts 1024-byte aligned. The warps form FM_WARPS_M = 4 · (warpgroups
// along M) by FM_WARPS_N (warpgroups along N); a warpgroup computes 64 rows by FM_WG_COLS.
//
// Pipeline, FM_STAGES ≥ 3 slots: while the wgmma of k-tile kt runs, the loads of kt + 1 …
// kt + STAGES − 1 are in flight. The slot the newest load takes held k-tile kt − 1, so that
// load waits for a second barrier per k-tile, after every warpgroup has waited for its wgmma
// of kt − 1; with one barrier the prefetch would reach only STAGES − 2 k-tiles ahead.
//
// Everything above the kernel (swizzle, descriptors, wgmma wrappers, mbarriers, the stage
// loader) is shared with the warp-specialised main loop of moe_gemm_wgmma_ws.cuh (FM_WGMMA 2)
// and the multicast one of moe_gemm_wgmma_mc.cuh (FM_WGMMA 3), which include this header
// after it; the kernel at the bottom is FM_WGMMA 1's alone.

#define FM_WG_M (FM_WARPS_M / 4)
#define FM_WG_N FM_WARPS_N
#define FM_WG_COLS (FM_BN / FM_WG_N)
#define FM_ROW_BYTES 128
#define FM_STAGE_BYTES ((FM_BM + FM_BN) * FM_ROW_BYTES)

static_assert(FM_BK == 64, "a tile row is one 128-byte swizzle row");
static_assert(FM_WARPS_M % 4 == 0 && FM_BM == 64 * FM_WG_M, "a warpgroup per 64 rows");
static_assert(FM_WG_COLS == 64 || FM_WG_COLS == 128 || FM_WG_COLS == 256,
              "a warpgroup's columns are one wgmma's N");
static_assert(FM_STAGES >= 3, "one slot computing, one draining, one loading at least");
static_assert(FM_VEC == 8, "16-byte loads only");

#if FM_DTYPE == 2
#define FM_WGMMA_AB ".bf16.bf16"
#else
#define FM_WGMMA_AB ".f16.f16"
#endif

// Byte offset of 16-byte chunk `c` of tile row `r` in the 128-byte swizzle.
__device__ __forceinline__ unsigned fm_swizzled(int r, int c) {
    return r * FM_ROW_BYTES + ((c ^ (r & 7)) << 4);
}

// The shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle starting
// at shared address `addr`: 8-row groups 1024 bytes apart (stride offset), the leading
// offset unused in this mode (1 by convention), swizzle mode 1 (128 bytes) in bits 62-63.
__device__ __forceinline__ fm_u64 fm_wg_desc(unsigned addr) {
    return (fm_u64)((addr & 0x3FFFF) >> 4) | ((fm_u64)1 << 16) | ((fm_u64)(1024 >> 4) << 32) |
           ((fm_u64)1 << 62);
}

__device__ __forceinline__ void fm_wg_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fm_wg_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void fm_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across a wgmma fence or wait.
__device__ __forceinline__ void fm_wg_fence_operand(float& x) {
    asm volatile("" : "+f"(x)::"memory");
}
// cp.async writes through the generic proxy; wgmma reads shared memory through the async one.
__device__ __forceinline__ void fm_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void fm_wgmma_n64(float (&d)[32], fm_u64 da, fm_u64 db) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32" FM_WGMMA_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ void fm_wgmma_n128(float (&d)[64], fm_u64 da, fm_u64 db) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32" FM_WGMMA_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(1));
}

__device__ __forceinline__ void fm_wgmma_n256(float (&d)[128], fm_u64 da, fm_u64 db) {
    asm volatile(
        "{\n.reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32" FM_WGMMA_AB " {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
          "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
          "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
          "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
          "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
          "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
          "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(1));
}

#if FM_WG_COLS == 64
#define FM_WGMMA_TILE fm_wgmma_n64
#elif FM_WG_COLS == 128
#define FM_WGMMA_TILE fm_wgmma_n128
#else
#define FM_WGMMA_TILE fm_wgmma_n256
#endif

// mbarrier at shared address `bar` (8-byte aligned).
__device__ __forceinline__ void fm_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Release (the default of mbarrier.arrive): this thread's shared-memory accesses before it
// happen before the waiter's after its wait.
__device__ __forceinline__ void fm_mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Until the phase of parity `parity` has completed (acquire, the default of try_wait).
__device__ __forceinline__ void fm_mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// 16 bytes global -> shared address `dst`, zero-filled where `valid` is false.
__device__ __forceinline__ void fm_cp_async16_to(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

// One thread's share of every stage load: the k-slice [k0, k0 + 64) of the A rows (tile rows
// [0, BM)) and the W rows (tile rows [BM, BM + BN)), swizzled, over LOADERS threads (`tid` in
// [0, LOADERS): all FM_THREADS of FM_WGMMA 1, the producer warpgroup of FM_WGMMA 2). A
// thread's chunks sit LOADERS apart, so it keeps one 16-byte column (chunk) and rows
// LOADERS / 8 apart, which share one swizzle phase: its shared offsets are one base plus constants, its sources
// one pointer per A row (gathered) plus one W pointer and a constant stride. Everything but
// k0 is set up once; recomputing it per chunk and k-tile (row tests, swizzle, 64-bit index
// math, behind branches) took about 30 instructions per 16-byte copy, and at 128x128 tiles
// that issue work, not the tensor cores, bounded the main loop (ncu: issue slots 53 % busy,
// tensor pipe 45 %). With LOAD_W false it copies the A rows alone (FM_WGMMA 3's W tile comes
// by TMA).
template <int LOADERS, bool LOAD_W = true>
struct FmWgLoader {
    static constexpr int ROWS_PER_PASS = LOADERS / 8;
    static constexpr int A_CHUNKS = FM_BM / ROWS_PER_PASS;
    static constexpr int B_CHUNKS = FM_BN / ROWS_PER_PASS;
    // Sources of the next k-tile: each A row's (gathered), the first W row's; rows that are
    // not copied point at a valid address all the same, so no select sits in the loop.
    const fm_t* a_src[A_CHUNKS];
    const fm_t* b_src;
    fm_i64 b_stride;   // elements between this thread's W rows
    unsigned valid;    // bit i: A row i holds a route; bit A_CHUNKS + i: W row i is inside n
    unsigned dst;      // shared offset of the first chunk within a stage
    int k;             // this thread's next k index (for the kdim test)

    __device__ __forceinline__ FmWgLoader(const FmRows& rows, const FmGemmParams& p,
                                          const fm_t* w_expert, int n0, int tid) {
        static_assert(LOADERS % 8 == 0 && FM_BM % ROWS_PER_PASS == 0 &&
                          FM_BN % ROWS_PER_PASS == 0 && ROWS_PER_PASS % 8 == 0,
                      "whole rows per pass, one swizzle phase per thread");
        static_assert(A_CHUNKS + B_CHUNKS <= 32, "one bit per chunk");
        const int row = tid / 8, chunk = tid % 8;
        k = chunk * 8;
        dst = fm_swizzled(row, chunk);
        const fm_t* a = (const fm_t*)p.a;
        valid = 0;
#pragma unroll
        for (int i = 0; i < A_CHUNKS; ++i) {
            const fm_i64 off = rows.a_offset[row + i * ROWS_PER_PASS];
            a_src[i] = a + (off >= 0 ? off : 0) + k;
            valid |= (off >= 0 ? 1u : 0u) << i;
        }
        if (!LOAD_W) return;
        // rows ROWS_PER_PASS apart (even) keep their half with FM_PAIRED_HALVES
        b_stride = (fm_i64)(ROWS_PER_PASS / FM_W_ROW_STEP) * p.kdim;
        const int n = n0 + row;
        b_src = w_expert + (fm_i64)fm_w_row(p, min(n, p.n - 1)) * p.kdim + k;
#pragma unroll
        for (int i = 0; i < B_CHUNKS; ++i)
            valid |= (n + i * ROWS_PER_PASS < p.n ? 1u : 0u) << (A_CHUNKS + i);
    }

    // Issues the copies of the next k-tile into the stage at shared address `stage`.
    __device__ __forceinline__ void load_next(unsigned stage, const FmGemmParams& p) {
        const unsigned live = k < p.kdim ? valid : 0u;  // kdim is a multiple of 8 here
        const unsigned d = stage + dst;
#pragma unroll
        for (int i = 0; i < A_CHUNKS; ++i) {
            fm_cp_async16_to(d + i * ROWS_PER_PASS * FM_ROW_BYTES, a_src[i], (live >> i) & 1u);
            a_src[i] += FM_BK;
        }
        k += FM_BK;
        if (!LOAD_W) return;
        const fm_t* b = b_src;
#pragma unroll
        for (int i = 0; i < B_CHUNKS; ++i) {
            // past n, b stays on the last row inside it: copied from nowhere, never read
            fm_cp_async16_to(d + (FM_BM + i * ROWS_PER_PASS) * FM_ROW_BYTES, b,
                             (live >> (A_CHUNKS + i)) & 1u);
            if (i + 1 < B_CHUNKS && ((valid >> (A_CHUNKS + i + 1)) & 1u)) b += b_stride;
        }
        b_src += FM_BK;
    }
};

// This thread's warpgroup in the tile (threads [0, FM_THREADS), 128 a warpgroup): its 64-row
// slab along M, its FM_WG_COLS columns along N, and their byte offsets into a stage.
struct FmWarpgroup {
    int m, n;
    unsigned a_off, b_off;
    __device__ __forceinline__ FmWarpgroup() {
        const int wg = threadIdx.x / 128;
        m = wg / FM_WG_N;
        n = wg % FM_WG_N;
        a_off = m * 64 * FM_ROW_BYTES;
        b_off = (FM_BM + n * FM_WG_COLS) * FM_ROW_BYTES;
    }
};

// A warpgroup's wgmmas of the k-tile in the stage at shared address `stage`, then the wait
// that leaves them in flight and the previous k-tile's done (both Hopper main loops).
__device__ __forceinline__ void fm_wg_mma_ktile(float (&acc)[FM_WG_COLS / 2], unsigned stage,
                                                const FmWarpgroup& g) {
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);
    fm_wg_fence();
#pragma unroll
    for (int ks = 0; ks < FM_BK / 16; ++ks)  // 16 elements = 32 bytes along the row
        FM_WGMMA_TILE(acc, fm_wg_desc(stage + g.a_off + ks * 32),
                      fm_wg_desc(stage + g.b_off + ks * 32));
    fm_wg_commit();
    fm_wg_wait<1>();  // this warpgroup's wgmma of the k-tile before is done
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);
}

// A warpgroup's epilogue, after its last wgmma: the LoRA delta (FM_LORA), then the stores.
// The accumulator fragment of m64nNk16: warp w of the warpgroup holds rows 16w + lane/4 (and
// 8 further down); per 8 columns j, registers 4j, 4j+1 sit at columns 8j + 2(lane%4) + {0, 1}
// of the first row, 4j+2, 4j+3 at the same columns of the second.
// `stages`: the stage buffers (generic address), which the LoRA expand of FM_LORA_B_SMEM
// takes over; every thread of the CTA calls it then.
__device__ __forceinline__ void fm_wg_epilogue(const FmRows& rows, const FmGemmParams& p,
                                               const FmBlock& b, const FmWarpgroup& g,
                                               float* acc, unsigned char* stages FM_LORA_ARG) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row0 = g.m * 64 + (warp % 4) * 16 + lane / 4;
    const int col0 = b.n0 + g.n * FM_WG_COLS + (lane % 4) * 2;
#if FM_LORA_B_SMEM
    fm_lora_expand_shared<FM_WG_COLS / 8, FM_PAIRED_HALVES>(
        lora, p, rows, row0, b.expert, b.n0, b.n0 + g.n * FM_WG_COLS, acc, stages,
        FM_STAGES * FM_STAGE_BYTES);
#elif FM_LORA
    fm_lora_expand_frags<FM_WG_COLS / 8, FM_PAIRED_HALVES>(
        lora, rows.route[row0], rows.route[row0 + 8], b.expert, b.n0 + g.n * FM_WG_COLS, acc);
#endif
    fm_store_row<FM_WG_COLS / 8, 0>(rows, p, b.expert, b.slot0, row0, col0, acc);
    fm_store_row<FM_WG_COLS / 8, 2>(rows, p, b.expert, b.slot0, row0 + 8, col0, acc);
}

#if FM_WGMMA == 1
// Two CTAs per SM where the accumulators allow (64 per thread fit the 128 registers that
// leaves, without spills): one CTA's epilogue and pipeline fill then overlap the other's
// main loop.
// The LoRA 64×128 variant (one warpgroup) at three: its expand from shared memory alone would
// take 173-182 registers under CUDA 13.0, one CTA fewer per SM.
#if FM_LORA_B_SMEM && FM_THREADS == 128 && FM_WG_COLS <= 128
#define FM_MIN_CTAS 3
#else
#define FM_MIN_CTAS (FM_WG_COLS <= 128 && FM_THREADS <= 256 ? 2 : 1)
#endif

extern "C" __global__ void __launch_bounds__(FM_THREADS, FM_MIN_CTAS) moe_gemm(const FmGemmParams p FM_LORA_KERNEL_ARG) {
    fm_pdl_wait();  // (tile.pdl) the stage before this one
    fm_pdl_launch_dependents();
    FmBlock b;
    if (!fm_block(p, b)) return;
    const int slot0 = b.slot0, n0 = b.n0, expert = b.expert;

    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows& rows = *(FmRows*)fm_smem;
    // The stages start at the first 1024-byte boundary past the row table (the launch asks
    // for 1024 bytes of slack).
    const unsigned smem0 = (unsigned)__cvta_generic_to_shared(fm_smem);
    const unsigned tiles0 = (smem0 + (unsigned)sizeof(FmRows) + 1023u) & ~1023u;
    // (the stages hold nothing yet: the row grouping's keys may sit there)
    FM_ROWS_SETUP(rows, p, slot0, (int*)(fm_smem + (tiles0 - smem0)));
    __syncthreads();

    const fm_t* w_expert = (const fm_t*)p.w + (fm_i64)expert * p.n * p.kdim;
    const FmWarpgroup g;

    float acc[FM_WG_COLS / 2];
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) acc[q] = 0.0f;

    FmWgLoader<FM_THREADS> loader(rows, p, w_expert, n0, threadIdx.x);
    const int k_tiles = (p.kdim + FM_BK - 1) / FM_BK;
#pragma unroll
    for (int s = 0; s < FM_STAGES - 1; ++s) {
        if (s < k_tiles) loader.load_next(tiles0 + s * FM_STAGE_BYTES, p);
        fm_cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        fm_cp_async_wait<FM_STAGES - 2>();
        fm_fence_proxy_async();
        __syncthreads();  // k-tile kt is in shared memory, every thread's part of it

        fm_wg_mma_ktile(acc, tiles0 + (kt % FM_STAGES) * FM_STAGE_BYTES, g);
        __syncthreads();  // every warpgroup's wgmma of kt - 1 is done: its slot takes k-tile
                          // kt + STAGES - 1

        const int next = kt + FM_STAGES - 1;
        if (next < k_tiles) loader.load_next(tiles0 + (next % FM_STAGES) * FM_STAGE_BYTES, p);
        fm_cp_async_commit();
#if FM_LORA_GROUPED
        if (kt == fm_lora_prefetch_at(k_tiles)) fm_lora_prefetch_b(lora, p, rows.slots, expert, n0);
#endif
    }
    fm_wg_wait<0>();
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);
    fm_cp_async_wait<0>();
    fm_wg_epilogue(rows, p, b, g, acc, fm_smem + (tiles0 - smem0) FM_LORA_PASS);
}
#endif  // FM_WGMMA == 1

// The LoRA stages of SPEC §7 around the GEMMs (the expand is in the GEMM epilogue, lora.cuh):
//
// moe_lora_map: each token's active slot into token_slot [M], from adapter_ids [M] or from
//   segments (seg_indptr [S+1], seg_adapter [S]); -1 where the adapter is -1, or its slot is
//   empty or disabled (the `active` mask). The map is device memory, so its values are checked
//   here, not on the host: an adapter outside [-1, L) acts as -1, and seg_indptr entries that
//   break 0 = first <= ... <= last = M leave the tokens they misplace without a delta; both are
//   counted into host-mapped counters (a slot per block, one plain write each) that the next
//   call on the layer reports, as the align kernel does for expert ids [TAG_GRAPH_SAFE].
//
// moe_lora_shrink: per kept route with an active slot, t[route, q] = round(A[a, e][q, :] · x),
//   rounded to the layer dtype and kept in f32 (as src/backend/cpu/lora.rs rounds). x is
//   the route's hidden row (GEMM1) or its activation row (GEMM2). Grid: x = the align step's
//   blocks (as the GEMMs: past num_padded they exit). f16/bf16 with 16-byte aligned rows take
//   tensor cores: a block per FM_SHRINK_MMA_ROWS rows of A and slot (y) takes its routes of
//   that slot, compacted, and streams the slot's A once through shared memory, all those
//   routes against it. Otherwise (f32, odd kdim) a SIMT path: y = groups of rows of A times
//   chunks of the block's routes, a warp per FM_SHRINK_ROWS rows and FM_SHRINK_ROUTES routes,
//   A found in L1/L2.
//
// Compile-time variant: FM_DTYPE, FM_SHRINK_* (moe_lora_shrink only, src/backend/cuda/lora.rs),
// FM_LORA_SLOTS, FM_LORA_MAP_BYTES and FM_LORA_SHRINK_BYTES (the mirrored structs' sizes,
// src/backend/cuda/lora.rs).
#include "lora.cuh"

struct FmLoraMapParams {
    const int* adapter_ids;     // [M], or null: the segments form
    const int* seg_indptr;      // [S + 1]
    const int* seg_adapter;     // [S]
    int* token_slot;            // [M]
    unsigned* bad_ids;          // host-mapped [gridDim.x]: adapter_ids outside [-1, L)
    unsigned* bad_seg_adapter;  // host-mapped [gridDim.x]: seg_adapter outside [-1, L)
    unsigned* bad_seg_indptr;   // host-mapped [gridDim.x]: seg_indptr entries out of order
    unsigned long long active;  // bit a: slot a has weights and is enabled
    int tokens, segments, num_slots;
};

#ifdef FM_LORA_MAP_BYTES
static_assert(sizeof(FmLoraMapParams) == FM_LORA_MAP_BYTES,
              "FmLoraMapParams must mirror MapParams in src/backend/cuda/lora.rs");
#endif

__device__ __forceinline__ bool fm_adapter_ok(int a, int num_slots) {
    return a >= -1 && a < num_slots;
}

__device__ __forceinline__ int fm_active_slot(int a, unsigned long long active) {
    return a >= 0 && ((active >> a) & 1ull) ? a : -1;
}

// The segment holding token m: the last s with indptr[s] <= m, if m < indptr[s + 1]; else -1
// (only where seg_indptr is malformed, which is counted).
__device__ __forceinline__ int fm_segment_of(const int* indptr, int segments, int m) {
    int lo = 0, hi = segments;  // indptr[lo] <= m is the invariant where indptr is sorted
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (indptr[mid] <= m)
            lo = mid;
        else
            hi = mid;
    }
    return segments > 0 && indptr[lo] <= m && m < indptr[lo + 1] ? lo : -1;
}

extern "C" __global__ void __launch_bounds__(256)
    moe_lora_map(const __grid_constant__ FmLoraMapParams p) {
    __shared__ unsigned bad[3];  // ids, segment adapters, indptr entries
    if (threadIdx.x < 3) bad[threadIdx.x] = 0;
    __syncthreads();
    const int stride = gridDim.x * blockDim.x;
    const int first = blockIdx.x * blockDim.x + threadIdx.x;
    if (p.adapter_ids != nullptr) {
        for (int m = first; m < p.tokens; m += stride) {
            int a = p.adapter_ids[m];
            if (!fm_adapter_ok(a, p.num_slots)) {
                atomicAdd(&bad[0], 1u);
                a = -1;
            }
            p.token_slot[m] = fm_active_slot(a, p.active);
        }
    } else {
        // the checks, once per segment (and the two ends once)
        for (int s = first; s < p.segments; s += stride) {
            if (!fm_adapter_ok(p.seg_adapter[s], p.num_slots)) atomicAdd(&bad[1], 1u);
            if (p.seg_indptr[s + 1] < p.seg_indptr[s]) atomicAdd(&bad[2], 1u);
        }
        if (first == 0) {
            if (p.seg_indptr[0] != 0) atomicAdd(&bad[2], 1u);
            if (p.seg_indptr[p.segments] != p.tokens) atomicAdd(&bad[2], 1u);
        }
        for (int m = first; m < p.tokens; m += stride) {
            const int s = fm_segment_of(p.seg_indptr, p.segments, m);
            const int a = s >= 0 ? p.seg_adapter[s] : -1;
            p.token_slot[m] = fm_adapter_ok(a, p.num_slots) ? fm_active_slot(a, p.active) : -1;
        }
    }
    __syncthreads();
    // host memory mapped for the device: one plain write per block and counter, only when
    // there is something to report (atomics on host memory are not portable)
    if (threadIdx.x == 0) {
        unsigned* counters[3] = {p.bad_ids, p.bad_seg_adapter, p.bad_seg_indptr};
        for (int i = 0; i < 3; ++i)
            if (bad[i] != 0) ((volatile unsigned*)counters[i])[blockIdx.x] += bad[i];
    }
}

#ifdef FM_DTYPE

// src/backend/cuda/lora.rs sizes the grid and the dynamic shared memory by these.
#if !defined(FM_SHRINK_WARPS) || !defined(FM_SHRINK_ROWS) || !defined(FM_SHRINK_ROUTES) ||    \
    !defined(FM_SHRINK_MMA_ROWS) || !defined(FM_SHRINK_STAGES) ||                            \
    !defined(FM_SHRINK_STAGE_ELEMS) || !defined(FM_SHRINK_MAX_BLOCK_M)
#error "the FM_SHRINK_* defines must be set (src/backend/cuda/lora.rs shrink_defines)"
#endif

struct FmLoraShrinkParams {
    FmLoraTable a;                // per slot: gate_up_a [E or 1, rows, kdim] or down_a [E, rows, kdim]
    const void* x;                // GEMM1: hidden [M, kdim]; GEMM2: activation [capacity, kdim]
    float* t;                     // [numel, rows]
    const int* token_slot;        // [M]
    const int* sorted_route_ids;  // [capacity]
    const int* block_expert;      // [max_blocks]
    const int* num_padded;        // [1]
    int numel, top_k;
    int rows;       // rows of A: 2r (gated gate_up), r otherwise
    int kdim;       // H or I
    int block_m;    // BLOCK_M of the plan
    int x_by_slot;  // 1: x's row is the route's sorted slot (GEMM2); 0: its token (GEMM1)
    int mma;        // 1: the tensor-core path (the host checked dtype, kdim and alignment)
    int slot_groups;  // tensor-core path: grid y = row blocks × this; > 1: a block per slot
};

#ifdef FM_LORA_SHRINK_BYTES
static_assert(sizeof(FmLoraShrinkParams) == FM_LORA_SHRINK_BYTES,
              "FmLoraShrinkParams must mirror ShrinkParams in src/backend/cuda/lora.rs");
#endif

#define FM_SHRINK_THREADS (FM_SHRINK_WARPS * 32)

// ---------------------------------------------------------------- SIMT path
// f32 layers, and kdim or pointers unfit for 16-byte copies. Grid y: groups of rows of A times
// chunks of FM_SHRINK_ROUTES routes; each warp takes FM_SHRINK_ROWS rows of A and those routes.

// This lane's share of Σ_j w[r·kdim + j] · x[j] for the rows r < nrows.
__device__ __forceinline__ void fm_shrink_dots(const fm_t* __restrict__ w,
                                               const fm_t* __restrict__ x, int kdim, int nrows,
                                               int lane, float (&sum)[FM_SHRINK_ROWS]) {
#pragma unroll
    for (int r = 0; r < FM_SHRINK_ROWS; ++r) sum[r] = 0.0f;
    const bool vec = kdim % FM_LORA_VEC == 0 &&
                     (((unsigned long long)w | (unsigned long long)x) & 15ull) == 0;
    if (vec) {
        for (int j = lane * FM_LORA_VEC; j < kdim; j += 32 * FM_LORA_VEC) {
            float xv[FM_LORA_VEC];
            fm_lora_load16(x + j, xv);
#pragma unroll
            for (int r = 0; r < FM_SHRINK_ROWS; ++r) {
                if (r >= nrows) break;
                float wv[FM_LORA_VEC];
                fm_lora_load16(w + (fm_i64)r * kdim + j, wv);
#pragma unroll
                for (int v = 0; v < FM_LORA_VEC; ++v) sum[r] += wv[v] * xv[v];
            }
        }
    } else {
        for (int j = lane; j < kdim; j += 32) {
            const float xv = fm_load(x[j]);
#pragma unroll
            for (int r = 0; r < FM_SHRINK_ROWS; ++r)
                if (r < nrows) sum[r] += fm_load(w[(fm_i64)r * kdim + j]) * xv;
        }
    }
}

__device__ __forceinline__ void fm_shrink_simt(const FmLoraShrinkParams& p, int expert,
                                               int slot0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int group_rows = FM_SHRINK_WARPS * FM_SHRINK_ROWS;
    const int row_groups = (p.rows + group_rows - 1) / group_rows;
    const int group = blockIdx.y % row_groups, chunk = blockIdx.y / row_groups;
    const int q0 = (group * FM_SHRINK_WARPS + warp) * FM_SHRINK_ROWS;
    if (q0 >= p.rows) return;  // the whole warp: no shuffle below is left half done
    const int nrows = min(FM_SHRINK_ROWS, p.rows - q0);
    const int first = chunk * FM_SHRINK_ROUTES;
    const int last = min(p.block_m, first + FM_SHRINK_ROUTES);
    for (int i = first; i < last; ++i) {
        const int slot = slot0 + i;
        const int route = p.sorted_route_ids[slot];
        // an expert's routes come first in its blocks, its padding (the sentinel numel) last
        if (route >= p.numel) break;
        const int m = route / p.top_k;
        const int a = p.token_slot[m];
        if (a < 0) continue;
        const FmLoraSlot& s = p.a.slot[a];
        if (s.w == nullptr) continue;
        const fm_t* w =
            (const fm_t*)s.w + ((fm_i64)(s.shared_outer ? 0 : expert) * p.rows + q0) * p.kdim;
        const fm_t* x = (const fm_t*)p.x + (fm_i64)(p.x_by_slot ? slot : m) * p.kdim;
        float sum[FM_SHRINK_ROWS];
        fm_shrink_dots(w, x, p.kdim, nrows, lane, sum);
        float mine = 0.0f;  // lane r keeps row r's total
#pragma unroll
        for (int r = 0; r < FM_SHRINK_ROWS; ++r) {
#pragma unroll
            for (int off = 16; off > 0; off /= 2) sum[r] += __shfl_xor_sync(FM_FULL_MASK, sum[r], off);
            if (lane == r) mine = sum[r];
        }
        // the rank intermediate is rounded to the layer dtype (SPEC §7), kept as f32
        if (lane < nrows) p.t[(fm_i64)route * p.rows + q0 + lane] = fm_load(fm_store(mine));
    }
}

// ---------------------------------------------------------------- tensor-core path
// Grid y: FM_SHRINK_MMA_ROWS rows of A times the slots: a block takes one slot a (slot 0 where
// slot_groups <= 1, as then no token has another: the map and the host's slot_groups come from
// the same active mask). Its routes of slot a are compacted, in their order, to the front of a
// shared list; passes of up to FM_SHRINK_PASS of them (an m16 tile per warp; with fewer the
// warps split the n8 tiles) run over k-chunks of those x rows and the block's rows of A[a, e]
// in a cp.async pipeline that runs on across passes. So the MMAs cover ceil(kept / 16) row
// tiles instead of BLOCK_M rows (4 adapters: a quarter), and a pass of 16 rows leaves room in
// a stage for twice the k. Each t[route, q] is its own row's dot product, in k order, whatever
// rows share its pass, so the values are those of the full-block passes this replaced.
#if FM_DTYPE != 0

#define FM_SHRINK_PASS (FM_SHRINK_WARPS * 16)
static_assert(FM_SHRINK_MMA_ROWS % 8 == 0 && FM_SHRINK_MMA_ROWS <= 32,
              "a warp keeps at most 4 n8 tiles of accumulators");
static_assert((FM_SHRINK_PASS + FM_SHRINK_MMA_ROWS) * 64 <= FM_SHRINK_STAGE_ELEMS,
              "a stage holds a pass of x rows and the block's rows of A at k 64");

// The block's routes of its slot, in their order within the align block.
struct FmShrinkShared {
    int route[FM_SHRINK_MAX_BLOCK_M];  // route id
    int xrow[FM_SHRINK_MAX_BLOCK_M];   // its row of x
    int count[FM_SHRINK_WARPS];        // the compaction: each warp's kept routes of a round
};

// The block's share of the work, the same in every thread.
struct FmShrinkTile {
    int kept;       // the block's routes of its slot (the list's length)
    int bmp;        // rows per pass: kept rounded up to 16, at most FM_SHRINK_PASS
    int passes;     // ceil(kept / bmp)
    int n0, nrows;  // the block's rows of A: [n0, n0 + nrows)
    int np8;        // nrows rounded up to 8: the rows of A a stage holds after bmp rows of x
    int bk, lg;     // k per stage (a power of two >= 64) and log2 of its 16-byte chunks
    int nk;         // stages per pass
};

// A warp's part of a pass: m16 tile mt of the pass, n8 tiles [nt0, nt0 + nn) of the rows.
struct FmShrinkWarp {
    int mt, nt0, nn;
    bool live;  // the tile holds a kept route, and nn > 0
};

// Element offset of 16-byte chunk c of row r in a stage of rows of bk elements. The chunk
// index is XORed with r mod 8, so the 8 rows an ldmatrix reads hit 8 different bank groups.
__device__ __forceinline__ int fm_shrink_at(int r, int c, int bk) {
    return r * bk + ((c ^ (r & 7)) << 3);
}

// The block's routes of slot a (its token's active slot), compacted in order into sh.route
// and sh.xrow by ballots and the warps' counts (no atomics: the same routing gives the same
// list); returns how many. Padding (the sentinel numel) and other slots' routes are skipped,
// and nothing is written for them here or later.
__device__ int fm_shrink_gather(const FmLoraShrinkParams& p, FmShrinkShared& sh, int a,
                                int slot0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int kept = 0;
    for (int i0 = 0; i0 < p.block_m; i0 += FM_SHRINK_THREADS) {
        const int i = i0 + threadIdx.x;
        const int route = i < p.block_m ? p.sorted_route_ids[slot0 + i] : p.numel;
        const int m = route < p.numel ? route / p.top_k : 0;
        const bool keep = route < p.numel && p.token_slot[m] == a;
        const unsigned ballot = __ballot_sync(FM_FULL_MASK, keep);
        if (lane == 0) sh.count[warp] = __popc(ballot);
        __syncthreads();
        int at = kept + __popc(ballot & ((1u << lane) - 1u)), round = 0;
#pragma unroll
        for (int w = 0; w < FM_SHRINK_WARPS; ++w) {
            const int c = sh.count[w];
            if (w < warp) at += c;
            round += c;
        }
        if (keep) {
            sh.route[at] = route;
            sh.xrow[at] = p.x_by_slot ? slot0 + i : m;
        }
        kept += round;
        // the counts are read before the next round writes them, the list is whole after it
        __syncthreads();
    }
    return kept;
}

__device__ __forceinline__ FmShrinkTile fm_shrink_tile(const FmLoraShrinkParams& p, int n0,
                                                       int kept) {
    FmShrinkTile g;
    g.kept = kept;
    g.bmp = min((kept + 15) & ~15, FM_SHRINK_PASS);
    g.passes = (kept + g.bmp - 1) / g.bmp;
    g.n0 = n0;
    g.nrows = min(FM_SHRINK_MMA_ROWS, p.rows - n0);
    g.np8 = (g.nrows + 7) & ~7;
    // the longest k a stage holds (fewer rows per pass: longer stages, fewer barriers, more
    // bytes of A in flight), no longer than kdim needs
    g.bk = 512;
    while (g.bk > 64 && ((g.bmp + g.np8) * g.bk > FM_SHRINK_STAGE_ELEMS || g.bk / 2 >= p.kdim))
        g.bk /= 2;
    g.lg = __ffs(g.bk) - 4;  // bk = 2^(lg + 3)
    g.nk = (p.kdim + g.bk - 1) / g.bk;
    return g;
}

// The 16-byte copies a thread makes into every stage of a pass, worked out once per pass, so a
// stage costs a few instructions per copy: ncu at Qwen3 M = 1024 found the shrink issue-bound
// (half the issue slots used at 10 warps per SM), with 38 instructions of index math around
// each copy. A row of a stage has 2^lg ≤ 64 chunks, which divides the block's threads, so a
// thread keeps one chunk column c and takes every (threads / 2^lg)-th row: x rows of the pass
// (past kept: zero), then the block's rows of A[a, e] (past nrows: zero). Per stage only k
// moves.
#define FM_SHRINK_COPIES (FM_SHRINK_STAGE_ELEMS / 8 / FM_SHRINK_THREADS)
static_assert(FM_SHRINK_STAGE_ELEMS % (8 * FM_SHRINK_THREADS) == 0,
              "a stage is a whole number of 16-byte copies per thread");

struct FmShrinkCopies {
    const fm_t* src[FM_SHRINK_COPIES];  // the row's element c·8 at k 0
    unsigned dst[FM_SHRINK_COPIES];     // where it lands in stage 0 (shared-space address)
    unsigned live;                      // bit i: copy i reads (a kept route, a row of A)
    int count;                          // copies per stage
    int col;                            // c·8
};

__device__ __forceinline__ FmShrinkCopies fm_shrink_copies(const FmLoraShrinkParams& p,
                                                           const FmShrinkShared& sh,
                                                           const FmShrinkTile& g, const fm_t* w,
                                                           int q, unsigned stage0) {
    FmShrinkCopies cp;
    const int c = threadIdx.x & ((1 << g.lg) - 1), r0 = threadIdx.x >> g.lg;
    const int rstep = FM_SHRINK_THREADS >> g.lg, rows = g.bmp + g.np8, base = q * g.bmp;
    const fm_t* x = (const fm_t*)p.x;
    cp.col = c * 8;
    cp.live = 0;
    cp.count = 0;
#pragma unroll
    for (int i = 0; i < FM_SHRINK_COPIES; ++i) {
        const int r = r0 + i * rstep;
        bool live;
        const fm_t* row;
        if (r < g.bmp) {
            live = base + r < g.kept;
            row = x + (fm_i64)sh.xrow[min(base + r, g.kept - 1)] * p.kdim;
        } else {
            live = r - g.bmp < g.nrows;
            row = w + (fm_i64)min(r - g.bmp, g.nrows - 1) * p.kdim;
        }
        cp.src[i] = row + cp.col;
        cp.dst[i] = stage0 + (unsigned)(fm_shrink_at(r, c, g.bk) * sizeof(fm_t));
        if (r < rows) {
            cp.count = i + 1;
            if (live) cp.live |= 1u << i;
        }
    }
    return cp;
}

// Stage k-chunk kc (k from kc·bk) of the pass `cp` was made for into the stage at `stage`
// bytes past stage 0; `any` is a readable address for the copies that read nothing.
__device__ __forceinline__ void fm_shrink_load(const FmShrinkCopies& cp, const void* any,
                                               int kdim, int kc, int bk, unsigned stage) {
    const int k0 = kc * bk;
    const bool in_k = k0 + cp.col < kdim;
#pragma unroll
    for (int i = 0; i < FM_SHRINK_COPIES; ++i) {
        if (i >= cp.count) break;
        const bool valid = in_k && ((cp.live >> i) & 1u);
        fm_cp_async16_at(cp.dst[i] + stage, valid ? (const void*)(cp.src[i] + k0) : any, valid);
    }
}

__device__ __forceinline__ void fm_shrink_next(int& q, int& kc, int nk) {
    if (++kc == nk) {
        kc = 0;
        ++q;
    }
}

// This warp's tiles in the pass that starts at list entry `base`. With 3 m16 tiles the
// fourth warp has none.
__device__ __forceinline__ FmShrinkWarp fm_shrink_warp(const FmShrinkTile& g, int base) {
    const int warp = threadIdx.x / 32;
    const int mtiles = g.bmp / 16;
    const int per_mt = FM_SHRINK_WARPS / mtiles;  // warps per m16 tile
    const int ntiles = g.np8 / 8, nper = (ntiles + per_mt - 1) / per_mt;
    FmShrinkWarp wp;
    wp.mt = warp / per_mt;
    wp.nt0 = warp % per_mt * nper;
    wp.nn = max(0, min(nper, ntiles - wp.nt0));
    wp.live = wp.mt < mtiles && base + wp.mt * 16 < g.kept && wp.nn > 0;
    return wp;
}

// acc += x rows of the warp's m16 tile · A rows of its n8 tiles, over k in [0, kend), from the
// stage at shared-space address `stage`. Every tile starts at a row that is a multiple of 8,
// so each row this lane addresses has swizzle lane & 7 (fm_shrink_at), and chunk 8·g + j of
// it sits at 8·g + (j ^ (lane & 7)): the addresses are a row start plus per-step constants.
__device__ __forceinline__ void fm_shrink_mma_stage(unsigned stage, const FmShrinkTile& g,
                                                    const FmShrinkWarp& wp, int kend,
                                                    float (&acc)[4][4]) {
    const int lane = threadIdx.x % 32, swz = lane & 7;
    const unsigned row_bytes = g.bk * sizeof(fm_t);
    // x4: rows 0-15 of the tile at k 0-7 (lanes 0-15) and at k 8-15 (lanes 16-31)
    const unsigned xrow = stage + (wp.mt * 16 + (lane & 15)) * row_bytes;
    const int xhalf = lane >> 4;
    // x2: 8 rows of A at k 0-7 (lanes 0-7) and 8-15 (lanes 8-15): the col-major k16 × n8 operand
    const unsigned arow = stage + (g.bmp + wp.nt0 * 8 + swz) * row_bytes;
    const int ahalf = (lane >> 3) & 1;
    for (int k64 = 0; k64 < kend; k64 += 64) {
        const unsigned kb = k64 * sizeof(fm_t);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (k64 + 16 * j >= kend) break;
            unsigned xa[4];
            fm_ldmatrix_x4_at(xa, xrow + kb + (((2 * j + xhalf) ^ swz) << 4));
#pragma unroll
            for (int n = 0; n < 4; ++n) {
                if (n >= wp.nn) break;
                unsigned wb[2];
                fm_ldmatrix_x2_at(wb, arow + n * 8 * row_bytes + kb + (((2 * j + ahalf) ^ swz) << 4));
                fm_mma(acc[n], xa, wb[0], wb[1]);
            }
        }
    }
}

// t[route, n0 + q] for the warp's kept routes of the pass at `base`; acc[j] holds rows
// lane/4 (+ 8) and columns 2·(lane % 4) (+ 1) of n8 tile nt0 + j.
__device__ __forceinline__ void fm_shrink_store(const FmLoraShrinkParams& p,
                                                const FmShrinkShared& sh, const FmShrinkTile& g,
                                                const FmShrinkWarp& wp, int base,
                                                const float (&acc)[4][4]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = base + wp.mt * 16 + lane / 4 + 8 * h;
        if (i >= g.kept) continue;
        float* t = p.t + (fm_i64)sh.route[i] * p.rows + g.n0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (j >= wp.nn) break;
            const int q = (wp.nt0 + j) * 8 + lane % 4 * 2;
            // the rank intermediate is rounded to the layer dtype (SPEC §7), kept as f32
            if (q < g.nrows) t[q] = fm_load(fm_store(acc[j][2 * h]));
            if (q + 1 < g.nrows) t[q + 1] = fm_load(fm_store(acc[j][2 * h + 1]));
        }
    }
}

__device__ void fm_shrink_mma(const FmLoraShrinkParams& p, int expert, int slot0) {
    __shared__ FmShrinkShared sh;
    extern __shared__ __align__(16) unsigned char fm_smem[];  // FM_SHRINK_STAGES stages
    fm_t* stages = (fm_t*)fm_smem;
    const int row_blocks = (p.rows + FM_SHRINK_MMA_ROWS - 1) / FM_SHRINK_MMA_ROWS;
    const int n0 = blockIdx.y % row_blocks * FM_SHRINK_MMA_ROWS;
    const int a = p.slot_groups > 1 ? (int)(blockIdx.y / row_blocks) : 0;
    const FmLoraSlot& s = p.a.slot[a];
    if (n0 >= p.rows || s.w == nullptr) return;  // the whole block
    const int kept = fm_shrink_gather(p, sh, a, slot0);
    if (kept == 0) return;  // the whole block: kept comes from shared memory
    const FmShrinkTile g = fm_shrink_tile(p, n0, kept);
    const fm_t* w =
        (const fm_t*)s.w + ((fm_i64)(s.shared_outer ? 0 : expert) * p.rows + g.n0) * p.kdim;
    const int total = g.passes * g.nk;
    const unsigned stage0 = (unsigned)__cvta_generic_to_shared(stages);
    constexpr unsigned stage_bytes = FM_SHRINK_STAGE_ELEMS * sizeof(fm_t);
    FmShrinkCopies cp;
    int lq = 0, lk = 0;  // the next chunk to load
    for (int st = 0; st < FM_SHRINK_STAGES - 1; ++st) {
        if (lq < g.passes) {
            if (lk == 0) cp = fm_shrink_copies(p, sh, g, w, lq, stage0);
            fm_shrink_load(cp, p.x, p.kdim, lk, g.bk, st * stage_bytes);
            fm_shrink_next(lq, lk, g.nk);
        }
        fm_cp_async_commit();  // empty groups too: the wait below counts groups
    }
    float acc[4][4] = {};
    FmShrinkWarp wp = {};
    int cq = 0, ck = 0;  // the chunk to multiply
    for (int it = 0; it < total; ++it) {
        fm_cp_async_wait<FM_SHRINK_STAGES - 2>();
        // chunk `it` is in, and every warp is done with the stage the next load overwrites
        __syncthreads();
        if (lq < g.passes) {
            const int st = (it + FM_SHRINK_STAGES - 1) % FM_SHRINK_STAGES;
            if (lk == 0) cp = fm_shrink_copies(p, sh, g, w, lq, stage0);
            fm_shrink_load(cp, p.x, p.kdim, lk, g.bk, st * stage_bytes);
            fm_shrink_next(lq, lk, g.nk);
        }
        fm_cp_async_commit();
        const int base = cq * g.bmp;
        if (ck == 0) wp = fm_shrink_warp(g, base);
        if (wp.live) {
            const unsigned stage = stage0 + it % FM_SHRINK_STAGES * stage_bytes;
            fm_shrink_mma_stage(stage, g, wp, min(g.bk, p.kdim - ck * g.bk), acc);
        }
        if (ck == g.nk - 1) {
            if (wp.live) fm_shrink_store(p, sh, g, wp, base, acc);
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[j][v] = 0.0f;
        }
        fm_shrink_next(cq, ck, g.nk);
    }
}

#endif  // FM_DTYPE != 0

extern "C" __global__ void __launch_bounds__(FM_SHRINK_THREADS)
    moe_lora_shrink(const __grid_constant__ FmLoraShrinkParams p) {
    const int slot0 = blockIdx.x * p.block_m;
    if (slot0 >= *p.num_padded) return;
    const int expert = p.block_expert[blockIdx.x];
    if (expert < 0) return;
#if FM_DTYPE != 0
    if (p.mma) {
        fm_shrink_mma(p, expert, slot0);
        return;
    }
#endif
    fm_shrink_simt(p, expert, slot0);
}

#endif  // FM_DTYPE

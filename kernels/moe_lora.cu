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
//   that slot, compacted, and multiplies them by the slot's A in m16 tiles, its warps
//   splitting k, operands loaded straight into registers. Otherwise (f32, odd kdim) a SIMT path: y = groups of rows of A times
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

// src/backend/cuda/lora.rs sizes the grid by these.
#if !defined(FM_SHRINK_WARPS) || !defined(FM_SHRINK_ROWS) || !defined(FM_SHRINK_ROUTES) ||    \
    !defined(FM_SHRINK_MMA_ROWS) || !defined(FM_SHRINK_MAX_BLOCK_M)
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
// the same active mask). Its routes of slot a are compacted, in their order, into a shared
// list; m16 tiles of that list, two per pass, run against the block's rows of A[a, e] (n8
// tiles), each warp over its quarter of k, and the warps' partial sums meet in shared memory.
//
// The operands go from global memory straight into mma fragments, no shared-memory stages:
// a lane loads 8 consecutive elements (16 bytes) of a row per 32-wide k step, and the k
// order inside the step is permuted alike for x and A, which a dot product does not see.
// Lane (g = lane / 4, q = lane % 4) holds elements 8q .. 8q + 7 of the step: x rows g and
// g + 8 of the tile, A row g of each n8 tile. The first k16 MMA takes elements 8q, 8q + 1 as
// fragment k 2q, 2q + 1 and 8q + 2, 8q + 3 as k 2q + 8, 2q + 9; the second the next four.
// The staged version this replaced (cp.async rings, ldmatrix) was issue-bound: ncu at Qwen3
// M = 1024 found half the issue slots used with 10 warps per SM (three CTAs by its 72 KB of
// stages) and thousands of instructions per warp in index math.
#if FM_DTYPE != 0

static_assert(FM_SHRINK_MMA_ROWS == 32, "a warp keeps 4 n8 tiles of accumulators");
#define FM_SHRINK_UNROLL 2  // k steps of 32 whose loads are in flight together

// The block's routes of its slot and the warps' partial sums of up to two m16 tiles.
struct FmShrinkShared {
    int route[FM_SHRINK_MAX_BLOCK_M];  // route id
    int xrow[FM_SHRINK_MAX_BLOCK_M];   // its row of x
    int count[FM_SHRINK_WARPS];        // the compaction: each warp's kept routes of a round
    float partial[FM_SHRINK_WARPS][32][FM_SHRINK_MMA_ROWS];  // two m16 tiles
};

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

// acc[t][n] += m16 tile t's x fragments (xa[t][0], xa[t][1]) · the A rows' (a) of n8 tile n,
// at one k step. All four n8 tiles, whatever nrows: a branch per tile let the compiler sink
// their loads behind it, one at a time; a tile past nrows multiplies repeats of the last row,
// unstored.
template <int MT>
__device__ __forceinline__ void fm_shrink_step(const uint4 (&xa)[MT][2], const uint4 (&a)[4],
                                               float (&acc)[MT][4][4]) {
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        const unsigned lo[4] = {xa[t][0].x, xa[t][1].x, xa[t][0].y, xa[t][1].y};
        const unsigned hi[4] = {xa[t][0].z, xa[t][1].z, xa[t][0].w, xa[t][1].w};
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            fm_mma(acc[t][n], lo, a[n].x, a[n].y);
            fm_mma(acc[t][n], hi, a[n].z, a[n].w);
        }
    }
}

// acc[t][n] += x rows of m16 tile t (xrow[t][0] = its row g, [1] = row g + 8) · A rows of n8
// tile n, over the k steps [s0, s1): MT tiles share each load of A. Every row pointer is a
// readable row (past kept or nrows: a repeat of the last, whose sums nobody stores), so the
// whole steps load without predicates; the pointers move by whole steps, a load is its
// pointer plus a constant. The last, partial step (kdim % 32 != 0) loads zeros past kdim.
template <int MT>
__device__ __forceinline__ void fm_shrink_tile_k(const fm_t* const (&xrow)[MT][2],
                                                 const fm_t* const (&arow)[4], int kdim,
                                                 int s0, int s1, float (&acc)[MT][4][4]) {
    const int k_lane = (threadIdx.x % 4) * 8;
    const int k_end = min(s1 * 32, kdim);
    const int whole = max(0, k_end / 32 - s0);  // steps with all 32 in range, warp-uniform
    const fm_t* px[MT][2];
    const fm_t* pa[4];
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) px[t][h] = xrow[t][h] + s0 * 32 + k_lane;
#pragma unroll
    for (int n = 0; n < 4; ++n) pa[n] = arow[n] + s0 * 32 + k_lane;
    int st = 0;
    for (; st + FM_SHRINK_UNROLL <= whole; st += FM_SHRINK_UNROLL) {
        uint4 xa[FM_SHRINK_UNROLL][MT][2], wb[FM_SHRINK_UNROLL][4];
#pragma unroll
        for (int u = 0; u < FM_SHRINK_UNROLL; ++u) {
#pragma unroll
            for (int t = 0; t < MT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) xa[u][t][h] = __ldg((const uint4*)(px[t][h] + 32 * u));
#pragma unroll
            for (int n = 0; n < 4; ++n) wb[u][n] = __ldg((const uint4*)(pa[n] + 32 * u));
        }
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) px[t][h] += 32 * FM_SHRINK_UNROLL;
#pragma unroll
        for (int n = 0; n < 4; ++n) pa[n] += 32 * FM_SHRINK_UNROLL;
#pragma unroll
        for (int u = 0; u < FM_SHRINK_UNROLL; ++u) fm_shrink_step<MT>(xa[u], wb[u], acc);
    }
    // the rest: whole steps left over from the unroll, then a partial one
    for (int k = (s0 + st) * 32 + k_lane; s0 + st < s1 && (s0 + st) * 32 < k_end; ++st, k += 32) {
        const bool in_k = k < k_end;  // kdim % 8 == 0: a lane's 8 are all in or all out
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        uint4 xa[MT][2], wb[4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                xa[t][h] = in_k ? __ldg((const uint4*)px[t][h]) : zero;
                px[t][h] += 32;
            }
#pragma unroll
        for (int n = 0; n < 4; ++n) {
            wb[n] = in_k ? __ldg((const uint4*)pa[n]) : zero;
            pa[n] += 32;
        }
        fm_shrink_step<MT>(xa, wb, acc);
    }
}

// t of the block's routes [i0, i0 + 16·MT) for its rows of A: the MT tiles over this warp's k
// steps, then the warps' partial sums added in shared memory, rounded and stored.
template <int MT>
__device__ __forceinline__ void fm_shrink_tiles(const FmLoraShrinkParams& p, FmShrinkShared& sh,
                                                int kept, int i0, int n0, int nrows,
                                                const fm_t* const (&arow)[4], int s0, int s1) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    const fm_t* x = (const fm_t*)p.x;
    const fm_t* xrow[MT][2];
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            xrow[t][h] = x + (fm_i64)sh.xrow[min(i0 + 16 * t + 8 * h + g, kept - 1)] * p.kdim;
    float acc[MT][4][4] = {};
    fm_shrink_tile_k<MT>(xrow, arow, p.kdim, s0, s1, acc);
    // acc[t][n] holds rows 16·t + g (+ 8) and columns 2·(lane % 4) (+ 1) of n8 tile n
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
            for (int v = 0; v < 4; ++v)
                sh.partial[warp][16 * t + g + 8 * (v / 2)][n * 8 + (lane % 4) * 2 + v % 2] =
                    acc[t][n][v];
    __syncthreads();
    for (int idx = threadIdx.x; idx < 16 * MT * FM_SHRINK_MMA_ROWS; idx += FM_SHRINK_THREADS) {
        const int row = idx / FM_SHRINK_MMA_ROWS, col = idx % FM_SHRINK_MMA_ROWS;
        if (i0 + row >= kept || col >= nrows) continue;
        float sum = 0.0f;
#pragma unroll
        for (int wi = 0; wi < FM_SHRINK_WARPS; ++wi) sum += sh.partial[wi][row][col];
        // the rank intermediate is rounded to the layer dtype (SPEC §7), kept as f32
        p.t[(fm_i64)sh.route[i0 + row] * p.rows + n0 + col] = fm_load(fm_store(sum));
    }
    __syncthreads();  // the partials are read before the next tiles write them
}

__device__ void fm_shrink_mma(const FmLoraShrinkParams& p, int expert, int slot0) {
    __shared__ FmShrinkShared sh;
    const int row_blocks = (p.rows + FM_SHRINK_MMA_ROWS - 1) / FM_SHRINK_MMA_ROWS;
    const int n0 = blockIdx.y % row_blocks * FM_SHRINK_MMA_ROWS;
    const int a = p.slot_groups > 1 ? (int)(blockIdx.y / row_blocks) : 0;
    const FmLoraSlot& s = p.a.slot[a];
    if (n0 >= p.rows || s.w == nullptr) return;  // the whole block
    const int kept = fm_shrink_gather(p, sh, a, slot0);
    if (kept == 0) return;  // the whole block: kept comes from shared memory

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    const int nrows = min(FM_SHRINK_MMA_ROWS, p.rows - n0);
    // this warp's k steps of 32: a quarter of them
    const int steps = (p.kdim + 31) / 32;
    const int per_warp = (steps + FM_SHRINK_WARPS - 1) / FM_SHRINK_WARPS;
    const int s0 = min(steps, warp * per_warp), s1 = min(steps, s0 + per_warp);
    const fm_t* w =
        (const fm_t*)s.w + ((fm_i64)(s.shared_outer ? 0 : expert) * p.rows + n0) * p.kdim;
    const fm_t* arow[4];  // row g of each n8 tile; past nrows the last row again
#pragma unroll
    for (int n = 0; n < 4; ++n) arow[n] = w + (fm_i64)min(n * 8 + g, nrows - 1) * p.kdim;
    // two m16 tiles per pass share the loads of A (a warp's round trips to memory are what
    // bound the shrink: ncu, long scoreboard); one where only one is left
    for (int i0 = 0; i0 < kept; i0 += 32) {
        if (i0 + 16 < kept)
            fm_shrink_tiles<2>(p, sh, kept, i0, n0, nrows, arow, s0, s1);
        else
            fm_shrink_tiles<1>(p, sh, kept, i0, n0, nrows, arow, s0, s1);
    }
}

#endif  // FM_DTYPE != 0

// Three CTAs per SM: CUDA 13.0's NVRTC gives the tensor-core path 172 registers unbounded (two
// CTAs), 168 with this bound (16 bytes of stack, spilled outside the k loop).
extern "C" __global__ void __launch_bounds__(FM_SHRINK_THREADS, 3)
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

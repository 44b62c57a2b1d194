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
//   rounded to the layer dtype and kept in f32 (the CPU's order, src/backend/cpu/lora.rs). x is
//   the route's hidden row (GEMM1) or its activation row (GEMM2). Grid: x = the align step's
//   blocks (as the GEMMs: past num_padded they exit), y = groups of rows of A times chunks of
//   the block's routes. Each warp takes FM_SHRINK_ROWS rows of A and FM_SHRINK_ROUTES routes,
//   all of one expert: A rows shared by those routes stay in L1, and the other chunks of the
//   block find them in L2. Loads are 16 bytes where rows allow.
//
// Compile-time variant: FM_DTYPE, FM_SHRINK_WARPS, FM_SHRINK_ROWS and FM_SHRINK_ROUTES
// (moe_lora_shrink only),
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

// FM_SHRINK_WARPS warps per block, FM_SHRINK_ROWS rows of A per warp (src/backend/cuda/lora.rs
// sizes the grid by them).
#if !defined(FM_SHRINK_WARPS) || !defined(FM_SHRINK_ROWS) || !defined(FM_SHRINK_ROUTES)
#error "FM_SHRINK_WARPS, FM_SHRINK_ROWS and FM_SHRINK_ROUTES must be defined (src/backend/cuda/lora.rs)"
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
};

#ifdef FM_LORA_SHRINK_BYTES
static_assert(sizeof(FmLoraShrinkParams) == FM_LORA_SHRINK_BYTES,
              "FmLoraShrinkParams must mirror ShrinkParams in src/backend/cuda/lora.rs");
#endif

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

extern "C" __global__ void __launch_bounds__(FM_SHRINK_WARPS * 32)
    moe_lora_shrink(const __grid_constant__ FmLoraShrinkParams p) {
    const int slot0 = blockIdx.x * p.block_m;
    if (slot0 >= *p.num_padded) return;
    const int expert = p.block_expert[blockIdx.x];
    if (expert < 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // blockIdx.y: a group of rows of A, and a chunk of FM_SHRINK_ROUTES of the block's routes
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

#endif  // FM_DTYPE

// GEMM1 and GEMM2 of SPEC §2 over the align step's blocks (DESIGN §5). One CTA computes a
// BM x BN tile of C[slot, n] = sum_k A[slot, k] * W[expert, n, k] for the BM slots of one
// block (all routed to one expert), then applies the stage's epilogue:
//   GEMM1 (FM_GEMM_MODE 1): A rows are hidden rows gathered through sorted_route_ids;
//          g1[slot, n] = round(v * (acc + b13[e, n])), v = router weight when on-input, else 1.
//   GEMM2 (FM_GEMM_MODE 2): A rows are the activation rows, slot by slot;
//          y[route, n] = round((acc + b2[e, n]) * w'), w' = router weight when applied here.
// Blocks past num_padded (read on the device) and blocks of no expert exit at once, so the
// grid is sized for the worst case and the launch is graph-safe [TAG_GRAPH_SAFE].
//
// Compile-time variant: FM_DTYPE, FM_GEMM_MODE, FM_BM, FM_BN, FM_BK, FM_WARPS_M, FM_WARPS_N,
// FM_STAGES, FM_VEC (8: 16-byte cp.async chunks, rows 16-byte aligned; 1: element loads),
// FM_MMA (1: mma.sync on 16-bit types; 0: SIMT in f32, the f32 layers' path), FM_WGMMA
// (1: Hopper's wgmma, moe_gemm_wgmma.cuh; 2: its warp-specialised form, a producer warpgroup
// beside the FM_THREADS of the tile, moe_gemm_wgmma_ws.cuh; 3: wgmma with the weight tile
// multicast by TMA over a pair of CTAs, moe_gemm_wgmma_mc.cuh; sm_90a, 16-bit types, 16-byte
// loads), FM_LORA
// (see the LoRA hook below), FM_FUSED_ACT (GEMM1 with the activation, below),
// FM_FUSED_COMBINE (GEMM2 with the combine, below) and FM_SPLIT_K (split-K over a
// thread-block cluster, below).
#include "common.cuh"

// ---------------------------------------------------------------- LoRA hook (SPEC §7)
// FM_LORA variants (moe_run_lora) take the expand stage's parameters (kernels/lora.cuh) as a
// second kernel argument and add the route's LoRA delta to the f32 accumulator before the
// bias, the router weight and the rounding: the tensor-core paths per warp fragment with
// MMAs (fm_lora_expand_frags), the SIMT path per element. Without FM_LORA the hook is empty.
#ifndef FM_LORA
#define FM_LORA 0
#endif
#if FM_LORA
#include "lora.cuh"
#define FM_LORA_KERNEL_ARG , const __grid_constant__ FmLoraExpand lora
#define FM_LORA_ARG , const FmLoraExpand &lora
#define FM_LORA_PASS , lora
#else
#define FM_LORA_KERNEL_ARG
#define FM_LORA_ARG
#define FM_LORA_PASS
#endif

struct FmGemmParams {
    const void* a;                // GEMM1: hidden [M, kdim]; GEMM2: activation [capacity, kdim]
    const void* w;                // [E, n, kdim]
    const void* bias;             // [E, n] or null
    const void* router;           // topk_weights [numel] (f32 or the layer dtype)
    void* out;                    // GEMM1: g1 [capacity, n]; GEMM2: y [numel, n]
    const int* sorted_route_ids;  // [capacity]
    const int* block_expert;      // [max_blocks]
    const int* num_padded;        // [1]
    int n, kdim, numel, top_k;
    int bias_kind;                // 0 f32, else the layer dtype's kind
    int router_kind;
    int apply_router;             // multiply by the route's router weight in the epilogue
    int n_tiles;                  // ceil(n / FM_BN)
    int group_m;                  // GROUP_M (>= 1)
    int m_blocks;                 // the grid's m-blocks (max_blocks)
    int inter;                    // I: the activation's columns (FM_FUSED_ACT)
    float alpha, limit;           // the activation's parameters (FM_FUSED_ACT)
    int early_dependents;         // GEMM1 (mma.sync loop) lets GEMM2 start at once (tile.pdl)
};

#ifdef FM_GEMM_PARAMS_BYTES
static_assert(sizeof(FmGemmParams) == FM_GEMM_PARAMS_BYTES,
              "FmGemmParams must mirror GemmParams in src/backend/cuda/kernels.rs");
#endif

#define FM_THREADS (FM_WARPS_M * FM_WARPS_N * 32)

// ---------------------------------------------------------------- fused activation
// FM_FUSED_ACT (GEMM1 on the tensor-core paths): the epilogue applies the activation (act.cuh;
// FM_ACT, FM_GATED, FM_INTERLEAVED as moe_act's) and writes the activation rows
// [capacity, inter] itself, so moe_act's launch and GEMM1's output round trip go. Both MMA
// fragment layouts give a thread its columns in pairs (2c, 2c + 1), so a gated GEMM1 takes its
// tile columns as (gate, up) pairs of intermediate c: interleaved w13 has its rows so already;
// with the halves layout tile column n reads W row fm_w_row(n) = n / 2 + (n odd) · I.
#ifndef FM_FUSED_ACT
#define FM_FUSED_ACT 0
#endif
#if FM_FUSED_ACT
#include "act.cuh"
#define FM_PAIRED_HALVES (FM_GATED && !FM_INTERLEAVED)
#else
#define FM_PAIRED_HALVES 0
#endif
// W rows between tile columns n and n + 2 (an even step keeps a column's half).
#define FM_W_ROW_STEP (FM_PAIRED_HALVES ? 2 : 1)

__device__ __forceinline__ int fm_w_row(const FmGemmParams& p, int n) {
#if FM_PAIRED_HALVES
    return (n >> 1) + (n & 1) * p.inter;
#else
    return n;
#endif
}

// LoRA's expand (lora.cuh) runs once per distinct adapter slot among a warp's 16 rows. In
// align order a block's rows mix the batch's adapters (at 4 adapters every warp ran 4
// passes), so the tensor-core LoRA GEMMs take their rows grouped by slot instead
// (fm_rows_setup); each row's outputs are the same dot products wherever it sits.
#define FM_LORA_GROUPED (FM_LORA && FM_MMA)

// Where the A row of each tile row starts (-1: the row holds no route) and its route id;
// with FM_LORA_GROUPED, the row of the align block it is (its slot is slot0 + at).
struct FmRows {
    fm_i64 a_offset[FM_BM];
    int route[FM_BM];
#if FM_LORA_GROUPED
    int at[FM_BM];
    fm_u64 slots;  // bit a: a row's route has active slot a (fm_lora_prefetch_b)
#endif
};

#ifdef FM_ROW_TABLE_BYTES
static_assert(sizeof(FmRows) <= FM_ROW_TABLE_BYTES,
              "the row table outgrows the shared memory src/backend/cuda/variant.rs gives it");
#endif

// The align-block row of tile row i: GEMM1 writes its output there.
__device__ __forceinline__ int fm_row_at(const FmRows& rows, int i) {
#if FM_LORA_GROUPED
    return rows.at[i];
#else
    return i;
#endif
}

// Tile row `at` takes row i of the align block.
__device__ __forceinline__ void fm_rows_put(FmRows& rows, const FmGemmParams& p, int slot0,
                                            int i, int at) {
    const int route = p.sorted_route_ids[slot0 + i];
    const bool valid = route < p.numel;
    rows.route[at] = valid ? route : -1;
#if FM_GEMM_MODE == 1
    rows.a_offset[at] = valid ? (fm_i64)(route / p.top_k) * p.kdim : -1;
#else
    rows.a_offset[at] = valid ? (fm_i64)(slot0 + i) * p.kdim : -1;
#endif
#if FM_LORA_GROUPED
    rows.at[at] = i;
#endif
}

#if FM_LORA_GROUPED
// The row table with the rows grouped by their route's active slot: stable (align order
// within a slot), rows without a slot and then padding last. `keys`: FM_BM ints of shared
// memory that nothing uses before the main loop. Every thread of the CTA calls it.
__device__ void fm_rows_setup(FmRows& rows, const FmGemmParams& p, int slot0, int* keys,
                              const FmLoraExpand& lora) {
    if (threadIdx.x == 0) rows.slots = 0;
    for (int i = threadIdx.x; i < FM_BM; i += blockDim.x) {
        const int route = p.sorted_route_ids[slot0 + i];
        const int a = route < p.numel ? fm_lora_slot_of(lora, route) : -1;
        keys[i] = route >= p.numel ? FM_LORA_SLOTS + 1 : a < 0 ? FM_LORA_SLOTS : a;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < FM_BM; i += blockDim.x) {
        const int key = keys[i];
        if (key < FM_LORA_SLOTS) atomicOr(&rows.slots, 1ull << key);
        int at = 0;  // rows before it: smaller keys, and equal keys earlier in the block
        for (int j = 0; j < FM_BM; ++j) {
            const int kj = keys[j];  // the same word in every lane: a broadcast
            at += kj < key || (kj == key && j < i);
        }
        fm_rows_put(rows, p, slot0, i, at);
    }
}
#define FM_ROWS_SETUP(rows, p, slot0, keys) fm_rows_setup(rows, p, slot0, keys, lora)

// The expand in the epilogue reads B[a, e] for the tile's columns, per slot a of its rows:
// from DRAM, one round trip per chunk of fragments, while the base GEMM streams the weights
// near the copy rate (ncu at Qwen3 M = 1024: the expand made the LoRA GEMMs ~25 % slower).
// FM_LORA_PREFETCH_KTILES k-tiles before its last, the CTA asks L2 for those lines, so that
// the epilogue finds them there; as many or more than its k-tiles: at its first.
#ifndef FM_LORA_PREFETCH_KTILES
#define FM_LORA_PREFETCH_KTILES 8
#endif

__device__ __forceinline__ int fm_lora_prefetch_at(int k_tiles) {
    return max(0, k_tiles - FM_LORA_PREFETCH_KTILES);
}

// Every thread of the CTA: a line request for each 128 bytes of B rows its columns take.
__device__ __forceinline__ void fm_lora_prefetch_b(const FmLoraExpand& L, const FmGemmParams& p,
                                                   fm_u64 slots, int expert, int n0) {
    const int row_bytes = L.rank * (int)sizeof(fm_t);
    while (slots != 0) {
        const int a = __ffsll((long long)slots) - 1;
        slots &= slots - 1;
        const FmLoraSlot& s = L.b.slot[a];
        if (s.w == nullptr) continue;
        const char* b = (const char*)s.w + (fm_i64)(s.shared_outer ? 0 : expert) * L.n * row_bytes;
        for (int c = threadIdx.x; c < FM_BN && n0 + c < p.n; c += FM_THREADS) {
            const fm_i64 at = (fm_i64)fm_w_row(p, n0 + c) * row_bytes;
            // the lines the row starts or crosses into: its first only where it starts one
            // (a row shorter than a line shares it with its neighbours), and the tile's
            // first two columns (the first rows of the gate and up halves)
            const fm_i64 first = c < 2 || (at & 127) == 0 ? at : (at & ~(fm_i64)127) + 128;
            for (fm_i64 line = first; line < at + row_bytes; line += 128) fm_prefetch_l2(b + line);
        }
    }
}

// The expand's B in shared memory (FM_LORA_B_SMEM: the plain wgmma loop, whose stages are
// free once its k loop is done). Read from global memory, B costs a warp a round trip per
// chunk of fragments and per slot, in series (ncu at Qwen3 M = 1024: the LoRA GEMM2 at 57 %
// of DRAM bandwidth, its k loop only 12 k-tiles); copied first, it costs the CTA one round.
#if FM_LORA_GROUPED && defined(FM_WGMMA) && FM_WGMMA == 1
#define FM_LORA_B_SMEM 1
#else
#define FM_LORA_B_SMEM 0
#endif

#if FM_LORA_B_SMEM
// What the copies and the word reads need: 16-byte rows of B and of t, 16-byte aligned
// matrices. The same answer in every thread.
__device__ __forceinline__ bool fm_lora_b_shared_ok(const FmLoraExpand& L, fm_u64 slots) {
    if (L.rank * (int)sizeof(fm_t) % 16 != 0 || L.t_stride % 4 != 0 ||
        ((unsigned long long)L.t & 15ull) != 0)
        return false;
    for (; slots != 0; slots &= slots - 1) {
        const int a = __ffsll((long long)slots) - 1;
        if (((unsigned long long)L.b.slot[a].w & 15ull) != 0) return false;
    }
    return true;
}

// Where the copies go in the stage buffers: the tiles of B, `pitch` bytes a row, then t's
// rows of the tile, `t_pitch` floats a row.
struct FmLoraStaged {
    int pitch, slot_bytes, t_pitch, bytes;
};

__device__ __forceinline__ FmLoraStaged fm_lora_staged(const FmLoraExpand& L, fm_u64 slots) {
    FmLoraStaged s;
    // 16 bytes past a row of B and 8 floats past one of t: a warp's reads hit 32 banks (B at
    // r = 16 and 64, t at r = 8 to 64)
    s.pitch = L.rank * (int)sizeof(fm_t) + 16;
    s.slot_bytes = FM_BN * s.pitch;
    s.t_pitch = L.t_stride + 8;
    s.bytes = __popcll(slots) * s.slot_bytes + FM_BM * s.t_pitch * (int)sizeof(float);
    return s;
}

// Copies, for each slot of `slots` in turn, B[a, e]'s rows of the tile's columns (row j: W
// row fm_w_row(n0 + j)), then t's rows of the tile's routes, to `stages` as `st` says. Every
// thread of the CTA; all of it is in shared memory for every thread on return.
__device__ __forceinline__ void fm_lora_stage(const FmLoraExpand& L, const FmGemmParams& p,
                                              const FmRows& rows, fm_u64 slots, int expert,
                                              int n0, unsigned char* stages,
                                              const FmLoraStaged& st) {
    const int chunks = L.rank * (int)sizeof(fm_t) / 16;  // 16-byte pieces a row of B
    unsigned char* dst = stages;
    for (; slots != 0; slots &= slots - 1, dst += st.slot_bytes) {
        const FmLoraSlot& s = L.b.slot[__ffsll((long long)slots) - 1];
        const fm_t* b = (const fm_t*)s.w + (fm_i64)(s.shared_outer ? 0 : expert) * L.n * L.rank;
        for (int c = threadIdx.x; c < FM_BN * chunks; c += FM_THREADS) {
            const int j = c / chunks, q = c % chunks;
            if (n0 + j < p.n)
                fm_cp_async16(dst + j * st.pitch + 16 * q,
                              b + (fm_i64)fm_w_row(p, n0 + j) * L.rank + q * (16 / (int)sizeof(fm_t)),
                              true);
        }
    }
    const int t_chunks = L.t_stride / 4;  // 16-byte pieces a row of t
    for (int c = threadIdx.x; c < FM_BM * t_chunks; c += FM_THREADS) {
        const int i = c / t_chunks, q = c % t_chunks;
        const int route = rows.route[i];
        if (route >= 0)
            fm_cp_async16(dst + (i * st.t_pitch + 4 * q) * (int)sizeof(float),
                          L.t + (fm_i64)route * L.t_stride + 4 * q, true);
    }
    fm_cp_async_commit();
    fm_cp_async_wait<0>();
    __syncthreads();
}

// fm_lora_expand_frags with B and t from shared memory, where the tiles of all the CTA's
// slots (FmRows.slots) and its rows of t fit the `stage_bytes` at `stages` (at r = 16, up to
// ten slots in 64×128's three stages) and the word loads can serve; else from global memory.
// Every thread of the CTA, after its last wgmma and cp.async; row_lo: this lane's first tile
// row (row_lo + 8 the second).
template <int NJ, bool PAIRED>
__device__ __forceinline__ void fm_lora_expand_shared(const FmLoraExpand& L,
                                                      const FmGemmParams& p, const FmRows& rows,
                                                      int row_lo, int expert, int n0, int col0,
                                                      float* acc, unsigned char* stages,
                                                      int stage_bytes) {
    const fm_u64 slots = rows.slots;
    const int route_lo = rows.route[row_lo], route_hi = rows.route[row_lo + 8];
    // loaded before the copies, to arrive during them
    const int a_lo = fm_lora_slot_of(L, route_lo), a_hi = fm_lora_slot_of(L, route_hi);
    const FmLoraStaged st = fm_lora_staged(L, slots);
    FmLoraBTile bt{nullptr, st.pitch, st.slot_bytes, n0, nullptr, nullptr};
    if (st.bytes <= stage_bytes && fm_lora_b_shared_ok(L, slots)) {
        __syncthreads();  // every warpgroup's wgmmas are done reading the stages
        fm_lora_stage(L, p, rows, slots, expert, n0, stages, st);
        bt.tile = stages;
        const float* t_rows = (const float*)(stages + __popcll(slots) * st.slot_bytes);
        bt.t_lo = t_rows + row_lo * st.t_pitch;
        bt.t_hi = t_rows + (row_lo + 8) * st.t_pitch;
    }
    fm_lora_expand_frags<NJ, PAIRED>(L, route_lo, route_hi, a_lo, a_hi, expert, col0, acc, bt,
                                     slots);
}
#endif  // FM_LORA_B_SMEM
#else
__device__ __forceinline__ void fm_rows_setup(FmRows& rows, const FmGemmParams& p, int slot0) {
    for (int i = threadIdx.x; i < FM_BM; i += FM_THREADS) fm_rows_put(rows, p, slot0, i, i);
}
#define FM_ROWS_SETUP(rows, p, slot0, keys) fm_rows_setup(rows, p, slot0)
#endif

// This CTA's tile: its first slot, first column and expert. False for blocks past num_padded
// (read on the device) and blocks of no expert, which exit at once.
struct FmBlock {
    int slot0, n0, expert;
};

// GROUP_M rasterization (Triton's): consecutive CTAs walk group_m m-blocks for one n-tile,
// then the next n-tile, so a weight tile is read from DRAM once and found in L2 by the other
// m-blocks of its expert; m-block-major order streamed a large expert's whole weight matrix
// once per m-block (Mixtral's w13 is 235 MB per expert, L2 50 MB).
// `index` is a CTA's place in that walk (blockIdx.x; FM_WGMMA 3 also asks of its peer's).
__device__ __forceinline__ bool fm_block_at(const FmGemmParams& p, int index, FmBlock& b) {
    const int per_group = p.group_m * p.n_tiles;
    const int group = index / per_group, first_m = group * p.group_m;
    const int group_rows = min(p.m_blocks - first_m, p.group_m);
    const int in_group = index - group * per_group;
    const int m_block = first_m + in_group % group_rows, n_tile = in_group / group_rows;
    b.slot0 = m_block * FM_BM;
    b.n0 = n_tile * FM_BN;
    if (b.slot0 >= *p.num_padded) return false;
    b.expert = p.block_expert[m_block];
    return b.expert >= 0;
}
__device__ __forceinline__ bool fm_block(const FmGemmParams& p, FmBlock& b) {
    return fm_block_at(p, blockIdx.x, b);
}

// The shared-memory tiles start after the row table, 128-byte aligned.
__device__ __forceinline__ fm_t* fm_tiles(unsigned char* smem) {
    return (fm_t*)(smem + ((sizeof(FmRows) + 127) / 128) * 128);
}

#ifndef FM_FUSED_COMBINE
#define FM_FUSED_COMBINE 0
#endif
#if FM_FUSED_COMBINE
static_assert(FM_MMA && !FM_WGMMA && !FM_LORA, "the combine is the plain mma.sync loop's");
// A second kernel argument (where LoRA's GEMMs take the expand's), so that the kernels
// without the combine keep their parameters, and their code, as they were.
struct FmCombine {
    int* counts;           // [tokens, tiles]: GEMM2 tiles arrived; null: moe_combine runs
    const int* route_slot; // [numel]: -1 where the route was dropped
    void* out;             // [tokens, hidden]
    int tokens;            // M
    int tiles;             // GEMM2's n-tiles
    float rsf;             // routed_scaling_factor
};
#define FM_COMBINE_KERNEL_ARG , const __grid_constant__ FmCombine combine
// ---------------------------------------------------------------- fused combine
// FM_FUSED_COMBINE (the mma.sync loop of a layer with cuda.fuse_combine, no LoRA): where a
// run gives counts (combine.counts; decode) GEMM2's CTAs do SPEC §2's combine themselves, so that its launch and its wait for GEMM2's last CTA go. A CTA counts
// its arrival per token of its rows and its n-tile; the one whose arrival completes a token's
// live routes sums that token's K rows over the tile's columns, in k order in f32 as
// moe_combine does (the same bits), and writes them. GEMM1 zeroes the counts first (GEMM2
// waits for all of GEMM1 before its epilogue) and writes the zero rows of tokens with no live
// route, which no GEMM2 tile reaches. The routes' rows are all read by then (inplace: out is
// hidden), since a token's GEMM2 tiles come after its GEMM1 tiles.

// GEMM1: every thread of every CTA, after the align step's arrays are there.
__device__ void fm_combine_reset(const FmGemmParams& p, const FmCombine& c) {
    const int cta = blockIdx.x + blockIdx.y * gridDim.x, ctas = gridDim.x * gridDim.y;
    const int counts = c.tokens * c.tiles;
    for (int i = cta * blockDim.x + threadIdx.x; i < counts; i += ctas * blockDim.x)
        c.counts[i] = 0;
    for (int t = cta; t < c.tokens; t += ctas) {
        bool live = false;
        for (int k = 0; k < p.top_k; ++k) live |= c.route_slot[(fm_i64)t * p.top_k + k] >= 0;
        if (live) continue;
        fm_t* out = (fm_t*)c.out + (fm_i64)t * p.kdim;  // GEMM1's kdim is H
        for (int h = threadIdx.x; h < p.kdim; h += blockDim.x) out[h] = fm_store(0.0f);
    }
}

// A 16-bit load from L2: other CTAs' rows, which this SM's L1 never held in this kernel.
__device__ __forceinline__ fm_t fm_load_l2(const fm_t* at) {
    fm_u16 v;
    asm volatile("ld.global.cg.u16 %0, [%1];\n" : "=h"(v) : "l"(at));
    return v;
}

// Routes of a token summed per batch of loads: the loads of a batch are in flight together.
#define FM_COMBINE_BATCH 8

// GEMM2: every thread of the CTA, after its stores of y. `last`: FM_BM + 1 ints of shared
// memory the main loop is done with (its stages).
__device__ void fm_combine_arrive(const FmRows& rows, const FmGemmParams& p, const FmCombine& c,
                                  int n0, int* last) {
    __threadfence();  // this thread's rows of y, before the arrivals count them
    if (threadIdx.x == 0) last[0] = 0;  // the tokens this CTA completes; then which
    __syncthreads();
    for (int i = threadIdx.x; i < FM_BM; i += blockDim.x) {
        if (rows.route[i] < 0) continue;
        const int token = rows.route[i] / p.top_k;
        const int* slots = c.route_slot + (fm_i64)token * p.top_k;
        int live = 0;
        for (int k = 0; k < p.top_k; ++k) live += slots[k] >= 0;
        const int before = atomicAdd(c.counts + (fm_i64)token * c.tiles + n0 / FM_BN, 1);
        if (before == live - 1) last[1 + atomicAdd(&last[0], 1)] = token;
    }
    __syncthreads();
    const int tokens = last[0];
    if (tokens == 0) return;
    __threadfence();  // the other routes' rows, after the count that says they are written
    const int cols = min(FM_BN, p.n - n0);
    for (int at = threadIdx.x; at < tokens * cols; at += blockDim.x) {
        const int token = last[1 + at / cols], col = n0 + at % cols;
        const int* slots = c.route_slot + (fm_i64)token * p.top_k;
        const fm_t* y = (const fm_t*)p.out + (fm_i64)token * p.top_k * p.n + col;
        float sum = 0.0f;
        for (int k0 = 0; k0 < p.top_k; k0 += FM_COMBINE_BATCH) {
            bool live[FM_COMBINE_BATCH];
            fm_t v[FM_COMBINE_BATCH];
#pragma unroll
            for (int j = 0; j < FM_COMBINE_BATCH; ++j) {
                live[j] = k0 + j < p.top_k && slots[k0 + j] >= 0;
                v[j] = live[j] ? fm_load_l2(y + (fm_i64)(k0 + j) * p.n) : fm_store(0.0f);
            }
#pragma unroll
            for (int j = 0; j < FM_COMBINE_BATCH; ++j)
                if (live[j]) sum += fm_load(v[j]);
        }
        ((fm_t*)c.out)[(fm_i64)token * p.n + col] = fm_store(c.rsf * sum);
    }
}
#else
#define FM_COMBINE_KERNEL_ARG
#endif

#if FM_MMA
// The epilogue of one row of a tensor-core accumulator fragment (mma.sync's m16n8 and
// wgmma's m64nN give a thread the same shape): tile row `i`, columns col0 + 8j and the one
// after, values acc[4j + Q0] and acc[4j + Q0 + 1] (Q0 0: the fragment's first row; 2: the
// row 8 below). What depends on the row alone (route, router weight, output row) is read
// once per row: per value it had been most of the epilogue's instructions, and with a short
// k loop (DeepSeek's GEMM2: 4 k-tiles) the epilogue is a large share of the kernel's issue
// slots. Each value is rounded as the stage's output (SPEC §2); with FM_FUSED_ACT that
// rounded pair then goes through the activation, as moe_act would read it back (SPEC §3).
template <int NJ, int Q0>
__device__ __forceinline__ void fm_store_row(const FmRows& rows, const FmGemmParams& p,
                                             int expert, int slot0, int i, int col0,
                                             const float* acc) {
    const int route = rows.route[i];
    if (route < 0) return;
    const float scale = p.apply_router ? fm_read_as_f32(p.router, route, p.router_kind) : 1.0f;
    const fm_i64 bias_row = (fm_i64)expert * p.n;
#if FM_FUSED_ACT
    fm_t* out = (fm_t*)p.out + (fm_i64)(slot0 + fm_row_at(rows, i)) * p.inter;
#elif FM_GEMM_MODE == 1
    fm_t* out = (fm_t*)p.out + (fm_i64)(slot0 + fm_row_at(rows, i)) * p.n;
#else
    fm_t* out = (fm_t*)p.out + (fm_i64)route * p.n;
#endif
#pragma unroll
    for (int j = 0; j < NJ; ++j) {
        const int col = col0 + 8 * j;  // even
        if (col >= p.n) break;
        const bool has1 = col + 1 < p.n;
        float v0 = acc[4 * j + Q0], v1 = acc[4 * j + Q0 + 1];
        if (p.bias) {
            v0 += fm_read_as_f32(p.bias, bias_row + fm_w_row(p, col), p.bias_kind);
            if (has1) v1 += fm_read_as_f32(p.bias, bias_row + fm_w_row(p, col + 1), p.bias_kind);
        }
        const fm_t lo = fm_store(scale * v0), hi = fm_store(scale * v1);
#if FM_FUSED_ACT && FM_GATED
        out[col >> 1] = fm_store(fm_act(fm_load(lo), fm_load(hi), p.alpha, p.limit));  // n = 2I
#elif FM_FUSED_ACT
        out[col] = fm_store(fm_act(fm_load(lo)));
        if (has1) out[col + 1] = fm_store(fm_act(fm_load(hi)));
#else
        if (has1 && !(p.n & 1)) {  // one aligned 4-byte store
            *(unsigned*)(out + col) = (unsigned)lo | ((unsigned)hi << 16);
        } else {
            out[col] = lo;
            if (has1) out[col + 1] = hi;
        }
#endif
    }
}
#endif

// The epilogue for one accumulated value at tile row `i`, global column `col`.
__device__ __forceinline__ void fm_epilogue(const FmRows& rows, const FmGemmParams& p,
                                            int expert, int slot0, int i, int col,
                                            float acc FM_LORA_ARG) {
    const int route = rows.route[i];
    if (route < 0 || col >= p.n) return;
#if FM_LORA && !FM_MMA
    acc += fm_lora_delta(lora, route, expert, col);  // tensor-core paths: fm_lora_expand_frags
#endif
    const float bias = p.bias ? fm_read_as_f32(p.bias, (fm_i64)expert * p.n + col, p.bias_kind)
                              : 0.0f;
    const float scale = p.apply_router ? fm_read_as_f32(p.router, route, p.router_kind) : 1.0f;
#if FM_GEMM_MODE == 1
    ((fm_t*)p.out)[(fm_i64)(slot0 + fm_row_at(rows, i)) * p.n + col] =
        fm_store(scale * (acc + bias));
#else
    ((fm_t*)p.out)[(fm_i64)route * p.n + col] = fm_store((acc + bias) * scale);
#endif
}

// ---------------------------------------------------------------- clusters (sm_90)
// For the kernels launched in thread-block clusters: split-K's (below) and the multicast
// wgmma loop's CTA pairs (moe_gemm_wgmma_mc.cuh). Emitted only where called.
__device__ __forceinline__ unsigned fm_cluster_rank() {
    unsigned r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// Every thread of the cluster arrives (its shared-memory writes before it released to the
// cluster) and, in fm_cluster_wait, waits for every other one (acquiring theirs); apart, so
// that work needing neither can run between the two.
__device__ __forceinline__ void fm_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fm_cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void fm_cluster_sync() {
    fm_cluster_arrive();
    fm_cluster_wait();
}

// ---------------------------------------------------------------- split-K (sm_90)
// FM_SPLIT_K > 1 (mma.sync path): the grid's y is one thread-block cluster of FM_SPLIT_K
// CTAs per output tile, each taking an equal run of the k-tiles. At decode a GEMM with a
// long k loop and few tiles (DeepSeek's GEMM1: 9 experts × 8 tiles = 72 CTAs for 132 SMs,
// K = 7168) had too few loads in flight to stream its weights (ncu: 34 % of DRAM bandwidth);
// split, it has FM_SPLIT_K times the CTAs. The partial tiles meet in the first CTA's
// registers through distributed shared memory, added in rank order (deterministic, no
// workspace, no atomics); that CTA alone runs the epilogue.
#ifndef FM_SPLIT_K
#define FM_SPLIT_K 1
#endif
#if FM_SPLIT_K > 1
#define FM_CLUSTER __cluster_dims__(1, FM_SPLIT_K, 1)

// The float4 at `local` (a shared address of this CTA) in the shared memory of CTA `rank`.
__device__ __forceinline__ float4 fm_ld_cluster_f4(const void* local, unsigned rank) {
    const unsigned a = (unsigned)__cvta_generic_to_shared(local);
    unsigned remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(a), "r"(rank));
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote)
                 : "memory");
    return v;
}

// The k-tiles [first, first + count) of this CTA's share of `k_tiles`.
__device__ __forceinline__ void fm_split_range(int k_tiles, int& first, int& count) {
    const int r = (int)fm_cluster_rank();
    first = r * k_tiles / FM_SPLIT_K;
    count = (r + 1) * k_tiles / FM_SPLIT_K - first;
}

// Adds the partial accumulators of ranks 1.. into rank 0's, in rank order. `scratch`: this
// CTA's shared memory, free (the main loop done), room for FM_THREADS · N floats. True in
// the CTA that goes on to the epilogue.
template <int N>
__device__ __forceinline__ bool fm_split_reduce(float* acc, float* scratch) {
    static_assert(N % 4 == 0, "accumulators come in float4s");
    float4* part = (float4*)scratch;
    const unsigned rank = fm_cluster_rank();
    if (rank != 0) {
#pragma unroll
        for (int q = 0; q < N / 4; ++q)  // a thread's float4s FM_THREADS apart: conflict-free
            part[q * FM_THREADS + threadIdx.x] =
                make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
    }
    fm_cluster_sync();
    if (rank == 0) {
        for (unsigned r = 1; r < FM_SPLIT_K; ++r) {
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 v = fm_ld_cluster_f4(part + q * FM_THREADS + threadIdx.x, r);
                acc[4 * q] += v.x;
                acc[4 * q + 1] += v.y;
                acc[4 * q + 2] += v.z;
                acc[4 * q + 3] += v.w;
            }
        }
    }
    fm_cluster_sync();  // a CTA's shared memory must outlive the reads of it
    return rank == 0;
}
#else
#define FM_CLUSTER
#endif

#if FM_WGMMA
// ================================================================ Hopper tensor cores
static_assert(FM_SPLIT_K == 1, "split-K takes the mma.sync main loop");
#include "moe_gemm_wgmma.cuh"
#if FM_WGMMA == 2
#include "moe_gemm_wgmma_ws.cuh"
#elif FM_WGMMA == 3
#include "moe_gemm_wgmma_mc.cuh"
#endif

#elif FM_MMA
// ================================================================ tensor cores (f16, bf16)

// Shared rows are padded by 8 elements (16 bytes) so ldmatrix's 8 row reads hit 32 banks.
#define FM_LDS (FM_BK + 8)
#define FM_WTM (FM_BM / FM_WARPS_M)
#define FM_WTN (FM_BN / FM_WARPS_N)
#define FM_MI (FM_WTM / 16)
#define FM_NI (FM_WTN / 8)

// Which rows fm_load_stage loads: both, or only the A or only the W rows (GEMM2 issues its
// first stages' W rows before it waits for GEMM1; see the prologue).
#define FM_LOAD_ALL 0
#define FM_LOAD_A 1
#define FM_LOAD_W 2

// Loads the k-slice [k0, k0 + BK) of the A rows and W rows (PART) into one stage.
template <int PART = FM_LOAD_ALL>
__device__ __forceinline__ void fm_load_stage(fm_t* sa, fm_t* sb, const FmRows& rows,
                                              const FmGemmParams& p, const fm_t* w_expert,
                                              int n0, int k0) {
    const fm_t* a = (const fm_t*)p.a;
    constexpr int chunks_per_row = FM_BK / 8;
    constexpr int chunks = (FM_BM + FM_BN) * chunks_per_row;
    // Unrolled with a constant trip count: a thread's chunks sit FM_THREADS apart, the same
    // column kk in rows a constant stride apart, so the index math folds and hoists out of
    // the k loop. As a strided loop it did not, and at decode (one CTA per SM, few MMAs per
    // k-step) issuing that math bound the kernel (ncu: 0.39 warps issued per scheduler).
    static_assert(FM_THREADS % chunks_per_row == 0, "a thread's chunks share one column");
#pragma unroll
    for (int i = 0; i < (chunks + FM_THREADS - 1) / FM_THREADS; ++i) {
        const int c = threadIdx.x + i * FM_THREADS;
        if (chunks % FM_THREADS != 0 && c >= chunks) break;
        const int row = c / chunks_per_row, kk = (c % chunks_per_row) * 8, k = k0 + kk;
        if ((PART == FM_LOAD_A && row >= FM_BM) || (PART == FM_LOAD_W && row < FM_BM)) continue;
        const fm_t* src;
        fm_t* dst;
        bool row_valid;
        if (row < FM_BM) {
            const fm_i64 off = rows.a_offset[row];
            row_valid = off >= 0;
            src = a + (row_valid ? off + k : 0);
            dst = sa + row * FM_LDS + kk;
        } else {
            const int n = n0 + row - FM_BM;
            row_valid = n < p.n;
            src = w_expert + (row_valid ? (fm_i64)fm_w_row(p, n) * p.kdim + k : 0);
            dst = sb + (row - FM_BM) * FM_LDS + kk;
        }
#if FM_VEC == 8
        // kdim is a multiple of 8 here, so a chunk is wholly inside or wholly past the end
        const bool valid = row_valid && k < p.kdim;
        fm_cp_async16(dst, valid ? (const void*)src : p.w, valid);
#else
#pragma unroll
        for (int j = 0; j < 8; ++j)
            dst[j] = (row_valid && k + j < p.kdim) ? src[j] : (fm_t)0;
#endif
    }
}

// A split-K cluster's CTAs share their tile (blockIdx.x), so they all exit here together.
extern "C" __global__ void __launch_bounds__(FM_THREADS) FM_CLUSTER
    moe_gemm(const FmGemmParams p FM_LORA_KERNEL_ARG FM_COMBINE_KERNEL_ARG) {
#if FM_GEMM_MODE == 1
    // GEMM1 needs the align step's arrays first thing. Once they are there GEMM2 may start
    // (tile.pdl) and load its first weight stages: at once (early_dependents), or once every
    // CTA is past its k loop. At once won at Qwen3 and DeepSeek M = 1 (1.04-1.08x) and lost
    // at gpt-oss M = 1 (0.85x), where GEMM2's early CTAs got in GEMM1's way (BENCHMARKS.md).
    fm_pdl_wait();
    if (p.early_dependents) fm_pdl_launch_dependents();
#if FM_FUSED_COMBINE
    if (combine.counts) fm_combine_reset(p, combine);
#endif
#endif
    FmBlock b;
    if (!fm_block(p, b)) return;
    const int slot0 = b.slot0, n0 = b.n0, expert = b.expert;

    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows& rows = *(FmRows*)fm_smem;
    fm_t* stages = fm_tiles(fm_smem);
    constexpr int stage_elems = (FM_BM + FM_BN) * FM_LDS;
    FM_ROWS_SETUP(rows, p, slot0, (int*)stages);
    __syncthreads();

    const fm_t* w_expert = (const fm_t*)p.w + (fm_i64)expert * p.n * p.kdim;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp / FM_WARPS_N, wn = warp % FM_WARPS_N;
    float acc[FM_MI][FM_NI][4];
#pragma unroll
    for (int i = 0; i < FM_MI; ++i)
#pragma unroll
        for (int j = 0; j < FM_NI; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

    // this CTA's k-tiles [kt0, kt0 + k_tiles): all of them, or its split's share
    const int all_k_tiles = (p.kdim + FM_BK - 1) / FM_BK;
    int kt0 = 0, k_tiles = all_k_tiles;
#if FM_SPLIT_K > 1
    fm_split_range(all_k_tiles, kt0, k_tiles);
#endif
#if FM_GEMM_MODE == 2
    // The first stages' W rows depend on nothing GEMM1 writes: as a programmatic dependent
    // (tile.pdl) this CTA streams them while GEMM1 finishes, then waits for the activation
    // rows. They join stage 0's copy group, which the first k-step waits for anyway.
#pragma unroll
    for (int s = 0; s < FM_STAGES - 1; ++s)
        if (s < k_tiles)
            fm_load_stage<FM_LOAD_W>(stages + s * stage_elems,
                                     stages + s * stage_elems + FM_BM * FM_LDS, rows, p, w_expert,
                                     n0, (kt0 + s) * FM_BK);
    fm_pdl_wait();
    constexpr int first_part = FM_LOAD_A;
#else
    constexpr int first_part = FM_LOAD_ALL;
#endif
#pragma unroll
    for (int s = 0; s < FM_STAGES - 1; ++s) {
        if (s < k_tiles)
            fm_load_stage<first_part>(stages + s * stage_elems,
                                      stages + s * stage_elems + FM_BM * FM_LDS, rows, p,
                                      w_expert, n0, (kt0 + s) * FM_BK);
        fm_cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int next = kt + FM_STAGES - 1;
        if (next < k_tiles) {
            fm_t* st = stages + (next % FM_STAGES) * stage_elems;
            fm_load_stage(st, st + FM_BM * FM_LDS, rows, p, w_expert, n0, (kt0 + next) * FM_BK);
        }
        fm_cp_async_commit();
        fm_cp_async_wait<FM_STAGES - 1>();
        __syncthreads();

        const fm_t* sa = stages + (kt % FM_STAGES) * stage_elems;
        const fm_t* sb = sa + FM_BM * FM_LDS;
#pragma unroll
        for (int kk = 0; kk < FM_BK; kk += 16) {
            unsigned af[FM_MI][4];
#pragma unroll
            for (int i = 0; i < FM_MI; ++i) {
                const int r = wm * FM_WTM + i * 16 + (lane % 16);
                fm_ldmatrix_x4(af[i], sa + r * FM_LDS + kk + (lane / 16) * 8);
            }
            unsigned bf[FM_NI][2];
#pragma unroll
            for (int j = 0; j + 1 < FM_NI; j += 2) {
                // lanes 0-15: n rows j*8.., lanes 16-31: n rows (j+1)*8..; k halves by lane/8
                const int nrow = wn * FM_WTN + j * 8 + (lane / 16) * 8 + (lane % 8);
                unsigned r4[4];
                fm_ldmatrix_x4(r4, sb + nrow * FM_LDS + kk + ((lane / 8) % 2) * 8);
                bf[j][0] = r4[0];
                bf[j][1] = r4[1];
                bf[j + 1][0] = r4[2];
                bf[j + 1][1] = r4[3];
            }
            if (FM_NI % 2 == 1) {
                const int j = FM_NI - 1;
                const int nrow = wn * FM_WTN + j * 8 + (lane % 8);
                unsigned r2[2];
                fm_ldmatrix_x2(r2, sb + nrow * FM_LDS + kk + ((lane / 8) % 2) * 8);
                bf[j][0] = r2[0];
                bf[j][1] = r2[1];
            }
#pragma unroll
            for (int i = 0; i < FM_MI; ++i)
#pragma unroll
                for (int j = 0; j < FM_NI; ++j) fm_mma(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }
        __syncthreads();
    }
    fm_cp_async_wait<0>();
    // GEMM1's dependent where not at once; the combine's blocks, for GEMM2's epilogue end
    if (FM_GEMM_MODE == 2 || !p.early_dependents) fm_pdl_launch_dependents();
#if FM_SPLIT_K > 1
    __syncthreads();  // no thread's cp.async still lands in the stages the partials reuse
    if (!fm_split_reduce<FM_MI * FM_NI * 4>(&acc[0][0][0], (float*)stages)) return;
#endif

#if FM_LORA
#pragma unroll
    for (int i = 0; i < FM_MI; ++i) {
        const int row = wm * FM_WTM + i * 16 + lane / 4;
        fm_lora_expand_frags<FM_NI, FM_PAIRED_HALVES>(lora, rows.route[row], rows.route[row + 8],
                                                      expert, n0 + wn * FM_WTN, &acc[i][0][0]);
    }
#endif
    // c0, c1: row lane/4, columns 2(lane%4) + {0, 1}; c2, c3: eight rows further down.
#pragma unroll
    for (int i = 0; i < FM_MI; ++i) {
        const int row = wm * FM_WTM + i * 16 + lane / 4;
        const int col0 = n0 + wn * FM_WTN + (lane % 4) * 2;
        fm_store_row<FM_NI, 0>(rows, p, expert, slot0, row, col0, &acc[i][0][0]);
        fm_store_row<FM_NI, 2>(rows, p, expert, slot0, row + 8, col0, &acc[i][0][0]);
    }
#if FM_FUSED_COMBINE && FM_GEMM_MODE == 2
    if (combine.counts) fm_combine_arrive(rows, p, combine, n0, (int*)stages);  // k loop done
#endif
}

#else
// ================================================================ SIMT (f32 layers)
static_assert(FM_SPLIT_K == 1, "split-K takes the tensor-core path");
// Each thread accumulates FM_PER_THREAD outputs of the tile; shared rows are padded by one
// element so that threads reading one k across many rows hit different banks.
#define FM_LDS (FM_BK + 1)
#define FM_PER_THREAD ((FM_BM * FM_BN + FM_THREADS - 1) / FM_THREADS)

extern "C" __global__ void __launch_bounds__(FM_THREADS)
    moe_gemm(const FmGemmParams p FM_LORA_KERNEL_ARG) {
    fm_pdl_wait();  // (tile.pdl) the stage before this one
    fm_pdl_launch_dependents();
    FmBlock b;
    if (!fm_block(p, b)) return;
    const int slot0 = b.slot0, n0 = b.n0, expert = b.expert;

    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows& rows = *(FmRows*)fm_smem;
    fm_t* sa = fm_tiles(fm_smem);
    fm_t* sb = sa + FM_BM * FM_LDS;
    FM_ROWS_SETUP(rows, p, slot0, (int*)sa);
    __syncthreads();

    const fm_t* a = (const fm_t*)p.a;
    const fm_t* w_expert = (const fm_t*)p.w + (fm_i64)expert * p.n * p.kdim;
    float acc[FM_PER_THREAD];
#pragma unroll
    for (int q = 0; q < FM_PER_THREAD; ++q) acc[q] = 0.0f;

    for (int k0 = 0; k0 < p.kdim; k0 += FM_BK) {
        for (int c = threadIdx.x; c < (FM_BM + FM_BN) * FM_BK; c += FM_THREADS) {
            const int row = c / FM_BK, kk = c % FM_BK, k = k0 + kk;
            if (row < FM_BM) {
                const fm_i64 off = rows.a_offset[row];
                sa[row * FM_LDS + kk] = (off >= 0 && k < p.kdim) ? a[off + k] : (fm_t)0;
            } else {
                const int n = n0 + row - FM_BM;
                sb[(row - FM_BM) * FM_LDS + kk] =
                    (n < p.n && k < p.kdim) ? w_expert[(fm_i64)n * p.kdim + k] : (fm_t)0;
            }
        }
        __syncthreads();
#pragma unroll
        for (int q = 0; q < FM_PER_THREAD; ++q) {
            const int idx = threadIdx.x + q * FM_THREADS;
            if (idx < FM_BM * FM_BN) {
                const int row = idx / FM_BN, col = idx % FM_BN;
                float sum = acc[q];
                for (int kk = 0; kk < FM_BK; ++kk)
                    sum += fm_load(sa[row * FM_LDS + kk]) * fm_load(sb[col * FM_LDS + kk]);
                acc[q] = sum;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < FM_PER_THREAD; ++q) {
        const int idx = threadIdx.x + q * FM_THREADS;
        if (idx < FM_BM * FM_BN)
            fm_epilogue(rows, p, expert, slot0, idx / FM_BN, n0 + idx % FM_BN, acc[q]
                        FM_LORA_PASS);
    }
}
#endif

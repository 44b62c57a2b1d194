// SPEC §4 on the device: the align step, the same arrays as the CPU's src/align.rs, stable
// (route order within each expert) without atomics on the order. In one block (moe_align), in
// one warp for at most 32 routes (moe_align_warp), or for many routes over chunks of them in
// three launches (the end of this file).
//
// The routes are cut into `segments` contiguous pieces, one warp each (segments ≤ warps). A
// warp walks its piece in order, 32 routes at a time: lanes with the same expert find each
// other with __match_any_sync, so a route's rank within its expert and piece is the running
// count of the piece plus the lanes below it. Then, per expert, the pieces' counts become
// their starts (a scan over pieces), the experts' padded starts a scan over experts, and every
// route lands at padded_start[e] + piece start + rank. A warp's steps grow with numel /
// segments, not with E × numel as a warp-per-expert scan would.
// Shared memory: piece_counts [segments][E], padded_start [E + 1], bad [1] (ints); the host
// picks segments so that fits (kernels.rs).
// [TAG_GRAPH_SAFE]: no allocation, no host sync; num_padded stays on the device.
#include "common.cuh"

// Ranks the routes [begin, end) in `segments` pieces, one warp each, as moe_align's step 1, and
// turns each piece's counts into the piece's starts within the range; totals[e] ends as the
// range's total of expert e. Returns the piece length (for the rank's piece: (r - begin) / it).
template <typename Id>
__device__ int fm_rank_pieces(const Id* __restrict__ topk_ids, int begin, int end, int experts,
                              int segments, int* piece_counts, int* totals, int* route_slot,
                              unsigned* bad) {
    const unsigned lane = threadIdx.x & 31u;
    const int warp = threadIdx.x >> 5;
    const int piece_len = (end - begin + segments - 1) / segments;
    if (warp < segments) {
        int* counts = piece_counts + warp * experts;
        const int lo = begin + warp * piece_len, hi = min(end, lo + piece_len);
        unsigned my_bad = 0;
        for (int base = lo; base < hi; base += 32) {
            const int r = base + (int)lane;
            int e = -1;
            if (r < hi) {
                const long long id = (long long)topk_ids[r];
                if (id >= 0 && id < experts) e = (int)id;
                else if (id != -1) ++my_bad;
            }
            const unsigned peers = __match_any_sync(FM_FULL_MASK, e);
            const int rank = e >= 0 ? counts[e] + __popc(peers & fm_lanes_below(lane)) : -1;
            __syncwarp();
            if (e >= 0 && (int)lane == __ffs(peers) - 1) counts[e] += __popc(peers);
            __syncwarp();
            if (r < hi) route_slot[r] = rank;
        }
        if (my_bad != 0) atomicAdd(bad, my_bad);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        int running = 0;
        for (int s = 0; s < segments; ++s) {
            const int c = piece_counts[s * experts + e];
            piece_counts[s * experts + e] = running;
            running += c;
        }
        totals[e] = running;
    }
    __syncthreads();
    return piece_len;
}

// Warp 0's exclusive scans over experts, each lane a run of consecutive experts: from the
// experts' route counts (`totals`; may be `padded_start` itself, read before written) to their
// padded starts, expert_offsets (kept routes before e) and num_padded; and the bad ids found,
// one plain write to the host-mapped counter, only when there is something to report (it is
// read by the next moe_prepare or moe_run).
__device__ void fm_scan_experts(const int* totals, int* padded_start, int experts, int block_m,
                                int* __restrict__ expert_offsets, int* __restrict__ num_padded,
                                unsigned bad, unsigned* __restrict__ bad_ids) {
    const unsigned lane = threadIdx.x & 31u;
    const int chunk = (experts + 31) / 32;
    const int lo = min(experts, (int)lane * chunk), hi = min(experts, lo + chunk);
    int padded = 0, kept = 0;
    for (int e = lo; e < hi; ++e) {
        padded += (totals[e] + block_m - 1) / block_m * block_m;
        kept += totals[e];
    }
    int padded_incl = padded, kept_incl = kept;
    for (int off = 1; off < 32; off <<= 1) {
        const int p = __shfl_up_sync(FM_FULL_MASK, padded_incl, off);
        const int k = __shfl_up_sync(FM_FULL_MASK, kept_incl, off);
        if ((int)lane >= off) {
            padded_incl += p;
            kept_incl += k;
        }
    }
    int padded_at = padded_incl - padded, kept_at = kept_incl - kept;
    for (int e = lo; e < hi; ++e) {
        const int c = totals[e];
        padded_start[e] = padded_at;
        expert_offsets[e] = kept_at;
        padded_at += (c + block_m - 1) / block_m * block_m;
        kept_at += c;
    }
    if (lane == 31) {
        padded_start[experts] = padded_incl;
        expert_offsets[experts] = kept_incl;
        *num_padded = padded_incl;
        if (bad != 0) *(volatile unsigned*)bad_ids += bad;
    }
}

template <typename Id>
__device__ void moe_align(const Id* __restrict__ topk_ids,  // [numel]: ids in [-1, E)
                          int numel, int experts, int block_m, int capacity, int max_blocks,
                          int segments,
                          int* __restrict__ sorted_route_ids,  // [capacity]
                          int* __restrict__ block_expert,      // [max_blocks]
                          int* __restrict__ num_padded,        // [1]
                          int* __restrict__ expert_offsets,    // [E + 1]: kept routes before e
                          int* __restrict__ route_slot,        // [numel]: padded position, -1 dropped
                          unsigned* __restrict__ bad_ids) {    // [1]: ids outside [-1, E), counted
    extern __shared__ int shared[];
    int* piece_counts = shared;                               // [segments][E]
    int* padded_start = shared + segments * experts;          // [E + 1]
    unsigned* bad = (unsigned*)(padded_start + experts + 1);  // [1]
    const int warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < segments * experts; i += blockDim.x) piece_counts[i] = 0;
    if (threadIdx.x == 0) *bad = 0;
    for (int i = threadIdx.x; i < capacity; i += blockDim.x) sorted_route_ids[i] = numel;
    for (int i = threadIdx.x; i < max_blocks; i += blockDim.x) block_expert[i] = -1;
    __syncthreads();

    // 1-2. Each piece in order: a route's rank among its expert's routes of the piece (kept in
    //    route_slot until step 4); ids out of range match no expert (they drop) and are
    //    counted. Then the pieces' counts become their starts within the expert; the expert's
    //    total goes to padded_start[e] for step 3.
    const int piece_len = fm_rank_pieces(topk_ids, 0, numel, experts, segments, piece_counts,
                                         padded_start, route_slot, bad);

    // 3. Exclusive scans over experts (warp 0).
    if (warp == 0)
        fm_scan_experts(padded_start, padded_start, experts, block_m, expert_offsets, num_padded,
                        *bad, bad_ids);
    __syncthreads();

    // 4. Every kept route to its place; 5. every used block tagged with its expert.
    for (int r = threadIdx.x; r < numel; r += blockDim.x) {
        const int rank = route_slot[r];
        if (rank < 0) continue;
        const int e = (int)topk_ids[r];
        const int at = padded_start[e] + piece_counts[(r / piece_len) * experts + e] + rank;
        sorted_route_ids[at] = r;
        route_slot[r] = at;
    }
    for (int e = threadIdx.x; e < experts; e += blockDim.x)
        for (int b = padded_start[e] / block_m; b < padded_start[e + 1] / block_m; ++b)
            block_expert[b] = e;
}

#define FM_ALIGN_ENTRY(name, Id)                                                              \
    extern "C" __global__ void __launch_bounds__(1024) name(                                  \
        const Id* topk_ids, int numel, int experts, int block_m, int capacity, int max_blocks, \
        int segments, int* sorted_route_ids, int* block_expert, int* num_padded,              \
        int* expert_offsets, int* route_slot, unsigned* bad_ids) {                             \
        fm_pdl_launch_dependents(); /* GEMM1 (tile.pdl) may be scheduled; it waits for us */  \
        moe_align<Id>(topk_ids, numel, experts, block_m, capacity, max_blocks, segments,       \
                      sorted_route_ids, block_expert, num_padded, expert_offsets, route_slot,  \
                      bad_ids);                                                                \
    }

FM_ALIGN_ENTRY(moe_align__i32, int)
FM_ALIGN_ENTRY(moe_align__i64, long long)

// ---------------------------------------------------------------- the same, in one warp
// Decode's few routes (numel <= 32: M = 1 to 4 at top-8) in one warp, a route per lane, with
// no shared memory and no block barrier: ncu had the one-block kernel at 6.2 us for Qwen3's 8
// routes (cold, base clocks), its 32 warps waiting on each other at four __syncthreads, and
// GEMM1 waits for all of it. Lanes with the same expert find each other with
// __match_any_sync (rank = lanes below); an expert's padded start and kept routes before it
// come from the other lanes' groups by shuffles. The same arrays as moe_align.
template <typename Id>
__device__ void moe_align_warp(const Id* __restrict__ topk_ids, int numel, int experts,
                               int block_m, int capacity, int max_blocks,
                               int* __restrict__ sorted_route_ids, int* __restrict__ block_expert,
                               int* __restrict__ num_padded, int* __restrict__ expert_offsets,
                               int* __restrict__ route_slot, unsigned* __restrict__ bad_ids) {
    const unsigned lane = threadIdx.x & 31u;
    const int r = (int)lane;
    int e = -1;  // this lane's route's expert; -1: no route, filtered (-1) or out of range
    bool bad = false;
    if (r < numel) {
        const long long id = (long long)topk_ids[r];
        if (id >= 0 && id < experts) e = (int)id;
        else bad = id != -1;
    }
    const unsigned peers = __match_any_sync(FM_FULL_MASK, e);
    const bool leader = e >= 0 && (int)lane == __ffs(peers) - 1;  // one lane per expert
    const int count = __popc(peers);
    const int padded = (count + block_m - 1) / block_m * block_m;
    // Over the experts' leaders: the padded start and the kept routes before this lane's
    // expert, and the totals.
    int start = 0, total_padded = 0;
    for (int j = 0; j < 32; ++j) {
        const int ej = __shfl_sync(FM_FULL_MASK, e, j);
        const int pj = __shfl_sync(FM_FULL_MASK, padded, j);
        const bool lj = __shfl_sync(FM_FULL_MASK, leader, j);
        if (lj) {
            total_padded += pj;
            if (ej < e) start += pj;
        }
    }
    // 1. Sentinels everywhere, then (after __syncwarp orders them) the routes over them.
    for (int i = r; i < capacity; i += 32) sorted_route_ids[i] = numel;
    for (int i = r; i < max_blocks; i += 32) block_expert[i] = -1;
    __syncwarp();
    if (r < numel) {
        const int at = e >= 0 ? start + __popc(peers & fm_lanes_below(lane)) : -1;
        if (at >= 0) sorted_route_ids[at] = r;
        route_slot[r] = at;
    }
    if (leader)
        for (int b = start / block_m; b < (start + padded) / block_m; ++b) block_expert[b] = e;
    // 2. expert_offsets[x] = kept routes of experts below x, x in [0, E]: each lane takes every
    //    32nd x and counts over the routes, whose experts it gathers first.
    int ids[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) ids[j] = __shfl_sync(FM_FULL_MASK, e, j);
    for (int x = r; x <= experts; x += 32) {
        int kept = 0;
#pragma unroll
        for (int j = 0; j < 32; ++j) kept += ids[j] >= 0 && ids[j] < x;
        expert_offsets[x] = kept;
    }
    const unsigned bad_count = __popc(__ballot_sync(FM_FULL_MASK, bad));
    if (lane == 0) {
        *num_padded = total_padded;
        if (bad_count != 0) *(volatile unsigned*)bad_ids += bad_count;
    }
}

#define FM_ALIGN_WARP_ENTRY(name, Id)                                                          \
    extern "C" __global__ void __launch_bounds__(32) name(                                    \
        const Id* topk_ids, int numel, int experts, int block_m, int capacity, int max_blocks, \
        int /* segments: moe_align's arguments, unused */, int* sorted_route_ids,              \
        int* block_expert, int* num_padded, int* expert_offsets, int* route_slot,              \
        unsigned* bad_ids) {                                                                   \
        fm_pdl_launch_dependents(); /* as moe_align's */                                       \
        moe_align_warp<Id>(topk_ids, numel, experts, block_m, capacity, max_blocks,            \
                           sorted_route_ids, block_expert, num_padded, expert_offsets,         \
                           route_slot, bad_ids);                                               \
    }

FM_ALIGN_WARP_ENTRY(moe_align_warp__i32, int)
FM_ALIGN_WARP_ENTRY(moe_align_warp__i64, long long)

// ---------------------------------------------------------------- the same, over many blocks
// One block is bound by its SM: ncu at M = 4096, E = 257, top 9 (36864 routes) had its L1 50 %
// busy with the scattered stores and its warps waiting, 100 us. For many routes the host cuts
// them into `chunks` contiguous chunks and launches three kernels instead, the same arrays out:
//   count   (a block per chunk): the routes of the chunk ranked as moe_align ranks them, in
//           pieces of the chunk; route_slot[r] = the route's rank among its expert's routes of
//           the chunk; chunk_counts[c][e] = the chunk's routes of expert e, [c][E] its bad ids.
//   scan    (one block): per expert, the chunks' counts become their starts, plus the expert's
//           padded start; expert_offsets, num_padded, block_expert, the padding's sentinels.
//   scatter (a block per chunk): every kept route to chunk_counts[c][e] + its rank.
// chunk_counts [chunks][E + 1] ints is the workspace's compact_routes section, which the CUDA
// path does not use otherwise (the host keeps chunks · (E + 1) ≤ numel).

template <typename Id>
__device__ void moe_align_count(const Id* __restrict__ topk_ids, int numel, int experts,
                                int chunk_len, int segments, int* __restrict__ route_slot,
                                int* __restrict__ chunk_counts) {
    extern __shared__ int shared[];
    int* piece_counts = shared;                                     // [segments][E]
    unsigned* bad = (unsigned*)(piece_counts + segments * experts);  // [1]
    for (int i = threadIdx.x; i < segments * experts; i += blockDim.x) piece_counts[i] = 0;
    if (threadIdx.x == 0) *bad = 0;
    __syncthreads();
    const int begin = min(numel, (int)blockIdx.x * chunk_len), end = min(numel, begin + chunk_len);
    int* mine = chunk_counts + (fm_i64)blockIdx.x * (experts + 1);
    const int piece_len = fm_rank_pieces(topk_ids, begin, end, experts, segments, piece_counts,
                                         mine, route_slot, bad);
    for (int r = begin + (int)threadIdx.x; r < end; r += blockDim.x) {
        const int rank = route_slot[r];
        if (rank >= 0)
            route_slot[r] = piece_counts[((r - begin) / piece_len) * experts + (int)topk_ids[r]] + rank;
    }
    if (threadIdx.x == 0) mine[experts] = (int)*bad;
}

__device__ void moe_align_scan(int experts, int block_m, int capacity, int max_blocks,
                               int chunks, int* __restrict__ chunk_counts,
                               int* __restrict__ sorted_route_ids,
                               int* __restrict__ block_expert, int* __restrict__ num_padded,
                               int* __restrict__ expert_offsets, unsigned* __restrict__ bad_ids,
                               int numel) {
    extern __shared__ int shared[];
    int* padded_start = shared;                         // [E + 1]
    int* totals = padded_start + experts + 1;           // [E]
    unsigned* bad = (unsigned*)(totals + experts);      // [1]
    const unsigned lane = threadIdx.x & 31u;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int stride = experts + 1;
    if (threadIdx.x == 0) *bad = 0;
    for (int i = threadIdx.x; i < max_blocks; i += blockDim.x) block_expert[i] = -1;
    __syncthreads();

    // 1. Per expert, a warp scans the chunks' counts 32 at a time: they become starts.
    for (int e = warp; e < experts; e += warps) {
        int running = 0;
        for (int c0 = 0; c0 < chunks; c0 += 32) {
            const int c = c0 + (int)lane;
            const int n = c < chunks ? chunk_counts[(fm_i64)c * stride + e] : 0;
            int incl = n;
            for (int off = 1; off < 32; off <<= 1) {
                const int v = __shfl_up_sync(FM_FULL_MASK, incl, off);
                if ((int)lane >= off) incl += v;
            }
            if (c < chunks) chunk_counts[(fm_i64)c * stride + e] = running + incl - n;
            running += __shfl_sync(FM_FULL_MASK, incl, 31);
        }
        if (lane == 0) totals[e] = running;
    }
    if (warp == warps - 1) {  // the chunks' bad ids
        unsigned n = 0;
        for (int c = (int)lane; c < chunks; c += 32) n += (unsigned)chunk_counts[(fm_i64)c * stride + experts];
        for (int off = 16; off > 0; off >>= 1) n += __shfl_down_sync(FM_FULL_MASK, n, off);
        if (lane == 0) *bad = n;
    }
    __syncthreads();

    // 2. Exclusive scans over experts (warp 0).
    if (warp == 0)
        fm_scan_experts(totals, padded_start, experts, block_m, expert_offsets, num_padded, *bad,
                        bad_ids);
    __syncthreads();

    // 3. The chunks' starts become places; every used block tagged; sentinels in each
    //    expert's padding and past num_padded (the routes fill the rest, in scatter).
    for (int i = threadIdx.x; i < chunks * experts; i += blockDim.x) {
        const int c = i / experts, e = i % experts;
        chunk_counts[(fm_i64)c * stride + e] += padded_start[e];
    }
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        for (int b = padded_start[e] / block_m; b < padded_start[e + 1] / block_m; ++b)
            block_expert[b] = e;
        for (int i = padded_start[e] + totals[e]; i < padded_start[e + 1]; ++i)
            sorted_route_ids[i] = numel;
    }
    for (int i = padded_start[experts] + (int)threadIdx.x; i < capacity; i += blockDim.x)
        sorted_route_ids[i] = numel;
}

template <typename Id>
__device__ void moe_align_scatter(const Id* __restrict__ topk_ids, int numel, int experts,
                                  int chunk_len, const int* __restrict__ chunk_counts,
                                  int* __restrict__ sorted_route_ids,
                                  int* __restrict__ route_slot) {
    const int begin = min(numel, (int)blockIdx.x * chunk_len), end = min(numel, begin + chunk_len);
    const int* starts = chunk_counts + (fm_i64)blockIdx.x * (experts + 1);
    for (int r = begin + (int)threadIdx.x; r < end; r += blockDim.x) {
        const int rank = route_slot[r];
        if (rank < 0) continue;
        const int at = starts[(int)topk_ids[r]] + rank;
        sorted_route_ids[at] = r;
        route_slot[r] = at;
    }
}

#define FM_ALIGN_CHUNK_ENTRIES(suffix, Id)                                                     \
    extern "C" __global__ void __launch_bounds__(1024) moe_align_count__##suffix(             \
        const Id* topk_ids, int numel, int experts, int chunk_len, int segments,               \
        int* route_slot, int* chunk_counts) {                                                  \
        moe_align_count<Id>(topk_ids, numel, experts, chunk_len, segments, route_slot,         \
                            chunk_counts);                                                     \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) moe_align_scatter__##suffix(           \
        const Id* topk_ids, int numel, int experts, int chunk_len, const int* chunk_counts,    \
        int* sorted_route_ids, int* route_slot) {                                              \
        fm_pdl_launch_dependents(); /* as moe_align's */                                       \
        moe_align_scatter<Id>(topk_ids, numel, experts, chunk_len, chunk_counts,               \
                              sorted_route_ids, route_slot);                                   \
    }

FM_ALIGN_CHUNK_ENTRIES(i32, int)
FM_ALIGN_CHUNK_ENTRIES(i64, long long)

extern "C" __global__ void __launch_bounds__(1024) moe_align_scan_chunks(
    int numel, int experts, int block_m, int capacity, int max_blocks, int chunks,
    int* chunk_counts, int* sorted_route_ids, int* block_expert, int* num_padded,
    int* expert_offsets, unsigned* bad_ids) {
    moe_align_scan(experts, block_m, capacity, max_blocks, chunks, chunk_counts,
                   sorted_route_ids, block_expert, num_padded, expert_offsets, bad_ids, numel);
}

// SPEC §4 on the device: the align step in one block, the same arrays as the CPU's
// src/align.rs, stable (route order within each expert) without atomics on the order.
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
    const unsigned lane = threadIdx.x & 31u;
    const int warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < segments * experts; i += blockDim.x) piece_counts[i] = 0;
    if (threadIdx.x == 0) *bad = 0;
    for (int i = threadIdx.x; i < capacity; i += blockDim.x) sorted_route_ids[i] = numel;
    for (int i = threadIdx.x; i < max_blocks; i += blockDim.x) block_expert[i] = -1;
    __syncthreads();

    // 1. Each piece in order: a route's rank among its expert's routes of the piece (kept in
    //    route_slot until step 4). Ids out of range match no expert (they drop) and are counted.
    const int piece_len = (numel + segments - 1) / segments;
    if (warp < segments) {
        int* counts = piece_counts + warp * experts;
        const int begin = warp * piece_len, end = min(numel, begin + piece_len);
        unsigned my_bad = 0;
        for (int base = begin; base < end; base += 32) {
            const int r = base + (int)lane;
            int e = -1;
            if (r < end) {
                const long long id = (long long)topk_ids[r];
                if (id >= 0 && id < experts) e = (int)id;
                else if (id != -1) ++my_bad;
            }
            const unsigned peers = __match_any_sync(FM_FULL_MASK, e);
            const int rank = e >= 0 ? counts[e] + __popc(peers & fm_lanes_below(lane)) : -1;
            __syncwarp();
            if (e >= 0 && (int)lane == __ffs(peers) - 1) counts[e] += __popc(peers);
            __syncwarp();
            if (r < end) route_slot[r] = rank;
        }
        if (my_bad != 0) atomicAdd(bad, my_bad);
    }
    __syncthreads();

    // 2. Per expert: the pieces' counts become their starts within the expert; the expert's
    //    total goes to padded_start[e] for step 3.
    for (int e = threadIdx.x; e < experts; e += blockDim.x) {
        int running = 0;
        for (int s = 0; s < segments; ++s) {
            const int c = piece_counts[s * experts + e];
            piece_counts[s * experts + e] = running;
            running += c;
        }
        padded_start[e] = running;
    }
    __syncthreads();

    // 3. Exclusive scans over experts in warp 0: each lane a run of consecutive experts.
    if (warp == 0) {
        const int chunk = (experts + 31) / 32;
        const int lo = min(experts, (int)lane * chunk), hi = min(experts, lo + chunk);
        int padded = 0, kept = 0;
        for (int e = lo; e < hi; ++e) {
            const int c = padded_start[e];
            padded += (c + block_m - 1) / block_m * block_m;
            kept += c;
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
            const int c = padded_start[e];
            padded_start[e] = padded_at;
            expert_offsets[e] = kept_at;
            padded_at += (c + block_m - 1) / block_m * block_m;
            kept_at += c;
        }
        if (lane == 31) {
            padded_start[experts] = padded_incl;
            expert_offsets[experts] = kept_incl;
            *num_padded = padded_incl;
            // bad_ids is host memory mapped for the device (read by the next moe_prepare or
            // moe_run): one plain write from one thread, only when there is something to report.
            if (*bad != 0) *(volatile unsigned*)bad_ids += *bad;
        }
    }
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
        moe_align<Id>(topk_ids, numel, experts, block_m, capacity, max_blocks, segments,       \
                      sorted_route_ids, block_expert, num_padded, expert_offsets, route_slot,  \
                      bad_ids);                                                                \
    }

FM_ALIGN_ENTRY(moe_align__i32, int)
FM_ALIGN_ENTRY(moe_align__i64, long long)

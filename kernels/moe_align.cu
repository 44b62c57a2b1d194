// SPEC §4 on the device: the align step in one block (E ≤ 4096: shared memory holds 2E + 2 ints), the same arrays as the CPU's
// src/align.rs. Stable without atomics on the route order: warp w owns experts e ≡ w (mod
// warps) and scans the routes in order, compacting hits with a ballot (llama.cpp's mmid
// habit), so the same routing gives the same order on every run. [TAG_GRAPH_SAFE]: no
// allocation, no host sync; num_padded stays on the device.
#include "common.cuh"

template <typename Id>
__device__ void moe_align(const Id* __restrict__ topk_ids,  // [numel]: ids in [-1, E)
                          int numel, int experts, int block_m, int capacity, int max_blocks,
                          int* __restrict__ sorted_route_ids,  // [capacity]
                          int* __restrict__ block_expert,      // [max_blocks]
                          int* __restrict__ num_padded,        // [1]
                          int* __restrict__ expert_offsets,    // [E + 1]: kept routes before e
                          int* __restrict__ route_slot,        // [numel]: padded position, -1 dropped
                          unsigned* __restrict__ bad_ids) {    // [1]: ids outside [-1, E), counted
    extern __shared__ int shared[];
    int* counts = shared;                           // [E]
    int* padded_start = shared + experts;           // [E + 1]
    unsigned* bad = (unsigned*)(shared + 2 * experts + 1);  // [1]
    if (threadIdx.x == 0) *bad = 0;
    __syncthreads();
    const unsigned lane = threadIdx.x & 31u;
    const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5;

    // 1. Routes per expert; ids out of range match no expert (they drop) and are counted.
    for (int e = warp; e < experts; e += warps) {
        int count = 0;
        for (int base = 0; base < numel; base += 32) {
            const int r = base + (int)lane;
            const bool hit = r < numel && (long long)topk_ids[r] == (long long)e;
            count += __popc(__ballot_sync(FM_FULL_MASK, hit));
        }
        if (lane == 0) counts[e] = count;
    }
    for (int r = threadIdx.x; r < numel; r += blockDim.x) {
        const long long id = (long long)topk_ids[r];
        if (id < -1 || id >= experts) atomicAdd(bad, 1u);
        route_slot[r] = -1;
    }
    for (int i = threadIdx.x; i < capacity; i += blockDim.x) sorted_route_ids[i] = numel;
    for (int i = threadIdx.x; i < max_blocks; i += blockDim.x) block_expert[i] = -1;
    __syncthreads();

    // 2. Each expert's padded start and compact offset (E ≤ 1024: one thread is enough).
    if (threadIdx.x == 0) {
        int padded = 0, kept = 0;
        for (int e = 0; e < experts; ++e) {
            padded_start[e] = padded;
            expert_offsets[e] = kept;
            padded += (counts[e] + block_m - 1) / block_m * block_m;
            kept += counts[e];
        }
        padded_start[experts] = padded;
        expert_offsets[experts] = kept;
        *num_padded = padded;
        // bad_ids is host memory mapped for the device (read by the next moe_prepare or
        // moe_run): one plain write from one thread, only when there is something to report.
        if (*bad != 0) *(volatile unsigned*)bad_ids += *bad;
    }
    __syncthreads();

    // 3. Scatter in route order and tag each expert's blocks.
    for (int e = warp; e < experts; e += warps) {
        int pos = padded_start[e];
        for (int base = 0; base < numel; base += 32) {
            const int r = base + (int)lane;
            const bool hit = r < numel && (long long)topk_ids[r] == (long long)e;
            const unsigned mask = __ballot_sync(FM_FULL_MASK, hit);
            if (hit) {
                const int at = pos + __popc(mask & fm_lanes_below(lane));
                sorted_route_ids[at] = r;
                route_slot[r] = at;
            }
            pos += __popc(mask);
        }
        for (int b = padded_start[e] / block_m + (int)lane; b < padded_start[e + 1] / block_m; b += 32)
            block_expert[b] = e;
    }
}

#define FM_ALIGN_ENTRY(name, Id)                                                              \
    extern "C" __global__ void __launch_bounds__(1024) name(                                  \
        const Id* topk_ids, int numel, int experts, int block_m, int capacity, int max_blocks, \
        int* sorted_route_ids, int* block_expert, int* num_padded, int* expert_offsets,       \
        int* route_slot, unsigned* bad_ids) {                                                  \
        moe_align<Id>(topk_ids, numel, experts, block_m, capacity, max_blocks,                 \
                      sorted_route_ids, block_expert, num_padded, expert_offsets, route_slot,  \
                      bad_ids);                                                                \
    }

FM_ALIGN_ENTRY(moe_align__i32, int)
FM_ALIGN_ENTRY(moe_align__i64, long long)

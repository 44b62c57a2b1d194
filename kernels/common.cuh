// Helpers every fusedmoe kernel shares. No CUDA toolkit header is included: NVRTC declares the
// intrinsics used here (__ballot_sync, __popc, atomicAdd) itself.
#pragma once

#define FM_FULL_MASK 0xffffffffu

// Lanes below this one in the warp: for stable compaction with a ballot.
__device__ __forceinline__ unsigned fm_lanes_below(unsigned lane) {
    return (1u << lane) - 1u;
}

// SPEC §6 on the device: local_topk_ids = topk_ids < 0 ? -1 : mapping[topk_ids]. A grid of
// blocks strides the routes; each block counts its ids >= E_g (mapped to -1, never used as an
// index) in shared memory and adds them to its own slot of the host-mapped counters with one
// plain write [TAG_GRAPH_SAFE]. In place (out == ids) is fine: each element is read before the
// same thread writes it.
//
// Compile-time variant: FM_IDS_I64, FM_OUT_I64 (int64 instead of int32).
#include "common.cuh"

#if FM_IDS_I64
typedef long long fm_in_t;
#else
typedef int fm_in_t;
#endif
#if FM_OUT_I64
typedef long long fm_out_t;
#else
typedef int fm_out_t;
#endif

extern "C" __global__ void __launch_bounds__(256)
    moe_dispatch(const fm_in_t* ids, fm_out_t* out, const int* __restrict__ mapping, int n,
                 int global_experts, unsigned* bad_ids) {
    __shared__ unsigned bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const long long id = (long long)ids[i];
        int local = -1;
        if (id >= global_experts)
            atomicAdd(&bad, 1u);
        else if (id >= 0)
            local = mapping[id];
        out[i] = (fm_out_t)local;
    }
    __syncthreads();
    if (threadIdx.x == 0 && bad != 0) ((volatile unsigned*)bad_ids)[blockIdx.x] += bad;
}

// The Hopper main loop of moe_gemm with the weight tile multicast over a pair of CTAs
// (FM_WGMMA 3, sm_90a only; option cuda.wgmma_multicast). moe_gemm.cu includes it after
// moe_gemm_wgmma.cuh, whose swizzle, descriptors, wgmma wrappers, mbarriers and A loader it
// uses, and it shares moe_gemm.cu's block walk, row table and epilogue.
//
// Why: ncu found FM_WGMMA 1's GEMMs at Qwen3 M = 4096 bound by L2 (85 % and 82 % of its
// throughput, tensor pipe 56 % and 47 %): a 128x128x64 k-tile reads 16 KB of gathered A rows
// and 16 KB of W rows from L2 for 2 MFLOP. Two CTAs on consecutive m-blocks of one expert
// and one n-tile read the same W tile. Here they form a cluster of two, and each loads half
// of the W tile by TMA and multicasts it into both CTAs' shared memory: per CTA and k-tile
// 16 KB of A and 8 KB of W leave L2, a quarter less. A keeps the cp.async gather of FM_WGMMA 1
// (the tensor copy engine cannot gather rows on sm_90).
//
// Pairs: CTAs 2c and 2c + 1 (cluster ranks 0 and 1). The host makes m_blocks and group_m
// even, so fm_block_at gives them consecutive m-blocks of one n-tile; they share W when both
// have a tile of the same expert and n-tile. A pair that does not (an expert's
// last odd m-block, blocks past num_padded) loads its own W tile by TMA, unicast, and the
// two never touch each other's shared memory or barriers: both decide alike from the block
// walk alone.
//
// The W tile by TMA: the host's 4-d tensor map (src/backend/cuda/tma.rs) reads
// {k, half, row, expert}; the box is 64 k × FM_W_ROW_STEP halves × the rows of half a tile,
// in the 128-byte swizzle of the stage layout. With FM_PAIRED_HALVES (gated, halves layout)
// `half` is the gate / up half of w13 and `row` the row within it, so the box lands in tile
// order (gate i, up i, gate i + 1, …) as fm_w_row reads; else `half` has extent 1. Rows past
// n and k past kdim are zero-filled and still counted in the transaction bytes.
//
// Pipeline over FM_STAGES slots, as FM_WGMMA 1 (A's cp.async groups and two __syncthreads
// per k-tile), plus two mbarriers per slot after the stages:
//   full[s]  (1 arrival: thread 0's expect_tx of the whole W tile; completes when both
//            halves have landed, from this CTA's TMA and, when shared, the peer's);
//   empty[s] (2 arrivals, shared pairs only: each CTA's thread 0 once every warpgroup's
//            wgmma of the slot's k-tile is done) before either CTA's TMA refills the slot,
//            since it writes into both CTAs.
// Phases: full[s] completes once per use u of slot s (k-tile s + u·STAGES), waited with
// parity u & 1; empty[s] once per release, and the load of use u ≥ 1 waits for the release
// of use u − 1 (parity (u − 1) & 1). Neither barrier gets a phase ahead of its waiter: the
// peer's TMA of use u + 1 needs this CTA's release of use u, which follows its wait on full
// use u. A peer's complete_tx may land before this CTA's expect_tx of the same use; the
// phase cannot complete before that arrival, so the count only dips below zero meanwhile.
// The cluster is synchronized after the barriers are made (the peer signals them) and before
// exit (the peer's last releases arrive on this CTA's barriers).

static_assert(!FM_LORA, "the LoRA GEMMs keep FM_WGMMA 1");
static_assert((FM_BN / 2) % (8 * FM_W_ROW_STEP) == 0 && FM_BN / 2 <= 256,
              "half a W tile is whole swizzle groups, one TMA box");

#define FM_MC_W_BYTES (FM_BN * FM_ROW_BYTES)
#define FM_MC_HALF_ROWS (FM_BN / 2)

// The host's CUtensorMap (128 bytes, 64-byte aligned), passed by value as __grid_constant__.
struct __align__(64) FmTensorMap {
    unsigned long long opaque[16];
};

__device__ __forceinline__ void fm_mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
// Arrives on the mbarrier at this CTA's shared address `bar` in cluster CTA `cta`'s shared
// memory, at the default (CTA) scope. Written .release.cluster, each arrive compiled to
// MEMBAR.ALL.GPU, which waited for the thread's cp.async copies in flight, twice per k-tile
// (ncu at Qwen3 M = 4096: 1.6x the time, warps stalled at the next __syncthreads); the
// .acquire.cluster wait added CCTL.IVALL. Neither is needed: the slot's readers are wgmmas
// that wgmma.wait_group has retired, and the waiter only starts TMA writes (async proxy)
// after its wait, so no generic-proxy access needs ordering at cluster scope.
__device__ __forceinline__ void fm_mbar_arrive_in(unsigned bar, unsigned cta) {
    asm volatile(
        "{\n.reg .b32 remote;\n"
        "mapa.shared::cluster.u32 remote, %0, %1;\n"
        "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
        "r"(cta)
        : "memory");
}

// One box of W (coordinates k, half, row, expert) into shared `dst`, completing on `bar`:
// into this CTA alone, or into both CTAs of the pair at the same offsets (ctaMask 0b11).
__device__ __forceinline__ void fm_tma_w(unsigned dst, const FmTensorMap& map, int k, int row,
                                         int expert, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"((unsigned long long)&map), "r"(k), "r"(0), "r"(row), "r"(expert), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void fm_tma_w_both(unsigned dst, const FmTensorMap& map, int k,
                                              int row, int expert, unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        ".multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
        "l"((unsigned long long)&map), "r"(k), "r"(0), "r"(row), "r"(expert), "r"(bar),
        "h"((unsigned short)3)
        : "memory");
}

// Thread 0's W loads: the whole tile of k-tile kt into `stage`, expected on `bar`.
struct FmMcWLoader {
    const FmTensorMap& map;
    int expert, n0;
    bool shared;
    unsigned rank;
    __device__ __forceinline__ void load(unsigned stage, unsigned bar, int kt) const {
        fm_mbar_expect_tx(bar, FM_MC_W_BYTES);
        const unsigned w0 = stage + FM_BM * FM_ROW_BYTES;
        if (shared) {
            const int half = (int)rank;
            fm_tma_w_both(w0 + half * FM_MC_HALF_ROWS * FM_ROW_BYTES, map, kt * FM_BK,
                          (n0 + half * FM_MC_HALF_ROWS) / FM_W_ROW_STEP, expert, bar);
        } else {
#pragma unroll
            for (int half = 0; half < 2; ++half)
                fm_tma_w(w0 + half * FM_MC_HALF_ROWS * FM_ROW_BYTES, map, kt * FM_BK,
                         (n0 + half * FM_MC_HALF_ROWS) / FM_W_ROW_STEP, expert, bar);
        }
    }
};

#define FM_MIN_CTAS (FM_WG_COLS <= 128 && FM_THREADS <= 256 ? 2 : 1)

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(FM_THREADS, FM_MIN_CTAS)
    moe_gemm(const FmGemmParams p, const __grid_constant__ FmTensorMap w_map) {
    fm_pdl_wait();  // (tile.pdl) the stage before this one
    fm_pdl_launch_dependents();
    FmBlock b, peer;
    if (!fm_block_at(p, blockIdx.x, b)) return;  // the peer then works alone
    const bool shared =
        fm_block_at(p, blockIdx.x ^ 1, peer) && peer.expert == b.expert && peer.n0 == b.n0;
    const int slot0 = b.slot0, n0 = b.n0, expert = b.expert;

    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows& rows = *(FmRows*)fm_smem;
    const unsigned smem0 = (unsigned)__cvta_generic_to_shared(fm_smem);
    const unsigned tiles0 = (smem0 + (unsigned)sizeof(FmRows) + 1023u) & ~1023u;
    const unsigned full0 = tiles0 + FM_STAGES * FM_STAGE_BYTES, empty0 = full0 + 8 * FM_STAGES;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < FM_STAGES; ++s) {
            fm_mbar_init(full0 + 8 * s, 1);
            fm_mbar_init(empty0 + 8 * s, 2);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    FM_ROWS_SETUP(rows, p, slot0, (int*)(fm_smem + (tiles0 - smem0)));
    __syncthreads();
    if (shared) fm_cluster_sync();  // the peer's barriers exist before this CTA's TMA signals them

    const FmWarpgroup g;
    float acc[FM_WG_COLS / 2];
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) acc[q] = 0.0f;

    FmWgLoader<FM_THREADS, false> loader(rows, p, nullptr, n0, threadIdx.x);
    const FmMcWLoader w{w_map, expert, n0, shared, fm_cluster_rank()};
    const bool producer = threadIdx.x == 0;
    const int k_tiles = (p.kdim + FM_BK - 1) / FM_BK;
#pragma unroll
    for (int s = 0; s < FM_STAGES - 1; ++s) {
        if (s < k_tiles) {
            loader.load_next(tiles0 + s * FM_STAGE_BYTES, p);
            if (producer) w.load(tiles0 + s * FM_STAGE_BYTES, full0 + 8 * s, s);
        }
        fm_cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        const int slot = kt % FM_STAGES;
        fm_cp_async_wait<FM_STAGES - 2>();
        fm_fence_proxy_async();
        __syncthreads();  // k-tile kt's A rows are in shared memory, every thread's part
        fm_mbar_wait(full0 + 8 * slot, (kt / FM_STAGES) & 1);  // and its W tile

        fm_wg_mma_ktile(acc, tiles0 + slot * FM_STAGE_BYTES, g);
        __syncthreads();  // every warpgroup's wgmma of kt - 1 is done

        const int next = kt + FM_STAGES - 1;
        if (producer && shared && kt > 0) {  // kt - 1's slot is free here; tell both CTAs
            const unsigned freed = empty0 + 8 * ((kt - 1) % FM_STAGES);
            fm_mbar_arrive_in(freed, 0);
            fm_mbar_arrive_in(freed, 1);
        }
        if (next < k_tiles) {
            const int ns = next % FM_STAGES;
            loader.load_next(tiles0 + ns * FM_STAGE_BYTES, p);
            if (producer) {
                // the slot's previous k-tile (next - STAGES) is done in the peer too
                if (shared && next >= FM_STAGES)
                    fm_mbar_wait(empty0 + 8 * ns, (next / FM_STAGES - 1) & 1);
                w.load(tiles0 + ns * FM_STAGE_BYTES, full0 + 8 * ns, next);
            }
        }
        fm_cp_async_commit();
    }
    fm_wg_wait<0>();
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);
    fm_cp_async_wait<0>();
    if (shared) fm_cluster_arrive();  // this CTA signals the peer no more
    fm_wg_epilogue(rows, p, b, g, acc, nullptr);  // no LoRA: no stages to lend
    if (shared) fm_cluster_wait();  // nor the peer this one: its shared memory may go
}

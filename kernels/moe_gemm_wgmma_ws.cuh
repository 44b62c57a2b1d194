// The warp-specialised Hopper main loop of moe_gemm (FM_WGMMA 2, sm_90a only; option
// cuda.wgmma_ws). moe_gemm.cu includes it after moe_gemm_wgmma.cuh, whose swizzle,
// descriptors, wgmma wrappers and stage loader (FmWgLoader) it uses as they are, and it
// shares moe_gemm.cu's block walk, row table and epilogue.
//
// Why: in FM_WGMMA 1 every warp issues both the gathered cp.async loads and the wgmma, with
// two __syncthreads per k-tile, and ncu found the loop issue-bound (the loads' address work in
// the MMA warps' issue slots) with the tensor pipe well under its peak. Here one producer
// warpgroup (threads [FM_THREADS, FM_THREADS + 128)) issues every copy, and the tile's
// warpgroups (threads [0, FM_THREADS), laid out as in FM_WGMMA 1, so the epilogue is the same)
// only wait, issue wgmma and release. setmaxnreg moves registers from the producer to them.
//
// Pipeline over FM_STAGES slots, two mbarriers per slot after the stages in shared memory:
//   full[s]  (128 arrivals, the producer's threads): the k-tile in slot s has landed;
//   empty[s] (FM_THREADS arrivals, every consumer thread): the wgmma that read slot s is done.
// Producer, per k-tile kt in slot s = kt % STAGES, use u = kt / STAGES:
//   wait empty[s] for use u − 1 (parity (u & 1) ^ 1, which passes at once while u = 0);
//   issue the copies of kt, commit a group; cp.async.wait_group<STAGES − 2> then says
//   k-tile kt − (STAGES − 2) has landed in this thread's part: fence.proxy.async (cp.async
//   writes through the generic proxy, wgmma reads through the async one) and arrive on its
//   full barrier. After the loop: wait_group<0>, the fence, and arrive for the last
//   min(k_tiles, STAGES − 2) k-tiles. Each k-tile's full barrier is arrived on exactly once
//   per producer thread, in k order.
// Consumers, per k-tile kt: wait full[s] (parity u & 1), issue the 4 k16 wgmmas of the slot,
//   commit, wgmma.wait_group<1> (the wgmma of kt − 1 is done, kt's still running), then
//   arrive on empty[slot of kt − 1]. No __syncthreads in the loop.
//
// Why it cannot deadlock (and why one parity bit suffices):
// - A CTA that fm_block sends away leaves before the barriers are made, all its threads
//   together (blockIdx alone decides). k_tiles is the same in every thread, so producer and
//   consumers walk the same k-tiles; rows past n, slots without a route and k past kdim
//   change only which copies zero-fill (cp.async src-size 0), never the control flow.
// - The producer's wait at kt needs the release of kt − STAGES, which a consumer gives after
//   it has waited for full(kt − STAGES + 1); the producer arrived on that in its iteration
//   kt − 1 (or, for the last ones, in its tail, which waits for nothing). So every wait is
//   on an arrival made earlier in program order of the other role: no cycle. With
//   k_tiles < STAGES − 1 the loop signals nothing and the tail signals every k-tile.
// - A barrier is never more than one phase ahead of its waiter: full[s] cannot complete use
//   u + 1 before every consumer released use u (the producer waits for that before loading
//   u + 1), and empty[s] cannot complete use u before the producer loaded use u. So the
//   parity of the use names the phase unambiguously, and no thread arrives on a phase twice.
// - The consumers release k-tiles the producer never waits for (the last STAGES − 1): those
//   arrivals complete phases nobody waits on, harmless. The producer exits after its tail;
//   the consumers use no CTA-wide barrier after the role split, so its exit stalls nothing.
// - Consumer warpgroups run independently of each other; the empty barrier counts all of
//   them, so a slot is refilled only when the slowest is done with it.

static_assert(FM_STAGES >= 3, "the producer keeps STAGES - 2 groups in flight at least");

#define FM_WS_PRODUCERS 128
#define FM_WS_THREADS (FM_THREADS + FM_WS_PRODUCERS)

// Registers: the kernel starts with the most its launch bounds allow (one CTA per SM); the
// producer keeps 56 (its loader holds a 64-bit pointer per A row it copies: at 40 ptxas
// spilled) and gives the rest to the consumers, whose accumulators (FM_WG_COLS / 2 floats)
// need them: 224 each at 128x256, of which they use about 150. With one consumer
// warpgroup the start (255) is already the most a thread can hold, so nothing moves.
#define FM_WS_ENTRY_REGS ((65536 / FM_WS_THREADS) / 8 * 8)
#define FM_WS_PRODUCER_REGS 56
#define FM_WS_CONSUMER_REGS_RAW \
    ((FM_WS_THREADS * FM_WS_ENTRY_REGS - FM_WS_PRODUCERS * FM_WS_PRODUCER_REGS) / FM_THREADS / 8 * 8)
#define FM_WS_CONSUMER_REGS (FM_WS_CONSUMER_REGS_RAW > 240 ? 240 : FM_WS_CONSUMER_REGS_RAW)
#define FM_WS_SETMAXNREG (FM_THREADS >= 256)
#if FM_WS_SETMAXNREG
static_assert(FM_WS_CONSUMER_REGS >= FM_WS_ENTRY_REGS && FM_WS_PRODUCER_REGS <= FM_WS_ENTRY_REGS,
              "setmaxnreg: consumers grow, the producer shrinks");
static_assert(FM_WS_PRODUCERS * FM_WS_PRODUCER_REGS + FM_THREADS * FM_WS_CONSUMER_REGS <=
                  FM_WS_THREADS * FM_WS_ENTRY_REGS,
              "setmaxnreg: the consumers take only what the producer gave back");
#endif

template <int REGS>
__device__ __forceinline__ void fm_setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void fm_setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

// The producer warpgroup (`tid` in [0, 128)): every stage load, and the full barriers.
__device__ __forceinline__ void fm_ws_produce(const FmRows& rows, const FmGemmParams& p,
                                              const FmBlock& b, const fm_t* w_expert,
                                              unsigned tiles0, unsigned full0, unsigned empty0,
                                              int k_tiles, int tid) {
    FmWgLoader<FM_WS_PRODUCERS> loader(rows, p, w_expert, b.n0, tid);
    int s = 0;           // kt's slot
    unsigned use = 0;    // kt's use of the slot, parity
    int ready = 0;       // the next k-tile whose full barrier this thread arrives on
    int ready_slot = 0;  // its slot
    for (int kt = 0; kt < k_tiles; ++kt) {
        fm_mbar_wait(empty0 + 8 * s, use ^ 1u);  // the slot's previous k-tile is consumed
        loader.load_next(tiles0 + s * FM_STAGE_BYTES, p);
        fm_cp_async_commit();
        if (kt >= FM_STAGES - 2) {  // k-tile kt - (STAGES - 2) has landed
            fm_cp_async_wait<FM_STAGES - 2>();
            fm_fence_proxy_async();
            fm_mbar_arrive(full0 + 8 * ready_slot);
            ++ready;
            if (++ready_slot == FM_STAGES) ready_slot = 0;
        }
        if (++s == FM_STAGES) {
            s = 0;
            use ^= 1u;
        }
    }
    fm_cp_async_wait<0>();
    fm_fence_proxy_async();
    for (; ready < k_tiles; ++ready) {
        fm_mbar_arrive(full0 + 8 * ready_slot);
        if (++ready_slot == FM_STAGES) ready_slot = 0;
    }
}

extern "C" __global__ void __launch_bounds__(FM_WS_THREADS, 1)
    moe_gemm(const FmGemmParams p FM_LORA_KERNEL_ARG) {
    fm_pdl_wait();  // (tile.pdl) the stage before this one
    fm_pdl_launch_dependents();
    FmBlock b;
    if (!fm_block(p, b)) return;  // the whole CTA, before any barrier exists
    const int slot0 = b.slot0, expert = b.expert;

    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows& rows = *(FmRows*)fm_smem;
    // The stages start at the first 1024-byte boundary past the row table (the launch asks
    // for 1024 bytes of slack), the barriers right after them: full[STAGES], empty[STAGES].
    const unsigned smem0 = (unsigned)__cvta_generic_to_shared(fm_smem);
    const unsigned tiles0 = (smem0 + (unsigned)sizeof(FmRows) + 1023u) & ~1023u;
    const unsigned full0 = tiles0 + FM_STAGES * FM_STAGE_BYTES;
    const unsigned empty0 = full0 + FM_STAGES * 8;
    // threads past FM_BM (the producer's among them) skip; the stages hold nothing yet, so
    // the LoRA row grouping's keys may sit there
    FM_ROWS_SETUP(rows, p, slot0, (int*)(fm_smem + (tiles0 - smem0)));
    if (threadIdx.x == 0) {
        for (int s = 0; s < FM_STAGES; ++s) {
            fm_mbar_init(full0 + 8 * s, FM_WS_PRODUCERS);
            fm_mbar_init(empty0 + 8 * s, FM_THREADS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();  // the row table and the barriers, for every thread

    const fm_t* w_expert = (const fm_t*)p.w + (fm_i64)expert * p.n * p.kdim;
    const int k_tiles = (p.kdim + FM_BK - 1) / FM_BK;
    if (threadIdx.x >= FM_THREADS) {
        // ------------------------------------------------ producer warpgroup
#if FM_WS_SETMAXNREG
        fm_setmaxnreg_dec<FM_WS_PRODUCER_REGS>();
#endif
        fm_ws_produce(rows, p, b, w_expert, tiles0, full0, empty0, k_tiles,
                      threadIdx.x - FM_THREADS);
    } else {
        // ------------------------------------------------ consumer warpgroups
#if FM_WS_SETMAXNREG
        fm_setmaxnreg_inc<FM_WS_CONSUMER_REGS>();
#endif
        const FmWarpgroup g;

        float acc[FM_WG_COLS / 2];
#pragma unroll
        for (int q = 0; q < FM_WG_COLS / 2; ++q) acc[q] = 0.0f;

        int s = 0, prev = FM_STAGES - 1;  // kt's slot, kt - 1's
        unsigned use = 0;                 // kt's use of the slot, parity
        for (int kt = 0; kt < k_tiles; ++kt) {
            fm_mbar_wait(full0 + 8 * s, use);  // k-tile kt is in shared memory
            fm_wg_mma_ktile(acc, tiles0 + s * FM_STAGE_BYTES, g);
            if (kt > 0) fm_mbar_arrive(empty0 + 8 * prev);  // its slot may be refilled
            prev = s;
            if (++s == FM_STAGES) {
                s = 0;
                use ^= 1u;
            }
        }
        fm_wg_wait<0>();
#pragma unroll
        for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);

        fm_wg_epilogue(rows, p, b, g, acc, nullptr FM_LORA_PASS);
    }
}

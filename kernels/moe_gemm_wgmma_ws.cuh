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
// Persistent: one wave of CTAs, each walking tiles (blockIdx.x, + gridDim.x, …). While the
// tile's warpgroups run one tile's epilogue, the producer already fills the freed slots with
// the next tile's first k-tiles, so a CTA's tensor cores wait for the loads only once, not
// once per tile. The one-tile-per-CTA form ran at 0.77-0.99x of FM_WGMMA 1 (an A/B,
// BENCHMARKS.md): at one CTA per SM nothing else used the tensor cores through a tile's
// prologue and epilogue, which weigh most in short k loops (DeepSeek's GEMM2: 4 k-tiles).
//
// Pipeline over FM_STAGES slots, two mbarriers per slot after the stages in shared memory:
//   full[s]  (128 arrivals, the producer's threads): the k-tile in slot s has landed;
//   empty[s] (FM_THREADS arrivals, every consumer thread): the wgmma that read slot s is done.
// Number the CTA's k-tiles over all its tiles in order: j, in slot s = j % STAGES, use
// u = j / STAGES (FmWsRing carries s and u's parity from tile to tile).
// Producer, per k-tile j: wait empty[s] for use u − 1 (parity (u & 1) ^ 1, which passes at
//   once while u = 0); issue the copies of j; cp.async.mbarrier.arrive on full[s] (the phase
//   stays open until this thread's copies have landed), then its own arrival there. It never
//   waits for its copies, so all the slots the consumers have freed are in flight.
// Consumers, per k-tile j: wait full[s] (parity u & 1), fence.proxy.async (cp.async wrote
//   through the generic proxy, wgmma reads through the async one), issue the 4 k16 wgmmas,
//   commit, wgmma.wait_group<1> (the wgmma of j − 1 is done, j's still running), then
//   arrive on empty[slot of j − 1]; the tile's last k-tile is released after
//   wgmma.wait_group<0>, before the epilogue. No __syncthreads after the barriers' setup.
// Row tables: the producer sets up tile i's (FM_ROWS_SETUP_BY over its 128 threads, named
//   barrier 1) in table i % 2, after waiting rows_free[i % 2] for the epilogue of tile i − 2;
//   the consumers read it in their epilogue, after the full barriers the producer arrived on
//   after writing it, and then arrive on rows_free.
//
// Why it cannot deadlock (and why one parity bit suffices):
// - fm_block_at decides from the tile index and device memory the kernel does not write, so
//   both roles skip the same tiles. k_tiles is the same in every thread, so producer and
//   consumers walk the same k-tiles; rows past n, slots without a route and k past kdim
//   change only which copies zero-fill (cp.async src-size 0), never the control flow.
// - The producer's wait at j needs the release of j − STAGES, which a consumer gives after
//   it has waited for full(j − STAGES + 1) (or, for a tile's last k-tile, after its own
//   full); the producer arrived on that in an earlier iteration, and the copy unit's arrival
//   follows from the copies alone. Its wait on rows_free before tile i needs the
//   epilogue of tile i − 2, whose k-tiles it finished signalling before it started tile
//   i − 1. So every wait is on an arrival made earlier in program order of the other role:
//   no cycle.
// - A barrier is never more than one phase ahead of its waiter: full[s] cannot complete use
//   u + 1 before every consumer released use u (the producer waits for that before loading
//   u + 1), and empty[s] cannot complete use u before the producer loaded use u; rows_free
//   likewise, one tile per table in turn. So the parity of the use names the phase
//   unambiguously, and no thread arrives on a phase twice.
// - The consumers release the last k-tiles, and the last tables, which the producer never
//   waits for: those arrivals complete phases nobody waits on, harmless. The producer exits
//   once its last copies have landed; the consumers use no CTA-wide barrier after the role
//   split, so its exit stalls nothing.
// - Consumer warpgroups run independently of each other; the empty and rows_free barriers
//   count all of them, so a slot or a table is refilled only when the slowest is done.

static_assert(FM_STAGES >= 2, "the consumers release a slot one k-tile late");

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
// A tile of one consumer warpgroup with at most 128 columns (64 accumulators a thread) fits
// two CTAs per SM in 128 registers a thread: then one CTA's epilogue runs beside the other's
// wgmmas, which a single consumer warpgroup cannot do for itself. Not the LoRA GEMMs: their
// expand spilled at 128 (CUDA 13.0 NVRTC, 280-328 bytes).
#define FM_WS_MIN_CTAS (FM_THREADS == 128 && FM_WG_COLS <= 128 && !FM_LORA ? 2 : 1)
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

// mbarrier at shared address `bar` (8-byte aligned).
__device__ __forceinline__ void fm_mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Release (the default of mbarrier.arrive): this thread's shared-memory accesses before it
// happen before the waiter's after its wait.
__device__ __forceinline__ void fm_mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Until the phase of parity `parity` has completed (acquire, the default of try_wait).
__device__ __forceinline__ void fm_mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// Where a CTA's walk over the stage ring stands: the next k-tile's slot and the parity of
// its use of that slot. It carries over from one tile to the next, so every slot's barriers
// see one arrival round per use, whichever tile the use belongs to.
struct FmWsRing {
    int slot = 0;
    unsigned use = 0;
    __device__ __forceinline__ void advance() {
        if (++slot == FM_STAGES) {
            slot = 0;
            use ^= 1u;
        }
    }
};

// Holds the current phase of `bar` open until this thread's cp.async copies issued so far
// have landed (the pending count grows by one, and the copy unit arrives once they are in).
// The thread does not wait for them.
__device__ __forceinline__ void fm_cp_async_track(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// The producer warpgroup's copies of one tile (`tid` in [0, 128)), and its full barriers:
// each k-tile's arrival is on its way (made by the copy unit) before it returns. The thread
// never waits for its own copies, so every slot the consumers have freed is in flight; an
// earlier form waited with cp.async.wait_group and kept only STAGES - 2 k-tiles in flight,
// which measured 0.85-0.92x of FM_WGMMA 1 at M = 4096 (0.92 with 6 stages instead of 4).
__device__ __forceinline__ void fm_ws_produce(const FmRows& rows, const FmGemmParams& p,
                                              const FmBlock& b, const fm_t* w_expert,
                                              unsigned tiles0, unsigned full0, unsigned empty0,
                                              int k_tiles, int tid, FmWsRing& ring) {
    FmWgLoader<FM_WS_PRODUCERS> loader(rows, p, w_expert, b.n0, tid);
    for (int kt = 0; kt < k_tiles; ++kt) {
        // the slot's previous k-tile is consumed (passes at once on a slot's first use)
        fm_mbar_wait(empty0 + 8 * ring.slot, ring.use ^ 1u);
        loader.load_next(tiles0 + ring.slot * FM_STAGE_BYTES, p);
        fm_cp_async_track(full0 + 8 * ring.slot);
        // the thread's own arrival, a release: the row table it wrote is seen by the
        // consumers, who acquire it with the k-tile
        fm_mbar_arrive(full0 + 8 * ring.slot);
        ring.advance();
    }
}

// The tile's warpgroups on one tile: wait for each k-tile, multiply, release its slot (the
// last one too, before the epilogue, so the producer fills it with the next tile's meanwhile).
__device__ __forceinline__ void fm_ws_consume(float (&acc)[FM_WG_COLS / 2], unsigned tiles0,
                                              unsigned full0, unsigned empty0, int k_tiles,
                                              const FmWarpgroup& g, FmWsRing& ring) {
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) acc[q] = 0.0f;
    int prev = 0;  // kt - 1's slot
    for (int kt = 0; kt < k_tiles; ++kt) {
        fm_mbar_wait(full0 + 8 * ring.slot, ring.use);  // k-tile kt is in shared memory
        // cp.async wrote it through the generic proxy; the wgmma reads through the async one
        fm_fence_proxy_async();
        fm_wg_mma_ktile(acc, tiles0 + ring.slot * FM_STAGE_BYTES, g);
        if (kt > 0) fm_mbar_arrive(empty0 + 8 * prev);  // kt - 1's wgmma is done
        prev = ring.slot;
        ring.advance();
    }
    fm_wg_wait<0>();
#pragma unroll
    for (int q = 0; q < FM_WG_COLS / 2; ++q) fm_wg_fence_operand(acc[q]);
    fm_mbar_arrive(empty0 + 8 * prev);
}

// The producer's own barrier (named barrier 1; __syncthreads is barrier 0).
struct FmProducerSync {
    __device__ __forceinline__ void operator()() const {
        asm volatile("bar.sync 1, %0;\n" ::"n"(FM_WS_PRODUCERS) : "memory");
    }
};

// Persistent: the grid is at most one wave (src/backend/cuda/kernels.rs), and CTA c takes
// tiles c, c + gridDim.x, … of the one-tile-per-CTA numbering, so a wave still walks the
// GROUP_M order together. Tiles fm_block_at rejects are skipped by every thread alike.
extern "C" __global__ void __launch_bounds__(FM_WS_THREADS, FM_WS_MIN_CTAS)
    moe_gemm(const FmGemmParams p FM_LORA_KERNEL_ARG) {
    fm_pdl_wait();  // (tile.pdl) the stage before this one
    fm_pdl_launch_dependents();

    // Shared memory: two row tables (tile i uses table i % 2, so the producer sets up the
    // next tile's while the epilogue reads this one's), FM_BM ints of keys for the LoRA row
    // grouping, then from the first 1024-byte boundary the stages (the launch asks for 1024
    // bytes of slack), and after them the barriers: full[STAGES], empty[STAGES], and
    // rows_free[2] (the tile's warpgroups are done with a row table: FM_THREADS arrivals).
    extern __shared__ __align__(16) unsigned char fm_smem[];
    FmRows* tables = (FmRows*)fm_smem;
    int* keys = (int*)(fm_smem + 2 * sizeof(FmRows));
    const unsigned smem0 = (unsigned)__cvta_generic_to_shared(fm_smem);
    const unsigned tiles0 =
        (smem0 + 2u * (unsigned)sizeof(FmRows) + FM_BM * 4u + 1023u) & ~1023u;
    const unsigned full0 = tiles0 + FM_STAGES * FM_STAGE_BYTES;
    const unsigned empty0 = full0 + FM_STAGES * 8;
    const unsigned rows_free0 = empty0 + FM_STAGES * 8;
    (void)keys;
    if (threadIdx.x == 0) {
        for (int s = 0; s < FM_STAGES; ++s) {
            fm_mbar_init(full0 + 8 * s, FM_WS_PRODUCERS);
            fm_mbar_init(empty0 + 8 * s, FM_THREADS);
        }
        for (int t = 0; t < 2; ++t) fm_mbar_init(rows_free0 + 8 * t, FM_THREADS);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();  // the barriers, for every thread

    const int tiles = p.m_blocks * p.n_tiles;
    const int k_tiles = (p.kdim + FM_BK - 1) / FM_BK;
    FmWsRing ring;
    int it = 0;  // this CTA's tiles so far: the row table and its use
    if (threadIdx.x >= FM_THREADS) {
        // ------------------------------------------------ producer warpgroup
#if FM_WS_SETMAXNREG
        fm_setmaxnreg_dec<FM_WS_PRODUCER_REGS>();
#endif
        const int tid = threadIdx.x - FM_THREADS;
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            FmBlock b;
            if (!fm_block_at(p, tile, b)) continue;
            FmRows& rows = tables[it & 1];
            // the epilogue of this table's tile before (two tiles ago) has read it
            fm_mbar_wait(rows_free0 + 8 * (it & 1), ((it >> 1) & 1) ^ 1u);
            FM_ROWS_SETUP_BY(rows, p, b.slot0, keys, tid, FM_WS_PRODUCERS, FmProducerSync());
            FmProducerSync()();  // every row, for every producer thread's loader
            // (the tile's warpgroups read the table after full barriers this thread arrives
            // on after it: those arrivals release it)
            const fm_t* w_expert = (const fm_t*)p.w + (fm_i64)b.expert * p.n * p.kdim;
            fm_ws_produce(rows, p, b, w_expert, tiles0, full0, empty0, k_tiles, tid, ring);
            ++it;
        }
        asm volatile("cp.async.wait_all;\n" ::: "memory");  // none left in flight at exit
    } else {
        // ------------------------------------------------ consumer warpgroups
#if FM_WS_SETMAXNREG
        fm_setmaxnreg_inc<FM_WS_CONSUMER_REGS>();
#endif
        const FmWarpgroup g;
        float acc[FM_WG_COLS / 2];
        for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            FmBlock b;
            if (!fm_block_at(p, tile, b)) continue;
            fm_ws_consume(acc, tiles0, full0, empty0, k_tiles, g, ring);
            fm_wg_epilogue(tables[it & 1], p, b, g, acc FM_LORA_PASS);
            fm_mbar_arrive(rows_free0 + 8 * (it & 1));
            ++it;
        }
    }
}

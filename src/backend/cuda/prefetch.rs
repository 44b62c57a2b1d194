//! The decode prefetches: at decode the layer's launches (align, GEMM1, GEMM2, combine) run one
//! after another, each starting only when the one before drains, so DRAM idles between them
//! while the weights wait to be read. These ask L2 for weights before the kernel that reads
//! them starts: w13 from moe_prepare's align step (kernels/moe_align.cu, fm_prefetch_up), w2
//! from GEMM1 (kernels/moe_gemm.cu, fm_prefetch_next). They are hints (results do not change)
//! and use the bulk prefetch of compute capability 9.0.

use super::device::DeviceState;
use crate::error::{unsupported, Result};
use crate::options::Options;

/// The layer's prefetch settings, from its options.
#[derive(Clone, Copy, Debug)]
pub struct Prefetch {
    /// moe_prepare's align step prefetches w13.
    up: bool,
    /// GEMM1 prefetches w2: 0 no, 1 as a CTA starts, 2 after its k loop, 3 as 2 with GEMM1's
    /// weight lines evict-first.
    down: u8,
    /// The most tokens a batch may have for the prefetches to apply.
    max_tokens: usize,
    /// L2 bytes each prefetch may fill, over all the experts a batch uses.
    budget: usize,
}

/// What a GEMM1 launch does about w2 (kernels/moe_gemm.cu, FmGemmParams).
pub struct DownPrefetch {
    /// 0: none, 1: at the CTA's start, 2: after its k loop.
    pub at: i32,
    pub evict_first: bool,
    pub budget: usize,
}

const DEFAULT_UP: i64 = 0;
const DEFAULT_DOWN: i64 = 0;
const DEFAULT_MAX_TOKENS: i64 = 64;
/// Percent of the L2 a prefetch may fill by default: room for the lines other reads bring.
const DEFAULT_BUDGET_PERCENT: usize = 70;

impl Prefetch {
    pub fn new(options: &Options, dev: &DeviceState) -> Result<Prefetch> {
        let up = options.int("cuda.prefetch_up");
        let down = options.int("cuda.prefetch_down");
        let bulk = dev.traits.compute_capability.0 >= 9;
        for (key, value) in [("cuda.prefetch_up", up), ("cuda.prefetch_down", down)] {
            if !bulk && value.is_some_and(|v| v != 0) {
                let (major, minor) = dev.traits.compute_capability;
                return Err(unsupported!(
                    "option \"{key}\": needs the bulk L2 prefetch of compute capability 9.0; {} has {major}.{minor}",
                    dev.name
                ));
            }
        }
        let budget = match options.int("cuda.prefetch_mib") {
            Some(mib) => mib as usize * 1024 * 1024,
            None => dev.l2_bytes * DEFAULT_BUDGET_PERCENT / 100,
        };
        Ok(Prefetch {
            up: bulk && up.unwrap_or(DEFAULT_UP) != 0,
            down: if bulk { down.unwrap_or(DEFAULT_DOWN) as u8 } else { 0 },
            max_tokens: options
                .int("cuda.prefetch_tokens")
                .unwrap_or(DEFAULT_MAX_TOKENS) as usize,
            budget,
        })
    }

    /// Bytes of each routed expert's w13 the align step asks for (0: none): all of it where
    /// the experts the batch can hit (at most its routes) fit the budget, else an equal share.
    pub fn up_bytes(&self, tokens: usize, routes: usize, experts: usize, expert_bytes: usize) -> usize {
        if !self.up || tokens > self.max_tokens || routes == 0 {
            return 0;
        }
        expert_bytes.min(self.budget / routes.min(experts).max(1))
    }

    /// What GEMM1 does about w2 for a batch of `tokens`.
    pub fn down(&self, tokens: usize) -> DownPrefetch {
        let on = self.down != 0 && tokens <= self.max_tokens;
        DownPrefetch {
            at: if on { self.down.min(2) as i32 } else { 0 },
            evict_first: on && self.down == 3,
            budget: self.budget,
        }
    }
}

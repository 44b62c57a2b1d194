//! SPEC §8: backend options by string key. Every key is known here with its value rule;
//! an unknown key or a bad value is refused by name, never ignored.

use crate::error::{invalid, Result};
use crate::tensor::DeviceKind;
use std::collections::BTreeMap;

/// A known option key, its value rule and the device it belongs to (None: any device).
struct Key {
    name: &'static str,
    rule: Rule,
    device: Option<DeviceKind>,
    doc: &'static str,
}

enum Rule {
    /// An integer in [min, max]; `pow2` also requires a power of two.
    Int { min: i64, max: i64, pow2: bool },
    /// A path to a readable file (read at layer creation).
    Path,
}

/// The most tokens for which cuda.fuse_combine lets GEMM2 combine (the CUDA backend sizes
/// its counts by it).
pub(crate) const FUSE_COMBINE_MAX_TOKENS: i64 = 256;

const KEYS: &[Key] = &[
    Key {
        name: "tile.block_m",
        rule: Rule::Int {
            min: 16,
            max: 256,
            pow2: true,
        },
        device: None,
        doc: "BLOCK_M for every token count (the align granularity)",
    },
    Key {
        name: "tile.block_n",
        rule: Rule::Int {
            min: 16,
            max: 256,
            pow2: true,
        },
        device: None,
        doc: "BLOCK_N",
    },
    Key {
        name: "tile.block_n_down",
        rule: Rule::Int {
            min: 16,
            max: 256,
            pow2: true,
        },
        device: None,
        doc: "GEMM2's own BLOCK_N (a table's BLOCK_N_DOWN; default BLOCK_N): GEMM2 shares BLOCK_M with GEMM1, not its width (SPEC §5). The CPU path has no use for it",
    },
    Key {
        name: "tile.block_k",
        rule: Rule::Int {
            min: 16,
            max: 256,
            pow2: true,
        },
        device: None,
        doc: "BLOCK_K",
    },
    Key {
        name: "tile.group_m",
        rule: Rule::Int {
            min: 1,
            max: 64,
            pow2: false,
        },
        device: None,
        doc: "GROUP_M",
    },
    Key {
        name: "tile.num_warps",
        rule: Rule::Int {
            min: 1,
            max: 16,
            pow2: true,
        },
        device: None,
        doc: "warps per block",
    },
    Key {
        name: "tile.num_stages",
        rule: Rule::Int {
            min: 1,
            max: 8,
            pow2: false,
        },
        device: None,
        doc: "pipeline stages",
    },
    Key {
        name: "tile.split_k",
        rule: Rule::Int {
            min: 1,
            max: crate::tiles::MAX_SPLIT_K as i64,
            pow2: false,
        },
        device: None,
        doc: "CUDA: CTAs (a thread-block cluster, sm_90) sharing each GEMM1 tile's k loop, on mma.sync; 1: none (like tile.num_warps, the CPU path has no use for it)",
    },
    Key {
        name: "tile.split_k_down",
        rule: Rule::Int {
            min: 1,
            max: crate::tiles::MAX_SPLIT_K as i64,
            pow2: false,
        },
        device: None,
        doc: "CUDA: the same for GEMM2 (the down projection)",
    },
    Key {
        name: "tile.pdl",
        rule: Rule::Int {
            min: 0,
            max: 2,
            pow2: false,
        },
        device: None,
        doc: "CUDA: how moe_run's kernels launch (a table's PDL): 0 in order; 1 as programmatic dependents (sm_90), each starting before the one before it ends, GEMM2 loading its first weight stages while GEMM1 ends, let in once GEMM1's CTAs are past their k loops; 2 the same, let in at GEMM1's start. LoRA runs launch in order; above 0 refused before compute capability 9.0",
    },
    Key {
        name: "tile.config_file",
        rule: Rule::Path,
        device: None,
        doc: "a tuned tile table (SPEC §5 format) for this layer",
    },
    Key {
        name: "cuda.wgmma",
        rule: Rule::Int {
            min: 0,
            max: 1,
            pow2: false,
        },
        device: Some(DeviceKind::Cuda),
        doc: "1 (default): GEMM tiles of wgmma's shape use Hopper's wgmma on sm_90a; 0: mma.sync",
    },
    Key {
        name: "cuda.wgmma_ws",
        rule: Rule::Int {
            min: 0,
            max: 1,
            pow2: false,
        },
        device: Some(DeviceKind::Cuda),
        doc: "1: GEMM tiles that take wgmma (cuda.wgmma) use its warp-specialised main loop, a producer warpgroup issuing the loads beside the tile's warpgroups (refused where the wgmma loop does not run); 0 (default): every warp loads and multiplies",
    },
    Key {
        name: "cuda.wgmma_multicast",
        rule: Rule::Int {
            min: 0,
            max: 1,
            pow2: false,
        },
        device: Some(DeviceKind::Cuda),
        doc: "1: GEMM tiles that take wgmma (cuda.wgmma), LoRA's aside, run as CTA pairs on consecutive blocks of one expert that load the weight tile once by TMA and multicast it to both (refused where the wgmma loop does not run, and with cuda.wgmma_ws); 0: each CTA loads its own; unset (default): the pairs for tiles 256 columns wide, where they measured faster",
    },
    Key {
        name: "cuda.fuse_act",
        rule: Rule::Int {
            min: 0,
            max: 1,
            pow2: false,
        },
        device: Some(DeviceKind::Cuda),
        doc: "1 (default): f16/bf16 layers apply the activation in GEMM1's epilogue; 0: a kernel of its own",
    },
    Key {
        name: "cuda.fuse_combine",
        rule: Rule::Int {
            min: 0,
            max: FUSE_COMBINE_MAX_TOKENS,
            pow2: false,
        },
        device: Some(DeviceKind::Cuda),
        doc: "up to this many tokens GEMM2 does the combine where both GEMMs take the mma.sync loop (0, the default: never; a kernel of its own)",
    },
    Key {
        name: "cpu.num_threads",
        rule: Rule::Int {
            min: 1,
            max: 4096,
            pow2: false,
        },
        device: Some(DeviceKind::Cpu),
        doc: "threads of this layer's own CPU pool",
    },
];

fn find(key: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == key)
}

/// Whether `key` is an option this build knows (the capability probe for options).
pub fn is_known(key: &str) -> bool {
    find(key).is_some()
}

/// All known keys with a one-line description, for error messages and docs.
pub fn known_keys() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

pub fn describe(key: &str) -> Option<&'static str> {
    find(key).map(|k| k.doc)
}

/// Checks one key/value pair on its own (cross-field checks happen at layer creation).
pub fn check(key: &str, value: &str) -> Result<()> {
    let Some(k) = find(key) else {
        return Err(invalid!(
            "key: unknown option \"{key}\" (known: {})",
            known_keys()
        ));
    };
    match k.rule {
        Rule::Int { min, max, pow2 } => {
            let v: i64 = value
                .trim()
                .parse()
                .map_err(|_| invalid!("value: option \"{key}\" = \"{value}\" is not an integer"))?;
            if v < min || v > max || (pow2 && (v as u64).count_ones() != 1) {
                let what = if pow2 { "a power of two " } else { "" };
                return Err(invalid!(
                    "value: option \"{key}\" = {v}, expected {what}in [{min}, {max}]"
                ));
            }
        }
        Rule::Path => {
            if value.is_empty() {
                return Err(invalid!(
                    "value: option \"{key}\" is empty, expected a file path"
                ));
            }
        }
    }
    Ok(())
}

/// The options a config holds: key → value, each checked when set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    values: BTreeMap<String, String>,
}

impl Options {
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        check(key, value)?;
        self.values.insert(key.to_string(), value.to_string());
        Ok(())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// An integer option (already checked when set).
    pub fn int(&self, key: &str) -> Option<i64> {
        self.get(key)
            .map(|v| v.trim().parse().expect("checked when set"))
    }

    /// Refuses options that belong to another device than the layer's.
    pub fn check_device(&self, device: DeviceKind) -> Result<()> {
        for key in self.values.keys() {
            let k = find(key).expect("checked when set");
            if let Some(d) = k.device {
                if d != device {
                    return Err(invalid!(
                        "key: option \"{key}\" is for {d:?} layers, but the config's device is {device:?}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let mut o = Options::default();
        assert!(o
            .set("tile.blockm", "64")
            .unwrap_err()
            .message
            .contains("tile.blockm"));
        assert!(o
            .set("tile.block_m", "48")
            .unwrap_err()
            .message
            .contains("power of two"));
        assert!(o
            .set("tile.block_m", "x")
            .unwrap_err()
            .message
            .contains("not an integer"));
        o.set("tile.block_m", "32").unwrap();
        assert_eq!(o.int("tile.block_m"), Some(32));
    }

    #[test]
    fn cpu_options_contradict_a_cuda_device() {
        let mut o = Options::default();
        o.set("cpu.num_threads", "2").unwrap();
        assert!(o.check_device(DeviceKind::Cpu).is_ok());
        assert!(o.check_device(DeviceKind::Cuda).is_err());
    }
}

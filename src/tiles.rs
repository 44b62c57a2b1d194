//! SPEC §5: tile configs. A layer's chooser picks one per token count M: the host's per-layer
//! override (options `tile.*`) over a tuned table (option `tile.config_file`, else the file in
//! `FUSEDMOE_TILE_CONFIG`, else a table shipped in the library) over SGLang's default rule.
//!
//! Table file format (JSON):
//! ```json
//! { "format": "fusedmoe-tiles/1",
//!   "tables": [ { "E": 8, "N": 14336, "K": 4096, "dtype": "bf16", "quant": "none",
//!                 "device": "NVIDIA H100 80GB HBM3",
//!                 "configs": { "1":  { "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1,
//!                                      "num_warps": 4, "num_stages": 4 },
//!                              "64": { ... } } } ] }
//! ```
//! `N` is the intermediate size I and `K` the hidden size H (SGLang's naming); the keys of
//! `configs` are token counts M. Ours, beyond SGLang's keys, each optional: `BLOCK_N_DOWN`
//! (GEMM2's own BLOCK_N, 16–256; default BLOCK_N), `SPLIT_K` and
//! `SPLIT_K_DOWN` (1–8, default 1: CTAs sharing a GEMM1 / GEMM2 tile's k loop) and `PDL`
//! (default 0: in order; 1: the batch's kernels launch as programmatic dependents on sm_90,
//! GEMM2 let in once GEMM1's CTAs are past their k loops; 2: the same, GEMM2 let in at
//! GEMM1's start; option tile.pdl overrides it).

use crate::dtype::DType;
use crate::error::{invalid, Result};
use crate::options::Options;
use serde_json::Value;

pub const TABLE_FORMAT: &str = "fusedmoe-tiles/1";
pub const ENV_TILE_CONFIG: &str = "FUSEDMOE_TILE_CONFIG";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub group_m: u32,
    pub num_warps: u32,
    pub num_stages: u32,
    /// Variant flags: bits 0–3 GEMM1's split-K, bits 4–7 GEMM2's (`split_k`), bits 8–9
    /// the launch mode (`pdl`), bits 12–14 GEMM2's own BLOCK_N (`block_n_down`); the rest 0.
    pub flags: u32,
}

/// The most CTAs one GEMM tile's k loop is split over: a split's CTAs form one thread-block
/// cluster, and 8 is the portable cluster size.
pub(crate) const MAX_SPLIT_K: u32 = 8;

impl TileConfig {
    /// How many CTAs share the k loop of one output tile of GEMM `gemm` (1 or 2); 1: no
    /// split. The split's partial sums are added in a fixed order in the cluster's first CTA
    /// (kernels/moe_gemm.cu), so the result stays deterministic.
    pub fn split_k(&self, gemm: u8) -> u32 {
        ((self.flags >> split_shift(gemm)) & 0xF).max(1)
    }

    /// This config with GEMM `gemm`'s split-K set to `split` (1..=MAX_SPLIT_K).
    pub fn with_split_k(self, gemm: u8, split: u32) -> TileConfig {
        debug_assert!((1..=MAX_SPLIT_K).contains(&split));
        let shift = split_shift(gemm);
        let code = if split <= 1 { 0 } else { split };
        TileConfig {
            flags: (self.flags & !(0xF << shift)) | (code << shift),
            ..self
        }
    }
}

/// How a config's batches launch moe_run's kernels (table key `PDL` and option `tile.pdl`:
/// 0, 1, 2): in order, or as programmatic dependents (sm_90;
/// src/backend/cuda/kernels.rs, Start::Programmatic) with GEMM2 let in after GEMM1's k loops
/// or at GEMM1's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdl {
    Off = 0,
    AfterGemm1Loop = 1,
    AtGemm1Start = 2,
}

impl Pdl {
    /// Its value as the table's `PDL` and option `tile.pdl`.
    pub fn key(self) -> u32 {
        self as u32
    }

    /// The mode of a `PDL` / `tile.pdl` value, already checked to be 0, 1 or 2.
    fn from_key(key: u32) -> Pdl {
        PDL_KEYS[key as usize]
    }
}

/// Bit 8: programmatic dependents; bit 9: GEMM2 let in at GEMM1's start.
const PDL_FLAG: u32 = 1 << 8;
const PDL_EARLY_FLAG: u32 = 1 << 9;

impl TileConfig {
    pub fn pdl(&self) -> Pdl {
        match (self.flags & PDL_FLAG != 0, self.flags & PDL_EARLY_FLAG != 0) {
            (false, _) => Pdl::Off,
            (true, false) => Pdl::AfterGemm1Loop,
            (true, true) => Pdl::AtGemm1Start,
        }
    }

    pub fn with_pdl(self, pdl: Pdl) -> TileConfig {
        let bits = match pdl {
            Pdl::Off => 0,
            Pdl::AfterGemm1Loop => PDL_FLAG,
            Pdl::AtGemm1Start => PDL_FLAG | PDL_EARLY_FLAG,
        };
        TileConfig {
            flags: (self.flags & !(PDL_FLAG | PDL_EARLY_FLAG)) | bits,
            ..self
        }
    }
}

/// Bits 12–14: GEMM2's own BLOCK_N as log2(BLOCK_N) − 3 (1 = 16 … 5 = 256); 0: GEMM1's.
const BLOCK_N_DOWN_SHIFT: u32 = 12;
const BLOCK_N_DOWN_MASK: u32 = 0x7 << BLOCK_N_DOWN_SHIFT;

impl TileConfig {
    /// GEMM2's own BLOCK_N (table key `BLOCK_N_DOWN`, option `tile.block_n_down`), None
    /// where it takes BLOCK_N. SPEC §5: GEMM2 may have its own config but shares BLOCK_M
    /// (one alignment). At decode the two GEMMs want different widths: GEMM1's few columns
    /// (DeepSeek's 512) need narrow tiles to fill the SMs, GEMM2's many (7168) with a short
    /// k loop make thousands of CTAs of a few KB each at that width.
    pub fn block_n_down(&self) -> Option<u32> {
        let code = (self.flags & BLOCK_N_DOWN_MASK) >> BLOCK_N_DOWN_SHIFT;
        (code != 0).then_some(8 << code)
    }

    /// This config with GEMM2's BLOCK_N set to `block_n` (a power of two in 16..=256);
    /// BLOCK_N itself leaves GEMM2 without one of its own.
    pub fn with_block_n_down(self, block_n: u32) -> TileConfig {
        debug_assert!(block_n.is_power_of_two() && (16..=256).contains(&block_n));
        let code = match block_n == self.block_n {
            true => 0,
            false => block_n.trailing_zeros() - 3,
        };
        TileConfig {
            flags: (self.flags & !BLOCK_N_DOWN_MASK) | (code << BLOCK_N_DOWN_SHIFT),
            ..self
        }
    }

    /// The config GEMM `gemm` (1 or 2) runs: GEMM2 with its own BLOCK_N where it has one.
    pub fn for_gemm(&self, gemm: u8) -> TileConfig {
        match (gemm, self.block_n_down()) {
            (2, Some(block_n)) => TileConfig {
                block_n,
                flags: self.flags & !BLOCK_N_DOWN_MASK,
                ..*self
            },
            _ => *self,
        }
    }
}

/// The table's `PDL` values, in order.
pub const PDL_KEYS: [Pdl; 3] = [Pdl::Off, Pdl::AfterGemm1Loop, Pdl::AtGemm1Start];

/// Where GEMM `gemm`'s split-K sits in the flags: bits 0–3 for GEMM1, 4–7 for GEMM2.
fn split_shift(gemm: u8) -> u32 {
    if gemm == 1 {
        0
    } else {
        4
    }
}

/// SGLang's default rule (fused_moe `get_default_config`, bf16/fp16): small batches take
/// narrow blocks. f32 layers use the same rule.
pub fn default_config(m: usize, experts: usize) -> TileConfig {
    let (block_m, block_n, block_k, group_m) = if m <= experts {
        (16, 32, 64, 1)
    } else {
        (64, 64, 32, 8)
    };
    TileConfig {
        block_m,
        block_n,
        block_k,
        group_m,
        num_warps: 4,
        num_stages: 3,
        flags: 0,
    }
}

/// Which layer a table is for (SPEC §5's key, minus M).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableKey {
    pub experts: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: DType,
    pub quant: String,
    pub device: String,
}

/// A tuned table: configs by token count, sorted by M.
#[derive(Clone, Debug, PartialEq)]
pub struct TileTable {
    pub key: TableKey,
    pub entries: Vec<(usize, TileConfig)>,
}

impl TileTable {
    /// The config of the nearest M key; on a tie, the smaller key.
    pub fn lookup(&self, m: usize) -> TileConfig {
        let mut best = self.entries[0];
        for &(key, cfg) in &self.entries[1..] {
            if key.abs_diff(m) < best.0.abs_diff(m) {
                best = (key, cfg);
            }
        }
        best.1
    }
}

fn field_u32(obj: &Value, name: &str, at: &str, min: u32, max: u32, pow2: bool) -> Result<u32> {
    let v = obj
        .get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid!("{at}: \"{name}\" is missing or not a non-negative integer"))?;
    let ok = v >= min as u64 && v <= max as u64 && (!pow2 || v.is_power_of_two());
    if !ok {
        let what = if pow2 { "a power of two " } else { "" };
        return Err(invalid!(
            "{at}: \"{name}\" = {v}, expected {what}in [{min}, {max}]"
        ));
    }
    Ok(v as u32)
}

fn parse_config(obj: &Value, at: &str) -> Result<TileConfig> {
    let config = TileConfig {
        block_m: field_u32(obj, "BLOCK_M", at, 16, 256, true)?,
        block_n: field_u32(obj, "BLOCK_N", at, 16, 256, true)?,
        block_k: field_u32(obj, "BLOCK_K", at, 16, 256, true)?,
        group_m: field_u32(obj, "GROUP_M", at, 1, 64, false)?,
        num_warps: field_u32(obj, "num_warps", at, 1, 16, true)?,
        num_stages: field_u32(obj, "num_stages", at, 1, 8, false)?,
        flags: 0,
    };
    let block_n_down = match obj.get("BLOCK_N_DOWN") {
        None => config.block_n,
        Some(_) => field_u32(obj, "BLOCK_N_DOWN", at, 16, 256, true)?,
    };
    Ok(config
        .with_block_n_down(block_n_down)
        .with_split_k(1, optional_u32(obj, "SPLIT_K", at, 1, MAX_SPLIT_K)?)
        .with_split_k(2, optional_u32(obj, "SPLIT_K_DOWN", at, 1, MAX_SPLIT_K)?)
        .with_pdl(match obj.get("PDL") {
            None => Pdl::Off,
            Some(_) => Pdl::from_key(field_u32(obj, "PDL", at, 0, 2, false)?),
        }))
}

/// A key tables may leave out (ours, beyond SGLang's configs): 1 when absent.
fn optional_u32(obj: &Value, name: &str, at: &str, min: u32, max: u32) -> Result<u32> {
    match obj.get(name) {
        None => Ok(1),
        Some(_) => field_u32(obj, name, at, min, max, false),
    }
}

fn parse_dtype(s: &str, at: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(invalid!(
            "{at}: \"dtype\" = \"{s}\", expected f32, f16 or bf16"
        )),
    }
}

fn parse_table(t: &Value, at: &str) -> Result<TileTable> {
    let size = |name: &str| -> Result<usize> {
        t.get(name)
            .and_then(Value::as_u64)
            .filter(|&v| v >= 1)
            .map(|v| v as usize)
            .ok_or_else(|| invalid!("{at}: \"{name}\" is missing or not a positive integer"))
    };
    let text = |name: &str| -> Result<String> {
        t.get(name)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| invalid!("{at}: \"{name}\" is missing or not a string"))
    };
    let key = TableKey {
        experts: size("E")?,
        n: size("N")?,
        k: size("K")?,
        dtype: parse_dtype(&text("dtype")?, at)?,
        quant: text("quant")?,
        device: text("device")?,
    };
    let configs = t
        .get("configs")
        .and_then(Value::as_object)
        .ok_or_else(|| invalid!("{at}: \"configs\" is missing or not an object"))?;
    let mut entries = Vec::with_capacity(configs.len());
    for (m, cfg) in configs {
        let m_at = format!("{at}.configs[\"{m}\"]");
        let tokens: usize = m
            .parse()
            .map_err(|_| invalid!("{m_at}: key is not a token count"))?;
        entries.push((tokens, parse_config(cfg, &m_at)?));
    }
    if entries.is_empty() {
        return Err(invalid!("{at}: \"configs\" is empty"));
    }
    entries.sort_by_key(|e| e.0);
    Ok(TileTable { key, entries })
}

/// Parses a table file; `source` names it in errors ("tile.config_file /x.json: ...").
pub fn parse_tables(json: &str, source: &str) -> Result<Vec<TileTable>> {
    let root: Value =
        serde_json::from_str(json).map_err(|e| invalid!("{source}: not JSON: {e}"))?;
    match root.get("format").and_then(Value::as_str) {
        Some(TABLE_FORMAT) => {}
        other => {
            return Err(invalid!(
                "{source}: \"format\" is {other:?}, expected \"{TABLE_FORMAT}\""
            ))
        }
    }
    let tables = root
        .get("tables")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid!("{source}: \"tables\" is missing or not an array"))?;
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| parse_table(t, &format!("{source}: tables[{i}]")))
        .collect()
}

/// The traits of a GPU that decide its best tiles besides its name: the same compute
/// capability means the same instructions and shared memory per SM, the same multiprocessor
/// count the same waves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuTraits {
    pub compute_capability: (u32, u32),
    pub sm_count: u32,
}

/// Tables shipped inside the library: examples/tune's output on each GPU we tuned for
/// (BENCHMARKS.md has the commands), with that GPU's traits as the tuning runs read them.
/// Parsed once, on the first layer that looks.
const BUILTIN_TABLE_FILES: [(&str, &str, GpuTraits); 2] = [
    (
        "src/tile_tables/nvidia_h100.json",
        include_str!("tile_tables/nvidia_h100.json"),
        GpuTraits {
            compute_capability: (9, 0),
            sm_count: 132,
        },
    ),
    (
        "src/tile_tables/nvidia_h200.json",
        include_str!("tile_tables/nvidia_h200.json"),
        GpuTraits {
            compute_capability: (9, 0),
            sm_count: 132,
        },
    ),
];

fn builtin_tables() -> &'static [(TileTable, GpuTraits)] {
    static TABLES: once_cell::sync::Lazy<Vec<(TileTable, GpuTraits)>> =
        once_cell::sync::Lazy::new(|| {
            BUILTIN_TABLE_FILES
                .iter()
                .flat_map(|(source, json, traits)| {
                    // a shipped table that does not parse fails the unit test below
                    let tables = parse_tables(json, source).unwrap_or_default();
                    tables.into_iter().map(move |t| (t, *traits))
                })
                .collect()
        });
    &TABLES
}

/// The shipped table for `key`: the one tuned on this GPU model, else (**ours**: SPEC §5 falls
/// back to the default rule) one of the same shape tuned on a GPU of the same compute
/// capability, preferring the same multiprocessor count (an H100 NVL or a GH200 takes the H100
/// SXM's): a sibling's tuned tiles are far nearer the best than the default rule, which was
/// 1.0-3.8x slower than the H200's own table there (BENCHMARKS.md, tile tables).
fn builtin_table(key: &TableKey, gpu: Option<GpuTraits>) -> Option<TileTable> {
    let tables = builtin_tables();
    if let Some((t, _)) = tables.iter().find(|(t, _)| &t.key == key) {
        return Some(t.clone());
    }
    let gpu = gpu?;
    let same_shape = |t: &TileTable| {
        TableKey {
            device: key.device.clone(),
            ..t.key.clone()
        } == *key
    };
    let siblings = || {
        tables.iter().filter(move |(t, traits)| {
            same_shape(t) && traits.compute_capability == gpu.compute_capability
        })
    };
    siblings()
        .find(|(_, traits)| traits.sm_count == gpu.sm_count)
        .or_else(|| siblings().next())
        .map(|(t, _)| t.clone())
}

/// Per-layer overrides from the options `tile.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Override {
    block_m: Option<u32>,
    block_n: Option<u32>,
    block_n_down: Option<u32>,
    block_k: Option<u32>,
    group_m: Option<u32>,
    num_warps: Option<u32>,
    num_stages: Option<u32>,
    split_k: Option<u32>,
    split_k_down: Option<u32>,
    pdl: Option<u32>,
}

impl Override {
    fn from_options(o: &Options) -> Self {
        let get = |k: &str| o.int(k).map(|v| v as u32);
        Override {
            block_m: get("tile.block_m"),
            block_n: get("tile.block_n"),
            block_n_down: get("tile.block_n_down"),
            block_k: get("tile.block_k"),
            group_m: get("tile.group_m"),
            num_warps: get("tile.num_warps"),
            num_stages: get("tile.num_stages"),
            split_k: get("tile.split_k"),
            split_k_down: get("tile.split_k_down"),
            pdl: get("tile.pdl"),
        }
    }

    /// The overrides over `c`. GEMM2's BLOCK_N: the option tile.block_n_down, else `c`'s own
    /// (a table's BLOCK_N_DOWN), else BLOCK_N as the options leave it.
    fn apply(&self, c: TileConfig) -> TileConfig {
        let with_block_n = TileConfig {
            block_m: self.block_m.unwrap_or(c.block_m),
            block_n: self.block_n.unwrap_or(c.block_n),
            block_k: self.block_k.unwrap_or(c.block_k),
            group_m: self.group_m.unwrap_or(c.group_m),
            num_warps: self.num_warps.unwrap_or(c.num_warps),
            num_stages: self.num_stages.unwrap_or(c.num_stages),
            flags: c.flags,
        };
        let block_n_down = self.block_n_down.or(c.block_n_down());
        with_block_n
            .with_block_n_down(block_n_down.unwrap_or(with_block_n.block_n))
            .with_split_k(1, self.split_k.unwrap_or(c.split_k(1)))
            .with_split_k(2, self.split_k_down.unwrap_or(c.split_k(2)))
            .with_pdl(self.pdl.map_or(c.pdl(), Pdl::from_key))
    }
}

/// A layer's tile choice, fixed at layer creation.
#[derive(Clone, Debug, PartialEq)]
pub struct TileChooser {
    experts: usize,
    table: Option<TileTable>,
    over: Override,
}

fn read_table_file(path: &str, source: &str, key: &TableKey) -> Result<Option<TileTable>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| invalid!("{source} {path}: cannot read: {e}"))?;
    let tables = parse_tables(&text, &format!("{source} {path}"))?;
    Ok(tables.into_iter().find(|t| &t.key == key))
}

impl TileChooser {
    /// Picks the table for `key` from the option file, the environment's file, or the
    /// shipped tables (a sibling GPU's where none is for this one: `builtin_table`), in that
    /// order. A file that does not parse is an error, not a fallback.
    pub fn new(key: &TableKey, gpu: Option<GpuTraits>, options: &Options) -> Result<Self> {
        let table = if let Some(path) = options.get("tile.config_file") {
            read_table_file(path, "tile.config_file", key)?
        } else if let Some(path) = std::env::var_os(ENV_TILE_CONFIG) {
            read_table_file(&path.to_string_lossy(), ENV_TILE_CONFIG, key)?
        } else {
            None
        };
        let table = table.or_else(|| builtin_table(key, gpu));
        Ok(TileChooser {
            experts: key.experts,
            table,
            over: Override::from_options(options),
        })
    }

    pub fn choose(&self, m: usize) -> TileConfig {
        let base = match &self.table {
            Some(t) => t.lookup(m),
            None => default_config(m, self.experts),
        };
        self.over.apply(base)
    }

    /// Every config some token count in [1, max_tokens] gets (for moe_warmup). The choice
    /// only changes at the default rule's boundary (M = E) and halfway between table keys,
    /// so those points and the keys themselves cover every M.
    pub fn configs_up_to(&self, max_tokens: usize) -> Vec<TileConfig> {
        let mut points = vec![1, max_tokens, self.experts, self.experts + 1];
        if let Some(t) = &self.table {
            let mut keys: Vec<usize> = t.entries.iter().map(|e| e.0).collect();
            keys.sort_unstable();
            points.extend(&keys);
            for w in keys.windows(2) {
                let mid = (w[0] + w[1]) / 2;
                points.extend([mid, mid + 1]);
            }
        }
        let mut configs: Vec<TileConfig> = Vec::new();
        for m in points.into_iter().filter(|&m| m >= 1 && m <= max_tokens) {
            let c = self.choose(m);
            if !configs.contains(&c) {
                configs.push(c);
            }
        }
        configs
    }

    /// The largest BLOCK_M any token count can get: it sizes the workspace.
    pub fn max_block_m(&self) -> u32 {
        if let Some(bm) = self.over.block_m {
            return bm;
        }
        let from_table = self
            .table
            .iter()
            .flat_map(|t| t.entries.iter().map(|e| e.1.block_m))
            .max();
        let from_rule = [
            default_config(0, self.experts),
            default_config(usize::MAX, self.experts),
        ]
        .iter()
        .map(|c| c.block_m)
        .max()
        .unwrap();
        from_table.unwrap_or(from_rule)
    }

    pub fn has_table(&self) -> bool {
        self.table.is_some()
    }

    /// The GPU the chosen table was tuned on ("cpu" for a host's CPU table), if any.
    pub fn table_device(&self) -> Option<&str> {
        self.table.as_ref().map(|t| t.key.device.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_tables_parse_and_are_found_by_their_key() {
        for (source, json, _) in BUILTIN_TABLE_FILES {
            let tables = parse_tables(json, source).unwrap();
            assert!(!tables.is_empty(), "{source}");
        }
        // Mixtral-8x7B on the H100 (examples/tune): large batches take the 128×256 tile
        let key = on("NVIDIA H100 80GB HBM3");
        let chooser = TileChooser::new(&key, Some(HOPPER_132), &Options::default()).unwrap();
        let big = chooser.choose(16384);
        assert_eq!((big.block_m, big.block_n, big.num_warps), (128, 256, 8));
        assert_ne!(
            chooser.choose(1),
            default_config(1, 8),
            "the table, not the default"
        );
        assert_eq!(chooser.table_device(), Some("NVIDIA H100 80GB HBM3"));
        // the H200 has a table of its own (tuned there, not the H100's copied)
        let h200 = TileChooser::new(&on("NVIDIA H200"), Some(HOPPER_132), &Options::default());
        let h200 = h200.unwrap();
        assert_eq!(h200.table_device(), Some("NVIDIA H200"));
        let wide = h200.choose(1024);
        assert_eq!((wide.block_m, wide.block_n, wide.num_stages), (128, 256, 4));
    }

    const HOPPER_132: GpuTraits = GpuTraits {
        compute_capability: (9, 0),
        sm_count: 132,
    };

    /// The Mixtral-8x7B key on the named device.
    fn on(device: &str) -> TableKey {
        TableKey {
            experts: 8,
            n: 14336,
            k: 4096,
            dtype: DType::BF16,
            quant: "none".into(),
            device: device.into(),
        }
    }

    #[test]
    fn a_gpu_without_a_table_takes_a_siblings_of_its_compute_capability() {
        let choose = |device: &str, gpu: Option<GpuTraits>| {
            TileChooser::new(&on(device), gpu, &Options::default()).unwrap()
        };
        // same compute capability and SM count (an H100 NVL): the first such shipped table
        let nvl = choose("NVIDIA H100 NVL", Some(HOPPER_132));
        assert_eq!(nvl.table_device(), Some("NVIDIA H100 80GB HBM3"));
        assert_ne!(nvl.choose(1024), default_config(1024, 8));
        // same compute capability, fewer SMs (an H100 PCIe): still a Hopper table
        let pcie = GpuTraits {
            sm_count: 114,
            ..HOPPER_132
        };
        assert!(choose("NVIDIA H100 PCIe", Some(pcie)).has_table());
        // another compute capability (an A100), or no GPU: the default rule
        let a100 = GpuTraits {
            compute_capability: (8, 0),
            sm_count: 108,
        };
        let a100 = choose("NVIDIA A100-SXM4-80GB", Some(a100));
        assert!(!a100.has_table());
        assert_eq!(a100.choose(16384), default_config(16384, 8));
        assert!(!choose("cpu", None).has_table());
        // another shape on a Hopper GPU: no table of that shape, so the default rule
        let small = TableKey {
            n: 1024,
            ..on("NVIDIA H100 NVL")
        };
        let small = TileChooser::new(&small, Some(HOPPER_132), &Options::default()).unwrap();
        assert!(!small.has_table());
    }

    const ONE: &str = r#"{"format": "fusedmoe-tiles/1", "tables": [
        {"E": 8, "N": 32, "K": 64, "dtype": "bf16", "quant": "none", "device": "cpu",
         "configs": {
           "1":  {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 4},
           "16": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 1, "num_warps": 4, "num_stages": 3},
           "64": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}}}]}"#;

    fn key() -> TableKey {
        TableKey {
            experts: 8,
            n: 32,
            k: 64,
            dtype: DType::BF16,
            quant: "none".into(),
            device: "cpu".into(),
        }
    }

    #[test]
    fn default_rule_switches_at_m_equal_e() {
        assert_eq!(default_config(8, 8).block_m, 16);
        assert_eq!(default_config(9, 8).block_m, 64);
        assert_eq!(
            (default_config(9, 8).block_n, default_config(9, 8).group_m),
            (64, 8)
        );
    }

    #[test]
    fn lookup_takes_the_nearest_m_and_ties_go_to_the_smaller_key() {
        let t = &parse_tables(ONE, "t").unwrap()[0];
        assert_eq!(t.lookup(1).block_m, 16);
        assert_eq!(t.lookup(8).block_m, 16); // |8-1| = 7 < |8-16| = 8
        assert_eq!(t.lookup(9).block_m, 32); // |9-16| = 7 < 8
        assert_eq!(t.lookup(40).block_m, 32); // tie 24/24 → the smaller key, 16
        assert_eq!(t.lookup(41).block_m, 64);
        assert_eq!(t.lookup(100000).block_m, 64);
    }

    #[test]
    fn bad_tables_name_the_place() {
        let e =
            parse_tables(&ONE.replace("\"BLOCK_M\": 32", "\"BLOCK_M\": 48"), "f.json").unwrap_err();
        assert!(
            e.message
                .contains("f.json: tables[0].configs[\"16\"]: \"BLOCK_M\" = 48"),
            "{}",
            e.message
        );
        let e = parse_tables("{}", "f.json").unwrap_err();
        assert!(e.message.contains("format"));
        assert!(parse_tables("{", "f.json")
            .unwrap_err()
            .message
            .contains("not JSON"));
    }

    #[test]
    fn split_k_comes_from_the_table_or_the_options_per_gemm() {
        let with_split = ONE.replace(
            "\"num_stages\": 4}",
            "\"num_stages\": 4, \"SPLIT_K\": 4, \"SPLIT_K_DOWN\": 2}",
        );
        let t = &parse_tables(&with_split, "t").unwrap()[0];
        assert_eq!((t.lookup(1).split_k(1), t.lookup(1).split_k(2)), (4, 2));
        assert_eq!((t.lookup(64).split_k(1), t.lookup(64).split_k(2)), (1, 1));
        let e =
            parse_tables(&with_split.replace("\"SPLIT_K\": 4", "\"SPLIT_K\": 9"), "f").unwrap_err();
        assert!(e.message.contains("\"SPLIT_K\" = 9"), "{}", e.message);

        let mut o = Options::default();
        o.set("tile.split_k_down", "8").unwrap();
        assert!(o.set("tile.split_k", "9").is_err());
        let c = TileChooser::new(&key(), None, &o).unwrap();
        assert_eq!((c.choose(1).split_k(1), c.choose(1).split_k(2)), (1, 8));
        // the flags a host reads back (moe_plan_tile_config): GEMM1 in bits 0-3, GEMM2 in 4-7
        assert_eq!(
            default_config(1, 8)
                .with_split_k(1, 3)
                .with_split_k(2, 5)
                .flags,
            0x53
        );
        assert_eq!(default_config(1, 8).with_split_k(1, 1).flags, 0);
    }

    #[test]
    fn gemm2s_block_n_comes_from_the_table_or_the_option_and_shares_block_m() {
        let wide = ONE.replace(
            "\"num_stages\": 4}",
            "\"num_stages\": 4, \"BLOCK_N_DOWN\": 128, \"SPLIT_K\": 2}",
        );
        let t = &parse_tables(&wide, "t").unwrap()[0];
        let c = t.lookup(1);
        assert_eq!(c.block_n_down(), Some(128));
        assert_eq!((c.for_gemm(1).block_n, c.for_gemm(2).block_n), (32, 128));
        // GEMM2's own config: BLOCK_M and the rest are GEMM1's, and it has no "down" width
        let g2 = c.for_gemm(2);
        assert_eq!((g2.block_m, g2.block_k, g2.split_k(1)), (16, 64, 2));
        assert_eq!(g2.block_n_down(), None);
        assert_eq!(c.for_gemm(1), c);
        // the flags a host reads back: bits 12-14, log2(BLOCK_N_DOWN) - 3
        assert_eq!(c.flags, 0x4002);
        assert_eq!(t.lookup(64).block_n_down(), None);
        // BLOCK_N itself is no width of GEMM2's own
        let same = ONE.replace(
            "\"num_stages\": 4}",
            "\"num_stages\": 4, \"BLOCK_N_DOWN\": 32}",
        );
        assert_eq!(parse_tables(&same, "t").unwrap()[0].lookup(1).flags, 0);
        let e = parse_tables(&wide.replace(": 128,", ": 96,"), "f").unwrap_err();
        assert!(e.message.contains("\"BLOCK_N_DOWN\" = 96"), "{}", e.message);
        for bn in [16, 32, 64, 128, 256] {
            let c = default_config(1, 8).with_block_n_down(bn);
            assert_eq!(c.for_gemm(2).block_n, bn);
        }

        // the option wins over the table; tile.block_n alone moves GEMM2 only where neither
        // gives GEMM2 a width of its own
        let path = std::env::temp_dir().join(format!("fm_tiles_down_{}.json", std::process::id()));
        std::fs::write(&path, &wide).unwrap();
        let chooser = |opts: &[(&str, &str)]| {
            let mut o = Options::default();
            o.set("tile.config_file", path.to_str().unwrap()).unwrap();
            for (k, v) in opts {
                o.set(k, v).unwrap();
            }
            TileChooser::new(&key(), None, &o).unwrap().choose(1)
        };
        let widths = |c: TileConfig| (c.for_gemm(1).block_n, c.for_gemm(2).block_n);
        assert_eq!(widths(chooser(&[])), (32, 128));
        assert_eq!(widths(chooser(&[("tile.block_n_down", "256")])), (32, 256));
        assert_eq!(widths(chooser(&[("tile.block_n_down", "32")])), (32, 32));
        assert_eq!(widths(chooser(&[("tile.block_n", "64")])), (64, 128));
        assert_eq!(widths(chooser(&[("tile.block_n", "128")])), (128, 128));
        std::fs::remove_file(&path).unwrap();
        let mut o = Options::default();
        o.set("tile.block_n", "64").unwrap();
        let c = TileChooser::new(&key(), None, &o).unwrap().choose(1);
        assert_eq!(widths(c), (64, 64));
        assert!(o.set("tile.block_n_down", "96").is_err());
        assert!(o.set("tile.block_n_down", "512").is_err());
    }

    #[test]
    fn pdl_comes_from_the_table_entry_in_bits_8_and_9() {
        let with_pdl = ONE.replace(
            "\"num_stages\": 4}",
            "\"num_stages\": 4, \"SPLIT_K\": 2, \"PDL\": 1}",
        );
        let t = &parse_tables(&with_pdl, "t").unwrap()[0];
        assert_eq!(t.lookup(1).pdl(), Pdl::AfterGemm1Loop);
        assert_eq!(t.lookup(1).flags, 0x102);
        assert_eq!(t.lookup(64).pdl(), Pdl::Off);
        let early = with_pdl.replace("\"PDL\": 1", "\"PDL\": 2");
        let t = &parse_tables(&early, "t").unwrap()[0];
        assert_eq!(t.lookup(1).pdl(), Pdl::AtGemm1Start);
        assert_eq!(t.lookup(1).flags, 0x302);
        let off = with_pdl.replace("\"PDL\": 1", "\"PDL\": 0");
        assert_eq!(
            parse_tables(&off, "t").unwrap()[0].lookup(1).pdl(),
            Pdl::Off
        );
        let e = parse_tables(&with_pdl.replace("\"PDL\": 1", "\"PDL\": 3"), "f").unwrap_err();
        assert!(e.message.contains("\"PDL\" = 3"), "{}", e.message);
        for p in PDL_KEYS {
            assert_eq!(
                default_config(1, 8)
                    .with_pdl(Pdl::AtGemm1Start)
                    .with_pdl(p)
                    .pdl(),
                p
            );
        }
        assert_eq!(
            default_config(1, 8)
                .with_pdl(Pdl::AtGemm1Start)
                .with_pdl(Pdl::Off)
                .flags,
            0
        );

        // option tile.pdl wins over the entry, as the other tile.* options do
        let mut o = Options::default();
        o.set("tile.pdl", "2").unwrap();
        assert!(o.set("tile.pdl", "3").is_err());
        let c = TileChooser::new(&key(), None, &o).unwrap();
        assert_eq!(c.choose(1).pdl(), Pdl::AtGemm1Start);
        o.set("tile.pdl", "0").unwrap();
        let entry = default_config(1, 8)
            .with_pdl(Pdl::AfterGemm1Loop)
            .with_split_k(1, 2);
        let applied = Override::from_options(&o).apply(entry);
        assert_eq!((applied.pdl(), applied.split_k(1)), (Pdl::Off, 2));
    }

    #[test]
    fn overrides_win_over_the_table_and_size_the_workspace() {
        let mut o = Options::default();
        let dir = std::env::temp_dir().join(format!("fusedmoe-tiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        std::fs::write(&path, ONE).unwrap();
        o.set("tile.config_file", path.to_str().unwrap()).unwrap();
        let c = TileChooser::new(&key(), None, &o).unwrap();
        assert!(c.has_table());
        assert_eq!(c.choose(64).block_n, 128);
        assert_eq!(c.max_block_m(), 64);
        o.set("tile.block_m", "128").unwrap();
        let c = TileChooser::new(&key(), None, &o).unwrap();
        assert_eq!((c.choose(1).block_m, c.choose(1).block_n), (128, 32));
        assert_eq!(c.max_block_m(), 128);
    }

    #[test]
    fn a_table_for_another_shape_falls_back_to_the_rule() {
        let mut o = Options::default();
        let dir = std::env::temp_dir().join(format!("fusedmoe-tiles2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.json");
        std::fs::write(&path, ONE).unwrap();
        o.set("tile.config_file", path.to_str().unwrap()).unwrap();
        let other = TableKey {
            experts: 16,
            ..key()
        };
        let c = TileChooser::new(&other, None, &o).unwrap();
        assert!(!c.has_table());
        assert_eq!(c.choose(1), default_config(1, 16));
    }
}

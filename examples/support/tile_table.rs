//! The tuned-table file of SPEC §5 (format "fusedmoe-tiles/1", parsed by
//! `fusedmoe::tiles::parse_tables`) as examples/tune writes it: one table per key (E, N = I,
//! K = H, dtype, quant, device), one config per token count M, a line per config. A file that
//! is there already is merged per (key, M), so tuning runs split by shape or by M add up.
//! tests/tiles_file.rs includes this file too and checks what it writes against the library.
#![allow(dead_code)]

use fusedmoe::tiles::{parse_tables, Pdl, TableKey, TileConfig, TileTable, TABLE_FORMAT};
use std::path::Path;

/// A JSON string literal (quotes and escapes as serde_json writes them).
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// One config as the table holds it; `BLOCK_N_DOWN` only when GEMM2 has its own BLOCK_N
/// (absent reads as BLOCK_N), the split-K keys only when a GEMM splits (absent reads as 1),
/// `PDL` only when set (absent reads as 0).
pub fn render_config(c: &TileConfig) -> String {
    let mut split = String::new();
    if let Some(block_n) = c.block_n_down() {
        split += &format!(", \"BLOCK_N_DOWN\": {block_n}");
    }
    for (gemm, name) in [(1, "SPLIT_K"), (2, "SPLIT_K_DOWN")] {
        if c.split_k(gemm) > 1 {
            split += &format!(", \"{name}\": {}", c.split_k(gemm));
        }
    }
    if c.pdl() != Pdl::Off {
        split += &format!(", \"PDL\": {}", c.pdl().key());
    }
    format!(
        "{{\"BLOCK_M\": {}, \"BLOCK_N\": {}, \"BLOCK_K\": {}, \"GROUP_M\": {}, \"num_warps\": {}, \"num_stages\": {}{split}}}",
        c.block_m, c.block_n, c.block_k, c.group_m, c.num_warps, c.num_stages
    )
}

fn render_table(t: &TileTable) -> String {
    let k = &t.key;
    let mut entries = t.entries.clone();
    entries.sort_by_key(|e| e.0);
    let configs: Vec<String> = entries
        .iter()
        .map(|(m, c)| format!("        {}: {}", quoted(&m.to_string()), render_config(c)))
        .collect();
    format!(
        "    {{\n      \"E\": {}, \"N\": {}, \"K\": {}, \"dtype\": {}, \"quant\": {},\n      \"device\": {},\n      \"configs\": {{\n{}\n      }}\n    }}",
        k.experts,
        k.n,
        k.k,
        quoted(k.dtype.name()),
        quoted(&k.quant),
        quoted(&k.device),
        configs.join(",\n")
    )
}

/// The file's text: every table, each with its configs in increasing M.
pub fn render(tables: &[TileTable]) -> String {
    let body: Vec<String> = tables.iter().map(render_table).collect();
    format!(
        "{{\n  \"format\": {},\n  \"tables\": [\n{}\n  ]\n}}\n",
        quoted(TABLE_FORMAT),
        body.join(",\n")
    )
}

/// `base` with `new` put in: for new's key, new's config at each of its M keys and the other
/// M keys of base kept; tables of other keys untouched. Tables of one key merge into one
/// (the library reads only the first of a key), the earlier one winning per M.
pub fn merge(base: Vec<TileTable>, new: &TileTable) -> Vec<TileTable> {
    let mut out: Vec<TileTable> = Vec::new();
    for t in base {
        match out.iter_mut().find(|o| o.key == t.key) {
            None => out.push(t),
            Some(o) => {
                for (m, c) in t.entries {
                    if !o.entries.iter().any(|e| e.0 == m) {
                        o.entries.push((m, c));
                    }
                }
            }
        }
    }
    match out.iter_mut().find(|o| o.key == new.key) {
        None => out.push(new.clone()),
        Some(o) => {
            for &(m, c) in &new.entries {
                match o.entries.iter_mut().find(|e| e.0 == m) {
                    Some(e) => e.1 = c,
                    None => o.entries.push((m, c)),
                }
            }
        }
    }
    for o in &mut out {
        o.entries.sort_by_key(|e| e.0);
    }
    out
}

/// The tables of the file at `path`, none when there is no file; a file that does not parse
/// is an error (the library would refuse it too).
pub fn read(path: &Path) -> Result<Vec<TileTable>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_tables(&text, &path.display().to_string()).map_err(|e| e.message),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: cannot read: {e}", path.display())),
    }
}

/// Writes `tables` to `path` (through a temporary file and a rename), after checking that the
/// library's parser reads the text back as exactly these tables.
pub fn write(path: &Path, tables: &[TileTable]) -> Result<(), String> {
    let text = render(tables);
    let back = parse_tables(&text, "the rendered table").map_err(|e| e.message)?;
    let sorted: Vec<TileTable> = tables
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t.entries.sort_by_key(|e| e.0);
            t
        })
        .collect();
    if back != sorted {
        return Err("the rendered table does not parse back to the same configs".into());
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A table of one key from (M, config) pairs.
pub fn table(key: TableKey, entries: &[(usize, TileConfig)]) -> TileTable {
    let mut entries = entries.to_vec();
    entries.sort_by_key(|e| e.0);
    TileTable { key, entries }
}

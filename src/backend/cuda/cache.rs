//! The disk cache of compiled kernels (DESIGN §4): one CUBIN file per (sources, NVRTC
//! version, architecture, options), so a second process skips NVRTC. Best effort: a cache
//! that cannot be read or written costs a compilation, never an error.

use super::compile::HEADERS;
use super::variant::Variant;
use std::path::PathBuf;

pub const ENV_CACHE_DIR: &str = "FUSEDMOE_CACHE_DIR";

/// FUSEDMOE_CACHE_DIR, else $XDG_CACHE_HOME/fusedmoe, else $HOME/.cache/fusedmoe.
pub fn dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os(ENV_CACHE_DIR) {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("fusedmoe"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("fusedmoe"))
}

/// FNV-1a, 64 bits: stable across builds and platforms (std's hasher is not).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // a separator, so that ("ab", "c") and ("a", "bc") differ
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The file a variant's CUBIN is kept in.
pub fn key(v: &Variant, arch: &str, nvrtc: (i32, i32)) -> String {
    let options = v.options().join(" ");
    let nvrtc = format!("{}.{}", nvrtc.0, nvrtc.1);
    let mut parts: Vec<&[u8]> = vec![
        v.source().text.as_bytes(),
        arch.as_bytes(),
        nvrtc.as_bytes(),
        options.as_bytes(),
    ];
    parts.extend(HEADERS.iter().map(|h| h.text.as_bytes()));
    format!("{}-{arch}-{:016x}.cubin", v.name, fnv1a(&parts))
}

pub fn load(name: &str) -> Option<Vec<u8>> {
    let bytes = std::fs::read(dir()?.join(name)).ok()?;
    bytes.starts_with(b"\x7fELF").then_some(bytes)
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
pub fn store(name: &str, cubin: &[u8]) {
    let Some(dir) = dir() else { return };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    // unique per writer: two threads may compile the same kernel at once
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{name}.{}.{n}.tmp", std::process::id()));
    if std::fs::write(&tmp, cubin).is_ok() && std::fs::rename(&tmp, dir.join(name)).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_arch_options_and_nvrtc() {
        let a = super::super::variant::align(false);
        let b = super::super::variant::align(true);
        assert_ne!(key(&a, "sm_90a", (13, 0)), key(&a, "sm_80", (13, 0)));
        assert_ne!(key(&a, "sm_90a", (13, 0)), key(&a, "sm_90a", (13, 1)));
        assert_ne!(key(&a, "sm_90a", (13, 0)), key(&b, "sm_90a", (13, 0)));
        assert_eq!(key(&a, "sm_90a", (13, 0)), key(&a, "sm_90a", (13, 0)));
    }
}

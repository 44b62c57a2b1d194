//! Generates the C header from src/ffi with cbindgen into OUT_DIR. The committed copy,
//! include/fusedmoe.h, is compared with it by tests/header.rs; `FUSEDMOE_BLESS=1 cargo build`
//! rewrites the committed copy.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // cbindgen reads the whole crate (a `pub const` anywhere lands in the header), so any
    // source change reruns it; watching src/ffi alone let a stale header pass locally.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=FUSEDMOE_BLESS");

    // The SONAME carries the ABI version, read from the one constant that defines it.
    let info = std::fs::read_to_string(crate_dir.join("src/ffi/info.rs")).expect("src/ffi/info.rs");
    let abi = info
        .lines()
        .find_map(|l| l.strip_prefix("pub const MOE_ABI_VERSION: u32 = "))
        .and_then(|v| v.trim_end_matches(';').parse::<u32>().ok())
        .expect("MOE_ABI_VERSION in src/ffi/info.rs");
    println!("cargo:rerun-if-changed=src/ffi/info.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libfusedmoe.so.{abi}");

    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let header = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let generated = out_dir.join("fusedmoe.h");
    header.write_to_file(&generated);
    if std::env::var_os("FUSEDMOE_BLESS").is_some_and(|v| v == "1") {
        std::fs::copy(&generated, crate_dir.join("include/fusedmoe.h"))
            .expect("write include/fusedmoe.h");
    }
}

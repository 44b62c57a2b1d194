//! Generates the C header from src/ffi with cbindgen into OUT_DIR. The committed copy,
//! include/fusedmoe.h, is compared with it by tests/header.rs; `FUSEDMOE_BLESS=1 cargo build`
//! rewrites the committed copy.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=FUSEDMOE_BLESS");

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

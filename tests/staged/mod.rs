//! A prefix staged by the install step (examples/install/layout.rs) from the library this
//! test run built, once per test binary: what the header tests and the hosts link against.
#![allow(dead_code)]

#[path = "../../examples/install/layout.rs"]
mod layout;

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>/deps: where this test run's build put libfusedmoe.so. (`cargo build`
/// also copies it one folder up, but `cargo test` alone does not, and that copy may be stale.)
pub fn deps_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The staged prefix: include/, lib/libfusedmoe.so(.1), lib/pkgconfig, lib/cmake.
pub fn prefix() -> &'static PathBuf {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        let prefix = deps_dir().parent().unwrap().join("staged").join(name);
        let _ = std::fs::remove_dir_all(&prefix);
        layout::install_built(&deps_dir(), &prefix).expect("staging the install prefix");
        prefix
    })
}

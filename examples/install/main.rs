//! Installs the library, the header, fusedmoe.pc and the CMake package under a prefix.
//!
//!   cargo run --release --example install -- --prefix "$HOME/.local"
//!
//! Then: `pkg-config --cflags --libs fusedmoe` (with PREFIX/lib/pkgconfig on
//! PKG_CONFIG_PATH), or in CMake `find_package(fusedmoe CONFIG REQUIRED)` and
//! `target_link_libraries(app PRIVATE fusedmoe::fusedmoe)` (with PREFIX on CMAKE_PREFIX_PATH).

mod layout;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let prefix = match (args.next().as_deref(), args.next()) {
        (Some("--prefix"), Some(p)) => PathBuf::from(p),
        _ => {
            eprintln!("usage: cargo run --release --example install -- --prefix DIR");
            std::process::exit(2);
        }
    };
    let prefix = std::path::absolute(&prefix).expect("prefix");
    // This binary sits in target/<profile>/examples; the library it was built with, in deps.
    let exe = std::env::current_exe().expect("own path");
    let deps = exe.parent().unwrap().parent().unwrap().join("deps");
    if let Err(e) = layout::install_built(&deps, &prefix) {
        eprintln!("install into {} failed: {e}", prefix.display());
        std::process::exit(1);
    }
    println!(
        "installed fusedmoe {} (ABI {}) into {}",
        env!("CARGO_PKG_VERSION"),
        fusedmoe::ffi::MOE_ABI_VERSION,
        prefix.display()
    );
}

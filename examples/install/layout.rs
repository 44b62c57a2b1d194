//! The installed layout of fusedmoe under a prefix, shared by `examples/install` and the
//! tests that stage a prefix for the hosts:
//!
//! ```text
//! PREFIX/include/fusedmoe.h
//! PREFIX/lib/libfusedmoe.so.<ABI>            the library (its SONAME)
//! PREFIX/lib/libfusedmoe.so -> libfusedmoe.so.<ABI>
//! PREFIX/lib/libfusedmoe.a                   when built
//! PREFIX/lib/pkgconfig/fusedmoe.pc
//! PREFIX/lib/cmake/fusedmoe/fusedmoe-config.cmake, fusedmoe-config-version.cmake
//! ```

use std::io;
use std::path::Path;

/// Installs what cargo built into `deps` (target/<profile>/deps: the shared and static
/// library) with this package's header into `prefix` (absolute), replacing an earlier install.
pub fn install_built(deps: &Path, prefix: &Path) -> io::Result<()> {
    let (shared, static_lib) = (deps.join("libfusedmoe.so"), deps.join("libfusedmoe.a"));
    if !shared.exists() {
        let missing = format!("no {}: build the library first", shared.display());
        return Err(io::Error::new(io::ErrorKind::NotFound, missing));
    }
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/fusedmoe.h");
    let artifacts = Artifacts {
        shared: &shared,
        static_lib: static_lib.exists().then_some(static_lib.as_path()),
        header: &header,
        version: env!("CARGO_PKG_VERSION"),
        abi: fusedmoe::ffi::MOE_ABI_VERSION,
    };
    install(&artifacts, prefix)
}

/// What to install: the built library files, the header, and the versions.
struct Artifacts<'a> {
    /// The built shared library (target/<profile>/deps/libfusedmoe.so).
    shared: &'a Path,
    /// The built static library, if any.
    static_lib: Option<&'a Path>,
    header: &'a Path,
    version: &'a str,
    abi: u32,
}

fn write(path: &Path, text: &str) -> io::Result<()> {
    std::fs::create_dir_all(path.parent().unwrap())?;
    std::fs::write(path, text)
}

fn install(a: &Artifacts, prefix: &Path) -> io::Result<()> {
    let (lib, include) = (prefix.join("lib"), prefix.join("include"));
    std::fs::create_dir_all(&lib)?;
    std::fs::create_dir_all(&include)?;
    std::fs::copy(a.header, include.join("fusedmoe.h"))?;
    let soname = format!("libfusedmoe.so.{}", a.abi);
    // Copy beside, then rename: a running program keeps the old file instead of seeing it
    // overwritten under it.
    let staging = lib.join(format!(".{soname}.new"));
    std::fs::copy(a.shared, &staging)?;
    std::fs::rename(&staging, lib.join(&soname))?;
    let link = lib.join("libfusedmoe.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&soname, &link)?;
    if let Some(s) = a.static_lib {
        std::fs::copy(s, lib.join("libfusedmoe.a"))?;
    }
    let p = prefix.display();
    write(
        &lib.join("pkgconfig/fusedmoe.pc"),
        &format!(
            "prefix={p}\nlibdir=${{prefix}}/lib\nincludedir=${{prefix}}/include\n\n\
             Name: fusedmoe\nDescription: Mixture-of-experts layers behind a C ABI\n\
             Version: {v}\nLibs: -L${{libdir}} -lfusedmoe\nLibs.private: -lpthread -ldl -lm\n\
             Cflags: -I${{includedir}}\n",
            v = a.version
        ),
    )?;
    write(
        &lib.join("cmake/fusedmoe/fusedmoe-config.cmake"),
        &format!(
            "# fusedmoe {v}: defines the imported target fusedmoe::fusedmoe.\n\
             get_filename_component(_fusedmoe_prefix \"${{CMAKE_CURRENT_LIST_DIR}}/../../..\" ABSOLUTE)\n\
             if(NOT TARGET fusedmoe::fusedmoe)\n\
             \x20 add_library(fusedmoe::fusedmoe SHARED IMPORTED)\n\
             \x20 set_target_properties(fusedmoe::fusedmoe PROPERTIES\n\
             \x20   IMPORTED_LOCATION \"${{_fusedmoe_prefix}}/lib/{soname}\"\n\
             \x20   IMPORTED_SONAME \"{soname}\"\n\
             \x20   INTERFACE_INCLUDE_DIRECTORIES \"${{_fusedmoe_prefix}}/include\")\n\
             endif()\n\
             set(fusedmoe_VERSION {v})\n\
             set(fusedmoe_ABI_VERSION {abi})\n\
             unset(_fusedmoe_prefix)\n",
            v = a.version,
            abi = a.abi
        ),
    )?;
    write(
        &lib.join("cmake/fusedmoe/fusedmoe-config-version.cmake"),
        &format!(
            "# Compatible when the requested version is not newer and has the same major version.\n\
             set(PACKAGE_VERSION {v})\n\
             if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION OR\n\
             \x20  NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL \"{major}\")\n\
             \x20 set(PACKAGE_VERSION_COMPATIBLE FALSE)\n\
             else()\n\
             \x20 set(PACKAGE_VERSION_COMPATIBLE TRUE)\n\
             \x20 if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)\n\
             \x20   set(PACKAGE_VERSION_EXACT TRUE)\n\
             \x20 endif()\n\
             endif()\n",
            v = a.version,
            major = a.version.split('.').next().unwrap_or("0")
        ),
    )?;
    Ok(())
}

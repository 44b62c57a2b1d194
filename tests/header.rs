//! The ABI as a contract: the committed header is what the code generates, compiles as C11
//! and C++17 with warnings as errors, links against the built library, documents every item;
//! the library exports only moe_ symbols; every entry point runs inside the panic boundary.

use std::path::{Path, PathBuf};

use std::process::Command;

mod staged;

fn root() -> PathBuf {
    staged::repo_root()
}

fn committed_header() -> String {
    std::fs::read_to_string(root().join("include/fusedmoe.h")).unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is a C/C++ toolchain installed?)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn committed_header_equals_the_generated_one() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/fusedmoe.h"));
    assert!(
        committed_header() == generated,
        "include/fusedmoe.h is stale: regenerate it with `FUSEDMOE_BLESS=1 cargo build` and commit it"
    );
}

const PROGRAM: &str = r#"
#include "fusedmoe.h"
#include <stdio.h>
#include <string.h>
int main(void) {
    moe_config *config = NULL;
    moe_status s = moe_config_create(&config);
    if (s != MOE_OK) return 1;
    s = moe_config_set_top_k(config, 0);
    int named = s == MOE_ERR_INVALID_ARGUMENT && strstr(moe_last_error(), "top_k") != NULL;
    moe_config_free(config);
    moe_tensor t;
    memset(&t, 0, sizeof t);
    printf("abi %u/%u version %s named %d supports_cpu %d tensor %zu\n", moe_abi_version(),
           (unsigned)MOE_ABI_VERSION, moe_version(), named, (int)moe_supports("cpu"), sizeof t);
    return moe_abi_version() == MOE_ABI_VERSION && named ? 0 : 2;
}
"#;

/// Compiles `program` with the header and the built library, runs it, returns its output.
fn compile_and_run(compiler: &str, std: &str, ext: &str, program: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "fusedmoe-header-{}-{std}-{}",
        std::process::id(),
        program.len()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("main.{ext}"));
    std::fs::write(&src, program).unwrap();
    let exe = dir.join("main");
    let prefix = staged::prefix();
    run(Command::new(compiler)
        .args([
            &format!("-std={std}"),
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
        ])
        .arg("-I")
        .arg(prefix.join("include"))
        .arg(&src)
        .arg("-L")
        .arg(prefix.join("lib"))
        .args(["-lfusedmoe", "-o"])
        .arg(&exe));
    run(Command::new(&exe).env("LD_LIBRARY_PATH", prefix.join("lib")))
}

// DLPack's DLTensor is 48 bytes on 64-bit hosts; ours must match field for field.
const EXPECTED: &str = "named 1 supports_cpu 1 tensor 48";

#[test]
fn header_compiles_as_c11_and_links() {
    let out = compile_and_run("cc", "c11", "c", PROGRAM);
    assert!(out.contains(EXPECTED), "{out}");
}

#[test]
fn header_compiles_as_cpp17_and_links() {
    let out = compile_and_run("c++", "c++17", "cpp", PROGRAM);
    assert!(out.contains(EXPECTED), "{out}");
}

/// The README's C example runs: a layer with a dropped route, end to end.
#[test]
fn the_c_quickstart_runs() {
    let program = std::fs::read_to_string(root().join("examples/c/quickstart.c")).unwrap();
    let out = compile_and_run("cc", "c11", "c", &program);
    assert!(
        out.trim_end().ends_with("ok") && out.contains("out[2][0..3]"),
        "{out}"
    );
}

#[test]
fn every_declaration_has_a_doc_comment_and_a_moe_name() {
    let header = committed_header();
    let lines: Vec<&str> = header.lines().collect();
    let (mut functions, mut others) = (0, 0);
    for (i, line) in lines.iter().enumerate() {
        let top_level = !line.starts_with(' ') && !line.starts_with('*') && !line.starts_with('#');
        let is_function = top_level && function_name(line).is_some();
        let is_other = (line.starts_with("#define ") && !line.contains("FUSEDMOE_H"))
            || line.starts_with("typedef struct ")
            || line.starts_with("enum ");
        if !(is_function || is_other) {
            continue;
        }
        if is_function {
            functions += 1
        } else {
            others += 1
        }
        let named = line
            .split(|c: char| !c.is_alphanumeric() && c != '_')
            .any(|w| w.starts_with("moe_") || w.starts_with("MOE_"));
        assert!(
            named || line == &"typedef struct {",
            "line {}: an exported name without the moe_ prefix: {line}",
            i + 1
        );
        assert!(
            i > 0 && lines[i - 1].trim_end().ends_with("*/"),
            "line {}: no doc comment before: {line}",
            i + 1
        );
    }
    assert_eq!(functions, header_functions().len());
    assert!(others >= 20, "{others} constants and types");
}

/// The function a top-level header line declares, if it declares one.
fn function_name(line: &str) -> Option<String> {
    let open = line.find('(')?;
    let name = line[..open].rsplit([' ', '*']).next()?;
    name.starts_with("moe_").then(|| name.to_string())
}

/// The function names the header declares.
fn header_functions() -> Vec<String> {
    let mut names: Vec<String> = committed_header()
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('*') && !l.starts_with('#'))
        .filter_map(function_name)
        .collect();
    names.sort();
    names
}

#[test]
fn the_library_exports_exactly_the_header_functions() {
    let so = staged::deps_dir().join("libfusedmoe.so");
    let out = run(Command::new("nm").args(["-D", "--defined-only"]).arg(&so));
    let exported: Vec<&str> = out
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            (parts.len() == 3 && parts[1] == "T").then_some(parts[2])
        })
        .collect();
    let foreign: Vec<&&str> = exported.iter().filter(|s| !s.starts_with("moe_")).collect();
    assert!(
        foreign.is_empty(),
        "exported symbols without the moe_ prefix: {foreign:?}"
    );
    let mut exported: Vec<String> = exported.iter().map(|s| s.to_string()).collect();
    exported.sort();
    assert!(exported.len() > 50);
    assert_eq!(
        exported,
        header_functions(),
        "the header and the library disagree on the functions"
    );
}

/// Every `extern "C"` function in src/ffi starts its body inside the panic boundary
/// (guard, guard_value, or the config set/get/copy helpers built on guard), except the two
/// that cannot panic.
#[test]
fn every_entry_point_runs_inside_the_panic_boundary() {
    let boundary = [
        "guard(",
        "guard_value(",
        "set(config",
        "get(config",
        "copy_section(",
    ];
    let infallible = ["moe_abi_version", "moe_version"];
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("src/ffi")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("extern \"C\" fn ") {
            let after = &rest[at + "extern \"C\" fn ".len()..];
            let name = &after[..after.find('(').unwrap()];
            let body_start = after.find(") ").unwrap();
            let body = &after[after[body_start..].find('{').unwrap() + body_start + 1..];
            let first = body.trim_start().lines().next().unwrap_or("");
            if !infallible.contains(&name) {
                assert!(
                    boundary.iter().any(|b| first.contains(b)),
                    "{}: {name} does not start inside the panic boundary: {first}",
                    file_name(&path)
                );
            }
            checked += 1;
            rest = after;
        }
    }
    assert_eq!(
        checked,
        header_functions().len(),
        "every header function was found in src/ffi"
    );
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// The SONAME carries the ABI version, so a host built against ABI 1 never loads ABI 2.
#[test]
fn the_soname_carries_the_abi_version() {
    let out = run(Command::new("readelf")
        .arg("-d")
        .arg(staged::deps_dir().join("libfusedmoe.so")));
    let want = format!("[libfusedmoe.so.{}]", fusedmoe::ffi::MOE_ABI_VERSION);
    assert!(
        out.lines()
            .any(|l| l.contains("SONAME") && l.contains(&want)),
        "{out}"
    );
}

//! NVRTC: kernel sources (embedded, with their headers in memory) to CUBIN for one
//! architecture. CUBIN, not PTX: a newer NVRTC writes PTX an older driver refuses, while SASS
//! for the exact architecture loads (DESIGN §4).

use cudarc::nvrtc::sys;
use std::ffi::{c_char, CString};

/// A kernel source file as embedded in the library.
pub struct Source {
    pub name: &'static str,
    pub text: &'static str,
}

/// Headers the kernels include, handed to NVRTC from memory.
pub const HEADERS: &[Source] = &[
    Source {
        name: "common.cuh",
        text: include_str!("../../../kernels/common.cuh"),
    },
    Source {
        name: "moe_gemm_wgmma.cuh",
        text: include_str!("../../../kernels/moe_gemm_wgmma.cuh"),
    },
    Source {
        name: "moe_gemm_wgmma_ws.cuh",
        text: include_str!("../../../kernels/moe_gemm_wgmma_ws.cuh"),
    },
    Source {
        name: "moe_gemm_wgmma_mc.cuh",
        text: include_str!("../../../kernels/moe_gemm_wgmma_mc.cuh"),
    },
    Source {
        name: "act.cuh",
        text: include_str!("../../../kernels/act.cuh"),
    },
    Source {
        name: "lora.cuh",
        text: include_str!("../../../kernels/lora.cuh"),
    },
];

pub const KERNEL_ALIGN: Source = Source {
    name: "moe_align.cu",
    text: include_str!("../../../kernels/moe_align.cu"),
};
pub const KERNEL_GEMM: Source = Source {
    name: "moe_gemm.cu",
    text: include_str!("../../../kernels/moe_gemm.cu"),
};
pub const KERNEL_ACT: Source = Source {
    name: "moe_act.cu",
    text: include_str!("../../../kernels/moe_act.cu"),
};
pub const KERNEL_DISPATCH: Source = Source {
    name: "moe_dispatch.cu",
    text: include_str!("../../../kernels/moe_dispatch.cu"),
};
pub const KERNEL_COMBINE: Source = Source {
    name: "moe_combine.cu",
    text: include_str!("../../../kernels/moe_combine.cu"),
};
pub const KERNEL_LORA: Source = Source {
    name: "moe_lora.cu",
    text: include_str!("../../../kernels/moe_lora.cu"),
};

fn check(result: sys::nvrtcResult, what: &str) -> Result<(), String> {
    if result == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(format!("NVRTC {what}: {result:?}"))
    }
}

/// The NVRTC version as (major, minor).
///
/// # Safety
/// NVRTC must be present (probe::AVAILABILITY.nvrtc is Ok).
pub unsafe fn version() -> Result<(i32, i32), String> {
    let (mut major, mut minor) = (0, 0);
    check(sys::nvrtcVersion(&mut major, &mut minor), "version")?;
    Ok((major, minor))
}

/// Compiles `source` for `arch` ("sm_90a", "sm_80") with extra `options` ("-DNAME=VALUE").
/// The error holds NVRTC's log.
///
/// # Safety
/// NVRTC must be present (probe::AVAILABILITY.nvrtc is Ok).
pub unsafe fn compile_cubin(
    source: &Source,
    arch: &str,
    options: &[String],
) -> Result<Vec<u8>, String> {
    let text = CString::new(source.text).map_err(|_| format!("{}: NUL in source", source.name))?;
    let name = CString::new(source.name).unwrap();
    let header_texts: Vec<CString> = HEADERS
        .iter()
        .map(|h| CString::new(h.text).unwrap())
        .collect();
    let header_names: Vec<CString> = HEADERS
        .iter()
        .map(|h| CString::new(h.name).unwrap())
        .collect();
    let texts: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let names: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let mut program: sys::nvrtcProgram = std::ptr::null_mut();
    check(
        sys::nvrtcCreateProgram(
            &mut program,
            text.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            texts.as_ptr(),
            names.as_ptr(),
        ),
        "create program",
    )?;
    let mut all_options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    all_options.extend_from_slice(options);
    let c_options: Vec<CString> = all_options
        .iter()
        .map(|o| CString::new(o.as_str()).unwrap())
        .collect();
    let option_ptrs: Vec<*const c_char> = c_options.iter().map(|c| c.as_ptr()).collect();
    let compiled =
        sys::nvrtcCompileProgram(program, option_ptrs.len() as i32, option_ptrs.as_ptr());
    let result = if compiled == sys::nvrtcResult::NVRTC_SUCCESS {
        let mut size = 0usize;
        check(sys::nvrtcGetCUBINSize(program, &mut size), "CUBIN size").and_then(|()| {
            let mut cubin = vec![0u8; size];
            check(
                sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut c_char),
                "CUBIN",
            )
            .map(|()| cubin)
        })
    } else {
        Err(format!(
            "{} for {arch} does not compile ({compiled:?}):\n{}",
            source.name,
            log(program)
        ))
    };
    sys::nvrtcDestroyProgram(&mut program);
    result
}

unsafe fn log(program: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if sys::nvrtcGetProgramLogSize(program, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS {
        return "(no log)".into();
    }
    let mut buf = vec![0u8; size.max(1)];
    sys::nvrtcGetProgramLog(program, buf.as_mut_ptr() as *mut c_char);
    String::from_utf8_lossy(&buf)
        .trim_end_matches('\0')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// DESIGN §4 / issue 4: every kernel variant compiles for sm_80 and sm_90a. Without NVRTC
    /// the test says so, and fails when FUSEDMOE_REQUIRE_NVRTC=1 (CI installs NVRTC from PyPI).
    #[test]
    fn every_kernel_variant_compiles_for_sm80_and_sm90a() {
        if let Err(missing) = &super::super::probe::AVAILABILITY.nvrtc {
            if std::env::var("FUSEDMOE_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("FUSEDMOE_REQUIRE_NVRTC=1 but {missing}");
            }
            eprintln!("SKIPPED: kernel compilation: {missing}");
            return;
        }
        let (major, minor) = unsafe { version() }.unwrap();
        // FUSEDMOE_CI_VARIANTS=TEXT compiles only the variants whose name contains TEXT (a
        // quick check of one kernel while it is written)
        let only = std::env::var("FUSEDMOE_CI_VARIANTS").unwrap_or_default();
        let variants: Vec<_> = super::super::variant::ci_set()
            .into_iter()
            .filter(|v| v.name.contains(&only))
            .collect();
        eprintln!("NVRTC {major}.{minor}: {} variants", variants.len());
        let jobs: Vec<_> = variants
            .iter()
            .flat_map(|v| ["sm_80", "sm_90a"].map(|arch| (v, arch)))
            .filter(|(v, arch)| *arch == "sm_90a" || !v.needs_sm90a())
            .collect();
        let failures: Vec<String> = jobs
            .par_iter()
            .filter_map(|(v, arch)| {
                match unsafe { compile_cubin(v.source(), arch, &v.options()) } {
                    Ok(cubin) if cubin.starts_with(b"\x7fELF") => dump(&v.name, arch, &cubin),
                    Ok(_) => Some(format!("{} for {arch}: not an ELF file", v.name)),
                    Err(e) => Some(format!("{} for {arch}: {e}", v.name)),
                }
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// FUSEDMOE_CI_DUMP=DIR keeps each cubin as DIR/NAME.ARCH.cubin, to compare two
    /// revisions' SASS (`cuobjdump -sass`) without a GPU. None: nothing failed.
    fn dump(name: &str, arch: &str, cubin: &[u8]) -> Option<String> {
        let dir = std::env::var_os("FUSEDMOE_CI_DUMP")?;
        let path = std::path::Path::new(&dir).join(format!("{name}.{arch}.cubin"));
        std::fs::write(&path, cubin)
            .err()
            .map(|e| format!("{}: {e}", path.display()))
    }
}

//! The weights' tensor map for the multicast GEMMs (kernels/moe_gemm_wgmma_mc.cuh): the TMA
//! unit reads half a W tile per CTA of a pair through it. Encoded on the host once per kernel
//! set (no device work: the driver packs 128 bytes; kernels.rs) and passed by value as the
//! kernel's second argument.

use super::device::driver_error;
use crate::dtype::DType;
use crate::error::{unsupported, Result};
use cudarc::driver::{sys, DeviceRepr, DriverError};

/// A CUtensorMap as the kernel's `const __grid_constant__ FmTensorMap`.
#[repr(C, align(64))]
pub struct WeightMap(sys::CUtensorMap);

unsafe impl DeviceRepr for WeightMap {}

/// The rows of one GEMM's weights, w[expert][row][k] with 16-bit elements, row-major.
pub struct WeightRows {
    pub base: u64,
    pub dtype: DType,
    pub experts: usize,
    /// rows per expert (n of the GEMM)
    pub rows: usize,
    pub kdim: usize,
    /// GEMM1 with the activation fused over the halves layout: tile column 2i + h reads row
    /// h · I + i (FM_PAIRED_HALVES), so the map walks (half, row within it) as two axes.
    pub paired_halves: bool,
}

/// The k extent of a box: one 128-byte swizzle row of 16-bit elements (FM_BK).
const BOX_K: u32 = 64;

/// The map over {k, half, row, expert} whose box is half a `block_n`-column W tile, 128-byte
/// swizzled as the kernel's stages are; rows past the expert's and k past kdim read as zeros.
pub fn weight_map(w: &WeightRows, block_n: u32) -> Result<WeightMap> {
    let esize = 2u64;
    let row_bytes = w.kdim as u64 * esize;
    let expert_bytes = w.rows as u64 * row_bytes;
    // (extent, stride in bytes) of the half and row axes
    let (halves, rows) = if w.paired_halves {
        let inter = (w.rows / 2) as u64;
        ((2, inter * row_bytes), inter)
    } else {
        ((1, row_bytes), w.rows as u64)
    };
    let dims = [w.kdim as u64, halves.0, rows, w.experts as u64];
    let strides = [halves.1, row_bytes, expert_bytes];
    let box_dim = [BOX_K, halves.0 as u32, block_n / 2 / halves.0 as u32, 1];
    let element_strides = [1u32; 4];
    let data_type = match w.dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        // wgmma (and so the multicast loop) takes 16-bit layers only (variant::main_loop)
        DType::F32 => return Err(unsupported!("the weights' tensor map: f32 weights")),
    };
    let mut map = WeightMap(unsafe { std::mem::zeroed() });
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map.0,
            data_type,
            4,
            w.base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            box_dim.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    status.result().map_err(|e: DriverError| {
        driver_error(
            &format!(
                "the weights' tensor map (dims {dims:?}, strides {strides:?}, box {box_dim:?})"
            ),
            e,
        )
    })?;
    Ok(map)
}

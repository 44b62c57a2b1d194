//! `moe_tensor` (DLPack's DLTensor, field for field) and its conversion into a checked core
//! [`Tensor`]: NULLs, ndim, device, lanes, strides, alignment and sizes, named by argument.

use crate::dtype::ElemType;
use crate::error::{ensure, invalid, Result};
use crate::tensor::{Device, DeviceKind, Shape, Tensor, MAX_NDIM};
use std::ffi::c_void;

/// DLPack device type of host memory (kDLCPU).
pub const MOE_DEVICE_CPU: i32 = 1;
/// DLPack device type of CUDA device memory (kDLCUDA).
pub const MOE_DEVICE_CUDA: i32 = 2;

/// DLPack type code of signed integers (kDLInt).
pub const MOE_DTYPE_CODE_INT: u8 = 0;
/// DLPack type code of unsigned integers (kDLUInt).
pub const MOE_DTYPE_CODE_UINT: u8 = 1;
/// DLPack type code of IEEE floats (kDLFloat).
pub const MOE_DTYPE_CODE_FLOAT: u8 = 2;
/// DLPack type code of bfloat16 (kDLBfloat).
pub const MOE_DTYPE_CODE_BFLOAT: u8 = 4;

/// Where a tensor lives; DLPack's DLDevice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct moe_device {
    /// MOE_DEVICE_CPU or MOE_DEVICE_CUDA.
    pub device_type: i32,
    /// The CUDA device ordinal; 0 for the CPU.
    pub device_id: i32,
}

/// An element type; DLPack's DLDataType (lanes must be 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct moe_dtype {
    /// One of MOE_DTYPE_CODE_*.
    pub code: u8,
    /// Bits per element: 16 or 32 for floats, 32 or 64 for ids, 8 for the workspace.
    pub bits: u8,
    /// Vector lanes; always 1.
    pub lanes: u16,
}

/// A tensor the host owns; DLPack's DLTensor, field for field, so a DLPack tensor passes as is.
///
/// A valid `moe_tensor` argument is readable; `shape` holds `ndim` entries, and `strides` is
/// NULL or holds `ndim` entries; `data` + `byte_offset` addresses the elements that `shape`
/// and `dtype` describe, in memory on `device` that stays valid while the library uses it:
/// for the call, until the work launched on the stream has run, or as long as the function
/// says (weights, LoRA slots).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct moe_tensor {
    /// First element minus byte_offset; may be NULL only when the tensor has no elements.
    pub data: *mut c_void,
    /// Where `data` lives.
    pub device: moe_device,
    /// Number of dimensions (at most 4).
    pub ndim: i32,
    /// Element type.
    pub dtype: moe_dtype,
    /// [ndim] sizes.
    pub shape: *mut i64,
    /// [ndim] strides in elements, or NULL for row-major contiguous (other strides: refused).
    pub strides: *mut i64,
    /// Bytes from `data` to the first element.
    pub byte_offset: u64,
}

fn device(name: &str, d: moe_device) -> Result<Device> {
    match d.device_type {
        MOE_DEVICE_CPU => Ok(Device::CPU),
        MOE_DEVICE_CUDA => {
            ensure!(d.device_id >= 0, "{name}: CUDA device id {} is negative", d.device_id);
            Ok(Device { kind: DeviceKind::Cuda, id: d.device_id })
        }
        t => Err(invalid!("{name}: device type {t} is not supported (expected MOE_DEVICE_CPU = 1 or MOE_DEVICE_CUDA = 2)")),
    }
}

/// Checks a `moe_device` given on its own (the config's device).
pub(crate) fn check_device(name: &str, d: moe_device) -> Result<Device> {
    device(name, d)
}

/// Converts a required tensor argument.
///
/// # Safety
/// `p`, if not NULL, must point to a readable `moe_tensor` whose shape/strides arrays hold
/// `ndim` entries.
pub(crate) unsafe fn tensor_arg(p: *const moe_tensor, name: &str) -> Result<Tensor> {
    let t = p.as_ref().ok_or_else(|| invalid!("{name}: NULL"))?;
    ensure!(
        (0..=MAX_NDIM as i32).contains(&t.ndim),
        "{name}: ndim {}, expected at most {MAX_NDIM}",
        t.ndim
    );
    let ndim = t.ndim as usize;
    ensure!(
        ndim == 0 || !t.shape.is_null(),
        "{name}: shape is NULL with ndim {ndim}"
    );
    let mut dims = [0i64; MAX_NDIM];
    if ndim > 0 {
        dims[..ndim].copy_from_slice(std::slice::from_raw_parts(t.shape, ndim));
    }
    let shape = &dims[..ndim];
    ensure!(
        shape.iter().all(|&d| d >= 0),
        "{name}: shape {} has a negative size",
        Shape(shape)
    );
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| invalid!("{name}: shape {} is too large", Shape(shape)))?;
    ensure!(
        t.dtype.lanes == 1,
        "{name}: dtype has {} lanes, expected 1",
        t.dtype.lanes
    );
    let elem = ElemType::new(t.dtype.code, t.dtype.bits);
    ensure!(
        t.dtype.bits > 0 && t.dtype.bits % 8 == 0,
        "{name}: dtype {} is not byte-sized",
        elem.name()
    );
    let device = device(name, t.device)?;

    // Strides of an empty tensor address nothing (NumPy 2 exports zeros for them).
    if !t.strides.is_null() && ndim > 0 && numel > 0 {
        let strides = std::slice::from_raw_parts(t.strides, ndim);
        let mut expected = [0i64; MAX_NDIM];
        let mut step = 1i64;
        for i in (0..ndim).rev() {
            expected[i] = step;
            step = step.saturating_mul(shape[i].max(1));
        }
        // A size-1 dimension's stride never matters (PyTorch reports arbitrary ones there).
        let contiguous = (0..ndim).all(|i| shape[i] <= 1 || strides[i] == expected[i]);
        ensure!(
            contiguous,
            "{name}: strides {} are not row-major contiguous for shape {} (expected {} or NULL)",
            Shape(strides),
            Shape(shape),
            Shape(&expected[..ndim])
        );
    }

    let data = if t.data.is_null() {
        ensure!(
            numel == 0,
            "{name}: data is NULL but the tensor has {numel} elements"
        );
        std::ptr::null_mut()
    } else {
        (t.data as *mut u8).wrapping_add(t.byte_offset as usize)
    };
    ensure!(
        (data as usize) % elem.size() == 0,
        "{name}: address {data:p} is not aligned to its {}-byte elements",
        elem.size()
    );
    Ok(Tensor {
        data,
        device,
        elem,
        ndim,
        dims,
    })
}

/// Converts an optional tensor argument (NULL = absent).
///
/// # Safety
/// As [`tensor_arg`].
pub(crate) unsafe fn optional_tensor_arg(
    p: *const moe_tensor,
    name: &str,
) -> Result<Option<Tensor>> {
    if p.is_null() {
        return Ok(None);
    }
    tensor_arg(p, name).map(Some)
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p`, if not NULL, must point to a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(p: *const std::ffi::c_char, name: &str) -> Result<&'a str> {
    ensure!(!p.is_null(), "{name}: NULL");
    std::ffi::CStr::from_ptr(p)
        .to_str()
        .map_err(|_| invalid!("{name}: not valid UTF-8"))
}

/// Writes `value` through an output pointer; checked for NULL first by [`out_arg`].
pub(crate) fn out_arg<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T> {
    unsafe { p.as_mut() }.ok_or_else(|| invalid!("{name}: NULL"))
}

/// Copies `values` into a caller's int32 array of `dst_len` entries and writes the count to
/// `*len`. With `dst` NULL and `dst_len` 0 only `*len` is written (to size an array).
///
/// # Safety
/// `dst` must be NULL or hold `dst_len` writable entries.
pub(crate) unsafe fn copy_i32_out(
    values: &[i32],
    dst: *mut i32,
    dst_len: usize,
    len: *mut usize,
) -> Result<()> {
    ensure!(
        !dst.is_null() || dst_len == 0,
        "dst: NULL with dst_len {dst_len}"
    );
    let len = out_arg(len, "len")?;
    if !dst.is_null() {
        ensure!(
            dst_len >= values.len(),
            "dst_len: {dst_len}, the array holds {} entries",
            values.len()
        );
        std::ptr::copy_nonoverlapping(values.as_ptr(), dst, values.len());
    }
    *len = values.len();
    Ok(())
}

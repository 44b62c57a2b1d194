//! A checked, contiguous tensor view: what the ABI layer makes of a `moe_tensor`.
//! The core checks shapes, dtypes and devices against the layer through these helpers.

use crate::dtype::{DType, ElemType};
use crate::error::{ensure, Result};
use std::fmt;

/// Most dimensions any fusedmoe tensor has (w13 and the no_combine out have 3).
pub(crate) const MAX_NDIM: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    pub kind: DeviceKind,
    pub id: i32,
}

impl Device {
    pub const CPU: Device = Device {
        kind: DeviceKind::Cpu,
        id: 0,
    };
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda => write!(f, "cuda:{}", self.id),
        }
    }
}

/// A row-major contiguous tensor whose memory the host owns. `data` already includes the
/// DLPack byte_offset; it may be null only when the tensor has no elements.
#[derive(Clone, Copy, Debug)]
pub struct Tensor {
    pub data: *mut u8,
    pub device: Device,
    pub elem: ElemType,
    pub ndim: usize,
    pub dims: [i64; MAX_NDIM],
}

// Tensors are descriptions of host memory; the host promises it outlives its use.
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

/// Formats a shape as "[3, 64]".
pub struct Shape<'a>(pub &'a [i64]);

impl fmt::Display for Shape<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl Tensor {
    /// The elements as a slice of `T`; empty tensors (whose data may be NULL) give `&[]`.
    ///
    /// # Safety
    /// The tensor must be host memory holding `numel` elements of `T`, alive for `'a`.
    pub unsafe fn host_slice<'a, T>(&self) -> &'a [T] {
        match self.numel() {
            0 => &[],
            n => std::slice::from_raw_parts(self.data as *const T, n),
        }
    }

    pub fn shape(&self) -> &[i64] {
        &self.dims[..self.ndim]
    }

    pub fn numel(&self) -> usize {
        self.shape().iter().map(|&d| d as usize).product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.elem.size()
    }

    /// The byte range [start, end) the tensor covers; empty tensors cover nothing.
    pub fn byte_range(&self) -> (usize, usize) {
        let start = self.data as usize;
        (start, start + self.nbytes())
    }

    pub fn overlaps(&self, other: &Tensor) -> bool {
        let (a0, a1) = self.byte_range();
        let (b0, b1) = other.byte_range();
        a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1
    }

    /// "hidden: shape [3, 64], expected [3, 128] ([M, H])".
    pub fn expect_shape(&self, name: &str, expected: &[i64], meaning: &str) -> Result<()> {
        ensure!(
            self.shape() == expected,
            "{name}: shape {}, expected {} ({meaning})",
            Shape(self.shape()),
            Shape(expected)
        );
        Ok(())
    }

    pub fn expect_ndim(&self, name: &str, ndim: usize, meaning: &str) -> Result<()> {
        ensure!(
            self.ndim == ndim,
            "{name}: ndim {} (shape {}), expected {ndim} ({meaning})",
            self.ndim,
            Shape(self.shape())
        );
        Ok(())
    }

    pub fn expect_device(&self, name: &str, device: Device) -> Result<()> {
        ensure!(
            self.device == device,
            "{name}: on {}, expected {device} like the layer",
            self.device
        );
        Ok(())
    }

    /// Checks that the tensor holds the layer's float dtype.
    pub fn expect_dtype(&self, name: &str, dtype: DType) -> Result<()> {
        ensure!(
            self.elem == dtype.elem(),
            "{name}: dtype {}, expected {} like the layer",
            self.elem.name(),
            dtype.name()
        );
        Ok(())
    }

    /// Checks for f32 or the layer's dtype (router weights, biases) and returns which.
    pub fn expect_f32_or(&self, name: &str, dtype: DType) -> Result<DType> {
        match self.elem.as_dtype() {
            Some(d) if d == DType::F32 || d == dtype => Ok(d),
            _ => Err(crate::error::invalid!(
                "{name}: dtype {}, expected f32 or {} like the layer",
                self.elem.name(),
                dtype.name()
            )),
        }
    }
}

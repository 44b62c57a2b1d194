//! Element types: the layer's float dtypes, DLPack type codes, and the one rounding rule.

use half::{bf16, f16};

/// DLPack type codes (dlpack.h `DLDataTypeCode`).
pub(crate) const CODE_INT: u8 = 0;
pub(crate) const CODE_UINT: u8 = 1;
pub(crate) const CODE_FLOAT: u8 = 2;
pub(crate) const CODE_BFLOAT: u8 = 4;

/// The float type a layer computes in; hidden, out and the weights carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    pub fn elem(self) -> ElemType {
        match self {
            DType::F32 => ElemType::new(CODE_FLOAT, 32),
            DType::F16 => ElemType::new(CODE_FLOAT, 16),
            DType::BF16 => ElemType::new(CODE_BFLOAT, 16),
        }
    }

    /// Rounds an f32 to this dtype and back (round to nearest even): the SPEC §2 rounding
    /// points. The identity for f32.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::BF16 => bf16::from_f32(x).to_f32(),
        }
    }

    /// Reads `dst.len()` contiguous elements at `src` as f32.
    ///
    /// # Safety
    /// `src` must point to `dst.len()` readable, aligned elements of this dtype.
    #[inline]
    pub unsafe fn load(self, src: *const u8, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            DType::F32 => dst.copy_from_slice(std::slice::from_raw_parts(src as *const f32, n)),
            DType::F16 => {
                let s = std::slice::from_raw_parts(src as *const u16, n);
                for (d, &bits) in dst.iter_mut().zip(s) {
                    *d = f16::from_bits(bits).to_f32();
                }
            }
            DType::BF16 => {
                // bf16 is the top half of an f32: a shift the compiler vectorizes.
                let s = std::slice::from_raw_parts(src as *const u16, n);
                for (d, &bits) in dst.iter_mut().zip(s) {
                    *d = f32::from_bits((bits as u32) << 16);
                }
            }
        }
    }

    /// Writes `src` (already rounded or not) to `dst` in this dtype, rounding to nearest even.
    ///
    /// # Safety
    /// `dst` must point to `src.len()` writable, aligned elements of this dtype.
    #[inline]
    pub unsafe fn store(self, src: &[f32], dst: *mut u8) {
        let n = src.len();
        match self {
            DType::F32 => std::slice::from_raw_parts_mut(dst as *mut f32, n).copy_from_slice(src),
            DType::F16 => {
                let d = std::slice::from_raw_parts_mut(dst as *mut u16, n);
                for (o, &x) in d.iter_mut().zip(src) {
                    *o = f16::from_f32(x).to_bits();
                }
            }
            DType::BF16 => {
                let d = std::slice::from_raw_parts_mut(dst as *mut u16, n);
                for (o, &x) in d.iter_mut().zip(src) {
                    *o = bf16::from_f32(x).to_bits();
                }
            }
        }
    }

    /// Reads element `index` as f32.
    ///
    /// # Safety
    /// `base` must point to at least `index + 1` aligned elements of this dtype.
    #[inline(always)]
    pub unsafe fn read(self, base: *const u8, index: usize) -> f32 {
        match self {
            DType::F32 => *(base as *const f32).add(index),
            DType::F16 => f16::from_bits(*(base as *const u16).add(index)).to_f32(),
            DType::BF16 => f32::from_bits((*(base as *const u16).add(index) as u32) << 16),
        }
    }
}

/// A tensor's element type as DLPack describes it (lanes are checked to be 1 at the ABI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ElemType {
    pub code: u8,
    pub bits: u8,
}

impl ElemType {
    pub const I32: ElemType = ElemType::new(CODE_INT, 32);
    pub const I64: ElemType = ElemType::new(CODE_INT, 64);
    pub const U8: ElemType = ElemType::new(CODE_UINT, 8);
    pub const F32: ElemType = ElemType::new(CODE_FLOAT, 32);

    pub const fn new(code: u8, bits: u8) -> Self {
        ElemType { code, bits }
    }

    /// The float dtype this element type is, if it is one a layer can compute in.
    pub fn as_dtype(self) -> Option<DType> {
        match (self.code, self.bits) {
            (CODE_FLOAT, 32) => Some(DType::F32),
            (CODE_FLOAT, 16) => Some(DType::F16),
            (CODE_BFLOAT, 16) => Some(DType::BF16),
            _ => None,
        }
    }

    /// Bytes per element, rounded up for sub-byte types.
    pub fn size(self) -> usize {
        (self.bits as usize).div_ceil(8)
    }

    pub fn name(self) -> String {
        if let Some(d) = self.as_dtype() {
            return d.name().to_string();
        }
        match self.code {
            CODE_INT => format!("int{}", self.bits),
            CODE_UINT => format!("uint{}", self.bits),
            CODE_FLOAT => format!("float{}", self.bits),
            CODE_BFLOAT => format!("bfloat{}", self.bits),
            c => format!("(code {c}, {} bits)", self.bits),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_round_to_nearest_even() {
        // 1 + 2^-8 lies halfway between two bf16 values; the even one (1.0) wins.
        assert_eq!(DType::BF16.round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(DType::BF16.round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(DType::F16.round(1.0 + 1.0 / 2048.0), 1.0);
        assert_eq!(DType::F32.round(0.1), 0.1);
    }

    #[test]
    fn load_and_store_round_trip() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let xs = [0.5f32, -3.25, 1024.0, 0.0];
            let mut bytes = vec![0u8; xs.len() * dtype.size()];
            let mut back = [0f32; 4];
            unsafe {
                dtype.store(&xs, bytes.as_mut_ptr());
                dtype.load(bytes.as_ptr(), &mut back);
                assert_eq!(dtype.read(bytes.as_ptr(), 1), -3.25);
            }
            assert_eq!(back, xs);
        }
    }
}

//! One GEMM call of the CPU path: `rows × n` outputs of f32 activations times a panel of an
//! expert's weight rows. bf16/f16 weights are widened to f32 a panel at a time into a
//! thread-local buffer sized to stay in L2, so the weights are read from memory once.

use crate::dtype::DType;
use std::cell::RefCell;

/// Bytes of one widened weight panel (fits a core's L2 with the activations beside it).
const PANEL_BYTES: usize = 256 * 1024;

thread_local! {
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Weight rows per panel for a reduction length `k`: a multiple of 16, at least 16.
pub fn panel_rows(k: usize, n_total: usize) -> usize {
    let rows = (PANEL_BYTES / (4 * k.max(1))) / 16 * 16;
    rows.max(16).min(n_total.max(1))
}

/// `dst[r, j] = Σ_l lhs[r, l] · w[j, l]` for r < rows, j < n, l < k, where `w` holds `n`
/// contiguous weight rows of length `k` in `dtype`, `lhs` rows are `k` apart and `dst` rows
/// `dst_stride` apart. Single-threaded: callers parallelise over panels.
///
/// # Safety
/// Every pointer must cover the extents above; `dst` must not alias the inputs.
// One GEMM's extents, operands and stride, as the hot loop has them and gemm::gemm takes
// them: a struct would only be unpacked again.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_panel(
    rows: usize,
    n: usize,
    k: usize,
    lhs: *const f32,
    w: *const u8,
    dtype: DType,
    dst: *mut f32,
    dst_stride: usize,
) {
    let gemm = |rhs: *const f32| {
        gemm::gemm(
            rows,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            false,
            lhs,
            1,
            k as isize,
            rhs,
            k as isize, // column j of rhs is weight row j
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    };
    if dtype == DType::F32 {
        return gemm(w as *const f32);
    }
    PANEL.with(|panel| {
        let mut panel = panel.borrow_mut();
        if panel.len() < n * k {
            panel.resize(n * k, 0.0);
        }
        dtype.load(w, &mut panel[..n * k]);
        gemm(panel.as_ptr());
    });
}

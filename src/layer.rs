//! A layer: a validated config, the host's weights (borrowed, checked against the config),
//! its tile chooser and, on request, its own CPU thread pool.

use crate::backend::{self, Backend};
use crate::config::{Config, Validated};
use crate::dtype::DType;
use crate::error::{ensure, Error, ErrorKind, Result};
use crate::tensor::Tensor;
use crate::tiles::{TableKey, TileChooser};
use crate::workspace::Layout;

/// The weight tensors as the host passed them (biases optional).
#[derive(Clone, Copy, Debug)]
pub struct Weights {
    pub w13: Tensor,
    pub w2: Tensor,
    pub b13: Option<Tensor>,
    pub b2: Option<Tensor>,
}

/// A bias as the backends read it: where it is and which float type it holds.
#[derive(Clone, Copy, Debug)]
pub struct Bias {
    pub data: *const u8,
    pub dtype: DType,
}

unsafe impl Send for Bias {}
unsafe impl Sync for Bias {}

pub struct Layer {
    /// The config as the host set it (what the layer's config handle reports).
    pub config: Config,
    pub v: Validated,
    pub weights: Weights,
    pub b13: Option<Bias>,
    pub b2: Option<Bias>,
    pub tiles: TileChooser,
    pub pool: Option<rayon::ThreadPool>,
    pub backend: &'static dyn Backend,
    /// The backend's own per-layer state (the CUDA kernels and error counter).
    pub state: backend::LayerState,
}

fn check_bias(
    t: &Option<Tensor>,
    name: &str,
    v: &Validated,
    shape: &[i64],
    meaning: &str,
) -> Result<Option<Bias>> {
    let Some(t) = t else { return Ok(None) };
    t.expect_device(name, v.device)?;
    let dtype = t.expect_f32_or(name, v.dtype)?;
    t.expect_shape(name, shape, meaning)?;
    Ok(Some(Bias {
        data: t.data,
        dtype,
    }))
}

impl Layer {
    /// Validates the config and checks every weight against it.
    pub fn new(config: &Config, weights: Weights) -> Result<Layer> {
        let v = config.validate()?;
        let backend = backend::for_device(v.device)?;
        let d = v.dims;
        let (e, n1, h, i) = (
            d.experts as i64,
            d.n1 as i64,
            d.hidden as i64,
            d.inter as i64,
        );

        let w13 = &weights.w13;
        w13.expect_device("w13", v.device)?;
        w13.expect_dtype("w13", v.dtype)?;
        w13.expect_ndim("w13", 3, "[E, N1, H]")?;
        if v.gated && w13.shape()[1] % 2 == 1 {
            return Err(crate::error::invalid!(
                "w13: dim 1 is {} (odd N1), but a gated layer needs N1 = 2·I = {n1}",
                w13.shape()[1]
            ));
        }
        let n1_meaning = if v.gated {
            "[E, N1 = 2·I, H]"
        } else {
            "[E, N1 = I, H]"
        };
        w13.expect_shape("w13", &[e, n1, h], n1_meaning)?;
        let w2 = &weights.w2;
        w2.expect_device("w2", v.device)?;
        w2.expect_dtype("w2", v.dtype)?;
        w2.expect_shape("w2", &[e, h, i], "[E, H, I]")?;
        let b13 = check_bias(&weights.b13, "b13", &v, &[e, n1], "[E, N1]")?;
        let b2 = check_bias(&weights.b2, "b2", &v, &[e, h], "[E, H]")?;

        let (device_name, gpu) = backend::device_identity(v.device)?;
        let key = TableKey {
            experts: d.experts,
            n: d.inter,
            k: d.hidden,
            dtype: v.dtype,
            quant: "none".into(),
            device: device_name,
        };
        let tiles = TileChooser::new(&key, gpu, &config.options)?;
        let pool = match config.options.int("cpu.num_threads") {
            None => None,
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n as usize)
                    .thread_name(|i| format!("fusedmoe-cpu-{i}"))
                    .build()
                    .map_err(|err| {
                        Error::new(
                            ErrorKind::OutOfMemory,
                            format!("cpu.num_threads: cannot start {n} threads: {err}"),
                        )
                    })?,
            ),
        };
        let state = backend.layer_state(&v, &weights, &config.options)?;
        Ok(Layer {
            state,
            config: config.clone(),
            v,
            weights,
            b13,
            b2,
            tiles,
            pool,
            backend,
        })
    }

    /// The workspace layout for `num_tokens` tokens at a given BLOCK_M; refused when it
    /// could not be addressed (sizes are capped, but their products are not).
    pub fn layout(&self, num_tokens: usize, block_m: usize) -> Result<Layout> {
        let d = self.v.dims;
        let numel = num_tokens as u128 * d.top_k as u128;
        // Every align section is at most (numel + E + 1) · BLOCK_M entries of 4 bytes; the
        // scratch is at most numel · (H + N1 + I) · 4 bytes on the CPU, and capacity rows of
        // N1 + I plus numel rows of H on CUDA.
        let rows = (numel + d.experts as u128 + 1) * block_m as u128;
        let bound = rows * 4 * 8
            + numel * (d.hidden + d.n1 + d.inter) as u128 * 4
            + rows * (d.n1 + d.inter) as u128 * 4;
        ensure!(
            bound <= (isize::MAX as u128) / 2,
            "max_tokens: {num_tokens} tokens need a workspace beyond what this machine can address"
        );
        let numel = numel as usize;
        let capacity = crate::align::capacity(numel, d.experts, block_m);
        Ok(Layout::new(
            numel,
            d.experts,
            block_m,
            self.backend.scratch_bytes(&self.v, numel, capacity),
        ))
    }

    /// Bytes of workspace that any batch of up to `max_tokens` tokens needs.
    pub fn workspace_size(&self, max_tokens: i64) -> Result<usize> {
        ensure!(max_tokens >= 0, "max_tokens: {max_tokens} is negative");
        ensure!(
            max_tokens <= crate::config::MAX_DIM,
            "max_tokens: {max_tokens}, expected at most {}",
            crate::config::MAX_DIM
        );
        Ok(self
            .layout(max_tokens as usize, self.tiles.max_block_m() as usize)?
            .total)
    }
}

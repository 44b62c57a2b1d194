//! What the examples share: a layer driven through the C ABI (RAII over the handles),
//! host buffers with their DLPack views, and seeded random data; `gpu` holds what the GPU
//! examples (bench, tune) share.
#![allow(dead_code)]

pub mod gpu;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use fusedmoe::ffi::*;
use half::{bf16, f16};
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f32" => Some(Dtype::F32),
            "f16" => Some(Dtype::F16),
            "bf16" => Some(Dtype::Bf16),
            _ => None,
        }
    }
    pub fn dl(self) -> moe_dtype {
        match self {
            Dtype::F32 => moe_dtype {
                code: MOE_DTYPE_CODE_FLOAT,
                bits: 32,
                lanes: 1,
            },
            Dtype::F16 => moe_dtype {
                code: MOE_DTYPE_CODE_FLOAT,
                bits: 16,
                lanes: 1,
            },
            Dtype::Bf16 => moe_dtype {
                code: MOE_DTYPE_CODE_BFLOAT,
                bits: 16,
                lanes: 1,
            },
        }
    }
    pub fn size(self) -> usize {
        if self == Dtype::F32 {
            4
        } else {
            2
        }
    }
}

/// The library's message for a failed call; exits the example with it.
/// A config's BLOCK_N as the examples print it: "32", or "32/128" where GEMM2 has its own.
pub fn block_n_text(c: &fusedmoe::tiles::TileConfig) -> String {
    match c.block_n_down() {
        Some(down) => format!("{}/{down}", c.block_n),
        None => c.block_n.to_string(),
    }
}

pub fn check(s: moe_status, what: &str) {
    if s != moe_status::MOE_OK {
        let msg = unsafe { CStr::from_ptr(moe_last_error()) }.to_string_lossy();
        eprintln!("{what} failed: {s:?}: {msg}");
        std::process::exit(1);
    }
}

/// Host memory with a DLPack view, optionally mirrored on the GPU (`copy_to_device`). Storage is
/// u64 so every dtype is aligned.
pub struct Buffer {
    store: Vec<u64>,
    pub shape: Vec<i64>,
    pub dtype: moe_dtype,
    device: Option<(Arc<CudaStream>, CudaSlice<u8>)>,
}

impl Buffer {
    pub fn zeros(dtype: moe_dtype, shape: &[i64]) -> Buffer {
        let bytes = shape.iter().product::<i64>() as usize * (dtype.bits as usize / 8);
        Buffer {
            store: vec![0; bytes.div_ceil(8) + 2],
            shape: shape.to_vec(),
            dtype,
            device: None,
        }
    }

    fn nbytes(&self) -> usize {
        self.numel() * (self.dtype.bits as usize / 8)
    }

    /// Copies the values to the GPU; from then on `tensor()` describes the device copy.
    pub fn copy_to_device(&mut self, stream: &Arc<CudaStream>) {
        let n = self.nbytes();
        let host = unsafe { std::slice::from_raw_parts(self.ptr(), n) };
        // at least one byte, so that an empty tensor still has an address
        let slice = if n == 0 {
            stream.alloc_zeros::<u8>(16)
        } else {
            stream.clone_htod(host)
        }
        .expect("copy to the GPU");
        self.device = Some((stream.clone(), slice));
    }

    /// Copies the device values back into the host storage (after the stream's work).
    fn sync_from_device(&mut self) {
        let n = self.nbytes();
        if let Some((stream, slice)) = &self.device {
            let (stream, slice) = (stream.clone(), slice.clone());
            let host = unsafe { std::slice::from_raw_parts_mut(self.ptr(), n) };
            stream
                .memcpy_dtoh(&slice.slice(0..n), host)
                .expect("copy from the GPU");
            stream.synchronize().expect("synchronize");
        }
    }

    /// Values rounded to `dt` and stored in it.
    pub fn from_f32(dt: Dtype, shape: &[i64], values: &[f32]) -> Buffer {
        let mut b = Buffer::zeros(dt.dl(), shape);
        let p = b.ptr();
        for (i, &v) in values.iter().enumerate() {
            unsafe {
                match dt {
                    Dtype::F32 => *(p as *mut f32).add(i) = v,
                    Dtype::F16 => *(p as *mut u16).add(i) = f16::from_f32(v).to_bits(),
                    Dtype::Bf16 => *(p as *mut u16).add(i) = bf16::from_f32(v).to_bits(),
                }
            }
        }
        b
    }

    pub fn ids(shape: &[i64], values: &[i32]) -> Buffer {
        let mut b = Buffer::zeros(
            moe_dtype {
                code: MOE_DTYPE_CODE_INT,
                bits: 32,
                lanes: 1,
            },
            shape,
        );
        unsafe {
            std::ptr::copy_nonoverlapping(values.as_ptr(), b.ptr() as *mut i32, values.len())
        };
        b
    }

    pub fn ptr(&mut self) -> *mut u8 {
        // 16-byte alignment for the workspace: skip one u64 if needed
        let p = self.store.as_mut_ptr() as *mut u8;
        p.wrapping_add((p as usize) % 16)
    }

    /// Element `i` as f64 (float dtypes).
    pub fn get(&mut self, dt: Dtype, i: usize) -> f64 {
        let p = self.ptr();
        unsafe {
            match dt {
                Dtype::F32 => *(p as *const f32).add(i) as f64,
                Dtype::F16 => f16::from_bits(*(p as *const u16).add(i)).to_f64(),
                Dtype::Bf16 => bf16::from_bits(*(p as *const u16).add(i)).to_f64(),
            }
        }
    }

    /// The elements of an int32 buffer.
    pub fn read_i32(&mut self) -> Vec<i32> {
        let n = self.numel();
        unsafe { std::slice::from_raw_parts(self.ptr() as *const i32, n) }.to_vec()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product::<i64>() as usize
    }

    pub fn read_f64(&mut self, dt: Dtype) -> Vec<f64> {
        self.sync_from_device();
        (0..self.numel()).map(|i| self.get(dt, i)).collect()
    }

    pub fn tensor(&mut self) -> moe_tensor {
        let (data, device_type) = match &self.device {
            Some((stream, slice)) => (slice.device_ptr(stream).0 as *mut c_void, MOE_DEVICE_CUDA),
            None => (self.ptr() as *mut c_void, MOE_DEVICE_CPU),
        };
        moe_tensor {
            data,
            device: moe_device {
                device_type,
                device_id: 0,
            },
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: null_mut(),
            byte_offset: 0,
        }
    }
}

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

/// A layer's shape.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub top_k: usize,
}

impl Shape {
    /// FLOPs of one batch: two GEMMs per kept route (gated: N1 = 2I).
    pub fn flops(&self, routes: usize) -> f64 {
        2.0 * routes as f64 * (2 * self.inter * self.hidden + self.hidden * self.inter) as f64
    }
}

/// Router output: softmax top-k over random logits, the weights renormalised.
pub fn route(rng: &mut Rng, tokens: usize, s: Shape) -> (Vec<i32>, Vec<f32>) {
    let (mut ids, mut weights) = (Vec::new(), Vec::new());
    for _ in 0..tokens {
        let logits: Vec<f32> = rng.vec(s.experts, -2.0, 2.0);
        let mut order: Vec<usize> = (0..s.experts).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top = &order[..s.top_k];
        let z: f32 = top.iter().map(|&e| logits[e].exp()).sum();
        for &e in top {
            ids.push(e as i32);
            weights.push(logits[e].exp() / z);
        }
    }
    (ids, weights)
}

/// A gated silu layer's weights in a dtype.
pub struct Weights {
    pub w13: Buffer,
    pub w2: Buffer,
}

impl Weights {
    pub fn random(rng: &mut Rng, dt: Dtype, s: Shape) -> Weights {
        let (e, h, i) = (s.experts as i64, s.hidden as i64, s.inter as i64);
        let a = 1.0 / (s.hidden as f32).sqrt();
        let b = 1.0 / (s.inter as f32).sqrt();
        Weights {
            w13: Buffer::from_f32(
                dt,
                &[e, 2 * i, h],
                &rng.vec((e * 2 * i * h) as usize, -a, a),
            ),
            w2: Buffer::from_f32(dt, &[e, h, i], &rng.vec((e * h * i) as usize, -b, b)),
        }
    }
}

/// A layer with its plan and workspace, freed on drop.
pub struct Layer {
    layer: *mut moe_layer,
    plan: *mut moe_plan,
    workspace: Buffer,
    /// The stream of a CUDA layer; None on the CPU.
    stream: Option<Arc<CudaStream>>,
}

impl Layer {
    /// A gated silu layer; `device` is "cpu" or "cuda".
    pub fn new(
        s: Shape,
        dt: Dtype,
        device: &str,
        w: &mut Weights,
        max_tokens: usize,
        options: &[(&str, &str)],
    ) -> Layer {
        Layer::new_local(s, s.experts, dt, device, w, max_tokens, options)
    }

    /// A rank's layer under expert parallelism: `s.experts` local experts of `global_experts`.
    pub fn new_local(
        s: Shape,
        global_experts: usize,
        dt: Dtype,
        device: &str,
        w: &mut Weights,
        max_tokens: usize,
        options: &[(&str, &str)],
    ) -> Layer {
        let (dev, stream) = match device {
            "cpu" => (
                moe_device {
                    device_type: MOE_DEVICE_CPU,
                    device_id: 0,
                },
                None,
            ),
            _ => {
                if !unsafe { moe_supports(c"cuda".as_ptr()) } {
                    eprintln!("--device cuda: this machine cannot run CUDA layers (no driver, NVRTC or GPU; see the README's CUDA section)");
                    std::process::exit(1);
                }
                let ctx = CudaContext::new(0).expect("CUDA device 0");
                let stream = ctx.new_stream().expect("a CUDA stream");
                w.w13.copy_to_device(&stream);
                w.w2.copy_to_device(&stream);
                (
                    moe_device {
                        device_type: MOE_DEVICE_CUDA,
                        device_id: 0,
                    },
                    Some(stream),
                )
            }
        };
        let mut config = null_mut();
        let mut layer = null_mut();
        let mut plan = null_mut();
        let mut bytes = 0usize;
        unsafe {
            check(moe_config_create(&mut config), "moe_config_create");
            check(
                moe_config_set_num_experts(config, global_experts as i64),
                "num_experts",
            );
            check(
                moe_config_set_num_local_experts(config, s.experts as i64),
                "num_local_experts",
            );
            check(moe_config_set_top_k(config, s.top_k as i64), "top_k");
            check(
                moe_config_set_hidden_size(config, s.hidden as i64),
                "hidden_size",
            );
            check(
                moe_config_set_intermediate_size(config, s.inter as i64),
                "intermediate_size",
            );
            check(moe_config_set_dtype(config, dt.dl()), "dtype");
            check(
                moe_config_set_activation(config, MOE_ACTIVATION_SILU),
                "activation",
            );
            check(moe_config_set_device(config, dev), "device");
            for (k, v) in options {
                let (k, v) = (CString::new(*k).unwrap(), CString::new(*v).unwrap());
                check(
                    moe_config_set_option(config, k.as_ptr(), v.as_ptr()),
                    "option",
                );
            }
            let (w13, w2) = (w.w13.tensor(), w.w2.tensor());
            let status = moe_layer_create(config, &w13, &w2, null(), null(), &mut layer);
            moe_config_free(config);
            check(status, "moe_layer_create");
            check(
                moe_workspace_size(layer, max_tokens as i64, &mut bytes),
                "moe_workspace_size",
            );
            check(moe_plan_create(layer, &mut plan), "moe_plan_create");
        }
        let mut workspace = Buffer::zeros(
            moe_dtype {
                code: MOE_DTYPE_CODE_UINT,
                bits: 8,
                lanes: 1,
            },
            &[bytes as i64],
        );
        if let Some(stream) = &stream {
            workspace.copy_to_device(stream);
            let s = stream.cu_stream() as *mut c_void;
            check(
                unsafe { moe_warmup(layer, max_tokens as i64, s) },
                "moe_warmup",
            );
        }
        Layer {
            layer,
            plan,
            workspace,
            stream,
        }
    }

    /// The CUDA stream the layer runs on (None for a CPU layer): put the batch's buffers on
    /// the device with `Buffer::copy_to_device(stream)`.
    pub fn stream(&self) -> Option<Arc<CudaStream>> {
        self.stream.clone()
    }

    pub fn workspace_bytes(&self) -> usize {
        self.workspace.numel()
    }

    /// moe_prepare then moe_run.
    pub fn forward(
        &mut self,
        hidden: &mut Buffer,
        ids: &mut Buffer,
        weights: &mut Buffer,
        out: &mut Buffer,
    ) {
        let (h, i, w, o, ws) = (
            hidden.tensor(),
            ids.tensor(),
            weights.tensor(),
            out.tensor(),
            self.workspace.tensor(),
        );
        let stream = self
            .stream
            .as_ref()
            .map_or(null_mut(), |s| s.cu_stream() as *mut c_void);
        unsafe {
            check(
                moe_prepare(self.layer, &i, &ws, self.plan, stream),
                "moe_prepare",
            );
            check(
                moe_run(self.layer, null(), self.plan, &h, &w, &o, stream),
                "moe_run",
            );
        }
        // CUDA work is asynchronous: wait for it, so that timings count it
        if let Some(s) = &self.stream {
            s.synchronize().expect("synchronize");
        }
    }
}

impl Drop for Layer {
    fn drop(&mut self) {
        unsafe {
            moe_plan_free(self.plan);
            moe_layer_free(self.layer);
        }
    }
}

/// Median of repeated timings of `f`, in seconds, after one warm-up call.
pub fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

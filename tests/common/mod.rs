//! Test harness over the C ABI: host tensors with aligned storage, a seeded generator, a
//! `Setup` that drives config → layer → workspace → plan → prepare → run through the
//! `extern "C"` entry points, and a float64 reference of SPEC §2–3 written here, apart from
//! the library's code.
#![allow(dead_code)]

pub mod ep;
pub mod lora;

use fusedmoe::ffi::*;
use half::{bf16, f16};
use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

// ---------------------------------------------------------------- dtypes and tensors

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
    Bf16,
    I32,
    I64,
    U8,
}

impl Dt {
    pub fn size(self) -> usize {
        match self {
            Dt::F32 | Dt::I32 => 4,
            Dt::F16 | Dt::Bf16 => 2,
            Dt::I64 => 8,
            Dt::U8 => 1,
        }
    }
    pub fn dl(self) -> moe_dtype {
        let (code, bits) = match self {
            Dt::F32 => (MOE_DTYPE_CODE_FLOAT, 32),
            Dt::F16 => (MOE_DTYPE_CODE_FLOAT, 16),
            Dt::Bf16 => (MOE_DTYPE_CODE_BFLOAT, 16),
            Dt::I32 => (MOE_DTYPE_CODE_INT, 32),
            Dt::I64 => (MOE_DTYPE_CODE_INT, 64),
            Dt::U8 => (MOE_DTYPE_CODE_UINT, 8),
        };
        moe_dtype {
            code,
            bits,
            lanes: 1,
        }
    }
    /// Rounds a value to this float dtype (the SPEC's rounding points), in f64.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Dt::F32 => x as f32 as f64,
            Dt::F16 => f16::from_f64(x).to_f64(),
            Dt::Bf16 => bf16::from_f64(x).to_f64(),
            _ => x,
        }
    }
    /// DESIGN §8 tolerance on the relative Frobenius error.
    pub fn tolerance(self) -> f64 {
        match self {
            Dt::F32 => 1e-5,
            Dt::F16 => 2e-3,
            Dt::Bf16 => 1e-2,
            _ => 0.0,
        }
    }
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Chunk([u8; 64]);

/// A tensor in host memory the test owns; every field of the `moe_tensor` it hands out can be
/// bent to make a bad call.
pub struct HostTensor {
    store: Vec<Chunk>,
    /// Bytes of the storage as allocated (shape may be bent afterwards).
    len_bytes: usize,
    pub dt: Dt,
    pub shape: Vec<i64>,
    pub strides: Option<Vec<i64>>,
    pub dtype: moe_dtype,
    pub device: moe_device,
    pub byte_offset: u64,
    pub data_override: Option<*mut c_void>,
    pub ndim_override: Option<i32>,
}

impl HostTensor {
    pub fn zeros(dt: Dt, shape: &[i64]) -> Self {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        let bytes = n * dt.size();
        HostTensor {
            store: vec![Chunk([0; 64]); bytes.div_ceil(64) + 1],
            len_bytes: bytes,
            dt,
            shape: shape.to_vec(),
            strides: None,
            dtype: dt.dl(),
            device: moe_device {
                device_type: MOE_DEVICE_CPU,
                device_id: 0,
            },
            byte_offset: 0,
            data_override: None,
            ndim_override: None,
        }
    }

    pub fn from_f64(dt: Dt, shape: &[i64], values: &[f64]) -> Self {
        let mut t = HostTensor::zeros(dt, shape);
        assert_eq!(values.len(), t.numel());
        for (i, &v) in values.iter().enumerate() {
            t.set(i, v);
        }
        t
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().map(|&d| d as usize).product()
    }

    pub fn ptr(&self) -> *mut u8 {
        self.store.as_ptr() as *mut u8
    }

    /// The storage as allocated, whatever the shape says now.
    pub fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len_bytes) }
    }

    pub fn fill_bytes(&mut self, b: u8) {
        unsafe { std::ptr::write_bytes(self.ptr(), b, self.len_bytes) }
    }

    pub fn set(&mut self, i: usize, v: f64) {
        let p = self.ptr();
        unsafe {
            match self.dt {
                Dt::F32 => *(p as *mut f32).add(i) = v as f32,
                Dt::F16 => *(p as *mut u16).add(i) = f16::from_f64(v).to_bits(),
                Dt::Bf16 => *(p as *mut u16).add(i) = bf16::from_f64(v).to_bits(),
                Dt::I32 => *(p as *mut i32).add(i) = v as i32,
                Dt::I64 => *(p as *mut i64).add(i) = v as i64,
                Dt::U8 => *p.add(i) = v as u8,
            }
        }
    }

    pub fn get(&self, i: usize) -> f64 {
        let p = self.ptr();
        unsafe {
            match self.dt {
                Dt::F32 => *(p as *const f32).add(i) as f64,
                Dt::F16 => f16::from_bits(*(p as *const u16).add(i)).to_f64(),
                Dt::Bf16 => bf16::from_bits(*(p as *const u16).add(i)).to_f64(),
                Dt::I32 => *(p as *const i32).add(i) as f64,
                Dt::I64 => *(p as *const i64).add(i) as f64,
                Dt::U8 => *p.add(i) as f64,
            }
        }
    }

    /// Every element of the storage as allocated.
    pub fn values(&self) -> Vec<f64> {
        (0..self.len_bytes / self.dt.size())
            .map(|i| self.get(i))
            .collect()
    }

    /// The DLPack view of this tensor; valid while `self` is alive and not moved.
    pub fn raw(&mut self) -> moe_tensor {
        moe_tensor {
            data: self.data_override.unwrap_or(self.ptr() as *mut c_void),
            device: self.device,
            ndim: self.ndim_override.unwrap_or(self.shape.len() as i32),
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: self.strides.as_mut().map_or(null_mut(), |s| s.as_mut_ptr()),
            byte_offset: self.byte_offset,
        }
    }
}

// ---------------------------------------------------------------- random data

/// splitmix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
}

// ---------------------------------------------------------------- ABI helpers

pub fn last_error() -> String {
    unsafe { CStr::from_ptr(moe_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Panics with the library's message unless `s` is MOE_OK.
pub fn ok(s: moe_status, what: &str) {
    assert_eq!(s, moe_status::MOE_OK, "{what}: {s:?}: {}", last_error());
}

pub const CPU: moe_device = moe_device {
    device_type: MOE_DEVICE_CPU,
    device_id: 0,
};

/// Every activation SPEC §3 allows gated, and non-gated.
pub const GATED: [u32; 6] = [
    MOE_ACTIVATION_SILU,
    MOE_ACTIVATION_GELU,
    MOE_ACTIVATION_GELU_TANH,
    MOE_ACTIVATION_SWIGLU_OAI,
    MOE_ACTIVATION_SILU_CLAMP,
    MOE_ACTIVATION_SILU_PRECLAMP,
];
pub const NON_GATED: [u32; 3] = [
    MOE_ACTIVATION_SILU,
    MOE_ACTIVATION_GELU,
    MOE_ACTIVATION_RELU2,
];

// ---------------------------------------------------------------- a test case

#[derive(Clone, Debug)]
pub struct Case {
    pub dt: Dt,
    pub experts: usize,
    pub global_experts: Option<usize>,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    pub tokens: usize,
    pub activation: u32,
    pub gated: bool,
    pub layout: u32,
    pub alpha: Option<f32>,
    pub limit: Option<f32>,
    pub rsf: f32,
    pub on_input: bool,
    pub no_combine: bool,
    pub keep_weight: bool,
    pub inplace: bool,
    pub b13: bool,
    pub b2: bool,
    /// Biases in f32 rather than the layer dtype.
    pub bias_f32: bool,
    /// Router weights in the layer dtype rather than f32.
    pub router_in_dtype: bool,
    pub ids_i64: bool,
    /// Probability that a route is dropped (id −1).
    pub drop: f64,
    pub options: Vec<(String, String)>,
    pub seed: u64,
}

impl Default for Case {
    fn default() -> Self {
        Case {
            dt: Dt::Bf16,
            experts: 8,
            global_experts: None,
            top_k: 2,
            hidden: 40,
            inter: 24,
            tokens: 7,
            activation: MOE_ACTIVATION_SILU,
            gated: true,
            layout: MOE_GATE_UP_HALVES,
            alpha: None,
            limit: None,
            rsf: 1.0,
            on_input: false,
            no_combine: false,
            keep_weight: false,
            inplace: false,
            b13: false,
            b2: false,
            bias_f32: false,
            router_in_dtype: false,
            ids_i64: false,
            drop: 0.0,
            options: vec![],
            seed: 1,
        }
    }
}

impl Case {
    pub fn n1(&self) -> usize {
        if self.gated {
            2 * self.inter
        } else {
            self.inter
        }
    }

    /// Alpha and limit as the activation needs them (gpt-oss values, a small limit so the
    /// clamps bite on test data).
    pub fn with_activation(mut self, act: u32) -> Self {
        self.activation = act;
        self.gated = act != MOE_ACTIVATION_RELU2;
        self.alpha = (act == MOE_ACTIVATION_SWIGLU_OAI).then_some(1.702);
        self.limit = match act {
            MOE_ACTIVATION_SWIGLU_OAI
            | MOE_ACTIVATION_SILU_CLAMP
            | MOE_ACTIVATION_SILU_PRECLAMP => Some(0.5),
            _ => None,
        };
        self
    }

    /// Builds the config handle the case describes (panics on failure).
    pub fn config(&self) -> *mut moe_config {
        let mut c = null_mut();
        unsafe {
            ok(moe_config_create(&mut c), "moe_config_create");
            ok(
                moe_config_set_num_experts(c, self.global_experts.unwrap_or(self.experts) as i64),
                "num_experts",
            );
            if self.global_experts.is_some() {
                ok(
                    moe_config_set_num_local_experts(c, self.experts as i64),
                    "num_local_experts",
                );
            }
            ok(moe_config_set_top_k(c, self.top_k as i64), "top_k");
            ok(moe_config_set_hidden_size(c, self.hidden as i64), "hidden");
            ok(
                moe_config_set_intermediate_size(c, self.inter as i64),
                "inter",
            );
            ok(moe_config_set_dtype(c, self.dt.dl()), "dtype");
            ok(moe_config_set_activation(c, self.activation), "activation");
            ok(moe_config_set_gated(c, self.gated), "gated");
            ok(moe_config_set_gate_up_layout(c, self.layout), "layout");
            if let Some(a) = self.alpha {
                ok(moe_config_set_gemm1_alpha(c, a), "alpha");
            }
            if let Some(l) = self.limit {
                ok(moe_config_set_gemm1_limit(c, l), "limit");
            }
            ok(moe_config_set_routed_scaling_factor(c, self.rsf), "rsf");
            ok(
                moe_config_set_apply_router_weight_on_input(c, self.on_input),
                "on_input",
            );
            ok(moe_config_set_no_combine(c, self.no_combine), "no_combine");
            ok(
                moe_config_set_no_combine_keep_router_weight(c, self.keep_weight),
                "keep",
            );
            ok(moe_config_set_inplace(c, self.inplace), "inplace");
            ok(moe_config_set_device(c, CPU), "device");
            // cuda.* keys are refused on a CPU layer; the CUDA twin sets them
            // (tests/cuda_support)
            self.set_options(c, |k| !k.starts_with("cuda."));
        }
        c
    }

    /// moe_config_set_option for each of the case's options whose key `keep` accepts.
    pub fn set_options(&self, c: *mut moe_config, keep: impl Fn(&str) -> bool) {
        for (k, v) in self.options.iter().filter(|(k, _)| keep(k)) {
            let k = std::ffi::CString::new(k.as_str()).unwrap();
            let v = std::ffi::CString::new(v.as_str()).unwrap();
            ok(
                unsafe { moe_config_set_option(c, k.as_ptr(), v.as_ptr()) },
                "option",
            );
        }
    }
}

/// moe_layer_create with optional biases.
pub fn create_layer(
    config: *const moe_config,
    w13: &moe_tensor,
    w2: &moe_tensor,
    b13: Option<&moe_tensor>,
    b2: Option<&moe_tensor>,
    layer: &mut *mut moe_layer,
) -> moe_status {
    unsafe {
        moe_layer_create(
            config,
            w13,
            w2,
            b13.map_or(null(), |t| t as *const _),
            b2.map_or(null(), |t| t as *const _),
            layer,
        )
    }
}

// ---------------------------------------------------------------- a whole setup

/// Every tensor and handle of one layer and one batch, valid and ready: tests call
/// `prepare` and `run`, or bend one piece first to make a bad call.
pub struct Setup {
    pub case: Case,
    pub config: *mut moe_config,
    pub layer: *mut moe_layer,
    pub plan: *mut moe_plan,
    pub w13: HostTensor,
    pub w2: HostTensor,
    pub b13: Option<HostTensor>,
    pub b2: Option<HostTensor>,
    pub hidden: HostTensor,
    pub ids: HostTensor,
    pub router: HostTensor,
    pub out: HostTensor,
    pub workspace: HostTensor,
    /// The hidden values before the run (inplace overwrites them).
    pub hidden_in: Vec<f64>,
}

impl Setup {
    /// Makes the weights and the batch; creates config, layer, workspace and plan.
    pub fn new(case: &Case) -> Setup {
        let c = case;
        let mut rng = Rng::new(c.seed);
        let (e, k, h, i, m, n1) = (
            c.experts as i64,
            c.top_k as i64,
            c.hidden as i64,
            c.inter as i64,
            c.tokens as i64,
            c.n1() as i64,
        );
        // Scales keep every stage's values O(1), so the activations' curves and clamps matter.
        let w13 = HostTensor::from_f64(
            c.dt,
            &[e, n1, h],
            &rng.vec((e * n1 * h) as usize, -2.0, 2.0)
                .iter()
                .map(|v| v / (h as f64).sqrt())
                .collect::<Vec<_>>(),
        );
        let w2 = HostTensor::from_f64(
            c.dt,
            &[e, h, i],
            &rng.vec((e * h * i) as usize, -2.0, 2.0)
                .iter()
                .map(|v| v / (i as f64).sqrt())
                .collect::<Vec<_>>(),
        );
        let bias_dt = if c.bias_f32 { Dt::F32 } else { c.dt };
        let b13 = c.b13.then(|| {
            HostTensor::from_f64(bias_dt, &[e, n1], &rng.vec((e * n1) as usize, -0.5, 0.5))
        });
        let b2 = c
            .b2
            .then(|| HostTensor::from_f64(bias_dt, &[e, h], &rng.vec((e * h) as usize, -0.5, 0.5)));
        let hidden = HostTensor::from_f64(c.dt, &[m, h], &rng.vec((m * h) as usize, -1.0, 1.0));
        let mut ids_v = Vec::with_capacity((m * k) as usize);
        for _ in 0..m {
            // distinct experts per token where possible, as a router's top-k gives
            let mut chosen: Vec<i64> = Vec::new();
            for _ in 0..k {
                let mut id = rng.below(c.experts) as i64;
                if c.top_k <= c.experts {
                    while chosen.contains(&id) {
                        id = rng.below(c.experts) as i64;
                    }
                }
                chosen.push(id);
            }
            for id in chosen {
                let dropped = c.drop > 0.0 && rng.uniform(0.0, 1.0) < c.drop;
                ids_v.push(if dropped { -1.0 } else { id as f64 });
            }
        }
        let ids = HostTensor::from_f64(if c.ids_i64 { Dt::I64 } else { Dt::I32 }, &[m, k], &ids_v);
        let router_dt = if c.router_in_dtype { c.dt } else { Dt::F32 };
        let router =
            HostTensor::from_f64(router_dt, &[m, k], &rng.vec((m * k) as usize, 0.05, 1.0));
        Setup::assemble(c, [w13, w2], [b13, b2], hidden, ids, router)
    }

    /// The rest of a Setup around its weights and batch: a poisoned `out` of the right shape,
    /// config, layer, workspace and plan.
    pub fn assemble(
        c: &Case,
        [w13, w2]: [HostTensor; 2],
        [b13, b2]: [Option<HostTensor>; 2],
        hidden: HostTensor,
        ids: HostTensor,
        router: HostTensor,
    ) -> Setup {
        let (m, k, h) = (c.tokens as i64, c.top_k as i64, c.hidden as i64);
        let out_shape: Vec<i64> = if c.no_combine {
            vec![m, k, h]
        } else {
            vec![m, h]
        };
        let mut out = HostTensor::zeros(c.dt, &out_shape);
        out.fill_bytes(0xFF); // NaN in every float dtype: poison
        let hidden_in = hidden.values();
        let mut s = Setup {
            case: c.clone(),
            config: c.config(),
            layer: null_mut(),
            plan: null_mut(),
            w13,
            w2,
            b13,
            b2,
            hidden,
            ids,
            router,
            out,
            workspace: HostTensor::zeros(Dt::U8, &[0]),
            hidden_in,
        };
        ok(s.create_layer(), "moe_layer_create");
        let mut bytes = 0usize;
        unsafe {
            ok(
                moe_workspace_size(s.layer, m, &mut bytes),
                "moe_workspace_size",
            );
            ok(moe_plan_create(s.layer, &mut s.plan), "moe_plan_create");
        }
        s.workspace = HostTensor::zeros(Dt::U8, &[bytes as i64]);
        s
    }

    /// moe_layer_create from the current config and weights (replaces a previous layer and
    /// its plan).
    pub fn create_layer(&mut self) -> moe_status {
        let w13 = self.w13.raw();
        let w2 = self.w2.raw();
        let b13 = self.b13.as_mut().map(|t| t.raw());
        let b2 = self.b2.as_mut().map(|t| t.raw());
        let mut layer = null_mut();
        let s = create_layer(
            self.config,
            &w13,
            &w2,
            b13.as_ref(),
            b2.as_ref(),
            &mut layer,
        );
        if s == moe_status::MOE_OK {
            unsafe { moe_layer_free(self.layer) };
            self.layer = layer;
            if !self.plan.is_null() {
                // a plan belongs to one layer: make a new one for the new layer
                unsafe { moe_plan_free(self.plan) };
                self.plan = null_mut();
                ok(
                    unsafe { moe_plan_create(self.layer, &mut self.plan) },
                    "moe_plan_create",
                );
            }
        }
        s
    }

    pub fn prepare(&mut self) -> moe_status {
        let ids = self.ids.raw();
        let ws = self.workspace.raw();
        unsafe { moe_prepare(self.layer, &ids, &ws, self.plan, null_mut()) }
    }

    /// moe_run with `out` (or NULL for an inplace layer).
    pub fn run(&mut self) -> moe_status {
        let hidden = self.hidden.raw();
        let router = self.router.raw();
        let out = self.out.raw();
        let out_ptr: *const moe_tensor = if self.case.inplace { null() } else { &out };
        unsafe {
            moe_run(
                self.layer,
                null(),
                self.plan,
                &hidden,
                &router,
                out_ptr,
                null_mut(),
            )
        }
    }

    /// The computed output as f64: `out`, or `hidden` for an inplace layer.
    pub fn output(&self) -> Vec<f64> {
        if self.case.inplace {
            self.hidden.values()
        } else {
            self.out.values()
        }
    }

    /// SPEC §2–3 in float64, rounding to the dtype exactly where the SPEC rounds.
    pub fn reference(&self) -> Vec<f64> {
        let c = &self.case;
        let (k, h, i, m, n1) = (c.top_k, c.hidden, c.inter, c.tokens, c.n1());
        let w13 = self.w13.values();
        let w2 = self.w2.values();
        let b13 = self.b13.as_ref().map(|t| t.values());
        let b2 = self.b2.as_ref().map(|t| t.values());
        let ids = self.ids.values();
        let router = self.router.values();
        let x = &self.hidden_in;
        let rnd = |v: f64| c.dt.round(v);
        let rows = if c.no_combine { m * k } else { m };
        let mut out = vec![0.0; rows * h];
        for t in 0..m {
            let mut sum = vec![0.0f64; h];
            for kk in 0..k {
                let r = t * k + kk;
                let e = ids[r];
                if e < 0.0 {
                    continue; // a dropped route contributes zero (and a zero no_combine row)
                }
                let e = e as usize;
                let w = router[r];
                let v = if c.on_input { w } else { 1.0 };
                let g1: Vec<f64> = (0..n1)
                    .map(|n| {
                        let dot: f64 = (0..h)
                            .map(|j| x[t * h + j] * w13[(e * n1 + n) * h + j])
                            .sum();
                        rnd(v * (dot + b13.as_ref().map_or(0.0, |b| b[e * n1 + n])))
                    })
                    .collect();
                let a: Vec<f64> = (0..i)
                    .map(|j| {
                        let val = if c.gated {
                            let (gi, ui) = if c.layout == MOE_GATE_UP_INTERLEAVED {
                                (2 * j, 2 * j + 1)
                            } else {
                                (j, i + j)
                            };
                            ref_gated(c, g1[gi], g1[ui])
                        } else {
                            ref_single(c.activation, g1[j])
                        };
                        rnd(val)
                    })
                    .collect();
                let w_after = if !c.on_input && (!c.no_combine || c.keep_weight) {
                    w
                } else {
                    1.0
                };
                for hh in 0..h {
                    let dot: f64 = (0..i).map(|j| a[j] * w2[(e * h + hh) * i + j]).sum();
                    let y = rnd((dot + b2.as_ref().map_or(0.0, |b| b[e * h + hh])) * w_after);
                    if c.no_combine {
                        out[r * h + hh] = y;
                    } else {
                        sum[hh] += y;
                    }
                }
            }
            if !c.no_combine {
                for hh in 0..h {
                    out[t * h + hh] = rnd(c.rsf as f64 * sum[hh]);
                }
            }
        }
        out
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        unsafe {
            moe_plan_free(self.plan);
            moe_layer_free(self.layer);
            moe_config_free(self.config);
        }
    }
}

extern "C" {
    fn erf(x: f64) -> f64;
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + unsafe { erf(x / std::f64::consts::SQRT_2) })
}

pub fn ref_single(act: u32, x: f64) -> f64 {
    match act {
        MOE_ACTIVATION_SILU => silu(x),
        MOE_ACTIVATION_GELU => gelu(x),
        MOE_ACTIVATION_RELU2 => x.max(0.0).powi(2),
        _ => panic!("no non-gated form"),
    }
}

pub fn ref_gated(c: &Case, g: f64, u: f64) -> f64 {
    let l = c.limit.unwrap_or(0.0) as f64;
    match c.activation {
        MOE_ACTIVATION_SILU => silu(g) * u,
        MOE_ACTIVATION_GELU => gelu(g) * u,
        MOE_ACTIVATION_GELU_TANH => {
            0.5 * g * (1.0 + (0.7978845608 * (g + 0.044715 * g * g * g)).tanh()) * u
        }
        MOE_ACTIVATION_SWIGLU_OAI => {
            let a = c.alpha.unwrap() as f64;
            let g = g.min(l);
            let u = u.clamp(-l, l);
            g / (1.0 + (-a * g).exp()) * (u + 1.0)
        }
        MOE_ACTIVATION_SILU_CLAMP => silu(g).min(l) * u.clamp(-l, l),
        MOE_ACTIVATION_SILU_PRECLAMP => silu(g.min(l)) * u.clamp(-l, l),
        _ => panic!("no gated form"),
    }
}

/// ‖got − want‖ / ‖want‖; infinite when `got` has a NaN (poison left or computed).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Runs a case end to end and returns (relative error, output) after checking the statuses.
pub fn run_case(c: &Case) -> (f64, Vec<f64>) {
    let mut s = Setup::new(c);
    ok(s.prepare(), "moe_prepare");
    ok(s.run(), "moe_run");
    let got = s.output();
    (rel_err(&got, &s.reference()), got)
}

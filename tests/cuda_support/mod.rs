//! The device side of tests/cuda.rs: the skip rule, device tensors (cudarc allocations whose
//! raw pointers go into `moe_tensor`s), the CUDA twin of a CPU `Setup` (same config with the
//! device set to CUDA, same weights and batch copied to the device), the comparison with the
//! CPU layer and the float64 reference, a stream gate, and a fast builder for model-sized
//! weights.
//!
//! cudarc's event tracking is off: every test orders its own work on one stream and
//! synchronizes before reading results, as a host of the library does.
#![allow(dead_code)]

use crate::common::*;
use cudarc::driver::{sys, CudaContext, CudaSlice, CudaStream, DevicePtr};
use fusedmoe::ffi::*;
use rayon::prelude::*;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const CUDA0: moe_device = moe_device {
    device_type: MOE_DEVICE_CUDA,
    device_id: 0,
};

/// 0xFF bytes: NaN in every float dtype, −1 in every int dtype.
pub const POISON: u8 = 0xFF;

/// Bytes allocated (and poisoned) behind a tensor with no elements, so that "writes nothing"
/// can be checked.
const EMPTY_PAD: usize = 256;

/// Above this many multiply-adds the float64 reference (single-threaded) is skipped and the
/// CPU layer alone is the reference (it is itself held to float64 by tests/semantics.rs).
const F64_BUDGET: usize = 400_000_000;

// ---------------------------------------------------------------- environment

/// `FUSEDMOE_GPU_REDUCED=1`: the small subset for compute-sanitizer runs.
pub fn reduced() -> bool {
    std::env::var("FUSEDMOE_GPU_REDUCED").as_deref() == Ok("1")
}

/// `FUSEDMOE_GPU_SANITIZER=1`: running under compute-sanitizer, which serializes launches, so
/// nothing may be queued behind a `Gate`, and whose racecheck deadlocks when several host
/// threads launch: cases run one at a time (check.sh also passes --test-threads=1).
pub fn sanitizer() -> bool {
    std::env::var("FUSEDMOE_GPU_SANITIZER").as_deref() == Ok("1")
}

fn gpu_required() -> bool {
    std::env::var("FUSEDMOE_REQUIRE_GPU").as_deref() == Ok("1")
}

/// The device's primary context, or None after printing `SKIPPED: <reason>` where this build
/// or machine cannot run a CUDA layer. With `FUSEDMOE_REQUIRE_GPU=1` that is a failure.
/// cudarc is touched only after `moe_supports("cuda")` said yes: cudarc panics where libcuda
/// is missing.
pub fn gpu(test: &str) -> Option<Arc<CudaContext>> {
    static CONTEXT: OnceLock<Result<Arc<CudaContext>, String>> = OnceLock::new();
    match CONTEXT.get_or_init(open_context) {
        Ok(ctx) => Some(ctx.clone()),
        Err(why) => {
            assert!(!gpu_required(), "{test}: FUSEDMOE_REQUIRE_GPU=1, but {why}");
            println!("SKIPPED: {test}: {why}");
            None
        }
    }
}

fn open_context() -> Result<Arc<CudaContext>, String> {
    if !unsafe { moe_supports(c"cuda".as_ptr()) } {
        return Err(format!(
            "moe_supports(\"cuda\") is false ({})",
            why_no_cuda()
        ));
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("CudaContext::new(0): {e:?}"))?;
    // SAFETY: before any allocation; each test orders its work on one stream itself.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// The library's own words for why a CUDA layer cannot be made here: a layer creation that
/// stops at the device probe (the weights are never read).
fn why_no_cuda() -> String {
    let c = Case::default();
    let config = c.config();
    let (mut w13, mut w2) = (
        HostTensor::zeros(c.dt, &[8, 48, 40]),
        HostTensor::zeros(c.dt, &[8, 40, 24]),
    );
    w13.device = CUDA0;
    w2.device = CUDA0;
    let (w13, w2) = (w13.raw(), w2.raw());
    let mut layer = null_mut();
    let why = unsafe {
        ok(moe_config_set_device(config, CUDA0), "device");
        match moe_layer_create(config, &w13, &w2, null(), null(), &mut layer) {
            moe_status::MOE_OK => "yet a CUDA layer was created".to_string(),
            s => format!("a CUDA layer: {s:?}: {}", last_error()),
        }
    };
    unsafe {
        moe_layer_free(layer);
        moe_config_free(config);
    }
    why
}

/// The raw stream for the ABI (NULL for the legacy default stream).
pub fn cu(stream: &CudaStream) -> *mut c_void {
    stream.cu_stream() as *mut c_void
}

/// Half the cases run on the legacy default stream (NULL), half on a stream of their own.
pub fn stream_for(ctx: &Arc<CudaContext>, seed: u64) -> Arc<CudaStream> {
    if seed % 2 == 0 {
        ctx.default_stream()
    } else {
        ctx.new_stream().expect("cuStreamCreate")
    }
}

pub fn sync(stream: &CudaStream) {
    stream.synchronize().expect("cuStreamSynchronize");
}

/// Ok unless `s` failed; the error carries the library's message.
pub fn status(s: moe_status, what: &str) -> Result<(), String> {
    if s == moe_status::MOE_OK {
        Ok(())
    } else {
        Err(format!("{what}: {s:?}: {}", last_error()))
    }
}

// ---------------------------------------------------------------- device tensors

/// A tensor in device memory the test owns; like `HostTensor`, every field of the
/// `moe_tensor` it hands out can be bent.
pub struct DeviceTensor {
    pub buf: CudaSlice<u8>,
    pub stream: Arc<CudaStream>,
    pub dt: Dt,
    pub dtype: moe_dtype,
    pub shape: Vec<i64>,
    pub device: moe_device,
    /// Bytes of the elements the shape had when made (0 for an empty tensor, whose buffer is
    /// EMPTY_PAD poisoned bytes).
    pub nbytes: usize,
}

impl DeviceTensor {
    /// A device copy of `host` (its storage as allocated), made on `stream`.
    pub fn upload(stream: &Arc<CudaStream>, host: &HostTensor) -> Self {
        let bytes = host.bytes();
        let buf = if bytes.is_empty() {
            stream.clone_htod(&vec![POISON; EMPTY_PAD])
        } else {
            stream.clone_htod(bytes)
        }
        .expect("cuMemcpyHtoD");
        DeviceTensor {
            buf,
            stream: stream.clone(),
            dt: host.dt,
            dtype: host.dtype,
            shape: host.shape.clone(),
            device: CUDA0,
            nbytes: bytes.len(),
        }
    }

    /// A tensor of `shape` whose every byte is POISON.
    pub fn poisoned(stream: &Arc<CudaStream>, dt: Dt, shape: &[i64]) -> Self {
        let mut h = HostTensor::zeros(dt, shape);
        h.fill_bytes(POISON);
        Self::upload(stream, &h)
    }

    pub fn ptr(&self) -> u64 {
        let (p, _no_event) = self.buf.device_ptr(&self.stream);
        p
    }

    /// The DLPack view; valid while `self` is alive.
    pub fn raw(&mut self) -> moe_tensor {
        moe_tensor {
            data: self.ptr() as *mut c_void,
            device: self.device,
            ndim: self.shape.len() as i32,
            dtype: self.dtype,
            shape: self.shape.as_mut_ptr(),
            strides: null_mut(),
            byte_offset: 0,
        }
    }

    /// Copies `host`'s storage over the start of this buffer (same stream order).
    pub fn write(&mut self, host: &HostTensor) {
        let bytes = host.bytes();
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(bytes, &mut self.buf)
                .expect("cuMemcpyHtoD");
        }
    }

    /// Sets every byte of the buffer, in stream order.
    pub fn fill(&mut self, byte: u8) {
        let p = self.ptr();
        unsafe {
            self.stream.context().bind_to_thread().expect("bind");
            sys::cuMemsetD8Async(p, byte, self.buf.len(), self.stream.cu_stream())
                .result()
                .expect("cuMemsetD8Async");
        }
    }

    /// The whole buffer, after the stream has finished.
    pub fn read_bytes(&self) -> Vec<u8> {
        sync(&self.stream);
        let v = self.stream.clone_dtoh(&self.buf).expect("cuMemcpyDtoH");
        sync(&self.stream);
        v
    }

    /// The elements the tensor had when made, as f64, after the stream has finished.
    pub fn values(&self) -> Vec<f64> {
        let bytes = self.read_bytes();
        let n = self.nbytes / self.dt.size();
        let h = HostTensor::zeros(self.dt, &[n as i64]);
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h.ptr(), self.nbytes) };
        h.values()
    }

    /// Whether every byte from `from` to the end of the buffer is still POISON.
    pub fn poisoned_from(&self, from: usize) -> bool {
        self.read_bytes()[from..].iter().all(|&b| b == POISON)
    }
}

// ---------------------------------------------------------------- the CUDA twin of a Setup

/// A CUDA layer made from a CPU `Setup`'s config (cloned, device set to CUDA) and its weights
/// (copied to the device), with a plan.
pub struct CudaLayer {
    pub config: *mut moe_config,
    pub layer: *mut moe_layer,
    pub plan: *mut moe_plan,
    pub w13: DeviceTensor,
    pub w2: DeviceTensor,
    pub b13: Option<DeviceTensor>,
    pub b2: Option<DeviceTensor>,
}

impl CudaLayer {
    pub fn new(s: &Setup, stream: &Arc<CudaStream>) -> Result<Self, String> {
        let mut config = null_mut();
        unsafe {
            status(moe_config_clone(s.config, &mut config), "moe_config_clone")?;
        }
        let mut l = CudaLayer {
            config,
            layer: null_mut(),
            plan: null_mut(),
            w13: DeviceTensor::upload(stream, &s.w13),
            w2: DeviceTensor::upload(stream, &s.w2),
            b13: s.b13.as_ref().map(|t| DeviceTensor::upload(stream, t)),
            b2: s.b2.as_ref().map(|t| DeviceTensor::upload(stream, t)),
        };
        unsafe {
            status(
                moe_config_set_device(l.config, CUDA0),
                "moe_config_set_device",
            )?;
            s.case.set_options(l.config, |k| k.starts_with("cuda."));
            status(l.create(), "moe_layer_create")?;
            status(moe_plan_create(l.layer, &mut l.plan), "moe_plan_create")?;
        }
        Ok(l)
    }

    /// moe_layer_create from this config and device weights (bend them first to make a bad
    /// call); keeps the layer on success.
    pub fn create(&mut self) -> moe_status {
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
        }
        s
    }

    /// A workspace for up to `tokens` tokens, every byte POISON (the library may not rely on
    /// zeroed scratch memory).
    pub fn workspace(
        &self,
        tokens: usize,
        stream: &Arc<CudaStream>,
    ) -> Result<DeviceTensor, String> {
        let mut bytes = 0usize;
        unsafe {
            status(
                moe_workspace_size(self.layer, tokens as i64, &mut bytes),
                "moe_workspace_size",
            )?;
        }
        Ok(DeviceTensor::poisoned(stream, Dt::U8, &[bytes as i64]))
    }

    /// moe_warmup: compiles every kernel variant the layer may use for up to `max_tokens`.
    pub fn warmup(&self, max_tokens: usize, stream: &CudaStream) -> moe_status {
        unsafe { moe_warmup(self.layer, max_tokens as i64, cu(stream)) }
    }

    pub fn prepare_raw(
        &self,
        ids: &moe_tensor,
        ws: &moe_tensor,
        stream: *mut c_void,
    ) -> moe_status {
        unsafe { moe_prepare(self.layer, ids, ws, self.plan, stream) }
    }

    pub fn run_raw(
        &self,
        hidden: &moe_tensor,
        router: &moe_tensor,
        out: Option<&moe_tensor>,
        stream: *mut c_void,
    ) -> moe_status {
        unsafe {
            moe_run(
                self.layer,
                null(),
                self.plan,
                hidden,
                router,
                out.map_or(null(), |t| t as *const _),
                stream,
            )
        }
    }
}

impl Drop for CudaLayer {
    fn drop(&mut self) {
        unsafe {
            moe_plan_free(self.plan);
            moe_layer_free(self.layer);
            moe_config_free(self.config);
        }
        // the weights are freed after the layer (fields drop after this)
    }
}

/// One batch on the device: the Setup's hidden, ids and router weights, a poisoned out and a
/// poisoned workspace.
pub struct DeviceBatch {
    pub hidden: DeviceTensor,
    pub ids: DeviceTensor,
    pub router: DeviceTensor,
    pub out: DeviceTensor,
    pub ws: DeviceTensor,
    pub stream: Arc<CudaStream>,
}

impl DeviceBatch {
    /// Copies `s`'s batch (hidden as it was before any CPU run) to the device.
    pub fn new(s: &Setup, layer: &CudaLayer, stream: &Arc<CudaStream>) -> Result<Self, String> {
        let hidden = HostTensor::from_f64(s.hidden.dt, &s.hidden.shape, &s.hidden_in);
        Ok(DeviceBatch {
            hidden: DeviceTensor::upload(stream, &hidden),
            ids: DeviceTensor::upload(stream, &s.ids),
            router: DeviceTensor::upload(stream, &s.router),
            out: DeviceTensor::poisoned(stream, s.out.dt, &s.out.shape),
            ws: layer.workspace(s.case.tokens, stream)?,
            stream: stream.clone(),
        })
    }

    /// Uses only the first `m` tokens of the buffers (shapes bent; data unchanged).
    pub fn rows(&mut self, m: usize) {
        for t in [
            &mut self.hidden,
            &mut self.ids,
            &mut self.router,
            &mut self.out,
        ] {
            t.shape[0] = m as i64;
        }
    }

    /// moe_prepare + moe_run on the batch's stream (asynchronous). An inplace layer gets
    /// `out` = NULL on even seeds and `out` = hidden on odd ones (both are documented).
    pub fn launch(&mut self, layer: &CudaLayer, c: &Case) -> Result<(), String> {
        let stream = cu(&self.stream);
        let (ids, ws) = (self.ids.raw(), self.ws.raw());
        status(layer.prepare_raw(&ids, &ws, stream), "moe_prepare")?;
        let (hidden, router, out) = (self.hidden.raw(), self.router.raw(), self.out.raw());
        let out = match (c.inplace, c.seed % 2) {
            (false, _) => Some(&out),
            (true, 0) => None,
            (true, _) => Some(&hidden),
        };
        status(layer.run_raw(&hidden, &router, out, stream), "moe_run")
    }

    /// The result (out, or hidden for an inplace layer), after the stream has finished.
    pub fn output(&self, c: &Case) -> Vec<f64> {
        if c.inplace {
            self.hidden.values()
        } else {
            self.out.values()
        }
    }
}

// ---------------------------------------------------------------- checking one case

/// Multiply-adds of the float64 reference for `c`.
pub fn reference_cost(c: &Case) -> usize {
    c.tokens * c.top_k * (c.n1() * c.hidden + c.hidden * c.inter)
}

/// Holds a CUDA result to the CPU layer's (and to float64 where given): the DESIGN §8
/// tolerance, no NaN, and exact zeros where every route of a row is dropped.
pub fn compare(
    c: &Case,
    got: &[f64],
    cpu: &[f64],
    reference: Option<&[f64]>,
    ids: &[f64],
) -> Result<String, String> {
    let tol = c.dt.tolerance();
    let h = c.hidden;
    if got.len() != cpu.len() {
        return Err(format!("{} outputs, expected {}", got.len(), cpu.len()));
    }
    let e_cpu = rel_err(got, cpu);
    if e_cpu.is_nan() || e_cpu > tol {
        return Err(format!(
            "relative error vs the CPU layer {e_cpu:e} > {tol:e}; {}",
            worst(got, cpu, h)
        ));
    }
    let e_ref = match reference {
        Some(r) => {
            let e = rel_err(got, r);
            if e.is_nan() || e > tol {
                return Err(format!(
                    "relative error vs float64 {e:e} > {tol:e} (vs the CPU layer {e_cpu:e}); {}",
                    worst(got, r, h)
                ));
            }
            format!("{e:.1e}")
        }
        None => "-".into(),
    };
    // rows of dropped routes (no_combine) and of tokens with every route dropped are zero
    let k = c.top_k;
    let rows: Vec<(usize, bool)> = if c.no_combine {
        (0..c.tokens * k).map(|r| (r, ids[r] < 0.0)).collect()
    } else {
        (0..c.tokens)
            .map(|m| (m, ids[m * k..(m + 1) * k].iter().all(|&e| e < 0.0)))
            .collect()
    };
    for (row, dropped) in rows {
        if dropped && got[row * h..(row + 1) * h].iter().any(|&v| v != 0.0) {
            return Err(format!(
                "row {row}: every route dropped, but not all zeros: {:?}",
                &got[row * h..(row * h + 8.min(h))]
            ));
        }
    }
    Ok(format!("err vs cpu {e_cpu:.1e}, vs f64 {e_ref}"))
}

/// Where `got` and `want` differ most, and how many outputs are not finite.
fn worst(got: &[f64], want: &[f64], h: usize) -> String {
    let bad = got.iter().filter(|v| !v.is_finite()).count();
    let (i, d) = got
        .iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_finite() {
                (a - b).abs()
            } else {
                f64::INFINITY
            }
        })
        .enumerate()
        .fold(
            (0, -1.0),
            |best, (i, d)| if d > best.1 { (i, d) } else { best },
        );
    if got.is_empty() {
        return "no outputs".into();
    }
    format!(
        "{bad} of {} outputs not finite; largest difference at row {} col {}: got {} want {} (|diff| {d:e})",
        got.len(),
        i / h,
        i % h,
        got[i],
        want[i]
    )
}

/// Runs `c` on the CPU (the reference) and on CUDA from the same data; a `Err` names what
/// differs. The CUDA work is queued first so that it overlaps the CPU run.
pub fn check_case(ctx: &Arc<CudaContext>, c: &Case) -> Result<String, String> {
    let start = Instant::now();
    let mut s = Setup::new(c);
    let stream = stream_for(ctx, c.seed);
    let layer = CudaLayer::new(&s, &stream)?;
    let mut d = DeviceBatch::new(&s, &layer, &stream)?;
    d.launch(&layer, c)?;
    status(s.prepare(), "CPU moe_prepare")?;
    status(s.run(), "CPU moe_run")?;
    let cpu = s.output();
    let reference = (reference_cost(c) <= F64_BUDGET).then(|| s.reference());
    sync(&stream);
    let got = d.output(c);
    let ids = s.ids.values();
    let line = compare(c, &got, &cpu, reference.as_deref(), &ids)?;
    if c.tokens == 0 {
        // M = 0 writes nothing: the poisoned bytes behind the empty tensors stay poisoned
        for (name, t) in [("out", &d.out), ("hidden", &d.hidden)] {
            if !t.poisoned_from(0) {
                return Err(format!("M = 0: {name} was written"));
            }
        }
    }
    Ok(format!(
        "{line}, {:.0} ms",
        start.elapsed().as_secs_f64() * 1e3
    ))
}

/// Runs every case (a few at a time: kernel compilation and CPU references overlap), prints
/// a line per case, and fails with every failing case's Debug and error.
pub fn run_cases(test: &str, ctx: &Arc<CudaContext>, cases: &[Case]) {
    run_each(test, cases, |c| check_case(ctx, c));
}

/// `run_cases` for any kind of case and check (tests/cuda_lora.rs checks LoRA cases).
pub fn run_each<C: std::fmt::Debug + Sync>(
    test: &str,
    cases: &[C],
    check: impl Fn(&C) -> Result<String, String> + Sync,
) {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    // one at a time under compute-sanitizer: racecheck deadlocks on concurrent host threads
    let workers = if sanitizer() { 1 } else { 4 };
    std::thread::scope(|scope| {
        for _ in 0..workers.min(cases.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let result = catch_unwind(AssertUnwindSafe(|| check(c)))
                    .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&panic))));
                match result {
                    Ok(line) => println!("ok   {test} #{i}: {line}"),
                    Err(e) => {
                        println!("FAIL {test} #{i}: {e}\n     {c:?}");
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("#{i} {c:?}\n    {e}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{test}: {} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

pub fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

// ---------------------------------------------------------------- batches

/// Distinct experts per token where possible (as a router's top-k gives); with `shared`, the
/// last route of every token is the last expert (a shared expert, DeepSeek style). A route is
/// dropped (−1) with probability `drop`.
pub fn route(rng: &mut Rng, tokens: usize, c: &Case, shared: bool) -> Vec<f64> {
    let (k, e) = (c.top_k, c.experts);
    let routed = if shared { e - 1 } else { e };
    let mut ids = Vec::with_capacity(tokens * k);
    for _ in 0..tokens {
        let mut chosen: Vec<usize> = Vec::new();
        for j in 0..k {
            if shared && j == k - 1 {
                chosen.push(e - 1);
                continue;
            }
            let mut id = rng.below(routed);
            while k <= routed && chosen.contains(&id) {
                id = rng.below(routed);
            }
            chosen.push(id);
        }
        for id in chosen {
            let dropped = c.drop > 0.0 && rng.uniform(0.0, 1.0) < c.drop;
            ids.push(if dropped { -1.0 } else { id as f64 });
        }
    }
    ids
}

/// Replaces `s`'s batch (same shapes and dtypes) with fresh random data from `seed`; tokens
/// from `valid` on have every route dropped and NaN hidden rows (a dropped token is never
/// read into a kept result). The output is poisoned again.
pub fn refill_batch(s: &mut Setup, valid: usize, seed: u64) {
    let c = s.case.clone();
    let (m, k, h) = (c.tokens, c.top_k, c.hidden);
    let mut rng = Rng::new(seed);
    let mut hidden = rng.vec(m * h, -1.0, 1.0);
    hidden[valid * h..].iter_mut().for_each(|v| *v = f64::NAN);
    let mut ids = route(&mut rng, m, &c, false);
    ids[valid * k..].iter_mut().for_each(|v| *v = -1.0);
    let router = rng.vec(m * k, 0.05, 1.0);
    s.hidden = HostTensor::from_f64(s.hidden.dt, &s.hidden.shape, &hidden);
    s.hidden_in = s.hidden.values();
    s.ids = HostTensor::from_f64(s.ids.dt, &s.ids.shape, &ids);
    s.router = HostTensor::from_f64(s.router.dt, &s.router.shape, &router);
    s.out.fill_bytes(POISON);
}

/// Makes the CPU `Setup` use only its first `m` tokens (shapes bent, data unchanged; the
/// reference follows `case.tokens`).
pub fn cpu_rows(s: &mut Setup, m: usize) {
    s.case.tokens = m;
    for t in [&mut s.hidden, &mut s.ids, &mut s.router, &mut s.out] {
        t.shape[0] = m as i64;
    }
}

// ---------------------------------------------------------------- model-sized weights

/// A `Setup` like `Setup::new`, for weights of 10⁸–10⁹ elements: filled in parallel, each
/// chunk from its own seeded generator. `shared`: the last expert is a shared one that every
/// token routes to.
pub fn big_setup(c: &Case, shared: bool) -> Setup {
    let (e, k, h, i, m, n1) = (c.experts, c.top_k, c.hidden, c.inter, c.tokens, c.n1());
    let w13 = par_tensor(c.dt, &[e, n1, h], c.seed ^ 0x13, 2.0 / (h as f64).sqrt());
    let w2 = par_tensor(c.dt, &[e, h, i], c.seed ^ 0x2, 2.0 / (i as f64).sqrt());
    let mut rng = Rng::new(c.seed);
    let bias_dt = if c.bias_f32 { Dt::F32 } else { c.dt };
    let b13 = c.b13.then(|| {
        HostTensor::from_f64(bias_dt, &[e as i64, n1 as i64], &rng.vec(e * n1, -0.5, 0.5))
    });
    let b2 = c
        .b2
        .then(|| HostTensor::from_f64(bias_dt, &[e as i64, h as i64], &rng.vec(e * h, -0.5, 0.5)));
    let hidden = HostTensor::from_f64(c.dt, &[m as i64, h as i64], &rng.vec(m * h, -1.0, 1.0));
    let ids_v = route(&mut rng, m, c, shared);
    let ids_dt = if c.ids_i64 { Dt::I64 } else { Dt::I32 };
    let ids = HostTensor::from_f64(ids_dt, &[m as i64, k as i64], &ids_v);
    let router_dt = if c.router_in_dtype { c.dt } else { Dt::F32 };
    let router = HostTensor::from_f64(router_dt, &[m as i64, k as i64], &rng.vec(m * k, 0.05, 1.0));
    Setup::assemble(c, [w13, w2], [b13, b2], hidden, ids, router)
}

/// Uniform values in [−scale, scale) in dtype `dt`, written in parallel.
fn par_tensor(dt: Dt, shape: &[usize], seed: u64, scale: f64) -> HostTensor {
    const CHUNK: usize = 1 << 20;
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let t = HostTensor::zeros(dt, &shape);
    let n = t.numel();
    let base = t.ptr() as usize;
    (0..n.div_ceil(CHUNK)).into_par_iter().for_each(|chunk| {
        let mut rng = Rng::new(seed.wrapping_mul(0x1000_0000_01B3) ^ chunk as u64);
        let p = base as *mut u8;
        for i in chunk * CHUNK..n.min((chunk + 1) * CHUNK) {
            let v = rng.uniform(-scale, scale);
            // SAFETY: i < n, and each chunk writes its own elements.
            unsafe {
                match dt {
                    Dt::F32 => *(p as *mut f32).add(i) = v as f32,
                    Dt::F16 => *(p as *mut u16).add(i) = half::f16::from_f64(v).to_bits(),
                    Dt::Bf16 => *(p as *mut u16).add(i) = half::bf16::from_f64(v).to_bits(),
                    _ => unreachable!("weights are floats"),
                }
            }
        }
    });
    t
}

// ---------------------------------------------------------------- a stream gate

/// Holds a stream at a host function until `open` (or GATE_LIMIT), so that work queued
/// behind it has certainly not run: calls that must not wait for the stream can be timed.
pub struct Gate {
    flag: Arc<AtomicBool>,
}

pub const GATE_LIMIT: Duration = Duration::from_secs(20);

unsafe extern "C" fn gate_wait(p: *mut c_void) {
    let flag = Arc::from_raw(p as *const AtomicBool);
    let start = Instant::now();
    while !flag.load(Ordering::Acquire) && start.elapsed() < GATE_LIMIT {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Gate {
    pub fn close(stream: &CudaStream) -> Gate {
        let flag = Arc::new(AtomicBool::new(false));
        let p = Arc::into_raw(flag.clone()) as *mut c_void;
        unsafe {
            stream.context().bind_to_thread().expect("bind");
            sys::cuLaunchHostFunc(stream.cu_stream(), Some(gate_wait), p)
                .result()
                .expect("cuLaunchHostFunc");
        }
        Gate { flag }
    }

    pub fn open(&self) {
        self.flag.store(true, Ordering::Release);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

/// H and I not multiples of 64 (nor of 16): 200 = 3·64 + 8, 72 = 64 + 8.
pub fn base(dt: Dt, seed: u64) -> Case {
    Case {
        dt,
        hidden: 200,
        inter: 72,
        tokens: 33,
        experts: 8,
        top_k: 2,
        seed,
        ..Case::default()
    }
}

/// Runs `calls` inside a capture of `stream` and ends the capture whatever happened; then
/// checks that the last call was refused for kernels moe_warmup had not compiled: status
/// MOE_ERR_INVALID_ARGUMENT, a message naming the stream and moe_warmup, a capture that ends
/// cleanly; and that every call before it returned MOE_OK. `calls` returns each call's name
/// and status in order.
pub fn assert_refused_inside_capture(
    stream: &Arc<CudaStream>,
    calls: impl FnOnce() -> Vec<(&'static str, moe_status)>,
) {
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("cuStreamBeginCapture");
    let statuses = calls();
    let message = last_error();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    let ((refused, last), before) = statuses.split_last().expect("at least one call");
    for &(what, s) in before {
        ok(s, &format!("{what} inside the capture"));
    }
    assert_eq!(
        *last,
        moe_status::MOE_ERR_INVALID_ARGUMENT,
        "{refused} with uncompiled kernels inside a capture: \"{message}\""
    );
    assert!(
        message.starts_with("stream:") && message.contains("moe_warmup"),
        "{message}"
    );
    graph.expect("the capture ends cleanly after the refusal");
}

/// Whether the GPU has thread-block clusters (compute capability 9.0 or later), which the
/// split-K GEMMs need.
pub fn has_clusters(ctx: &Arc<CudaContext>) -> bool {
    let major = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )
        .expect("the device's compute capability");
    major >= 9
}

/// For a split-K test: whether the GPU has clusters; if not, says the test is skipped.
pub fn clusters_for_split_k(ctx: &Arc<CudaContext>) -> bool {
    let has = has_clusters(ctx);
    if !has {
        println!("SKIPPED: split-K needs thread-block clusters (compute capability 9.0)");
    }
    has
}

/// Backend options from (key, number) pairs, e.g. a tile config's `tile.*` keys.
pub fn number_options(pairs: &[(&str, u32)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

//! What the GPU examples (bench, tune) share: the four model shapes of issue 5, device 0 with
//! one stream and CUDA-event timing, device buffers with their DLPack views, random weights
//! filled from a device-side pattern, and RAII over the ABI's layer and plan handles.

use super::{check, route, Rng, Shape};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream};
use cudarc::driver::{DevicePtr, DeviceRepr};
use fusedmoe::ffi::*;
use half::bf16;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::Arc;
use std::time::Instant;

pub const CUDA0: moe_device = moe_device {
    device_type: MOE_DEVICE_CUDA,
    device_id: 0,
};
pub const BF16: moe_dtype = moe_dtype {
    code: MOE_DTYPE_CODE_BFLOAT,
    bits: 16,
    lanes: 1,
};
pub const F32: moe_dtype = moe_dtype {
    code: MOE_DTYPE_CODE_FLOAT,
    bits: 32,
    lanes: 1,
};
pub const I32: moe_dtype = moe_dtype {
    code: MOE_DTYPE_CODE_INT,
    bits: 32,
    lanes: 1,
};
pub const U8: moe_dtype = moe_dtype {
    code: MOE_DTYPE_CODE_UINT,
    bits: 8,
    lanes: 1,
};

/// The random block copied over and over to fill weights and activations.
pub const PATTERN_BYTES: usize = 64 << 20;

/// Calls shorter than this get a head start of queued calls before the start event, so the
/// host's launch cost stays off the device's timeline.
pub const HEAD_START_MS: f64 = 0.5;
pub const MAX_ITERS: usize = 5000;

// ---------------------------------------------------------------- models

#[derive(Clone, Copy, Debug)]
pub struct Model {
    pub name: &'static str,
    pub experts: usize,
    pub hidden: usize,
    pub inter: usize,
    pub top_k: usize,
    /// The last expert is shared: every token takes it as its last route, weight 1
    /// (DeepSeek-V3 with the shared expert fused into the layer).
    pub shared: bool,
    /// gpt-oss: swiglu_oai (alpha 1.702, limit 7.0), interleaved gate/up, bf16 b13 and b2.
    pub oai: bool,
}

pub const MODELS: [Model; 4] = [
    Model {
        name: "mixtral",
        experts: 8,
        hidden: 4096,
        inter: 14336,
        top_k: 2,
        shared: false,
        oai: false,
    },
    Model {
        name: "qwen3",
        experts: 128,
        hidden: 2048,
        inter: 768,
        top_k: 8,
        shared: false,
        oai: false,
    },
    Model {
        name: "deepseek",
        experts: 257,
        hidden: 7168,
        inter: 256,
        top_k: 9,
        shared: true,
        oai: false,
    },
    Model {
        name: "gpt-oss",
        experts: 128,
        hidden: 2880,
        inter: 2880,
        top_k: 4,
        shared: false,
        oai: true,
    },
];

impl Model {
    pub fn n1(&self) -> usize {
        2 * self.inter
    }

    /// The bytes of one expert's weights and biases: what a batch that hits it must read.
    pub fn expert_bytes(&self) -> usize {
        let w = self.n1() * self.hidden + self.hidden * self.inter;
        let b = if self.oai { self.n1() + self.hidden } else { 0 };
        2 * (w + b)
    }

    /// 2·routes·(N1·H + H·I): both GEMMs of every kept route.
    pub fn flops(&self, routes: usize) -> f64 {
        let per_route = self.n1() * self.hidden + self.hidden * self.inter;
        2.0 * routes as f64 * per_route as f64
    }

    pub fn activation(&self) -> &'static str {
        if self.oai {
            "swiglu_oai"
        } else {
            "silu"
        }
    }

    /// Softmax top-k over random logits; with a shared expert, top-(K−1) over the routed
    /// experts and the shared id last.
    pub fn route(&self, rng: &mut Rng, tokens: usize) -> (Vec<i32>, Vec<f32>) {
        if !self.shared {
            return route(rng, tokens, self.shape(self.experts, self.top_k));
        }
        let k = self.top_k - 1;
        let (routed, weights) = route(rng, tokens, self.shape(self.experts - 1, k));
        let (mut ids, mut w) = (Vec::new(), Vec::new());
        for t in 0..tokens {
            ids.extend_from_slice(&routed[t * k..][..k]);
            ids.push(self.experts as i32 - 1);
            w.extend_from_slice(&weights[t * k..][..k]);
            w.push(1.0);
        }
        (ids, w)
    }

    pub fn shape(&self, experts: usize, top_k: usize) -> Shape {
        Shape {
            experts,
            hidden: self.hidden,
            inter: self.inter,
            top_k,
        }
    }

    /// Bytes of one input set: hidden and out [M, H] bf16, ids and router weights [M, K].
    pub fn set_bytes(&self, tokens: usize) -> usize {
        tokens * (4 * self.hidden + 8 * self.top_k)
    }

    pub fn describe(&self) -> Value {
        json!({
            "name": self.name, "experts": self.experts, "hidden": self.hidden,
            "inter": self.inter, "top_k": self.top_k, "activation": self.activation(),
            "shared_expert": self.shared, "biases": self.oai,
            "gate_up_layout": if self.oai { "interleaved" } else { "halves" },
        })
    }
}

/// The models named in a comma-separated `--shapes` value; `other` names that are not models
/// but the program understands (e.g. bench's "ep") are skipped. `usage` reports a bad value.
pub fn parse_models(value: &str, other: &[&str], usage: fn(&str) -> !) -> Vec<Model> {
    value
        .split(',')
        .filter(|s| !other.contains(s))
        .map(|s| {
            *MODELS
                .iter()
                .find(|m| m.name == s)
                .unwrap_or_else(|| usage(&format!("unknown shape {s}")))
        })
        .collect()
}

/// The token counts of a comma-separated `--tokens` value, each ≥ 1.
pub fn parse_tokens(value: &str, usage: fn(&str) -> !) -> Vec<usize> {
    value
        .split(',')
        .map(|t| match t.parse() {
            Ok(n) if n >= 1 => n,
            _ => usage("--tokens is a list of counts ≥ 1"),
        })
        .collect()
}

pub fn distinct(ids: &[i32]) -> usize {
    let mut seen: Vec<i32> = ids.iter().copied().filter(|&e| e >= 0).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

/// Prints "<program>: msg" ("bench: ...", "tune: ...") and exits with status 1.
pub fn die(msg: &str) -> ! {
    eprintln!("{}: {msg}", program());
    std::process::exit(1)
}

/// The example's name: its executable's file name without directory or extension.
fn program() -> String {
    std::env::args()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "example".into())
}

// ---------------------------------------------------------------- the device

pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub start: CudaEvent,
    pub end: CudaEvent,
}

/// Median, spread and shape of one timing: `reps` repeats of `iters` calls each.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub median_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub iters: usize,
    pub reps: usize,
}

impl Timing {
    pub fn json(&self) -> Value {
        json!({
            "median_us": self.median_us, "min_us": self.min_us, "max_us": self.max_us,
            "iters_per_repeat": self.iters, "repeats": self.reps,
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Repeats {
    pub reps: usize,
    /// Device time each repeat should last, at least one call.
    pub target_ms: f64,
}

impl Gpu {
    pub fn new() -> Gpu {
        let ctx = CudaContext::new(0).unwrap_or_else(|e| die(&format!("CUDA device 0: {e:?}")));
        // SAFETY: before any allocation. All work is ordered on one stream and synchronized
        // before the host reads anything; cudarc's per-buffer events would only add syncs
        // (and event records inside graph captures).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().expect("cuStreamCreate");
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = ctx.new_event(timing).expect("cuEventCreate");
        let end = ctx.new_event(timing).expect("cuEventCreate");
        Gpu {
            ctx,
            stream,
            start,
            end,
        }
    }

    /// The stream as the ABI takes it.
    pub fn raw(&self) -> *mut c_void {
        self.stream.cu_stream() as *mut c_void
    }

    pub fn sync(&self) {
        self.stream
            .synchronize()
            .unwrap_or_else(|e| die(&format!("cuStreamSynchronize: {e:?}")));
    }

    pub fn alloc(&self, bytes: usize) -> CudaSlice<u8> {
        // SAFETY: every buffer is written (filled, uploaded or poisoned) before it is read.
        unsafe { self.stream.alloc::<u8>(bytes.max(256)) }
            .unwrap_or_else(|e| die(&format!("cuMemAlloc of {bytes} bytes: {e:?}")))
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) {
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .unwrap_or_else(|e| die(&format!("cuMemcpyDtoDAsync: {e:?}")));
    }

    pub fn memset(&self, dst: u64, byte: u8, bytes: usize) {
        unsafe { result::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }
            .unwrap_or_else(|e| die(&format!("cuMemsetD8Async: {e:?}")));
    }

    /// `body`'s work on the stream, captured into an instantiated graph.
    pub fn capture(&self, body: impl FnOnce()) -> CudaGraph {
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        self.stream
            .begin_capture(mode)
            .unwrap_or_else(|e| die(&format!("cuStreamBeginCapture: {e:?}")));
        body();
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .unwrap_or_else(|e| die(&format!("cuStreamEndCapture / instantiate: {e:?}")))
            .unwrap_or_else(|| die("the capture recorded an empty graph"));
        graph
            .upload()
            .unwrap_or_else(|e| die(&format!("cuGraphUpload: {e:?}")));
        graph
    }

    /// Device milliseconds of the work `f` enqueues, between two events.
    pub fn span_ms(&self, f: impl FnOnce()) -> f64 {
        self.start.record(&self.stream).expect("cuEventRecord");
        f();
        self.end.record(&self.stream).expect("cuEventRecord");
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .unwrap_or_else(|e| die(&format!("the timed work failed: {e:?}")));
        ms as f64
    }

    /// Times `call(set)`, the sets taken in turn (0, 1, …, sets−1, 0, …) across the warm-up,
    /// the pilot, the head starts and the repeats. Every set runs at least once.
    pub fn time(&self, p: Repeats, sets: usize, mut call: impl FnMut(usize)) -> Timing {
        let mut next = 0usize;
        let mut enqueue = |n: usize| {
            for _ in 0..n {
                call(next % sets);
                next += 1;
            }
        };
        enqueue(sets);
        self.sync();
        let pilot_n = sets.min(4);
        let pilot = self.span_ms(|| enqueue(pilot_n)) / pilot_n as f64;
        let iters = ((p.target_ms / pilot).ceil() as usize).clamp(1, MAX_ITERS);
        let head = if pilot < HEAD_START_MS {
            ((HEAD_START_MS / pilot).ceil() as usize).min(iters)
        } else {
            0
        };
        let mut us: Vec<f64> = (0..p.reps)
            .map(|_| {
                enqueue(head);
                self.span_ms(|| enqueue(iters)) * 1e3 / iters as f64
            })
            .collect();
        us.sort_by(f64::total_cmp);
        Timing {
            median_us: us[us.len() / 2],
            min_us: us[0],
            max_us: us[us.len() - 1],
            iters,
            reps: p.reps,
        }
    }
}

pub fn launch(g: &CudaGraph) {
    g.launch()
        .unwrap_or_else(|e| die(&format!("cuGraphLaunch: {e:?}")));
}

// ---------------------------------------------------------------- device buffers

/// A device buffer with the DLPack description the ABI gets.
pub struct DevBuf {
    pub buf: CudaSlice<u8>,
    pub ptr: u64,
    pub dtype: moe_dtype,
    pub shape: Vec<i64>,
}

/// A `moe_tensor` on device 0. The library only reads `shape` (the ABI's pointer is not
/// const), so a shared slice serves.
pub fn tensor_at(ptr: u64, dtype: moe_dtype, shape: &[i64]) -> moe_tensor {
    moe_tensor {
        data: ptr as *mut c_void,
        device: CUDA0,
        ndim: shape.len() as i32,
        dtype,
        shape: shape.as_ptr() as *mut i64,
        strides: null_mut(),
        byte_offset: 0,
    }
}

pub fn as_bytes<T: DeviceRepr>(v: &[T]) -> &[u8] {
    // SAFETY: plain numbers (i32, f32, u16), read as their bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl DevBuf {
    /// Uninitialised; the caller writes it before anything reads it.
    pub fn new(gpu: &Gpu, dtype: moe_dtype, shape: &[i64]) -> DevBuf {
        let bytes = shape.iter().product::<i64>() as usize * dtype.bits as usize / 8;
        let buf = gpu.alloc(bytes);
        let ptr = buf.device_ptr(&gpu.stream).0;
        DevBuf {
            buf,
            ptr,
            dtype,
            shape: shape.to_vec(),
        }
    }

    pub fn upload<T: DeviceRepr>(gpu: &Gpu, dtype: moe_dtype, shape: &[i64], host: &[T]) -> DevBuf {
        let mut b = DevBuf::new(gpu, dtype, shape);
        assert_eq!(as_bytes(host).len(), b.bytes());
        gpu.stream
            .memcpy_htod(as_bytes(host), &mut b.buf)
            .unwrap_or_else(|e| die(&format!("cuMemcpyHtoD: {e:?}")));
        b
    }

    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<i64>() as usize * self.dtype.bits as usize / 8
    }

    pub fn tensor(&self) -> moe_tensor {
        tensor_at(self.ptr, self.dtype, &self.shape)
    }

    /// The contents, after the stream's work.
    pub fn download(&self, gpu: &Gpu) -> Vec<u8> {
        let host = gpu
            .stream
            .clone_dtoh(&self.buf.slice(0..self.bytes()))
            .unwrap_or_else(|e| die(&format!("cuMemcpyDtoH: {e:?}")));
        gpu.sync();
        host
    }
}

/// A 64 MiB block of random bf16 values ~U(−a, a) on the device. Big buffers are filled by
/// copying pieces of it (device to device) from varying offsets: generating gigabytes of
/// random numbers on the host would take longer than the benchmark.
pub struct Pattern {
    pub block: DevBuf,
}

impl Pattern {
    pub fn new(gpu: &Gpu, seed: u64, a: f32) -> Pattern {
        let mut host = vec![0u16; PATTERN_BYTES / 2];
        host.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(c, chunk)| {
                let mut rng = Rng(seed.wrapping_mul(0x1000_0000_01B3) ^ c as u64);
                for v in chunk {
                    *v = bf16::from_f32(rng.uniform(-a, a)).to_bits();
                }
            });
        let n = host.len() as i64;
        Pattern {
            block: DevBuf::upload(gpu, BF16, &[n], &host),
        }
    }

    /// Fills `bytes` bytes at `dst` with pieces of the block; `salt` varies the offsets.
    pub fn fill(&self, gpu: &Gpu, dst: u64, bytes: usize, salt: usize) {
        let window = PATTERN_BYTES / 2;
        let (mut done, mut j) = (0, salt);
        while done < bytes {
            let n = window.min(bytes - done);
            let offset = (j * 97 % 128) * (window / 128);
            gpu.copy(dst + done as u64, self.block.ptr + offset as u64, n);
            done += n;
            j += 1;
        }
    }
}

// ---------------------------------------------------------------- ABI handles

/// The layer's weights on the device: w13 [E, N1, H], w2 [E, H, I], biases [E, N1], [E, H].
pub struct Weights {
    pub w13: DevBuf,
    pub w2: DevBuf,
    pub b13: Option<DevBuf>,
    pub b2: Option<DevBuf>,
}

impl Weights {
    /// Values ~U(−a, a), a = 1/√(the product's reduction length).
    pub fn random(gpu: &Gpu, m: &Model, seed: u64) -> Weights {
        let (e, n1, h, i) = (
            m.experts as i64,
            m.n1() as i64,
            m.hidden as i64,
            m.inter as i64,
        );
        let p13 = Pattern::new(gpu, seed, 1.0 / (m.hidden as f32).sqrt());
        let p2 = Pattern::new(gpu, seed + 1, 1.0 / (m.inter as f32).sqrt());
        let filled = |p: &Pattern, shape: &[i64], salt: usize| {
            let b = DevBuf::new(gpu, BF16, shape);
            p.fill(gpu, b.ptr, b.bytes(), salt);
            b
        };
        let w = Weights {
            w13: filled(&p13, &[e, n1, h], 0),
            w2: filled(&p2, &[e, h, i], 0),
            b13: m.oai.then(|| filled(&p2, &[e, n1], 1)),
            b2: m.oai.then(|| filled(&p2, &[e, h], 2)),
        };
        gpu.sync();
        w
    }

    pub fn bytes(&self) -> usize {
        self.w13.bytes()
            + self.w2.bytes()
            + self.b13.as_ref().map_or(0, DevBuf::bytes)
            + self.b2.as_ref().map_or(0, DevBuf::bytes)
    }
}

pub struct Layer(pub *mut moe_layer);

impl Drop for Layer {
    fn drop(&mut self) {
        unsafe { moe_layer_free(self.0) };
    }
}

pub struct Plan(pub *mut moe_plan);

impl Drop for Plan {
    fn drop(&mut self) {
        unsafe { moe_plan_free(self.0) };
    }
}

impl Layer {
    /// `m`'s layer over the first `local` experts of `w` (all of them, or an EP rank's
    /// share: the values do not matter for timing).
    pub fn new(m: &Model, w: &Weights, local: usize) -> Layer {
        Layer::with_options(m, w, local, &[]).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(1)
        })
    }

    /// The same with backend options (`tile.block_m` = "64", ...); a refused option or
    /// layer comes back as `check`'s line ("moe_layer_create failed: MOE_ERR_...: why").
    pub fn with_options(
        m: &Model,
        w: &Weights,
        local: usize,
        options: &[(&str, String)],
    ) -> Result<Layer, String> {
        let (e, n1, h, i) = (local as i64, m.n1() as i64, m.hidden as i64, m.inter as i64);
        let (s13, s2, sb13, sb2) = ([e, n1, h], [e, h, i], [e, n1], [e, h]);
        let w13 = tensor_at(w.w13.ptr, BF16, &s13);
        let w2 = tensor_at(w.w2.ptr, BF16, &s2);
        let b13 = w.b13.as_ref().map(|b| tensor_at(b.ptr, BF16, &sb13));
        let b2 = w.b2.as_ref().map(|b| tensor_at(b.ptr, BF16, &sb2));
        let opt = |t: &Option<moe_tensor>| t.as_ref().map_or(null(), |t| t as *const _);
        let mut config = null_mut();
        let mut layer = null_mut();
        unsafe {
            check(moe_config_create(&mut config), "moe_config_create");
            check(
                moe_config_set_num_experts(config, m.experts as i64),
                "num_experts",
            );
            check(moe_config_set_num_local_experts(config, e), "local experts");
            check(moe_config_set_top_k(config, m.top_k as i64), "top_k");
            check(moe_config_set_hidden_size(config, h), "hidden_size");
            check(moe_config_set_intermediate_size(config, i), "inter");
            check(moe_config_set_dtype(config, BF16), "dtype");
            check(moe_config_set_device(config, CUDA0), "device");
            if m.oai {
                let act = MOE_ACTIVATION_SWIGLU_OAI;
                check(moe_config_set_activation(config, act), "activation");
                check(moe_config_set_gemm1_alpha(config, 1.702), "gemm1_alpha");
                check(moe_config_set_gemm1_limit(config, 7.0), "gemm1_limit");
                let layout = MOE_GATE_UP_INTERLEAVED;
                check(moe_config_set_gate_up_layout(config, layout), "layout");
            }
            for (key, value) in options {
                let (k, v) = (
                    CString::new(*key).unwrap(),
                    CString::new(value.as_str()).unwrap(),
                );
                if let Err(e) = attempt(
                    moe_config_set_option(config, k.as_ptr(), v.as_ptr()),
                    &format!("option {key}"),
                ) {
                    moe_config_free(config);
                    return Err(e);
                }
            }
            let status = moe_layer_create(config, &w13, &w2, opt(&b13), opt(&b2), &mut layer);
            moe_config_free(config);
            attempt(status, "moe_layer_create")?;
        }
        Ok(Layer(layer))
    }

    /// A workspace for up to `max_tokens` tokens.
    pub fn workspace(&self, gpu: &Gpu, max_tokens: usize) -> DevBuf {
        let mut bytes = 0usize;
        let status = unsafe { moe_workspace_size(self.0, max_tokens as i64, &mut bytes) };
        check(status, "moe_workspace_size");
        DevBuf::new(gpu, U8, &[bytes as i64])
    }

    /// moe_warmup (NVRTC runs here, or the disk cache answers); its wall seconds.
    pub fn warmup(&self, gpu: &Gpu, max_tokens: usize) -> f64 {
        let t = Instant::now();
        check(
            unsafe { moe_warmup(self.0, max_tokens as i64, gpu.raw()) },
            "moe_warmup",
        );
        t.elapsed().as_secs_f64()
    }

    pub fn plan(&self) -> Plan {
        let mut p = null_mut();
        check(
            unsafe { moe_plan_create(self.0, &mut p) },
            "moe_plan_create",
        );
        Plan(p)
    }
}

/// `check` without the exit: Err holds the line `check` would print.
pub fn attempt(s: moe_status, what: &str) -> Result<(), String> {
    if s == moe_status::MOE_OK {
        return Ok(());
    }
    let msg = unsafe { CStr::from_ptr(moe_last_error()) }.to_string_lossy();
    Err(format!("{what} failed: {s:?}: {msg}"))
}

/// Exits with the library's own reason when this machine cannot run CUDA layers; cudarc
/// must not be touched before (it panics where libcuda is missing).
pub fn require_cuda() {
    if unsafe { moe_supports(c"cuda".as_ptr()) } {
        return;
    }
    let mut d = null_mut();
    let status = unsafe { moe_dispatcher_create_contiguous(8, 1, 0, 0, CUDA0, &mut d) };
    let why = if status == moe_status::MOE_OK {
        unsafe { moe_dispatcher_free(d) };
        "the CUDA probe failed".to_string()
    } else {
        unsafe { CStr::from_ptr(moe_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    die(&format!(
        "no CUDA here: moe_supports(\"cuda\") is false ({why}). Run on a GPU machine with FUSEDMOE_NVRTC_PATH set to libnvrtc.so.13."
    ));
}

pub fn driver_version() -> i32 {
    let mut v = 0;
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .expect("cuDriverGetVersion");
    v
}

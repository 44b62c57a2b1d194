#!/usr/bin/env python3
"""Issue 5: our MoE layer next to PyTorch's own ways of computing it, in one process on one GPU.

    python3 examples/python/bench_torch.py [--quick] [--shapes mixtral,qwen3,deepseek,gpt-oss]
        [--tokens 1,16,256] [--reps N] [--json PATH] [--png PATH]

The library is found as the tests find it (fusedmoe.py beside this file): FUSEDMOE_LIB, else
the cargo target directory, else the system loader; the CUDA backend needs FUSEDMOE_NVRTC_PATH
(libnvrtc.so.13). Without torch, a CUDA device or the library's CUDA backend it says why and
exits 0 (1 when FUSEDMOE_REQUIRE_GPU=1, as on the GPU machine's checks).

The shapes, routing, input sets and metrics are examples/bench.rs's (the library alone); here,
per shape and token count M, all bf16 on torch CUDA tensors, side by side:
- ours: moe_prepare + moe_run through fusedmoe.py (Plan.prepare / Plan.run, one workspace),
  CUDA graph replays for M <= 256 (one graph per input set, captured after Layer.warmup),
  direct calls above. Also moe_prepare alone, graph replays.
- torch loop: per expert hit, gather its tokens, x @ w13[e].T (+ b13), the activation,
  @ w2[e].T (+ b2), times the router weight, index_add_ into an fp32 out (cast to bf16 at the
  end). The experts' token counts reach the host once per call (one sync); the shapes depend
  on them, so it cannot be captured: timed eagerly.
- torch grouped_mm: permute the routes by expert (a stable argsort of the flat ids), int32
  offsets (cumsum of the counts, counted on the device), torch._grouped_mm with w13, the
  activation, torch._grouped_mm with w2, unpermute and the weighted sum over k in fp32.
  Captured like ours (M <= 256) when one call runs with torch's sync debug mode set to
  "error" without raising, else timed eagerly; where the call itself fails the row records
  the error and goes on.
Timing: CUDA events around many calls (>= 25 ms, or 10 ms with --quick), the median of the
repeats; input sets rotate between calls. Correctness, on input set 0 before any timing:
every path against a reference (the torch loop at SPEC §2's rounding points: fp32 products of
the bf16 operands, one rounding each for g1, the activation and y·w), and ours also against
the timed torch loop: ||x - ref||_F / ||ref||_F <= 1e-2 (output poisoned with NaN first).
After timing, ours' and the captured grouped_mm graph's outputs are checked again. A failed
check marks the row WRONG (that torch path then leaves the comparison) and the exit status 1.

Per row: µs of each path, the speed-up of ours over the faster (correct) torch path, TB/s
over the weight bytes of the experts hit, TFLOP/s = 2·M·K·(N1·H + H·I), each next to the
ceilings measured at the start of the run: a 1 GiB device-to-device copy (dst.copy_(src),
read + write bytes counted, as bench.rs) and an 8192³ bf16 torch.matmul (cuBLAS).
% roofline = max(TB/s / copy TB/s, TFLOP/s / matmul TFLOP/s), i.e. the floor time over the
measured time. The table comes last on stdout; --json writes every number (rewritten after
each shape); --png plots speed-up and % roofline against M (needs matplotlib).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

ALL_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
QUICK_TOKENS = [1, 16, 64, 256, 1024, 4096]
GRAPH_MAX_TOKENS = 256  # token counts up to this are timed as graph replays
SETS_TARGET_BYTES = 100_000_000  # input sets together: over twice the 50 MB L2 of an H100
SETS_MIN, SETS_MAX, SETS_MEMORY = 4, 16, 4 << 30
COPY_BYTES = 1 << 30
GEMM_SIZE = 8192
HEAD_START_MS = 0.5  # calls shorter than this get a head start of queued calls
MAX_ITERS = 5000
TOLERANCE = 1e-2  # bf16, relative Frobenius error
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


class Model:
    """One layer shape (the same four as examples/bench.rs)."""

    def __init__(self, name, experts, hidden, inter, top_k, shared=False, oai=False):
        self.name, self.experts, self.hidden, self.inter, self.top_k = (
            name, experts, hidden, inter, top_k)
        self.shared = shared  # the last expert is shared: every token's last route, weight 1
        self.oai = oai  # swiglu_oai (alpha 1.702, limit 7.0), interleaved gate/up, bf16 biases

    @property
    def n1(self):
        return 2 * self.inter

    @property
    def activation(self):
        return "swiglu_oai" if self.oai else "silu"

    @property
    def layout(self):
        return "interleaved" if self.oai else "halves"

    def expert_bytes(self):
        """One expert's weights and biases: what a batch that hits it must read."""
        weights = self.n1 * self.hidden + self.hidden * self.inter
        biases = self.n1 + self.hidden if self.oai else 0
        return 2 * (weights + biases)

    def flops(self, routes):
        return 2.0 * routes * (self.n1 * self.hidden + self.hidden * self.inter)

    def set_bytes(self, tokens):
        """hidden and out [M, H] bf16, ids and router weights [M, K] (4 bytes each)."""
        return tokens * (4 * self.hidden + 8 * self.top_k)

    def describe(self):
        return dict(name=self.name, experts=self.experts, hidden=self.hidden,
                    inter=self.inter, top_k=self.top_k, activation=self.activation,
                    shared_expert=self.shared, biases=self.oai, gate_up_layout=self.layout)


MODELS = [
    Model("mixtral", 8, 4096, 14336, 2),
    Model("qwen3", 128, 2048, 768, 8),
    Model("deepseek", 257, 7168, 256, 9, shared=True),
    Model("gpt-oss", 128, 2880, 2880, 4, oai=True),
]


def set_count(nbytes):
    """How many input sets of `nbytes` each to rotate through (bench.rs's rule)."""
    nbytes = max(nbytes, 1)
    want = max(-(-SETS_TARGET_BYTES // nbytes), SETS_MIN)
    return max(min(want, SETS_MAX, SETS_MEMORY // nbytes), 2)


# ---------------------------------------------------------------------------------------------
# Arguments (before any import of torch: --help works without it).


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Our MoE layer (fusedmoe, CUDA) against torch's per-expert loop and "
                    "torch._grouped_mm, bf16, in one process on GPU 0 (issue 5).",
        epilog="env: FUSEDMOE_LIB=/path/libfusedmoe.so (else the cargo target dir), "
               "FUSEDMOE_NVRTC_PATH=/path/libnvrtc.so.13, FUSEDMOE_CACHE_DIR (kernel cache), "
               "FUSEDMOE_REQUIRE_GPU=1 (a skip is a failure)")
    p.add_argument("--quick", action="store_true",
                   help="M in %s; 5 repeats of >= 10 ms (default: M in %s; 7 repeats of "
                        ">= 25 ms)" % (",".join(map(str, QUICK_TOKENS)),
                                       ",".join(map(str, ALL_TOKENS))))
    p.add_argument("--shapes", default=",".join(m.name for m in MODELS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--tokens", help="comma-separated token counts M (overrides --quick's)")
    p.add_argument("--reps", type=int, help="repeats per timing (median taken)")
    p.add_argument("--json", metavar="PATH", help="write every number to PATH")
    p.add_argument("--png", metavar="PATH",
                   help="plot speed-up and %% of roofline against M (needs matplotlib)")
    a = p.parse_args(argv)
    names = {m.name: m for m in MODELS}
    try:
        a.models = [names[s] for s in a.shapes.split(",") if s]
    except KeyError as e:
        p.error("unknown shape %s (known: %s)" % (e, ", ".join(names)))
    if a.tokens:
        try:
            a.tokens = [int(t) for t in a.tokens.split(",") if t]
        except ValueError:
            p.error("--tokens is a list of counts >= 1")
        if not a.tokens or min(a.tokens) < 1:
            p.error("--tokens is a list of counts >= 1")
    else:
        a.tokens = QUICK_TOKENS if a.quick else ALL_TOKENS
    a.target_ms = 10.0 if a.quick else 25.0
    if a.reps is None:
        a.reps = 5 if a.quick else 7
    elif a.reps < 1:
        p.error("--reps is a count >= 1")
    return a


def skip(why):
    """This machine cannot run the benchmark: say why; a failure only where it must run."""
    required = os.environ.get("FUSEDMOE_REQUIRE_GPU") == "1"
    print("bench_torch: %s: %s" % ("error" if required else "skipped", why), file=sys.stderr)
    sys.exit(1 if required else 0)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Everything below runs with torch and fusedmoe imported (main() does it).

torch = None
F = None
fm = None


def load():
    """Imports torch and fusedmoe, or skips with the reason."""
    global torch, F, fm
    try:
        import torch as _torch
        import torch.nn.functional as _F
    except ImportError as e:
        skip("torch is not installed (%s)" % e)
    torch, F = _torch, _F
    if not torch.cuda.is_available():
        skip("torch.cuda is not available on this machine (torch %s, CUDA %s)"
             % (torch.__version__, torch.version.cuda))
    sys.path.insert(0, HERE)
    try:
        import fusedmoe as _fm
    except ImportError as e:  # the library is not there, or of another ABI
        skip(str(e))
    fm = _fm
    if not fm.supports("cuda"):
        try:  # the library's own reason, as bench.rs gives it
            fm.Dispatcher.contiguous(8, 1, 0, 0, device="cuda:0").close()
            why = "the CUDA probe failed"
        except fm.FusedMoEError as e:
            why = e.message
        skip("this fusedmoe build cannot run CUDA layers here: moe_supports('cuda') is "
             "false (%s); set FUSEDMOE_NVRTC_PATH to libnvrtc.so.13" % why)


def grouped_mm_function():
    """torch's grouped GEMM (2-D x 3-D with offsets), or None where this torch has none."""
    if hasattr(torch, "_grouped_mm"):
        return "torch._grouped_mm", torch._grouped_mm
    if hasattr(F, "grouped_mm"):
        return "torch.nn.functional.grouped_mm", F.grouped_mm
    return None, None


class Timing:
    """Median, spread and shape of one timing: `reps` repeats of `iters` calls each."""

    def __init__(self, us, iters, host_us):
        us = sorted(us)
        self.median_us = us[len(us) // 2]
        self.min_us, self.max_us = us[0], us[-1]
        self.iters, self.reps = iters, len(us)
        self.host_us = statistics.median(host_us)  # host time to enqueue one call

    def json(self):
        return dict(median_us=self.median_us, min_us=self.min_us, max_us=self.max_us,
                    iters_per_repeat=self.iters, repeats=self.reps,
                    host_enqueue_us=self.host_us)


class Gpu:
    """One stream (torch's current stream throughout), two timing events."""

    def __init__(self, opts):
        self.opts = opts
        self.device = torch.device("cuda", 0)
        torch.cuda.set_device(self.device)
        self.stream = torch.cuda.Stream(self.device)
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    @property
    def handle(self):
        """The stream as the C ABI takes it (an int, cudaStream_t)."""
        return self.stream.cuda_stream

    def sync(self):
        self.stream.synchronize()

    def span_ms(self, body):
        self.start.record(self.stream)
        t0 = time.perf_counter()
        body()
        host = time.perf_counter() - t0
        self.end.record(self.stream)
        self.end.synchronize()
        return self.start.elapsed_time(self.end), host * 1e3

    def time(self, sets, call):
        """Times call(set), the sets taken in turn (0, 1, ..., sets-1, 0, ...) across the
        warm-up, the pilot, the head starts and the repeats (bench.rs's Gpu::time)."""
        state = {"next": 0}

        def enqueue(n):
            for _ in range(n):
                call(state["next"] % sets)
                state["next"] += 1

        enqueue(sets)
        self.sync()
        pilot_n = min(sets, 4)
        pilot = max(self.span_ms(lambda: enqueue(pilot_n))[0] / pilot_n, 1e-4)
        iters = min(max(math.ceil(self.opts.target_ms / pilot), 1), MAX_ITERS)
        head = min(math.ceil(HEAD_START_MS / pilot), iters) if pilot < HEAD_START_MS else 0
        us, host = [], []
        for _ in range(self.opts.reps):
            enqueue(head)
            ms, host_ms = self.span_ms(lambda: enqueue(iters))
            us.append(ms * 1e3 / iters)
            host.append(host_ms * 1e3 / iters)
        return Timing(us, iters, host)

    def capture(self, sets, body):
        """[(graph, result)]: body(i)'s work on the stream captured into a CUDA graph, one
        per set i. The graphs share a memory pool of their own: they replay one at a time on
        this stream, and the outputs a caller keeps stay allocated."""
        pool = torch.cuda.graph_pool_handle()
        captured = []
        self.sync()
        for i in range(sets):
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                result = body(i)
            finally:
                graph.capture_end()
            captured.append((graph, result))
        return captured


def rel_error(got, want):
    """||got - want||_F / ||want||_F in fp32; NaN anywhere gives NaN, which fails any bound."""
    diff = (got.float() - want.float()).norm()
    return (diff / want.float().norm()).item()


def finite_and_nonzero(t):
    return bool(torch.isfinite(t).all().item()) and bool((t != 0).any().item())


# ---------------------------------------------------------------------------------------------
# The layer's weights and input sets.


class Weights:
    """w13 [E, N1, H], w2 [E, H, I] bf16 ~ N(0, 1/reduction length), biases ~ N(0, 0.1²) for
    gpt-oss; filled an expert at a time (no full-size fp32 temporary)."""

    def __init__(self, gpu, m, seed):
        dev, bf16 = gpu.device, torch.bfloat16
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed)
        self.w13 = torch.empty(m.experts, m.n1, m.hidden, dtype=bf16, device=dev)
        self.w2 = torch.empty(m.experts, m.hidden, m.inter, dtype=bf16, device=dev)
        for e in range(m.experts):
            self.w13[e].normal_(0.0, m.hidden ** -0.5, generator=gen)
            self.w2[e].normal_(0.0, m.inter ** -0.5, generator=gen)
        self.b13 = self.b2 = None
        if m.oai:
            self.b13 = torch.empty(m.experts, m.n1, dtype=bf16, device=dev).normal_(
                0.0, 0.1, generator=gen)
            self.b2 = torch.empty(m.experts, m.hidden, dtype=bf16, device=dev).normal_(
                0.0, 0.1, generator=gen)
        # grouped_mm's operands: [E, H, N1] and [E, I, H], views of the same memory
        self.w13_t = self.w13.transpose(1, 2)
        self.w2_t = self.w2.transpose(1, 2)
        gpu.sync()

    def bytes(self):
        return sum(t.numel() * t.element_size()
                   for t in (self.w13, self.w2, self.b13, self.b2) if t is not None)


def route(m, gen, tokens, device):
    """Softmax top-k over random logits (torch.randn, topk, softmax over the top k); with a
    shared expert, top-(K-1) of the routed experts and the shared id last with weight 1.
    Returns int64 ids (topk's own) and f32 weights, [M, K]."""
    routed = m.experts - 1 if m.shared else m.experts
    k = m.top_k - 1 if m.shared else m.top_k
    logits = torch.randn(tokens, routed, generator=gen, device=device, dtype=torch.float32)
    top, ids = torch.topk(logits, k, dim=1)
    weights = torch.softmax(top, dim=1)
    if m.shared:
        ids = torch.cat([ids, torch.full((tokens, 1), m.experts - 1, dtype=ids.dtype,
                                         device=device)], dim=1)
        weights = torch.cat([weights, torch.ones(tokens, 1, device=device)], dim=1)
    return ids.contiguous(), weights.contiguous()


class InputSet:
    """One batch: hidden [M, H] bf16, ids [M, K] (int32 for ours, int64 for torch), router
    weights [M, K] f32, our out [M, H] (NaN-poisoned) and our plan."""

    def __init__(self, gpu, m, layer, gen, tokens):
        dev = gpu.device
        self.ids64, self.weights = route(m, gen, tokens, dev)
        self.ids32 = self.ids64.to(torch.int32)
        self.hidden = torch.empty(tokens, m.hidden, dtype=torch.bfloat16, device=dev)
        self.hidden.uniform_(-1.0, 1.0, generator=gen)
        self.out = torch.full((tokens, m.hidden), float("nan"), dtype=torch.bfloat16,
                              device=dev)
        self.plan = fm.Plan(layer)
        self.distinct = int(torch.unique(self.ids64).numel())
        self.routes = int((self.ids64 >= 0).sum().item())


# ---------------------------------------------------------------------------------------------
# The three ways to compute a layer.


def act_torch(m, g):
    """SPEC §3 on GEMM1's output [rows, N1], in g's dtype (bf16, as torch models write it)."""
    if not m.oai:  # gated silu, halves
        return F.silu(g[:, :m.inter]) * g[:, m.inter:]
    gate = g[:, 0::2].clamp(max=SWIGLU_LIMIT)  # swiglu_oai, interleaved
    up = g[:, 1::2].clamp(min=-SWIGLU_LIMIT, max=SWIGLU_LIMIT)
    return gate * torch.sigmoid(gate * SWIGLU_ALPHA) * (up + 1)


def torch_loop(m, w, s, exact=False):
    """Per expert hit: its tokens, two GEMMs, the activation, the router weight, index_add_
    into an fp32 out. `exact`: the reference the checks use (not timed), SPEC §2's rounding
    points: fp32 products of the bf16 operands, one rounding each for g1, act, and y·w."""
    tokens, k = s.ids64.shape
    flat = s.ids64.reshape(-1)
    order = torch.argsort(flat, stable=True)  # routes grouped by expert, in route order
    counts = torch.bincount(flat, minlength=m.experts).tolist()  # the host sync
    token_of = order // k
    router = s.weights.reshape(-1)
    out = torch.zeros(tokens, m.hidden, dtype=torch.float32, device=s.hidden.device)
    bf16 = torch.bfloat16
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        routes = order[start:start + count]
        rows = token_of[start:start + count]
        start += count
        x = s.hidden.index_select(0, rows)
        r = router.index_select(0, routes).unsqueeze(1)
        if exact:
            g = x.float() @ w.w13[e].float().t()
            if w.b13 is not None:
                g += w.b13[e].float()
            a = act_torch(m, g.to(bf16).float()).to(bf16)
            y = a.float() @ w.w2[e].float().t()
            if w.b2 is not None:
                y += w.b2[e].float()
            y = (y * r).to(bf16).float()
        else:
            g = x @ w.w13[e].t()
            if w.b13 is not None:
                g = g + w.b13[e]
            y = act_torch(m, g) @ w.w2[e].t()
            if w.b2 is not None:
                y = y + w.b2[e]
            y = y.float() * r
        out.index_add_(0, rows, y)
    return out.to(bf16)


def torch_grouped(m, w, s, grouped_mm):
    """Permute by expert, two grouped GEMMs around the activation, unpermute, weighted sum.
    No host sync: the counts are a scatter on the device (bincount would read its max)."""
    tokens, k = s.ids64.shape
    flat = s.ids64.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    counts = torch.zeros(m.experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = s.hidden.index_select(0, order // k)  # [M*K, H], by expert
    g = grouped_mm(x, w.w13_t, offs=offs)  # [M*K, N1]
    if w.b13 is not None:
        g = g + w.b13.index_select(0, sorted_ids)
    a = act_torch(m, g).contiguous()
    y = grouped_mm(a, w.w2_t, offs=offs)  # [M*K, H]
    if w.b2 is not None:
        y = y + w.b2.index_select(0, sorted_ids)
    routes = torch.empty_like(y).index_copy_(0, order, y)  # back to route order m*K + k
    out = (routes.view(tokens, k, m.hidden).float() * s.weights.unsqueeze(2)).sum(1)
    return out.to(torch.bfloat16)


def make_layer(gpu, m, w):
    config = fm.Config(num_experts=m.experts, top_k=m.top_k, hidden_size=m.hidden,
                       intermediate_size=m.inter, dtype="bf16", device=str(gpu.device))
    with config:
        if m.oai:
            config.activation = "swiglu_oai"
            config.gemm1_alpha = SWIGLU_ALPHA
            config.gemm1_limit = SWIGLU_LIMIT
            config.gate_up_layout = "interleaved"
        return fm.Layer(config, w.w13, w.w2, w.b13, w.b2)


# ---------------------------------------------------------------------------------------------
# One shape.


class Ceilings:
    def __init__(self, copy, copy_tbs, gemm, gemm_tflops):
        self.copy, self.copy_tbs, self.gemm, self.gemm_tflops = copy, copy_tbs, gemm, gemm_tflops

    def json(self):
        return dict(
            copy=dict(bytes_per_copy=COPY_BYTES, counted_bytes=2 * COPY_BYTES,
                      convention="read + write", how="dst.copy_(src), uint8",
                      tb_per_s=self.copy_tbs, timing=self.copy.json()),
            gemm=dict(m=GEMM_SIZE, n=GEMM_SIZE, k=GEMM_SIZE, dtype="bf16",
                      how="torch.matmul(a, b, out=c), random data",
                      tflop_per_s=self.gemm_tflops, timing=self.gemm.json()))


def measure_ceilings(gpu):
    dev = gpu.device
    src = torch.full((COPY_BYTES,), 0x3C, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy = gpu.time(1, lambda _: dst.copy_(src))
    src = dst = None  # freed before the matmul's operands are made
    gen = torch.Generator(device=dev)
    gen.manual_seed(5)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=torch.bfloat16, device=dev, generator=gen)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, dtype=torch.bfloat16, device=dev, generator=gen)
    c = torch.empty_like(a)
    gemm = gpu.time(1, lambda _: torch.matmul(a, b, out=c))
    a = b = c = None
    torch.cuda.empty_cache()
    return Ceilings(copy, 2.0 * COPY_BYTES / (copy.median_us * 1e-6) / 1e12, gemm,
                    2.0 * GEMM_SIZE ** 3 / (gemm.median_us * 1e-6) / 1e12)


def rates(m, row, time_us, ceilings):
    """TB/s, TFLOP/s and their % of the ceilings, for one path's time."""
    if time_us is None:
        return {}
    tbs = row["weight_bytes"] / (time_us * 1e-6) / 1e12
    tflops = m.flops(row["routes"]) / (time_us * 1e-6) / 1e12
    pct_copy = 100.0 * tbs / ceilings.copy_tbs
    pct_gemm = 100.0 * tflops / ceilings.gemm_tflops
    return dict(tb_per_s=tbs, pct_copy_bw=pct_copy, tflop_per_s=tflops, pct_gemm=pct_gemm,
                pct_roofline=max(pct_copy, pct_gemm))


def error_text(e):
    text = "%s: %s" % (type(e).__name__, e)
    return text if len(text) <= 2000 else text[:2000] + " ..."


def bench_row(gpu, m, w, layer, ws, tokens, ceilings, grouped):
    """One shape at one token count: every path, its checks and its timings."""
    graph = tokens <= GRAPH_MAX_TOKENS
    n = set_count(m.set_bytes(tokens))
    gen = torch.Generator(device=gpu.device)
    gen.manual_seed(1000 + tokens)
    sets = [InputSet(gpu, m, layer, gen, tokens) for _ in range(n)]
    gpu.sync()
    distinct = sum(s.distinct for s in sets) / n
    row = dict(shape=m.name, tokens=tokens, routes=sets[0].routes, input_sets=n,
               distinct_experts=distinct, weight_bytes=distinct * m.expert_bytes(),
               flops=m.flops(sets[0].routes), problems=[])
    h = gpu.handle

    def ours(i):
        s = sets[i]
        s.plan.prepare(s.ids32, ws, h)
        s.plan.run(s.hidden, s.weights, s.out, h)

    def prepare(i):
        s = sets[i]
        s.plan.prepare(s.ids32, ws, h)

    # -- the checks, on input set 0, before anything is timed: every path against the
    # reference (the loop at SPEC §2's rounding points), ours also against the timed loop
    want = torch_loop(m, w, sets[0], exact=True)
    loop = torch_loop(m, w, sets[0])
    ours(0)
    gpu.sync()

    def check(key, what, got, **extra):
        err = rel_error(got, want)
        ok = err <= TOLERANCE and finite_and_nonzero(got)
        row[key].update(rel_error=err, ok=ok, **extra)
        if not ok:
            row["problems"].append("%s: relative error %.3g against the reference "
                                   "(tolerance %g)" % (what, err, TOLERANCE))

    row["ours"] = dict(tile=sets[0].plan.tile_config._asdict())
    row["torch_loop"] = {}
    check("torch_loop", "torch loop", loop)
    check("ours", "ours", sets[0].out, rel_error_vs_loop=rel_error(sets[0].out, loop))
    if not row["ours"]["rel_error_vs_loop"] <= TOLERANCE:
        row["ours"]["ok"] = False
        row["problems"].append("ours vs the torch loop: relative error %.3g (tolerance %g)"
                               % (row["ours"]["rel_error_vs_loop"], TOLERANCE))
    del loop
    gname, gfn = grouped
    row["torch_grouped_mm"] = dict(function=gname)
    if gfn is not None:
        try:
            got = torch_grouped(m, w, sets[0], gfn)
            gpu.sync()
            check("torch_grouped_mm", "torch grouped_mm", got)
            del got
        except Exception as e:  # noqa: BLE001 (any failure of torch's call: record, go on)
            row["torch_grouped_mm"].update(error=error_text(e), ok=False)
            torch.cuda.synchronize()
    else:
        row["torch_grouped_mm"].update(error="this torch has no grouped GEMM", ok=False)

    # -- ours
    if graph:
        graphs = [c[0] for c in gpu.capture(n, ours)]
        t = gpu.time(n, lambda i: graphs[i].replay())
        graphs = None
    else:
        t = gpu.time(n, ours)
    gpu.sync()
    row["ours"].update(timed_as="graph replay, one graph per input set" if graph
                       else "direct calls", time_us=t.median_us, timing=t.json(),
                       **rates(m, row, t.median_us, ceilings))
    # what was timed: set 0's out holds its last timed call; every set's out was written
    err = rel_error(sets[0].out, want)
    row["ours"]["rel_error_timed_output"] = err
    written = all(finite_and_nonzero(s.out) for s in sets)
    if not err <= TOLERANCE or not written:
        row["ours"]["ok"] = False
        row["problems"].append("ours, timed output: relative error %.3g, every set written: %s"
                               % (err, written))
    graphs = [c[0] for c in gpu.capture(n, prepare)]
    t = gpu.time(n, lambda i: graphs[i].replay())
    graphs = None
    row["prepare"] = dict(timed_as="graph replay, one graph per input set",
                          time_us=t.median_us, timing=t.json())

    # -- torch, per-expert loop (eager: shapes depend on the routing)
    t = gpu.time(n, lambda i: torch_loop(m, w, sets[i]))
    row["torch_loop"].update(timed_as="eager (one host sync per call for the expert counts)",
                             time_us=t.median_us, timing=t.json(),
                             **rates(m, row, t.median_us, ceilings))

    # -- torch, grouped_mm
    g = row["torch_grouped_mm"]
    if gfn is not None and "error" not in g:
        try:
            time_grouped(gpu, m, w, sets, gfn, graph, want, row)
            g.update(rates(m, row, g["time_us"], ceilings))
        except Exception as e:  # noqa: BLE001
            g.update(error="timing: " + error_text(e), ok=False, time_us=None)
            torch.cuda.synchronize()

    # -- the comparison: ours over the faster torch path that computed the right thing
    torch_paths = [(name, row[key]["time_us"]) for name, key in
                   (("loop", "torch_loop"), ("grouped_mm", "torch_grouped_mm"))
                   if row[key].get("ok") and row[key].get("time_us")]
    if torch_paths:
        name, best = min(torch_paths, key=lambda p: p[1])
        row.update(faster_torch=name, faster_torch_us=best,
                   speedup=best / row["ours"]["time_us"])
    else:
        row.update(faster_torch=None, faster_torch_us=None, speedup=None)
    for s in sets:
        s.plan.close()
    return row


def time_grouped(gpu, m, w, sets, gfn, graph, want, row):
    """Graph replays (M <= 256) if a call makes no host sync and captures; else eager."""
    g = row["torch_grouped_mm"]
    call = lambda i: torch_grouped(m, w, sets[i], gfn)  # noqa: E731
    how = "eager"
    if graph:
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(0)
            sync_free = True
        except RuntimeError as e:
            sync_free = False
            g["not_captured_because"] = "a call synchronizes: " + error_text(e)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        gpu.sync()
        if sync_free:
            try:
                captured = gpu.capture(len(sets), call)
                how = "graph"
            except Exception as e:  # noqa: BLE001
                g["not_captured_because"] = "capture failed: " + error_text(e)
                torch.cuda.synchronize()
    if how == "graph":
        graphs = [c[0] for c in captured]
        t = gpu.time(len(sets), lambda i: graphs[i].replay())
        graphs[0].replay()  # its output is set 0's: checked like ours
        gpu.sync()
        err = rel_error(captured[0][1], want)
        g["rel_error_replayed_output"] = err
        if not err <= TOLERANCE:
            g["ok"] = False
            row["problems"].append("torch grouped_mm, replayed graph: relative error %.3g "
                                   "against the reference" % err)
        del graphs, captured
        g["timed_as"] = "graph replay, one graph per input set"
    else:
        t = gpu.time(len(sets), call)
        g["timed_as"] = "eager" + (" (M <= %d: not capturable)" % GRAPH_MAX_TOKENS
                                   if graph else " (direct calls)")
    g.update(time_us=t.median_us, timing=t.json())


def bench_model(gpu, opts, m, ceilings, grouped):
    t0 = time.perf_counter()
    w = Weights(gpu, m, seed=7)
    max_tokens = max(opts.tokens)
    layer = make_layer(gpu, m, w)
    ws = torch.empty(layer.workspace_size(max_tokens), dtype=torch.uint8, device=gpu.device)
    t1 = time.perf_counter()
    layer.warmup(max_tokens, gpu.handle)
    gpu.sync()
    warm = time.perf_counter() - t1
    log("%s: weights %.2f GB, workspace %.2f GB for M <= %d; ready in %.1f s (warmup %.1f s)"
        % (m.name, w.bytes() / 1e9, ws.numel() / 1e9, max_tokens, time.perf_counter() - t0,
           warm))
    rows = []
    for tokens in opts.tokens:
        t = time.perf_counter()
        try:
            row = bench_row(gpu, m, w, layer, ws, tokens, ceilings, grouped)
        except Exception as e:  # noqa: BLE001 (record it, go on while the device works)
            row = dict(shape=m.name, tokens=tokens, problems=["row failed: " + error_text(e)])
            torch.cuda.synchronize()  # raises where the context is lost: then nothing goes on
            torch.cuda.empty_cache()
        rows.append(row)
        log("  M=%d: %s (%.1f s)" % (tokens, row_summary(row), time.perf_counter() - t))
        for p in row["problems"]:
            log("    WRONG: " + p)
    layer.close()
    del layer, ws, w
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return rows


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def row_summary(row):
    if "ours" not in row or "time_us" not in row.get("ours", {}):
        return "failed"
    g = row["torch_grouped_mm"]
    return ("ours %.1f µs (err %.1e, vs loop %.1e), prepare %.1f µs, loop %.1f µs, "
            "grouped_mm %s, speed-up %s" % (
                row["ours"]["time_us"], row["ours"]["rel_error"],
                row["ours"]["rel_error_vs_loop"], row["prepare"]["time_us"],
                row["torch_loop"]["time_us"],
                             ("%.1f µs" % g["time_us"]) if g.get("time_us") else
                             "failed: " + g.get("error", "?")[:120],
                             fmt(row["speedup"], ".2f")))


# ---------------------------------------------------------------------------------------------
# Output: the table, the JSON file, the plot.


def us(path):
    """A path's median µs for the table, starred where the host could not keep up."""
    if not path.get("time_us"):
        return "–"
    host_bound = path["timing"]["host_enqueue_us"] >= 0.9 * path["time_us"]
    return "%.1f%s" % (path["time_us"], "*" if host_bound else "")


def print_table(report):
    c = report["ceilings"]
    print("\n%s; torch %s (CUDA %s); fusedmoe %s; bf16; µs per call, median of the repeats"
          % (report["device"], report["torch_version"], report["torch_cuda"],
             report["fusedmoe_version"]))
    print("ceilings: copy %.2f TB/s (dst.copy_(src) 1 GiB, read + write bytes); "
          "cuBLAS bf16 %.0f TFLOP/s (torch.matmul %d³)"
          % (c["copy"]["tb_per_s"], c["gemm"]["tflop_per_s"], GEMM_SIZE))
    print("ours: graph replay for M ≤ %d, direct above; loop: eager; grouped: %s; speed-up = "
          "faster correct torch path / ours; TB/s, TFLOP/s, %% copy, %% cuBLAS, %% roofline "
          "are ours; * = host-bound (enqueuing a call took ≥ 90 %% of its device time)"
          % (GRAPH_MAX_TOKENS, report["grouped_mm"] or "not in this torch"))
    print("err = ‖x − ref‖/‖ref‖ on input set 0 (tolerance %g), ref = the torch loop at the "
          "SPEC's rounding points (fp32 products); ours/loop = ours against the timed loop"
          % TOLERANCE)
    print("| shape | M | ours µs | loop µs | grouped µs | grouped as | speed-up | vs | experts "
          "hit | weights GB | TB/s | % copy | TFLOP/s | % cuBLAS | % roofline | prepare µs "
          "| err ours | err ours/loop | err loop | err grouped | check |")
    print("|" + "---|" * 21)
    for r in report["rows"]:
        if "time_us" not in r.get("ours", {}):
            print("| %s | %d | failed: %s |" % (r["shape"], r["tokens"],
                                                "; ".join(r["problems"])[:200]))
            continue
        o, lp, g = r["ours"], r["torch_loop"], r["torch_grouped_mm"]
        gas = g.get("timed_as", "").split(" ")[0] if g.get("time_us") else (
            "error" if "error" in g else "–")
        speedup = "%.2f×" % r["speedup"] if r["speedup"] else "–"
        print("| %s | %d | %s | %s | %s | %s | %s | %s | %.1f | %.3f | %.2f | %.0f %% | "
              "%.1f | %.0f %% | %.0f %% | %.1f | %.1e | %.1e | %.1e | %s | %s |" % (
                  r["shape"], r["tokens"], us(o), us(lp), us(g), gas, speedup,
                  r["faster_torch"] or "–",
                  r["distinct_experts"], r["weight_bytes"] / 1e9, o["tb_per_s"],
                  o["pct_copy_bw"], o["tflop_per_s"], o["pct_gemm"], o["pct_roofline"],
                  r["prepare"]["time_us"], o["rel_error"], o["rel_error_vs_loop"],
                  lp["rel_error"], fmt(g.get("rel_error"), ".1e"),
                  "ok" if not r["problems"] else "WRONG"))
    errors = sorted({r["torch_grouped_mm"]["error"] for r in report["rows"]
                     if "error" in r.get("torch_grouped_mm", {})})
    for e in errors:
        print("grouped_mm error: " + e[:400])
    notes = sorted({r["torch_grouped_mm"]["not_captured_because"] for r in report["rows"]
                    if "not_captured_because" in r.get("torch_grouped_mm", {})})
    for n in notes:
        print("grouped_mm timed eagerly at M ≤ %d: %s" % (GRAPH_MAX_TOKENS, n[:400]))


def save_json(path, report):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)


def plot(path, report):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        log("--png: matplotlib is not installed here (%s); no plot written" % e)
        return
    rows = [r for r in report["rows"] if "time_us" in r.get("ours", {})]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, shape in enumerate(shapes):
        mine = [r for r in rows if r["shape"] == shape]
        col = colors[i % len(colors)]
        pts = [(r["tokens"], r["speedup"]) for r in mine if r["speedup"]]
        if pts:
            left.plot(*zip(*pts), "o-", color=col, label=shape)
        right.plot([r["tokens"] for r in mine], [r["ours"]["pct_roofline"] for r in mine],
                   "o-", color=col, label="%s, ours" % shape)
        best = []
        for r in mine:
            key = {"loop": "torch_loop", "grouped_mm": "torch_grouped_mm"}.get(
                r["faster_torch"])
            if key and "pct_roofline" in r[key]:
                best.append((r["tokens"], r[key]["pct_roofline"]))
        if best:
            right.plot(*zip(*best), "s--", color=col, alpha=0.6,
                       label="%s, faster torch" % shape)
    ticks = sorted({r["tokens"] for r in rows})
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("tokens M")
        ax.grid(True, alpha=0.3)
    left.axhline(1.0, color="black", lw=1, ls="--", label="1.0× (issue 5: at least)")
    left.axhline(1.5, color="gray", lw=1, ls=":", label="1.5× (goal)")
    left.set_yscale("log", base=2)
    left.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: "%g×" % v))
    left.set_ylabel("speed-up: faster torch path / ours")
    left.set_title("ours vs the faster of the torch loop and grouped_mm")
    left.legend(fontsize=8)
    right.axhline(80, color="gray", lw=1, ls=":", label="80 % (decode target)")
    right.set_ylabel("% of roofline = max(% copy BW, % cuBLAS rate)")
    right.set_title("roofline: copy %.2f TB/s, cuBLAS bf16 %.0f TFLOP/s (same run)"
                    % (report["ceilings"]["copy"]["tb_per_s"],
                       report["ceilings"]["gemm"]["tflop_per_s"]))
    right.set_ylim(0, max([105.0] + [1.05 * max(ln.get_ydata()) for ln in right.lines
                                     if len(ln.get_ydata())]))
    right.legend(fontsize=7, ncol=2)
    fig.suptitle("%s, bf16 MoE layers: fusedmoe vs torch (bench_torch.py%s)"
                 % (report["device"], " --quick" if report["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log("plot: " + path)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    opts = parse_args(argv)
    load()
    wall = time.perf_counter()
    gpu = Gpu(opts)
    torch.set_float32_matmul_precision("highest")  # the reference's fp32 products: no TF32
    grouped = grouped_mm_function()
    props = torch.cuda.get_device_properties(gpu.device)
    report = dict(
        device=torch.cuda.get_device_name(gpu.device), sm_count=props.multi_processor_count,
        compute_capability="%d.%d" % (props.major, props.minor),
        torch_version=torch.__version__, torch_cuda=torch.version.cuda,
        fusedmoe_version=fm.version(), library=fm.lib._name, grouped_mm=grouped[0],
        bf16_reduced_precision_reduction=(
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction),
        dtype="bf16", quick=opts.quick, tokens=opts.tokens, reps=opts.reps,
        target_ms_per_repeat=opts.target_ms, tolerance=TOLERANCE,
        tile_config_env=os.environ.get("FUSEDMOE_TILE_CONFIG"),
        shapes=[m.describe() for m in opts.models], rows=[])
    log("%s (sm_%s, %d SMs); torch %s, CUDA %s; fusedmoe %s (%s); grouped GEMM: %s"
        % (report["device"], report["compute_capability"].replace(".", ""),
           report["sm_count"], report["torch_version"], report["torch_cuda"],
           report["fusedmoe_version"], report["library"], grouped[0] or "none"))
    with torch.cuda.stream(gpu.stream):
        ceilings = measure_ceilings(gpu)
        report["ceilings"] = ceilings.json()
        log("ceilings: copy %.2f TB/s (read + write), cuBLAS bf16 %.0f TFLOP/s"
            % (ceilings.copy_tbs, ceilings.gemm_tflops))
        try:
            for m in opts.models:
                report["rows"].extend(bench_model(gpu, opts, m, ceilings, grouped))
                report["wall_s"] = time.perf_counter() - wall
                if opts.json:
                    save_json(opts.json, report)  # a later failure keeps what was measured
        except BaseException:
            if report["rows"]:  # what was measured before it, then the failure itself
                print_table(report)
            raise
    if opts.png:
        plot(opts.png, report)
    print_table(report)
    wrong = [r for r in report["rows"] if r["problems"]]
    print("total %.0f s; %s" % (time.perf_counter() - wall,
                                "%d row(s) WRONG (see above)" % len(wrong) if wrong
                                else "every check passed"))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())

"""The Python host on PyTorch: torch tensors through __dlpack__ on the CPU (f32, bf16) against a
float64 reference; where this build runs CUDA, torch CUDA tensors on torch's current stream and
inside a CUDA graph, against the CPU result."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: these tests need it")

import fusedmoe as fm  # noqa: E402  (after the skip: without torch there is nothing to test)
import moe_reference as reference  # noqa: E402

SIZES = dict(num_experts=4, top_k=2, hidden_size=64, intermediate_size=32)
TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"f32": 1e-5, "bf16": 1e-2}


def round_bf16(x):
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()


ROUNDING = {"f32": reference.no_rounding, "bf16": round_bf16}


def to_torch(array, dtype, device):
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def random_weights(dtype, device="cpu", seed=0):
    """w13, w2 and both biases; never zeros."""
    rng = np.random.default_rng(seed)
    experts, hidden, inter = SIZES["num_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    as_layer = lambda a: to_torch(a, TORCH_DTYPES[dtype], device)
    return dict(
        w13=as_layer(rng.uniform(-1, 1, (experts, 2 * inter, hidden)) / np.sqrt(hidden)),
        w2=as_layer(rng.uniform(-1, 1, (experts, hidden, inter)) / np.sqrt(inter)),
        b13=as_layer(rng.uniform(-0.5, 0.5, (experts, 2 * inter))),
        b2=as_layer(rng.uniform(-0.5, 0.5, (experts, hidden))),
    )


def random_batch(dtype, device="cpu", tokens=7, seed=1):
    """hidden, topk_ids (every third token drops a route) and f32 topk_weights."""
    rng = np.random.default_rng(seed)
    experts, top_k = SIZES["num_experts"], SIZES["top_k"]
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]
    ids[::3, -1] = -1
    return dict(
        hidden=to_torch(rng.uniform(-1, 1, (tokens, SIZES["hidden_size"])), TORCH_DTYPES[dtype],
                        device),
        topk_ids=to_torch(ids, torch.int32, device),
        topk_weights=to_torch(rng.uniform(0.1, 1.0, (tokens, top_k)), torch.float32, device),
    )


def make_layer(weights, dtype, device="cpu"):
    config = fm.Config(dtype=dtype, device=device, **SIZES)
    return fm.Layer(config, weights["w13"], weights["w2"], weights["b13"], weights["b2"])


def poisoned_output(batch):
    return torch.full_like(batch["hidden"], float("nan"))


def forward(layer, batch, out):
    return layer.forward(batch["hidden"], batch["topk_ids"], batch["topk_weights"], out=out)


def expected(weights, batch, dtype):
    as_f64 = {name: t.to("cpu", torch.float64).numpy() for name, t in {**weights, **batch}.items()}
    as_f64["topk_ids"] = batch["topk_ids"].cpu().numpy()
    return reference.moe(**as_f64, round_to=ROUNDING[dtype])


def relative_error(got, want):
    return reference.relative_error(got.to("cpu", torch.float64).numpy(), want)


# ---------------------------------------------------------------------------------------------
# CPU.


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cpu_layer_on_torch_tensors_matches_reference_in_place(dtype):
    weights, batch = random_weights(dtype), random_batch(dtype)
    out = poisoned_output(batch)
    address = out.data_ptr()
    with make_layer(weights, dtype) as layer:
        assert forward(layer, batch, out) is out
    assert out.data_ptr() == address
    assert relative_error(out, expected(weights, batch, dtype)) <= TOLERANCE[dtype]


def test_forward_allocates_a_torch_output_like_hidden():
    weights, batch = random_weights("bf16"), random_batch("bf16")
    with make_layer(weights, "bf16") as layer:
        out = forward(layer, batch, None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert relative_error(out, expected(weights, batch, "bf16")) <= TOLERANCE["bf16"]


# ---------------------------------------------------------------------------------------------
# CUDA: on torch's current stream, and captured in a CUDA graph.


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch.cuda is not available on this machine")
    if not fm.supports("cuda"):
        pytest.skip("this fusedmoe build has no CUDA backend (moe_supports('cuda') is false)")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_result(weights, batch, dtype):
    """The CPU layer's output for CUDA (or CPU) tensors, which every CUDA run must match."""
    cpu = lambda tensors: {name: t.cpu() for name, t in tensors.items()}
    weights, batch = cpu(weights), cpu(batch)
    with make_layer(weights, dtype) as layer:
        return forward(layer, batch, poisoned_output(batch))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cuda_layer_runs_on_torch_current_stream_and_matches_cpu(cuda, dtype):
    weights, batch = random_weights(dtype, cuda), random_batch(dtype, cuda)
    want = cpu_result(weights, batch, dtype)
    side = torch.cuda.Stream(cuda)
    side.wait_stream(torch.cuda.current_stream(cuda))  # the inputs were written on that one
    with make_layer(weights, dtype, cuda) as layer, torch.cuda.stream(side):
        out = poisoned_output(batch)
        forward(layer, batch, out)  # prepare and run on `side`, torch's current stream here
        side.synchronize()
    assert relative_error(out, want.double().numpy()) <= TOLERANCE[dtype]
    assert relative_error(out, expected(weights, batch, dtype)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cuda_layer_replays_in_a_cuda_graph_and_matches_cpu(cuda, dtype):
    weights, static = random_weights(dtype, cuda), random_batch(dtype, cuda, seed=1)
    out = poisoned_output(static)
    with make_layer(weights, dtype, cuda) as layer:
        # Warm up outside the capture: kernels compile and the workspace is allocated on first
        # use, neither of which a capture allows.
        side = torch.cuda.Stream(cuda)
        side.wait_stream(torch.cuda.current_stream(cuda))
        with torch.cuda.stream(side):
            forward(layer, static, out)
        torch.cuda.current_stream(cuda).wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward(layer, static, out)

        fresh = random_batch(dtype, cuda, seed=2)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize(cuda)
    want = cpu_result(weights, fresh, dtype)
    assert relative_error(out, want.double().numpy()) <= TOLERANCE[dtype]
    assert relative_error(out, expected(weights, fresh, dtype)) <= TOLERANCE[dtype]


# ---------------------------------------------------------------------------------------------
# LoRA on CUDA (SPEC §7): a wrapper over a CUDA layer against the same wrapper over the CPU
# layer (tests/lora.rs and test_lora.py check that one against float64).


def random_adapters(device, seed=3, max_rank=8):
    """Three bf16 adapters of ranks 8, 3 (zero padded, shared outer) and 8, as set_slot takes
    them, with their scalings."""
    rng = np.random.default_rng(seed)
    e, h, i = SIZES["num_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    as_bf16 = lambda a: to_torch(a, torch.bfloat16, device)
    adapters = []
    for rank, shared, scaling in [(8, False, 0.5), (3, True, 2.0), (8, False, 1.0)]:
        outer, r = (1 if shared else e), max_rank
        gate_up_a = rng.uniform(-1, 1, (outer, 2 * r, h)) * 1.5 / np.sqrt(h)
        gate_up_a[:, (np.arange(2 * r) % r) >= rank, :] = 0
        gate_up_b = rng.uniform(-1, 1, (e, 2 * i, r)) * 1.5 / np.sqrt(rank)
        gate_up_b[:, :, rank:] = 0
        down_a = rng.uniform(-1, 1, (e, r, i)) * 1.5 / np.sqrt(i)
        down_a[:, rank:, :] = 0
        down_b = rng.uniform(-1, 1, (outer, h, r)) * 1.5 / np.sqrt(rank)
        down_b[:, :, rank:] = 0
        adapters.append(([as_bf16(w) for w in (gate_up_a, gate_up_b, down_a, down_b)], scaling))
    return adapters


def lora_forward(weights, adapters, batch, adapter_ids, device, out=None):
    """A LoRA wrapper (4 slots: the three adapters, the third disabled, one empty) over a
    layer on `device`, run once; returns the output."""
    moved = lambda t: t.to(device)
    with make_layer({k: moved(v) for k, v in weights.items()}, "bf16", device) as layer, \
            fm.Lora(layer, 4, 8) as lora:
        for slot, (tensors, scaling) in enumerate(adapters):
            lora.set_slot(slot, *[moved(t) for t in tensors], scaling)
        lora.set_enabled(2, False)
        batch = {k: moved(v) for k, v in batch.items()}
        out = poisoned_output(batch) if out is None else out
        lora.forward(batch["hidden"], batch["topk_ids"], batch["topk_weights"],
                     adapter_ids=moved(adapter_ids), out=out)
        if out.is_cuda:
            torch.cuda.current_stream(out.device).synchronize()
        return out.cpu()


def token_adapters(tokens, device="cpu"):
    """-1, 0, 1, 2 (disabled), 3 (empty) in turn."""
    return torch.tensor([m % 5 - 1 for m in range(tokens)], dtype=torch.int32, device=device)


def test_cuda_lora_matches_the_cpu_wrapper_and_its_deltas_matter(cuda):
    weights, batch = random_weights("bf16"), random_batch("bf16", tokens=23)
    adapters, ids = random_adapters("cpu"), token_adapters(23)
    want = lora_forward(weights, adapters, batch, ids, "cpu")
    got = lora_forward(weights, adapters, batch, ids, cuda)
    base = cpu_result(weights, batch, "bf16")
    assert relative_error(got, want.double().numpy()) <= TOLERANCE["bf16"]
    assert relative_error(got, base.double().numpy()) > 10 * TOLERANCE["bf16"]


def test_cuda_lora_replays_in_a_cuda_graph_with_new_adapter_ids(cuda):
    weights, static = random_weights("bf16", cuda), random_batch("bf16", cuda, tokens=23)
    adapters = random_adapters(cuda)
    ids = token_adapters(23, cuda)
    out = poisoned_output(static)
    with make_layer(weights, "bf16", cuda) as layer, fm.Lora(layer, 4, 8) as lora:
        for slot, (tensors, scaling) in enumerate(adapters):
            lora.set_slot(slot, *tensors, scaling)
        lora.set_enabled(2, False)
        run = lambda: lora.forward(static["hidden"], static["topk_ids"], static["topk_weights"],
                                   adapter_ids=ids, out=out)
        # the LoRA kernels compile and the workspace is allocated on the first run: outside
        side = torch.cuda.Stream(cuda)
        side.wait_stream(torch.cuda.current_stream(cuda))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(cuda).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        # the map is device memory read at replay: new ids, new inputs, the same slots
        fresh = random_batch("bf16", cuda, tokens=23, seed=5)
        for name, tensor in fresh.items():
            static[name].copy_(tensor)
        ids.copy_(torch.flip(token_adapters(23, cuda), [0]))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize(cuda)
    want = lora_forward({k: v.cpu() for k, v in weights.items()},
                        [([t.cpu() for t in ts], s) for ts, s in adapters],
                        {k: v.cpu() for k, v in fresh.items()}, ids.cpu(), "cpu")
    assert relative_error(out, want.double().numpy()) <= TOLERANCE["bf16"]

"""The Python host's LoRA wrapper (SPEC §7) on NumPy: mixed adapters against the float64
reference in moe_reference.py, both map forms, the runner config passed through by pointer, a
wrapper outliving its layer, and bad input refused by name."""

import ctypes

import numpy as np
import pytest

import fusedmoe as fm
import moe_reference as reference

SIZES = dict(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}
ROUNDING = {"f32": reference.no_rounding, "f16": reference.round_f16}
TOLERANCE = {"f32": 1e-5, "f16": 2e-3}


def inputs(dtype, tokens, gated, seed):
    rng = np.random.default_rng(seed)
    e, k, h, i = (SIZES[n] for n in ("num_experts", "top_k", "hidden_size", "intermediate_size"))
    n1 = 2 * i if gated else i
    cast = lambda a: np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])
    ids = np.argsort(rng.random((tokens, e)), axis=1)[:, :k].astype(np.int32)
    ids[::5, -1] = -1
    return dict(
        hidden=cast(rng.uniform(-1, 1, (tokens, h))),
        w13=cast(rng.uniform(-1, 1, (e, n1, h)) / np.sqrt(h)),
        w2=cast(rng.uniform(-1, 1, (e, h, i)) / np.sqrt(i)),
        topk_ids=ids,
        topk_weights=rng.uniform(0.1, 1.0, (tokens, k)).astype(np.float32),
    )


def adapter(dtype, rank, max_rank, gated, shared, scaling, rng):
    """Random weights of `rank`, zero padded to `max_rank`."""
    e, h, i = SIZES["num_experts"], SIZES["hidden_size"], SIZES["intermediate_size"]
    n1, r, outer = (2 * i if gated else i), max_rank, (1 if shared else e)
    rows = 2 * r if gated else r
    gate_up_a = rng.uniform(-1, 1, (outer, rows, h)) * 1.5 / np.sqrt(h)
    gate_up_a[:, (np.arange(rows) % r) >= rank, :] = 0
    gate_up_b = rng.uniform(-1, 1, (e, n1, r)) * 1.5 / np.sqrt(rank)
    gate_up_b[:, :, rank:] = 0
    down_a = rng.uniform(-1, 1, (e, r, i)) * 1.5 / np.sqrt(i)
    down_a[:, rank:, :] = 0
    down_b = rng.uniform(-1, 1, (outer, h, r)) * 1.5 / np.sqrt(rank)
    down_b[:, :, rank:] = 0
    cast = lambda a: np.ascontiguousarray(a, dtype=NUMPY_DTYPES[dtype])
    return dict(gate_up_a=cast(gate_up_a), gate_up_b=cast(gate_up_b), down_a=cast(down_a),
                down_b=cast(down_b), scaling=scaling)


def as_f64(weights):
    return {k: (v if k == "scaling" else v.astype(np.float64)) for k, v in weights.items()}


def segments(token_adapter):
    """The same assignment as runs of equal adapters: (seg_indptr, seg_adapter)."""
    if not token_adapter:
        return np.zeros(1, np.int32), np.zeros(0, np.int32)
    starts = [0] + [m for m in range(1, len(token_adapter))
                    if token_adapter[m] != token_adapter[m - 1]]
    indptr = np.array(starts + [len(token_adapter)], dtype=np.int32)
    return indptr, np.asarray(token_adapter, dtype=np.int32)[indptr[:-1]]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("gated,layout", [(True, "halves"), (True, "interleaved"),
                                          (False, "halves")])
@pytest.mark.parametrize("use_segments", [False, True])
@pytest.mark.parametrize("tokens", [0, 1, 37])
def test_mixed_adapters_match_the_reference(dtype, gated, layout, use_segments, tokens):
    rng = np.random.default_rng(tokens + 7 * gated)
    x = inputs(dtype, tokens, gated, seed=tokens)
    activation = "silu" if gated else "relu2"
    fields = dict(activation=activation, gated=gated, gate_up_layout=layout,
                  routed_scaling_factor=1.5)
    max_rank = 8
    slots = [adapter(dtype, 8, max_rank, gated, False, 0.5, rng),
             adapter(dtype, 3, max_rank, gated, True, 2.0, rng),   # smaller rank, shared outer
             adapter(dtype, 8, max_rank, gated, False, 1.0, rng)]  # disabled below
    token_adapter = [(m // 3) % 5 - 1 for m in range(tokens)]     # -1, 0, 1, 2, 3 (empty)
    config = fm.Config(dtype=dtype, **SIZES, **fields)
    with fm.Layer(config, x["w13"], x["w2"]) as layer, fm.Lora(layer, 4, max_rank) as lora:
        for s, w in enumerate(slots):
            lora.set_slot(s, w["gate_up_a"], w["gate_up_b"], w["down_a"], w["down_b"],
                          w["scaling"])
        lora.set_enabled(2, False)
        out = np.full((tokens, SIZES["hidden_size"]), np.nan, dtype=NUMPY_DTYPES[dtype])
        if use_segments:
            indptr, seg = segments(token_adapter)
            lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], seg_indptr=indptr,
                         seg_adapter=seg, out=out)
        else:
            ids = np.array(token_adapter, dtype=np.int32)
            lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], adapter_ids=ids,
                         out=out)
    if tokens == 0:
        return
    active = [as_f64(slots[0]), as_f64(slots[1]), None, None]
    used = [a if a < 0 or active[a] is not None else -1 for a in token_adapter]
    want, base = (reference.moe_lora(
        x["hidden"].astype(np.float64), x["w13"].astype(np.float64),
        x["w2"].astype(np.float64), x["topk_ids"], x["topk_weights"].astype(np.float64),
        active, adapters, round_to=ROUNDING[dtype], **fields)
        for adapters in (used, [-1] * tokens))
    assert reference.relative_error(out, want) <= TOLERANCE[dtype]
    if any(a >= 0 for a in used):  # the deltas matter
        assert reference.relative_error(out, base) > 10 * TOLERANCE[dtype]


def address(config):
    return ctypes.cast(config.ptr, ctypes.c_void_p).value


def test_runner_config_is_the_layers_own_and_outlives_the_layer():
    x = inputs("f32", 5, True, seed=1)
    layer = fm.Layer(fm.Config(dtype="f32", **SIZES), x["w13"], x["w2"])
    with fm.Lora(layer, 2, 4) as lora:
        assert address(lora.runner_config) == address(layer.config)
        layer.close()
        config = lora.runner_config
        assert (config.num_local_experts, config.top_k, config.dtype, config.device) == (
            4, 2, "f32", "cpu")
        with pytest.raises(AttributeError):
            config.top_k = 3


def test_without_adapters_it_is_the_base_layer():
    x = inputs("f32", 9, True, seed=2)
    with fm.Layer(fm.Config(dtype="f32", **SIZES), x["w13"], x["w2"]) as layer, \
            fm.Lora(layer, 2, 4) as lora:
        lora.set_slot(0, *[adapter("f32", 4, 4, True, False, 1.0, np.random.default_rng(3))[k]
                           for k in ("gate_up_a", "gate_up_b", "down_a", "down_b")])
        lora.clear_slot(0)
        ids = np.array([-1, 0, 1] * 3, dtype=np.int32)
        got = lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], adapter_ids=ids)
        base = layer.forward(x["hidden"], x["topk_ids"], x["topk_weights"])
        assert np.array_equal(got, base)


def test_bad_input_is_refused_by_name():
    x = inputs("f32", 6, True, seed=4)
    w = adapter("f32", 4, 4, True, False, 1.0, np.random.default_rng(5))
    with fm.Layer(fm.Config(dtype="f32", **SIZES), x["w13"], x["w2"]) as layer, \
            fm.Lora(layer, 2, 4) as lora:
        with pytest.raises(fm.InvalidArgumentError, match="slot: 2, expected 0..2"):
            lora.set_slot(2, w["gate_up_a"], w["gate_up_b"], w["down_a"], w["down_b"])
        with pytest.raises(fm.InvalidArgumentError, match="gate_up_b: shape"):
            lora.set_slot(0, w["gate_up_a"], np.zeros((4, 32, 8), np.float32), w["down_a"],
                          w["down_b"])
        with pytest.raises(fm.InvalidArgumentError, match="down_a: dtype f16"):
            lora.set_slot(0, w["gate_up_a"], w["gate_up_b"], w["down_a"].astype(np.float16),
                          w["down_b"])
        out = np.full((6, SIZES["hidden_size"]), np.nan, dtype=np.float32)
        ids = np.array([0, 1, 2, -1, 0, 1], dtype=np.int32)
        with pytest.raises(fm.InvalidArgumentError, match="adapter_ids: adapter 2 at index 2"):
            lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], adapter_ids=ids, out=out)
        with pytest.raises(fm.InvalidArgumentError, match="adapter_ids: NULL, and no segments"):
            lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], out=out)
        indptr = np.array([0, 6], dtype=np.int32)
        with pytest.raises(fm.InvalidArgumentError, match="given together with segments"):
            lora.forward(x["hidden"], x["topk_ids"], x["topk_weights"], adapter_ids=ids,
                         seg_indptr=indptr, seg_adapter=np.array([0], np.int32), out=out)
        assert np.isnan(out).all()
        with pytest.raises(fm.InvalidArgumentError, match="lora: must be NULL for moe_run"):
            plan = fm.Plan(layer)
            plan.prepare(x["topk_ids"], fm.aligned_empty(layer.workspace_size(6)))
            fm.lib.moe_run(layer.ptr, lora.ptr, plan.ptr, None, None, None, None)
    assert fm.supports("lora")

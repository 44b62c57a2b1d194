"""The Python host on NumPy: real layers on the CPU against a float64 reference, the binding's
no-copy and ownership rules, and the binding diffed against include/fusedmoe.h."""

import ctypes
import gc
import os
import pathlib
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fusedmoe as fm
import moe_reference as reference

HERE = pathlib.Path(__file__).resolve().parent
HEADER = HERE.parent.parent / "include" / "fusedmoe.h"

SIZES = dict(num_experts=4, top_k=2, hidden_size=32, intermediate_size=16)
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16}
ROUNDING = {"f32": reference.no_rounding, "f16": reference.round_f16}
TOLERANCE = {"f32": 1e-5, "f16": 2e-3}


# ---------------------------------------------------------------------------------------------
# Helpers.


def random_inputs(dtype, tokens=7, bias=False, bias_dtype=None, gated=True, seed=0):
    """Fresh random inputs (never zeros) in the layer dtype; every third token drops a route."""
    rng = np.random.default_rng(seed)
    experts, top_k = SIZES["num_experts"], SIZES["top_k"]
    hidden, inter = SIZES["hidden_size"], SIZES["intermediate_size"]
    n1 = 2 * inter if gated else inter
    cast = lambda a, to=NUMPY_DTYPES[dtype]: np.ascontiguousarray(a, dtype=to)
    ids = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k].astype(np.int32)
    ids[::3, -1] = -1
    biases = bias_dtype or NUMPY_DTYPES[dtype]
    return dict(
        hidden=cast(rng.uniform(-1, 1, (tokens, hidden))),
        w13=cast(rng.uniform(-1, 1, (experts, n1, hidden)) / np.sqrt(hidden)),
        w2=cast(rng.uniform(-1, 1, (experts, hidden, inter)) / np.sqrt(inter)),
        b13=cast(rng.uniform(-0.5, 0.5, (experts, n1)), biases) if bias else None,
        b2=cast(rng.uniform(-0.5, 0.5, (experts, hidden)), biases) if bias else None,
        topk_ids=ids,
        topk_weights=cast(rng.uniform(0.1, 1.0, (tokens, top_k)), np.float32),
    )


def expected(inputs, dtype, **fields):
    as_f64 = {k: v if v is None or k == "topk_ids" else v.astype(np.float64)
              for k, v in inputs.items()}
    return reference.moe(**as_f64, round_to=ROUNDING[dtype], **fields)


def make_layer(inputs, dtype, **fields):
    config = fm.Config(dtype=dtype, **SIZES, **fields)
    return fm.Layer(config, inputs["w13"], inputs["w2"], inputs["b13"], inputs["b2"])


def poisoned_output(inputs, dtype, no_combine=False):
    tokens, hidden = inputs["hidden"].shape
    shape = (tokens, SIZES["top_k"], hidden) if no_combine else (tokens, hidden)
    return np.full(shape, np.nan, dtype=NUMPY_DTYPES[dtype])


def run_and_compare(dtype, bias=False, **fields):
    """Runs a layer on fresh inputs into a NaN-poisoned output; returns (inputs, out, relative
    error against the float64 reference)."""
    inputs = random_inputs(dtype, bias=bias, gated=fields.get("gated", True))
    out = poisoned_output(inputs, dtype, fields.get("no_combine", False))
    with make_layer(inputs, dtype, **fields) as layer:
        layer.forward(inputs["hidden"], inputs["topk_ids"], inputs["topk_weights"], out=out)
    return inputs, out, reference.relative_error(out, expected(inputs, dtype, **fields))


def data_pointer(array):
    return array.__array_interface__["data"][0]


# ---------------------------------------------------------------------------------------------
# Semantics (SPEC §2-3).


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gated_silu_with_biases_and_dropped_routes_matches_reference(dtype):
    _, _, error = run_and_compare(dtype, bias=True, activation="silu")
    assert error <= TOLERANCE[dtype]


ACTIVATION_CASES = {
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "swiglu_oai_interleaved": dict(
        activation="swiglu_oai", gemm1_alpha=1.702, gemm1_limit=0.5, gate_up_layout="interleaved"
    ),
    "silu_clamp": dict(activation="silu_clamp", gemm1_limit=0.5),
    "silu_preclamp": dict(activation="silu_preclamp", gemm1_limit=0.5),
    "silu_interleaved": dict(activation="silu", gate_up_layout="interleaved"),
    "non_gated_silu": dict(activation="silu", gated=False),
    "non_gated_gelu": dict(activation="gelu", gated=False),
    "non_gated_relu2": dict(activation="relu2", gated=False),
}


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_every_activation_matches_reference(dtype, case):
    _, _, error = run_and_compare(dtype, bias=True, **ACTIVATION_CASES[case])
    assert error <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("keep_router_weight", [False, True])
def test_no_combine_gives_one_row_per_route_and_zero_rows_for_dropped_routes(
    dtype, keep_router_weight
):
    inputs, out, error = run_and_compare(
        dtype, bias=True, no_combine=True, no_combine_keep_router_weight=keep_router_weight
    )
    assert error <= TOLERANCE[dtype]
    assert np.all(out[inputs["topk_ids"] < 0] == 0)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_router_weight_on_input_with_bias_and_routed_scaling(dtype):
    _, _, error = run_and_compare(
        dtype, bias=True, apply_router_weight_on_input=True, routed_scaling_factor=2.5
    )
    assert error <= TOLERANCE[dtype]


def test_f16_layer_takes_f32_biases_int64_ids_and_f16_router_weights():
    inputs = random_inputs("f16", bias=True, bias_dtype=np.float32)
    inputs["topk_ids"] = inputs["topk_ids"].astype(np.int64)
    inputs["topk_weights"] = inputs["topk_weights"].astype(np.float16)
    with make_layer(inputs, "f16") as layer:
        out = layer.forward(inputs["hidden"], inputs["topk_ids"], inputs["topk_weights"])
    assert reference.relative_error(out, expected(inputs, "f16")) <= TOLERANCE["f16"]


def test_inplace_layer_writes_the_result_into_hidden():
    inputs = random_inputs("f32", bias=True)
    want = expected(inputs, "f32")
    hidden = inputs["hidden"]
    with make_layer(inputs, "f32", inplace=True) as layer:
        result = layer.forward(hidden, inputs["topk_ids"], inputs["topk_weights"])
    assert result is hidden
    assert reference.relative_error(hidden, want) <= TOLERANCE["f32"]


def test_empty_batch_gives_an_empty_output():
    inputs = random_inputs("f32", tokens=0)
    with make_layer(inputs, "f32") as layer:
        out = layer.forward(inputs["hidden"], inputs["topk_ids"], inputs["topk_weights"])
    assert out.shape == (0, SIZES["hidden_size"])


def test_forward_from_several_threads_at_once_matches_reference():
    inputs = [random_inputs("f32", tokens=5 + seed, seed=seed) for seed in range(8)]
    with make_layer(inputs[0], "f32") as layer:

        def forward(batch):
            out = layer.forward(batch["hidden"], batch["topk_ids"], batch["topk_weights"])
            with_first_weights = dict(batch, w13=inputs[0]["w13"], w2=inputs[0]["w2"])
            return reference.relative_error(out, expected(with_first_weights, "f32"))

        with ThreadPoolExecutor(4) as pool:
            errors = list(pool.map(forward, inputs))
    assert max(errors) <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# No copies: the library reads and writes the arrays' own memory.


def test_output_array_is_written_in_place_never_copied():
    inputs = random_inputs("f32", bias=True)
    out = poisoned_output(inputs, "f32")
    address = data_pointer(out)
    with make_layer(inputs, "f32") as layer, fm.Plan(layer) as plan:
        workspace = fm.aligned_empty(layer.workspace_size(len(out)))
        plan.prepare(inputs["topk_ids"], workspace)
        result = plan.run(inputs["hidden"], inputs["topk_weights"], out)
    assert result is out and data_pointer(out) == address
    assert reference.relative_error(out, expected(inputs, "f32")) <= TOLERANCE["f32"]


def test_non_contiguous_input_is_refused_not_copied():
    inputs = random_inputs("f32")
    out = poisoned_output(inputs, "f32")
    column_major = np.asfortranarray(inputs["hidden"])
    with make_layer(inputs, "f32") as layer, pytest.raises(fm.InvalidArgumentError) as caught:
        layer.forward(column_major, inputs["topk_ids"], inputs["topk_weights"], out)
    assert "hidden" in caught.value.message and "strides" in caught.value.message
    assert np.isnan(out).all()


def test_layer_keeps_its_borrowed_weights_alive():
    inputs = random_inputs("f32")
    config = fm.Config(dtype="f32", **SIZES)
    layer = fm.Layer(config, inputs["w13"].copy(), inputs["w2"].copy())  # only the layer holds them
    gc.collect()
    out = layer.forward(inputs["hidden"], inputs["topk_ids"], inputs["topk_weights"])
    assert reference.relative_error(out, expected(inputs, "f32")) <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# Errors.


def test_wrong_dtype_raises_invalid_argument_naming_hidden_and_writes_nothing():
    inputs = random_inputs("f32")
    out = poisoned_output(inputs, "f32")
    with make_layer(inputs, "f32") as layer, pytest.raises(fm.InvalidArgumentError) as caught:
        layer.forward(inputs["hidden"].astype(np.float64), inputs["topk_ids"],
                      inputs["topk_weights"], out)
    error = caught.value
    assert isinstance(error, fm.FusedMoEError)
    assert error.status == fm.Status.ERR_INVALID_ARGUMENT and error.function == "moe_run"
    assert "hidden" in error.message and "hidden" in str(error)
    assert np.isnan(out).all()


def test_cpu_layer_refuses_a_stream():
    inputs = random_inputs("f32")
    with make_layer(inputs, "f32") as layer, fm.Plan(layer) as plan:
        workspace = fm.aligned_empty(layer.workspace_size(7))
        with pytest.raises(fm.InvalidArgumentError, match="stream"):
            plan.prepare(inputs["topk_ids"], workspace, stream=0x1234)


def test_a_cuda_layer_that_cannot_run_is_refused_by_name():
    """DeviceError naming the missing library where CUDA is absent; UnsupportedError where
    CUDA is present but this build cannot run it yet."""
    if fm.supports("cuda"):
        pytest.skip("this build runs CUDA layers")
    inputs = random_inputs("f32")
    with pytest.raises((fm.DeviceError, fm.UnsupportedError), match="device: cuda:0"):
        make_layer(inputs, "f32", device="cuda:0")


def test_every_status_has_its_error_class():
    assert set(fm.ERRORS) == set(fm.Status) - {fm.Status.OK}
    assert all(issubclass(error, fm.FusedMoEError) for error in fm.ERRORS.values())


def test_missing_library_is_reported_with_the_place_tried():
    missing = "/nonexistent/libfusedmoe.so"
    result = subprocess.run(
        [sys.executable, "-c", "import fusedmoe"],
        cwd=HERE, env=dict(os.environ, FUSEDMOE_LIB=missing), capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert "ImportError" in result.stderr and missing in result.stderr


# ---------------------------------------------------------------------------------------------
# Handles.


def test_closing_twice_is_harmless_and_a_closed_handle_is_refused():
    config = fm.Config(**SIZES)
    config.close()
    config.close()
    assert config.closed
    with pytest.raises(ValueError, match="closed"):
        config.top_k


def test_with_block_closes_every_handle():
    inputs = random_inputs("f32")
    with make_layer(inputs, "f32") as layer, fm.Plan(layer) as plan:
        pass
    assert layer.closed and plan.closed


def test_dropped_handles_are_freed_by_their_finalizers():
    inputs = random_inputs("f32")
    config = fm.Config(dtype="f32", **SIZES)
    layer = fm.Layer(config, inputs["w13"], inputs["w2"])
    layer.forward(inputs["hidden"], inputs["topk_ids"], inputs["topk_weights"])
    plan = fm.Plan(layer)
    finalizers = [config.finalizer, layer.finalizer, plan.finalizer]
    assert all(f.alive for f in finalizers)
    del config, layer, plan
    gc.collect()
    assert not any(f.alive for f in finalizers)


def test_a_plan_keeps_its_layer_usable_after_the_layer_object_is_dropped():
    inputs = random_inputs("f32")
    layer = make_layer(inputs, "f32")
    layer_finalizer, plan = layer.finalizer, fm.Plan(layer)
    workspace = fm.aligned_empty(layer.workspace_size(7))
    del layer
    gc.collect()
    assert layer_finalizer.alive
    plan.prepare(inputs["topk_ids"], workspace)
    assert plan.num_tokens == 7


def test_layer_config_is_read_only_and_dies_with_the_layer():
    inputs = random_inputs("f32")
    layer = make_layer(inputs, "f32", activation="gelu")
    config = layer.config
    assert config.activation == "gelu" and config.hidden_size == SIZES["hidden_size"]
    with pytest.raises(AttributeError, match="read-only"):
        config.top_k = 1
    layer.close()
    with pytest.raises(ValueError, match="closed"):
        config.top_k


# ---------------------------------------------------------------------------------------------
# Config and plan accessors.

EVERY_FIELD = dict(
    num_experts=8, num_local_experts=4, top_k=3, hidden_size=64, intermediate_size=32,
    dtype="bf16", activation="swiglu_oai", gated=True, gate_up_layout="interleaved",
    gemm1_alpha=1.5, gemm1_limit=7.0, routed_scaling_factor=2.5,
    apply_router_weight_on_input=True, no_combine=True, no_combine_keep_router_weight=True,
    inplace=True, device="cuda:1",
)


def test_every_config_field_round_trips():
    assert sorted(EVERY_FIELD) == fm.Config.field_names()
    with fm.Config(**EVERY_FIELD) as config:
        assert {name: getattr(config, name) for name in EVERY_FIELD} == EVERY_FIELD


def test_unset_fields_read_as_documented_defaults():
    with fm.Config(num_experts=8) as config:
        assert config.num_local_experts == 8 and config.gemm1_alpha is None
        assert config.activation == "silu" and config.device == "cpu"
        with pytest.raises(fm.InvalidArgumentError):
            config.dtype


def test_options_round_trip_and_an_unknown_key_is_named():
    with fm.Config(options={"tile.block_m": 64}) as config:
        config.set_option("cpu.num_threads", 2)
        assert config.get_option("tile.block_m") == "64"
        assert config.get_option("cpu.num_threads") == "2"
        with pytest.raises(fm.InvalidArgumentError, match="tile.nonsense"):
            config.set_option("tile.nonsense", 1)


def test_clone_is_an_independent_writable_copy():
    inputs = random_inputs("f32")
    with make_layer(inputs, "f32", activation="gelu") as layer, layer.config.clone() as copy:
        copy.activation = "relu2"
        assert copy.activation == "relu2" and layer.config.activation == "gelu"


def expected_align(topk_ids, experts, block_m):
    """SPEC §4: each expert's routes in increasing order, padded with M·K to BLOCK_M."""
    flat, sentinel = topk_ids.ravel(), topk_ids.size
    routes, blocks = [], []
    for expert in range(experts):
        mine = list(np.flatnonzero(flat == expert))
        mine += [sentinel] * (-len(mine) % block_m)
        routes += mine
        blocks += [expert] * (len(mine) // block_m)
    return routes, blocks


def test_plan_exposes_the_align_result():
    inputs = random_inputs("f32")
    with make_layer(inputs, "f32", options={"tile.block_m": 16}) as layer, fm.Plan(layer) as plan:
        plan.prepare(inputs["topk_ids"], fm.aligned_empty(layer.workspace_size(7)))
        routes, blocks = expected_align(inputs["topk_ids"], SIZES["num_experts"], 16)
        sorted_ids, block_expert = plan.sorted_route_ids(), plan.block_expert()
        assert plan.tile_config.block_m == 16 and plan.num_tokens == 7
        assert plan.num_padded == len(routes)
        assert sorted_ids[: len(routes)].tolist() == routes
        assert np.all(sorted_ids[len(routes) :] == inputs["topk_ids"].size)
        assert block_expert[: len(blocks)].tolist() == blocks
        assert np.all(block_expert[len(blocks) :] == -1)


def test_workspace_is_aligned():
    for nbytes in (1, 100, 4096):
        workspace = fm.aligned_empty(nbytes)
        assert workspace.nbytes == nbytes and data_pointer(workspace) % 16 == 0


def test_library_identifies_itself():
    assert fm.abi_version() == fm.ABI_VERSION == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", fm.version())
    assert fm.supports("cpu") and not fm.supports("no such feature")
    assert fm.status_string(fm.Status.ERR_INVALID_ARGUMENT) == "invalid argument"


# ---------------------------------------------------------------------------------------------
# The binding diffed against the header: every prototype, struct and constant.


def header_text(preprocessor=True):
    """The header without comments (and without preprocessor lines, unless asked)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    return text if preprocessor else re.sub(r"(?m)^\s*#.*$", "", text)


C_TYPES = {
    "moe_status": fm.moe_status, "bool": ctypes.c_bool, "float": ctypes.c_float,
    "uint8_t": ctypes.c_uint8, "uint16_t": ctypes.c_uint16, "uint32_t": ctypes.c_uint32,
    "uint64_t": ctypes.c_uint64, "int32_t": ctypes.c_int32, "int64_t": ctypes.c_int64,
    "size_t": ctypes.c_size_t,
}
for _struct in ("moe_config", "moe_layer", "moe_lora", "moe_plan", "moe_dispatcher", "moe_dtype",
                "moe_device", "moe_tensor", "moe_tile_config"):
    C_TYPES[_struct] = getattr(fm, _struct)


def ctypes_type(declaration):
    """The ctypes type that passes a C type ("const moe_config **", "char *", "void")."""
    stars = declaration.count("*")
    base = " ".join(declaration.replace("*", " ").replace("const", " ").split())
    if base == "void":
        return {0: None, 1: ctypes.c_void_p}[stars]
    if base == "char" and stars == 1:
        return ctypes.c_char_p
    result = C_TYPES[base]
    for _ in range(stars):
        result = ctypes.POINTER(result)
    return result


def split_declaration(declaration):
    """("const moe_config *", "config") from "const moe_config *config"."""
    match = re.fullmatch(r"(.*?)\s*(\w+)", declaration.strip(), flags=re.S)
    return match.group(1), match.group(2)


def header_functions():
    """{name: (restype, [argtypes])} for every prototype in the header."""
    functions = {}
    for statement in header_text(preprocessor=False).split(";"):
        statement = re.split(r"[{}]", statement)[-1]  # after `extern "C" {` or a struct
        prototype = re.fullmatch(r"\s*([\w\s*]+?)\s*\b(moe_\w+)\s*\(([^)]*)\)\s*", statement)
        if prototype:
            returns, name, params = prototype.groups()
            params = [] if params.strip() == "void" else params.split(",")
            argtypes = [ctypes_type(split_declaration(p)[0]) for p in params]
            functions[name] = (ctypes_type(returns), argtypes)
    return functions


def test_binding_declares_every_header_function_with_its_types():
    functions = header_functions()
    # A prototype begins a line; the parser must have found each one.
    starts = re.findall(r"(?m)^\w[\w \t*]*\bmoe_\w+\(", header_text(preprocessor=False))
    assert len(functions) == len(starts) > 50
    assert sorted(fm.SIGNATURES) == sorted(functions)
    for name, (restype, argtypes) in functions.items():
        declared = getattr(fm.lib, name)
        assert declared.restype is restype, name
        assert len(declared.argtypes) == len(argtypes), name
        for position, (have, want) in enumerate(zip(declared.argtypes, argtypes)):
            assert have is want, f"{name} argument {position}: {have} vs {want}"
        assert (declared.errcheck is not None) == (restype is fm.moe_status), name


def test_binding_mirrors_every_header_struct_field_for_field():
    structs = re.findall(r"typedef struct \{(.*?)\} (\w+);", header_text(), flags=re.S)
    assert {name for _, name in structs} == {"moe_dtype", "moe_device", "moe_tensor",
                                             "moe_tile_config"}
    for body, name in structs:
        fields = [split_declaration(f) for f in body.split(";") if f.strip()]
        want = [(field, ctypes_type(ctype)) for ctype, field in fields]
        assert getattr(fm, name)._fields_ == want, name


def test_binding_has_every_header_constant():
    text = header_text()
    defines = re.findall(r"#define MOE_(\w+) (\d+)", text)
    statuses = re.findall(r"\bMOE_(\w+) = (\d+),", text)
    assert len(defines) > 15 and len(statuses) == 6
    for name, value in defines:
        assert getattr(fm, name) == int(value), name
    assert {name: int(value) for name, value in statuses} == {s.name: s.value for s in fm.Status}


def test_config_has_a_field_for_every_header_setter():
    setters = {name[len("moe_config_set_"):] for name in header_functions()
               if name.startswith("moe_config_set_")}
    assert setters - {"option"} == set(fm.Config.field_names())

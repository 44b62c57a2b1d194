"""fusedmoe from Python: a ctypes binding of libfusedmoe.so (include/fusedmoe.h).

    import fusedmoe, numpy as np
    config = fusedmoe.Config(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32,
                             dtype="f32", activation="silu")
    with fusedmoe.Layer(config, w13, w2) as layer:          # the weights are borrowed, not copied
        out = layer.forward(hidden, topk_ids, topk_weights)  # or Plan(layer).prepare(...).run(...)

Expert parallelism (SPEC §6): a Dispatcher maps global expert ids to this rank's local ones,
which a layer with num_local_experts = dispatcher.num_local_experts then runs:

    with fusedmoe.Dispatcher.contiguous(num_experts=8, ep_size=2, ep_rank=1) as dispatcher:
        local_ids = dispatcher.dispatch(topk_ids)           # or dispatch(ids, out=ids): in place

LoRA (SPEC §7): adapter slots over a layer; each token picks a slot (-1: none):

    with fusedmoe.Lora(layer, num_slots=4, max_rank=16) as lora:
        lora.set_slot(0, gate_up_a, gate_up_b, down_a, down_b, scaling=0.5)   # borrowed
        out = lora.forward(hidden, topk_ids, topk_weights, adapter_ids=ids)  # or seg_indptr=,
                                                                             # seg_adapter=
Tensors are any object with `__dlpack__` (NumPy, PyTorch, CuPy): the library reads and writes
their memory in place; nothing is ever copied. Every failing call raises a FusedMoEError
subclass carrying the library's message, which names the argument ("hidden: dtype ...").

The library is found through FUSEDMOE_LIB (a full path), else the cargo target directory of
the repository holding this file, else the system's library path.
"""

import ctypes
import ctypes.util
import enum
import os
import pathlib
import threading
import weakref
from collections import namedtuple
from ctypes import POINTER, byref, c_bool, c_char_p, c_float, c_int32, c_int64, c_size_t
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64, c_void_p

import numpy as np

# ---------------------------------------------------------------------------------------------
# The header's constants (test_fusedmoe.py checks them against include/fusedmoe.h).

ABI_VERSION = 1  # the ABI this module was written for

ACTIVATION_SILU = 0
ACTIVATION_GELU = 1
ACTIVATION_GELU_TANH = 2
ACTIVATION_SWIGLU_OAI = 3
ACTIVATION_SILU_CLAMP = 4
ACTIVATION_SILU_PRECLAMP = 5
ACTIVATION_RELU2 = 6

GATE_UP_HALVES = 0
GATE_UP_INTERLEAVED = 1

DEVICE_CPU = 1
DEVICE_CUDA = 2

DTYPE_CODE_INT = 0
DTYPE_CODE_UINT = 1
DTYPE_CODE_FLOAT = 2
DTYPE_CODE_BFLOAT = 4


class Status(enum.IntEnum):
    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_UNSUPPORTED = 2
    ERR_DEVICE = 3
    ERR_OUT_OF_MEMORY = 4
    ERR_INTERNAL = 5


WORKSPACE_ALIGNMENT = 16  # bytes; moe_workspace_size's documented requirement

# ---------------------------------------------------------------------------------------------
# The header's types.


class moe_status(c_uint32):
    """The status every fallible function returns; a distinct type so that errcheck finds them."""


class moe_config(ctypes.Structure):
    """Opaque."""


class moe_layer(ctypes.Structure):
    """Opaque."""


class moe_lora(ctypes.Structure):
    """Opaque."""


class moe_plan(ctypes.Structure):
    """Opaque."""


class moe_dispatcher(ctypes.Structure):
    """Opaque."""


class moe_dtype(ctypes.Structure):
    """DLPack's DLDataType."""

    _fields_ = [("code", c_uint8), ("bits", c_uint8), ("lanes", c_uint16)]


class moe_device(ctypes.Structure):
    """DLPack's DLDevice."""

    _fields_ = [("device_type", c_int32), ("device_id", c_int32)]


class moe_tensor(ctypes.Structure):
    """DLPack's DLTensor, field for field."""

    _fields_ = [
        ("data", c_void_p),
        ("device", moe_device),
        ("ndim", c_int32),
        ("dtype", moe_dtype),
        ("shape", POINTER(c_int64)),
        ("strides", POINTER(c_int64)),
        ("byte_offset", c_uint64),
    ]


class moe_tile_config(ctypes.Structure):
    _fields_ = [
        ("block_m", c_uint32),
        ("block_n", c_uint32),
        ("block_k", c_uint32),
        ("group_m", c_uint32),
        ("num_warps", c_uint32),
        ("num_stages", c_uint32),
        ("flags", c_uint32),
    ]


TileConfig = namedtuple("TileConfig", [name for name, _ in moe_tile_config._fields_])

_config_p = POINTER(moe_config)
_layer_p = POINTER(moe_layer)
_plan_p = POINTER(moe_plan)
_dispatcher_p = POINTER(moe_dispatcher)
_lora_p = POINTER(moe_lora)
_tensor_p = POINTER(moe_tensor)

# name: (restype, argtypes), in the header's order. test_fusedmoe.py diffs it with the header.
SIGNATURES = {
    "moe_config_create": (moe_status, [POINTER(_config_p)]),
    "moe_config_clone": (moe_status, [_config_p, POINTER(_config_p)]),
    "moe_config_free": (None, [_config_p]),
    "moe_config_set_num_experts": (moe_status, [_config_p, c_int64]),
    "moe_config_set_num_local_experts": (moe_status, [_config_p, c_int64]),
    "moe_config_set_top_k": (moe_status, [_config_p, c_int64]),
    "moe_config_set_hidden_size": (moe_status, [_config_p, c_int64]),
    "moe_config_set_intermediate_size": (moe_status, [_config_p, c_int64]),
    "moe_config_set_dtype": (moe_status, [_config_p, moe_dtype]),
    "moe_config_set_activation": (moe_status, [_config_p, c_uint32]),
    "moe_config_set_gated": (moe_status, [_config_p, c_bool]),
    "moe_config_set_gate_up_layout": (moe_status, [_config_p, c_uint32]),
    "moe_config_set_gemm1_alpha": (moe_status, [_config_p, c_float]),
    "moe_config_set_gemm1_limit": (moe_status, [_config_p, c_float]),
    "moe_config_set_routed_scaling_factor": (moe_status, [_config_p, c_float]),
    "moe_config_set_apply_router_weight_on_input": (moe_status, [_config_p, c_bool]),
    "moe_config_set_no_combine": (moe_status, [_config_p, c_bool]),
    "moe_config_set_no_combine_keep_router_weight": (moe_status, [_config_p, c_bool]),
    "moe_config_set_inplace": (moe_status, [_config_p, c_bool]),
    "moe_config_set_device": (moe_status, [_config_p, moe_device]),
    "moe_config_set_option": (moe_status, [_config_p, c_char_p, c_char_p]),
    "moe_config_get_option": (
        moe_status,
        [_config_p, c_char_p, c_char_p, c_size_t, POINTER(c_size_t)],
    ),
    "moe_config_get_num_experts": (moe_status, [_config_p, POINTER(c_int64)]),
    "moe_config_get_num_local_experts": (moe_status, [_config_p, POINTER(c_int64)]),
    "moe_config_get_top_k": (moe_status, [_config_p, POINTER(c_int64)]),
    "moe_config_get_hidden_size": (moe_status, [_config_p, POINTER(c_int64)]),
    "moe_config_get_intermediate_size": (moe_status, [_config_p, POINTER(c_int64)]),
    "moe_config_get_dtype": (moe_status, [_config_p, POINTER(moe_dtype)]),
    "moe_config_get_activation": (moe_status, [_config_p, POINTER(c_uint32)]),
    "moe_config_get_gated": (moe_status, [_config_p, POINTER(c_bool)]),
    "moe_config_get_gate_up_layout": (moe_status, [_config_p, POINTER(c_uint32)]),
    "moe_config_get_gemm1_alpha": (moe_status, [_config_p, POINTER(c_bool), POINTER(c_float)]),
    "moe_config_get_gemm1_limit": (moe_status, [_config_p, POINTER(c_bool), POINTER(c_float)]),
    "moe_config_get_routed_scaling_factor": (moe_status, [_config_p, POINTER(c_float)]),
    "moe_config_get_apply_router_weight_on_input": (moe_status, [_config_p, POINTER(c_bool)]),
    "moe_config_get_no_combine": (moe_status, [_config_p, POINTER(c_bool)]),
    "moe_config_get_no_combine_keep_router_weight": (moe_status, [_config_p, POINTER(c_bool)]),
    "moe_config_get_inplace": (moe_status, [_config_p, POINTER(c_bool)]),
    "moe_config_get_device": (moe_status, [_config_p, POINTER(moe_device)]),
    "moe_dispatcher_create_contiguous": (
        moe_status,
        [c_int64, c_int64, c_int64, c_int64, moe_device, POINTER(_dispatcher_p)],
    ),
    "moe_dispatcher_create_mapping": (
        moe_status,
        [_tensor_p, c_int64, moe_device, POINTER(_dispatcher_p)],
    ),
    "moe_dispatcher_free": (None, [_dispatcher_p]),
    "moe_dispatcher_num_experts": (moe_status, [_dispatcher_p, POINTER(c_int64)]),
    "moe_dispatcher_num_local_experts": (moe_status, [_dispatcher_p, POINTER(c_int64)]),
    "moe_dispatcher_mapping": (
        moe_status,
        [_dispatcher_p, POINTER(c_int32), c_size_t, POINTER(c_size_t)],
    ),
    "moe_dispatcher_expert_mask": (
        moe_status,
        [_dispatcher_p, POINTER(c_int32), c_size_t, POINTER(c_size_t)],
    ),
    "moe_dispatch": (moe_status, [_dispatcher_p, _tensor_p, _tensor_p, c_void_p]),
    "moe_abi_version": (c_uint32, []),
    "moe_version": (c_char_p, []),
    "moe_status_string": (c_char_p, [c_uint32]),
    "moe_last_error": (c_char_p, []),
    "moe_supports": (c_bool, [c_char_p]),
    "moe_layer_create": (
        moe_status,
        [_config_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, POINTER(_layer_p)],
    ),
    "moe_layer_free": (None, [_layer_p]),
    "moe_layer_config": (moe_status, [_layer_p, POINTER(_config_p)]),
    "moe_workspace_size": (moe_status, [_layer_p, c_int64, POINTER(c_size_t)]),
    "moe_warmup": (moe_status, [_layer_p, c_int64, c_void_p]),
    "moe_lora_create": (moe_status, [_layer_p, c_int64, c_int64, POINTER(_lora_p)]),
    "moe_lora_free": (None, [_lora_p]),
    "moe_lora_set_slot": (
        moe_status,
        [_lora_p, c_int64, _tensor_p, _tensor_p, _tensor_p, _tensor_p, c_float],
    ),
    "moe_lora_clear_slot": (moe_status, [_lora_p, c_int64]),
    "moe_lora_set_enabled": (moe_status, [_lora_p, c_int64, c_bool]),
    "moe_lora_runner_config": (moe_status, [_lora_p, POINTER(_config_p)]),
    "moe_lora_workspace_size": (moe_status, [_lora_p, c_int64, POINTER(c_size_t)]),
    "moe_run_lora": (
        moe_status,
        [_lora_p, _plan_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p, _tensor_p,
         c_void_p],
    ),
    "moe_plan_create": (moe_status, [_layer_p, POINTER(_plan_p)]),
    "moe_plan_free": (None, [_plan_p]),
    "moe_prepare": (moe_status, [_layer_p, _tensor_p, _tensor_p, _plan_p, c_void_p]),
    "moe_run": (
        moe_status,
        [_layer_p, _lora_p, _plan_p, _tensor_p, _tensor_p, _tensor_p, c_void_p],
    ),
    "moe_plan_num_tokens": (moe_status, [_plan_p, POINTER(c_int64)]),
    "moe_plan_num_padded": (moe_status, [_plan_p, POINTER(c_int64)]),
    "moe_plan_tile_config": (moe_status, [_plan_p, POINTER(moe_tile_config)]),
    "moe_plan_sorted_route_ids": (
        moe_status,
        [_plan_p, POINTER(c_int32), c_size_t, POINTER(c_size_t)],
    ),
    "moe_plan_block_expert": (
        moe_status,
        [_plan_p, POINTER(c_int32), c_size_t, POINTER(c_size_t)],
    ),
}

# ---------------------------------------------------------------------------------------------
# Errors.


class FusedMoEError(Exception):
    """A call failed: `status` (a Status) and `message`, the library's moe_last_error()."""

    def __init__(self, status, message, function=None):
        super().__init__(status, message)
        self.status = _as_status(status)
        self.message = message
        self.function = function

    def __str__(self):
        where = f"{self.function}: " if self.function else ""
        return f"{where}{status_string(self.status)}: {self.message}"


def _as_status(value):
    """A Status, or the plain number for a status this module does not know."""
    try:
        return Status(value)
    except ValueError:
        return value


class InvalidArgumentError(FusedMoEError):
    """An argument is wrong: NULL, dtype, shape, device, range, aliasing, a bad option."""


class UnsupportedError(FusedMoEError):
    """Well formed, but this build or machine cannot run it."""


class DeviceError(FusedMoEError):
    """The device or its driver failed."""


class OutOfMemoryError(FusedMoEError):
    """Memory or threads could not be had."""


class InternalError(FusedMoEError):
    """A bug in fusedmoe (a caught panic)."""


ERRORS = {
    Status.ERR_INVALID_ARGUMENT: InvalidArgumentError,
    Status.ERR_UNSUPPORTED: UnsupportedError,
    Status.ERR_DEVICE: DeviceError,
    Status.ERR_OUT_OF_MEMORY: OutOfMemoryError,
    Status.ERR_INTERNAL: InternalError,
}


def _raise_on_failure(result, function, _args):
    """errcheck of every moe_status function: runs right after the call, on its thread, so
    moe_last_error() is still this call's message."""
    if result.value == Status.OK:
        return None
    message = lib.moe_last_error().decode("utf-8", "replace")
    error = ERRORS.get(result.value, FusedMoEError)
    raise error(result.value, message, function.__name__)


# ---------------------------------------------------------------------------------------------
# Loading the library.


def _candidates():
    """(where, what to dlopen) in search order. FUSEDMOE_LIB, when set, is the only one: a
    host that names a library must get that one, not a stale build found elsewhere."""
    explicit = os.environ.get("FUSEDMOE_LIB")
    if explicit:
        return [("FUSEDMOE_LIB", explicit)]
    release = pathlib.Path(__file__).resolve().parents[2] / "target" / "release"
    found = ctypes.util.find_library("fusedmoe")
    return [
        ("cargo target", str(release / "libfusedmoe.so")),
        ("cargo target", str(release / "deps" / "libfusedmoe.so")),
        ("ctypes.util.find_library('fusedmoe')", found or "(not found)"),
    ]


def _load():
    tried = []
    for where, path in _candidates():
        try:
            return ctypes.CDLL(path)
        except OSError as error:
            tried.append(f"  {where}: {path}: {error}")
    raise ImportError("fusedmoe: cannot load libfusedmoe.so; tried:\n" + "\n".join(tried))


def _declare(library):
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes
        if restype is moe_status:
            function.errcheck = _raise_on_failure


def _check_abi(library):
    found = library.moe_abi_version()
    if found != ABI_VERSION:
        raise ImportError(
            f"fusedmoe: {library._name} has ABI version {found}, this module was written for "
            f"{ABI_VERSION}"
        )


lib = _load()
_declare(lib)
_check_abi(lib)


def abi_version():
    return lib.moe_abi_version()


def version():
    return lib.moe_version().decode()


def status_string(status):
    return lib.moe_status_string(status).decode()


def supports(feature):
    """Whether this build, on this machine, can run `feature` ("cuda", "bf16", "swiglu_oai",
    "dispatch", "option:tile.block_m", ...)."""
    return lib.moe_supports(feature.encode())


# ---------------------------------------------------------------------------------------------
# DLPack: borrowing a tensor's memory for the duration of a call.

# Our own function object, so that setting its types does not touch ctypes.pythonapi's shared one.
_capsule_pointer = ctypes.PYFUNCTYPE(c_void_p, ctypes.py_object, c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)
_DLPACK_LEGACY_DEFAULT_STREAM = 1  # DLPack's code for CUDA's stream 0, which it reserves


def _is_cuda(array):
    return array.__dlpack_device__()[0] == DEVICE_CUDA


class _Borrowed:
    """An array's DLPack export, alive as long as this object: the capsule is not renamed
    (we do not consume it), so its producer still owns the memory and frees it later."""

    __slots__ = ("source", "capsule", "tensor")

    def __init__(self, source, stream=None):
        self.source = source
        self.capsule = self._export(source, stream)
        address = _capsule_pointer(self.capsule, b"dltensor")
        # A DLManagedTensor begins with its DLTensor, which is a moe_tensor.
        self.tensor = ctypes.cast(address, _tensor_p)

    @staticmethod
    def _export(source, stream):
        """`stream`: the CUDA stream that will use the memory, which a CUDA producer makes
        wait for its pending work (the DLPack protocol); CPU producers take none."""
        if not hasattr(source, "__dlpack__"):
            raise TypeError(f"expected an array with __dlpack__, got {type(source).__name__}")
        if _is_cuda(source):
            return source.__dlpack__(stream=stream or _DLPACK_LEGACY_DEFAULT_STREAM)
        return source.__dlpack__()


def _borrow(source, stream=None):
    """The borrowed export of `source`, or None for an optional tensor left out."""
    return None if source is None else _Borrowed(source, stream)


def _tensor_arg(borrowed):
    return None if borrowed is None else borrowed.tensor


def _current_stream(array):
    """The stream a host framework would use for `array` now: torch's current stream for a
    CUDA tensor; None (the legacy default stream; required on the CPU) otherwise."""
    if not _is_cuda(array) or not _is_torch(array):
        return None
    import torch

    return torch.cuda.current_stream(array.device).cuda_stream


def _is_torch(array):
    return type(array).__module__.partition(".")[0] == "torch"


def aligned_empty(nbytes, alignment=WORKSPACE_ALIGNMENT):
    """An uninitialized uint8 NumPy array of `nbytes` at an `alignment`-byte address (a CPU
    workspace): over-allocated, then sliced; the slice keeps its buffer alive."""
    buffer = np.empty(nbytes + alignment - 1, dtype=np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start : start + nbytes]


def _empty_like(array, shape, workspace=False, caller="Layer.forward",
                hint="pass out=, or use Plan with a workspace of your own"):
    """A new array on `array`'s device: `shape` in its dtype, or a workspace of shape bytes."""
    if isinstance(array, np.ndarray):
        return aligned_empty(shape[0]) if workspace else np.empty(shape, dtype=array.dtype)
    if _is_torch(array):
        import torch  # torch's allocations are at least 64-byte aligned

        return array.new_empty(shape, dtype=torch.uint8 if workspace else array.dtype)
    raise TypeError(
        f"{caller} allocates NumPy and torch arrays only, not {type(array).__name__}: {hint}"
    )


# ---------------------------------------------------------------------------------------------
# Handles.


class Managed:
    """A library handle, freed exactly once: by close(), at the end of a `with`, or by the
    garbage collector when the object is dropped unclosed (`finalizer`)."""

    def __init__(self, handle, free):
        self._handle = handle
        self.finalizer = weakref.finalize(self, free, handle)

    @property
    def ptr(self):
        """The C handle; refused after close, so a freed handle never reaches the library."""
        if not self.finalizer.alive:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._handle

    @property
    def closed(self):
        return not self.finalizer.alive

    def close(self):
        self.finalizer()  # a finalize object calls its function once; later calls do nothing

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()


def _new_handle(create, handle_type, *args):
    out = POINTER(handle_type)()
    create(*args, byref(out))
    return out


def _read_scalar(getter, handle, ctype):
    value = ctype()
    getter(handle, byref(value))
    return value.value


def _copy_int32(copy, handle):
    """An int32 NumPy array from a (handle, dst, dst_len, *len) copy function: sized first."""
    length = c_size_t()
    copy(handle, None, 0, byref(length))
    values = np.empty(length.value, dtype=np.int32)
    copy(handle, values.ctypes.data_as(POINTER(c_int32)), values.size, byref(length))
    return values


# ---------------------------------------------------------------------------------------------
# Configs.


def _lookup(table, key, what):
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"{what}: {key!r} is not one of {', '.join(map(str, table))}") from None


def _inverse(table):
    return {value: key for key, value in table.items()}


DTYPES = {
    "f32": (DTYPE_CODE_FLOAT, 32),
    "f16": (DTYPE_CODE_FLOAT, 16),
    "bf16": (DTYPE_CODE_BFLOAT, 16),
}
ACTIVATIONS = {
    "silu": ACTIVATION_SILU,
    "gelu": ACTIVATION_GELU,
    "gelu_tanh": ACTIVATION_GELU_TANH,
    "swiglu_oai": ACTIVATION_SWIGLU_OAI,
    "silu_clamp": ACTIVATION_SILU_CLAMP,
    "silu_preclamp": ACTIVATION_SILU_PRECLAMP,
    "relu2": ACTIVATION_RELU2,
}
GATE_UP_LAYOUTS = {"halves": GATE_UP_HALVES, "interleaved": GATE_UP_INTERLEAVED}
DEVICE_TYPES = {"cpu": DEVICE_CPU, "cuda": DEVICE_CUDA}


def _dtype_to_c(name):
    code, bits = _lookup(DTYPES, name, "dtype")
    return moe_dtype(code, bits, 1)


def _dtype_from_c(dtype):
    return _lookup(_inverse(DTYPES), (dtype.code, dtype.bits), "dtype")


def _device_to_c(device):
    """"cpu", "cuda", "cuda:1" (or anything whose str() is one, e.g. a torch.device)."""
    kind, _, ordinal = str(device).partition(":")
    return moe_device(_lookup(DEVICE_TYPES, kind, "device"), int(ordinal or 0))


def _device_from_c(device):
    kind = _lookup(_inverse(DEVICE_TYPES), device.device_type, "device")
    return kind if kind == "cpu" else f"{kind}:{device.device_id}"


class _Field:
    """A config field: a property over moe_config_get_<name> and moe_config_set_<name>."""

    def __init__(self, ctype, to_c=lambda value: value, from_c=lambda value: value.value):
        self.ctype, self.to_c, self.from_c = ctype, to_c, from_c

    def __set_name__(self, owner, name):
        self.name = name
        self.getter = getattr(lib, f"moe_config_get_{name}")
        self.setter = getattr(lib, f"moe_config_set_{name}")

    def __get__(self, config, owner=None):
        if config is None:
            return self
        value = self.ctype()
        self.getter(config.ptr, byref(value))
        return self.from_c(value)

    def __set__(self, config, value):
        if not config.writable:
            raise AttributeError(f"{self.name}: a layer's config is read-only; clone() it")
        self.setter(config.ptr, self.to_c(value))


class _OptionalField(_Field):
    """A float field that may be unset (gemm1_alpha, gemm1_limit): None when unset."""

    def __get__(self, config, owner=None):
        if config is None:
            return self
        is_set, value = c_bool(), c_float()
        self.getter(config.ptr, byref(is_set), byref(value))
        return value.value if is_set.value else None


def _enum_field(table, what):
    return _Field(
        c_uint32,
        to_c=lambda name: _lookup(table, name, what),
        from_c=lambda value: _lookup(_inverse(table), value.value, what),
    )


class _ConfigFields:
    """Every config field as a property, and the options; shared by a host's Config and a
    layer's read-only LayerConfig."""

    writable = False

    num_experts = _Field(c_int64)
    num_local_experts = _Field(c_int64)
    top_k = _Field(c_int64)
    hidden_size = _Field(c_int64)
    intermediate_size = _Field(c_int64)
    dtype = _Field(moe_dtype, _dtype_to_c, _dtype_from_c)
    activation = _enum_field(ACTIVATIONS, "activation")
    gated = _Field(c_bool)
    gate_up_layout = _enum_field(GATE_UP_LAYOUTS, "gate_up_layout")
    gemm1_alpha = _OptionalField(c_float)
    gemm1_limit = _OptionalField(c_float)
    routed_scaling_factor = _Field(c_float)
    apply_router_weight_on_input = _Field(c_bool)
    no_combine = _Field(c_bool)
    no_combine_keep_router_weight = _Field(c_bool)
    inplace = _Field(c_bool)
    device = _Field(moe_device, _device_to_c, _device_from_c)

    @classmethod
    def field_names(cls):
        return [name for name in dir(cls) if isinstance(getattr(cls, name), _Field)]

    def get_option(self, key):
        """A backend option's value (InvalidArgumentError when it is not set)."""
        length = c_size_t()
        lib.moe_config_get_option(self.ptr, key.encode(), None, 0, byref(length))
        buffer = ctypes.create_string_buffer(length.value + 1)
        lib.moe_config_get_option(self.ptr, key.encode(), buffer, len(buffer), byref(length))
        return buffer.value.decode()

    def clone(self):
        """A new, writable copy."""
        return Config._adopt(_new_handle(lib.moe_config_clone, moe_config, self.ptr))


class Config(_ConfigFields, Managed):
    """A mutable config (one thread at a time): Config(num_experts=8, top_k=2, ...,
    options={"cpu.num_threads": 4}); every field is also a read-write property."""

    writable = True

    def __init__(self, *, options=None, **fields):
        unknown = set(fields) - set(self.field_names())
        if unknown:
            raise TypeError(f"Config has no field {', '.join(sorted(unknown))}")
        Managed.__init__(self, _new_handle(lib.moe_config_create, moe_config), lib.moe_config_free)
        for name, value in fields.items():
            setattr(self, name, value)
        for key, value in (options or {}).items():
            self.set_option(key, value)

    @classmethod
    def _adopt(cls, handle):
        config = cls.__new__(cls)
        Managed.__init__(config, handle, lib.moe_config_free)
        return config

    def set_option(self, key, value):
        """A backend option, e.g. ("tile.block_m", 64); an unknown key or bad value is refused."""
        lib.moe_config_set_option(self.ptr, key.encode(), str(value).encode())


class LayerConfig(_ConfigFields):
    """A layer's own config: read-only, owned by the layer (which this object keeps alive)."""

    def __init__(self, layer):
        self._layer = layer
        self._handle = _new_handle(lib.moe_layer_config, moe_config, layer.ptr)

    @property
    def ptr(self):
        if self._layer.closed:
            raise ValueError("Layer is closed, and its config with it")
        return self._handle


# ---------------------------------------------------------------------------------------------
# Layers and plans.


class Layer(Managed):
    """A layer: a validated copy of `config` and the borrowed weights w13 [E, N1, H],
    w2 [E, H, I], optional biases b13 [E, N1] and b2 [E, H]. The weights are not copied:
    this object keeps them alive, and they must not change while the layer is in use.
    Immutable; any thread may use it."""

    def __init__(self, config, w13, w2, b13=None, b2=None):
        weights = [_borrow(w) for w in (w13, w2, b13, b2)]
        handle = _new_handle(
            lib.moe_layer_create, moe_layer, config.ptr, *[_tensor_arg(w) for w in weights]
        )
        super().__init__(handle, lib.moe_layer_free)
        self._weights = weights
        self._per_thread = threading.local()

    @property
    def config(self):
        """The layer's read-only config (made on demand: stored, it would hold the layer in a
        reference cycle)."""
        return LayerConfig(self)

    def workspace_size(self, max_tokens):
        """Bytes of workspace any batch of up to `max_tokens` tokens needs."""
        size = c_size_t()
        lib.moe_workspace_size(self.ptr, max_tokens, byref(size))
        return size.value

    def warmup(self, max_tokens, stream=None):
        """Compiles every kernel batches of up to `max_tokens` tokens use (CUDA layers; a CPU
        layer has nothing to compile). Call it before capturing a CUDA graph."""
        lib.moe_warmup(self.ptr, max_tokens, stream)

    def forward(self, hidden, topk_ids, topk_weights, out=None, stream=None):
        """Runs the layer on one batch and returns `out` (allocated like hidden when None:
        [M, H], or [M, K, H] with no_combine; hidden itself for an inplace layer).

        Uses a plan and a workspace this layer keeps for the calling thread; the workspace
        grows when a batch has more tokens than any before (so warm up at the largest batch
        before capturing a CUDA graph). `stream`: the CUDA stream; by default torch's current
        stream for torch CUDA tensors."""
        if stream is None:
            stream = _current_stream(hidden)
        config = self.config
        plan, workspace = self._scratch(hidden, len(topk_ids))
        plan.prepare(topk_ids, workspace, stream)
        if out is None and not config.inplace:
            out = _empty_like(hidden, _output_shape(config, hidden, topk_ids))
        plan.run(hidden, topk_weights, out, stream)
        return hidden if config.inplace else out

    def _scratch(self, like, tokens):
        """This thread's plan, and a workspace on `like`'s device for `tokens` tokens."""
        scratch = self._per_thread
        if not hasattr(scratch, "plan"):
            # A proxy: a plan holding this layer would form a cycle that delays freeing the
            # weights until a garbage collection.
            scratch.plan = Plan(weakref.proxy(self))
            scratch.workspace, scratch.max_tokens = None, -1
        if tokens > scratch.max_tokens:
            scratch.workspace = _empty_like(like, (self.workspace_size(tokens),), workspace=True)
            scratch.max_tokens = tokens
        return scratch.plan, scratch.workspace


def _output_shape(config, hidden, topk_ids):
    tokens, hidden_size = hidden.shape
    if config.no_combine:
        return (tokens, topk_ids.shape[1], hidden_size)
    return (tokens, hidden_size)


class Plan(Managed):
    """One batch's align result for `layer`: prepare(), then run(). One stream (thread) at a
    time. `stream` arguments are CUDA stream handles (int) for CUDA layers; left out, they are
    torch's current stream for torch CUDA tensors (as Layer.forward), None otherwise."""

    def __init__(self, layer):
        super().__init__(_new_handle(lib.moe_plan_create, moe_plan, layer.ptr), lib.moe_plan_free)
        self._layer = layer
        self._workspace = None

    def prepare(self, topk_ids, workspace, stream=None):
        """The align step and tile choice for topk_ids [M, K] (int32 or int64, local ids in
        [-1, E); -1 drops a route), into `workspace` (1-D uint8, 16-byte aligned)."""
        if stream is None:
            stream = _current_stream(topk_ids)
        ids, space = _borrow(topk_ids, stream), _borrow(workspace, stream)
        lib.moe_prepare(self._layer.ptr, ids.tensor, space.tensor, self.ptr, stream)
        self._workspace = space  # the plan refers to it until the next prepare
        return self

    def run(self, hidden, topk_weights, out=None, stream=None):
        """The layer on the prepared batch: hidden [M, H], topk_weights [M, K], into out
        ([M, H], or [M, K, H] with no_combine; None or hidden for an inplace layer)."""
        if stream is None:
            stream = _current_stream(hidden)
        tensors = [_borrow(t, stream) for t in (hidden, topk_weights, out)]
        lib.moe_run(self._layer.ptr, None, self.ptr, *[_tensor_arg(t) for t in tensors], stream)
        return out

    @property
    def num_tokens(self):
        return self._read(lib.moe_plan_num_tokens, c_int64)

    @property
    def num_padded(self):
        return self._read(lib.moe_plan_num_padded, c_int64)

    @property
    def tile_config(self):
        config = moe_tile_config()
        lib.moe_plan_tile_config(self.ptr, byref(config))
        return TileConfig(*(getattr(config, name) for name in TileConfig._fields))

    def sorted_route_ids(self):
        """The whole capacity of sorted route ids (int32): used entries, then padding."""
        return self._copy_ids(lib.moe_plan_sorted_route_ids)

    def block_expert(self):
        """The expert of each BLOCK_M entries of the capacity (int32); -1 past the used ones."""
        return self._copy_ids(lib.moe_plan_block_expert)

    def run_lora(self, lora, hidden, topk_weights, adapter_ids=None, seg_indptr=None,
                 seg_adapter=None, out=None, stream=None):
        """run() with the deltas of `lora`'s slots (a wrapper of this plan's layer; prepare
        into a workspace of lora.workspace_size(M) bytes). The token -> adapter map is
        adapter_ids [M] (int32) or seg_indptr [S+1] with seg_adapter [S] (int32): tokens
        [seg_indptr[s], seg_indptr[s+1]) use seg_adapter[s]. -1, an empty or a disabled slot
        means no delta."""
        if stream is None:
            stream = _current_stream(hidden)
        tensors = [_borrow(t, stream) for t in
                   (hidden, topk_weights, adapter_ids, seg_indptr, seg_adapter, out)]
        lib.moe_run_lora(lora.ptr, self.ptr, *[_tensor_arg(t) for t in tensors], stream)
        return out

    def _read(self, getter, ctype):
        return _read_scalar(getter, self.ptr, ctype)

    def _copy_ids(self, copy):
        return _copy_int32(copy, self.ptr)


# ---------------------------------------------------------------------------------------------
# Expert parallelism (SPEC §6).


class Dispatcher(Managed):
    """An expert-parallel dispatcher: the global -> local expert mapping of one rank and its
    expert mask. Made by Dispatcher.contiguous(...) or Dispatcher.from_mapping(...);
    immutable, any thread may use it.

    A rank's layer is made with num_experts = dispatcher.num_experts and num_local_experts =
    dispatcher.num_local_experts, and local expert l holds the weights of the global expert g
    with mapping[g] == l; dispatch() turns the router's global ids into its local ids."""

    def __init__(self, *_args, **_kwargs):
        raise TypeError(
            "make a Dispatcher with Dispatcher.contiguous(...) or Dispatcher.from_mapping(...)"
        )

    @classmethod
    def _adopt(cls, handle):
        dispatcher = cls.__new__(cls)
        Managed.__init__(dispatcher, handle, lib.moe_dispatcher_free)
        return dispatcher

    @classmethod
    def contiguous(cls, num_experts, ep_size, ep_rank, num_shared_experts=0, device="cpu"):
        """The contiguous partition for rank `ep_rank` of `ep_size`: with S =
        `num_shared_experts` (the last S global ids, replicated on every rank) and
        R = (num_experts - S) / ep_size, global ids [ep_rank*R, (ep_rank+1)*R) become local
        0..R-1 and the shared ones R..R+S-1; every other id maps to -1."""
        return cls._adopt(
            _new_handle(
                lib.moe_dispatcher_create_contiguous, moe_dispatcher, num_experts, ep_size,
                ep_rank, num_shared_experts, _device_to_c(device),
            )
        )

    @classmethod
    def from_mapping(cls, mapping, num_local_experts, device="cpu"):
        """An explicit table (EPLB-style placements): `mapping` is a 1-D int32 host array
        [num_experts] of local ids in [-1, num_local_experts), -1 for experts stored
        elsewhere, no local id twice. The library copies it. Arrays are passed as they are
        (another dtype is refused, naming "mapping"); a list or tuple becomes int32."""
        if isinstance(mapping, (list, tuple)):
            mapping = np.array(mapping, dtype=np.int32)
        table = _borrow(mapping)
        return cls._adopt(
            _new_handle(
                lib.moe_dispatcher_create_mapping, moe_dispatcher, table.tensor,
                num_local_experts, _device_to_c(device),
            )
        )

    @property
    def num_experts(self):
        """E_g, the experts of the whole model: the length of mapping."""
        return _read_scalar(lib.moe_dispatcher_num_experts, self.ptr, c_int64)

    @property
    def num_local_experts(self):
        """E_local, the experts this rank stores (its layer's num_local_experts)."""
        return _read_scalar(lib.moe_dispatcher_num_local_experts, self.ptr, c_int64)

    @property
    def mapping(self):
        """int32 [num_experts]: the local id of each global expert, -1 where stored elsewhere
        (a copy)."""
        return _copy_int32(lib.moe_dispatcher_mapping, self.ptr)

    @property
    def expert_mask(self):
        """int32 [num_experts]: 1 where the global expert is stored on this rank, else 0 (a
        copy)."""
        return _copy_int32(lib.moe_dispatcher_expert_mask, self.ptr)

    def dispatch(self, topk_ids, out=None, stream=None):
        """Maps global expert ids topk_ids (int32 or int64, e.g. [M, K]) to this rank's local
        ids: -1 where the id is negative or the expert is stored elsewhere. Returns `out`
        (allocated like topk_ids when None); out=topk_ids maps in place. An id >=
        num_experts is refused and nothing is written. `stream`: as Plan.prepare (None on
        the CPU)."""
        if stream is None:
            stream = _current_stream(topk_ids)
        if out is None:
            out = _empty_like(topk_ids, tuple(topk_ids.shape), caller="Dispatcher.dispatch",
                              hint="pass out=")
        ids = _borrow(topk_ids, stream)
        local = ids if out is topk_ids else _borrow(out, stream)
        lib.moe_dispatch(self.ptr, ids.tensor, local.tensor, stream)
        return out


# ---------------------------------------------------------------------------------------------
# LoRA (SPEC §7).


class LoraConfig(_ConfigFields):
    """A LoRA wrapper's runner config: the wrapped layer's own config handle (the very pointer
    Layer.config has), read-only; it stays valid while the wrapper is open."""

    def __init__(self, lora):
        self._lora = lora
        self._handle = _new_handle(lib.moe_lora_runner_config, moe_config, lora.ptr)

    @property
    def ptr(self):
        if self._lora.closed:
            raise ValueError("Lora is closed, and its runner config with it")
        return self._handle


class Lora(Managed):
    """A LoRA wrapper over `layer`: `num_slots` adapter slots of rank at most `max_rank`, all
    empty and enabled at first. The library keeps the layer alive for the wrapper, so the
    runner config stays valid after layer.close(); this object keeps the layer's weights and
    every slot's weights alive. Slots may change while other threads run the wrapper."""

    def __init__(self, layer, num_slots, max_rank):
        handle = _new_handle(lib.moe_lora_create, moe_lora, layer.ptr, num_slots, max_rank)
        super().__init__(handle, lib.moe_lora_free)
        self._layer = layer  # its weights (and a Plan's need of its handle to prepare)
        self._slots = {}
        self._per_thread = threading.local()
        self.num_slots, self.max_rank = num_slots, max_rank

    def set_slot(self, slot, gate_up_a, gate_up_b, down_a, down_b, scaling=1.0):
        """Sets slot `slot` to an adapter (borrowed, not copied): gate_up_a [E or 1, 2r, H]
        (gated; rows [0, r) gate, [r, 2r) up) or [E or 1, r, H], gate_up_b [E, N1, r], down_a
        [E, r, I], down_b [E or 1, H, r], in the layer dtype; r = max_rank (zero pad smaller
        ranks). `scaling` multiplies B's products."""
        weights = [_borrow(w) for w in (gate_up_a, gate_up_b, down_a, down_b)]
        lib.moe_lora_set_slot(self.ptr, slot, *[w.tensor for w in weights], scaling)
        self._slots[slot] = weights
        return self

    def clear_slot(self, slot):
        lib.moe_lora_clear_slot(self.ptr, slot)
        self._slots.pop(slot, None)
        return self

    def set_enabled(self, slot, enabled=True):
        lib.moe_lora_set_enabled(self.ptr, slot, enabled)
        return self

    @property
    def runner_config(self):
        return LoraConfig(self)

    def workspace_size(self, max_tokens):
        """Bytes of workspace a LoRA run of up to `max_tokens` tokens needs."""
        size = c_size_t()
        lib.moe_lora_workspace_size(self.ptr, max_tokens, byref(size))
        return size.value

    def forward(self, hidden, topk_ids, topk_weights, adapter_ids=None, seg_indptr=None,
                seg_adapter=None, out=None, stream=None):
        """Layer.forward with each token's adapter (see Plan.run_lora for the map)."""
        if stream is None:
            stream = _current_stream(hidden)
        config = self.runner_config
        plan, workspace = self._scratch(hidden, len(topk_ids))
        plan.prepare(topk_ids, workspace, stream)
        if out is None and not config.inplace:
            out = _empty_like(hidden, _output_shape(config, hidden, topk_ids))
        plan.run_lora(self, hidden, topk_weights, adapter_ids, seg_indptr, seg_adapter, out,
                      stream)
        return hidden if config.inplace else out

    def _scratch(self, like, tokens):
        scratch = self._per_thread
        if not hasattr(scratch, "plan"):
            scratch.plan = Plan(self._layer)
            scratch.workspace, scratch.max_tokens = None, -1
        if tokens > scratch.max_tokens:
            scratch.workspace = _empty_like(like, (self.workspace_size(tokens),), workspace=True)
            scratch.max_tokens = tokens
        return scratch.plan, scratch.workspace

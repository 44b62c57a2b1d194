"""The expert-parallel dispatcher (SPEC §6) on NumPy: the contiguous partition and its mask,
explicit tables, moe_dispatch (in place too), its errors and handles, and expert parallelism
end to end: the outputs of ep_size ranks sum to the single-rank output."""

import gc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fusedmoe as fm
import moe_reference as reference

HIDDEN, INTER, TOP_K = 32, 16, 3


def data_pointer(array):
    return array.__array_interface__["data"][0]


def spec_contiguous(num_experts, ep_size, ep_rank, shared):
    """SPEC §6 written out independently: (mapping, mask, E_local)."""
    routed = (num_experts - shared) // ep_size
    mapping = [-1] * num_experts
    for i in range(routed):
        mapping[ep_rank * routed + i] = i
    for s in range(shared):
        mapping[num_experts - shared + s] = routed + s
    mask = [int(0 <= local < routed + shared) for local in mapping]
    return mapping, mask, routed + shared


# ---------------------------------------------------------------------------------------------
# The contiguous partition and explicit tables.


def test_contiguous_partition_of_the_spec_example():
    """E_g 9, one shared expert, 4 ranks: R = 2; rank 1 holds 2, 3 and the shared 8."""
    with fm.Dispatcher.contiguous(9, ep_size=4, ep_rank=1, num_shared_experts=1) as dispatcher:
        assert dispatcher.num_experts == 9 and dispatcher.num_local_experts == 3
        mapping, mask = dispatcher.mapping, dispatcher.expert_mask
        assert mapping.dtype == np.int32 and mask.dtype == np.int32
        assert mapping.tolist() == [-1, -1, 0, 1, -1, -1, -1, -1, 2]
        assert mask.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 1]


@pytest.mark.parametrize("num_experts, ep_size, shared", [(8, 1, 0), (8, 4, 0), (9, 4, 1),
                                                          (11, 3, 2), (6, 2, 0), (7, 6, 1)])
def test_contiguous_partition_follows_spec_on_every_rank(num_experts, ep_size, shared):
    holders = np.zeros(num_experts, dtype=int)
    for rank in range(ep_size):
        with fm.Dispatcher.contiguous(num_experts, ep_size, rank, shared) as dispatcher:
            mapping, mask, local = spec_contiguous(num_experts, ep_size, rank, shared)
            assert dispatcher.mapping.tolist() == mapping
            assert dispatcher.expert_mask.tolist() == mask
            assert dispatcher.num_local_experts == local
            assert dispatcher.num_experts == num_experts
            holders += dispatcher.expert_mask
    # Every routed expert lives on exactly one rank; the shared ones on all of them.
    assert holders.tolist() == [1] * (num_experts - shared) + [ep_size] * shared


def test_explicit_table_round_trips_and_is_copied():
    table = np.array([3, -1, 0, -1, 2, 1, -1], dtype=np.int32)
    with fm.Dispatcher.from_mapping(table, num_local_experts=4) as dispatcher:
        table[:] = -1  # the library holds its own copy
        assert dispatcher.num_experts == 7 and dispatcher.num_local_experts == 4
        assert dispatcher.mapping.tolist() == [3, -1, 0, -1, 2, 1, -1]
        assert dispatcher.expert_mask.tolist() == [1, 0, 1, 0, 1, 1, 0]
        # The properties are copies, too.
        dispatcher.mapping[0] = 99
        assert dispatcher.mapping[0] == 3


def test_explicit_table_may_be_a_list():
    with fm.Dispatcher.from_mapping([-1, 1, 0], num_local_experts=2) as dispatcher:
        assert dispatcher.mapping.tolist() == [-1, 1, 0]


@pytest.mark.parametrize("table, local, words", [
    ([0, 1, 0], 2, "used twice"),        # a duplicate local id
    ([0, 2], 2, "mapping[1] = 2"),       # a local id >= E_local
    ([0, -2], 2, "mapping[1] = -2"),     # below -1
])
def test_a_bad_table_raises_invalid_argument_naming_mapping(table, local, words):
    with pytest.raises(fm.InvalidArgumentError) as caught:
        fm.Dispatcher.from_mapping(np.array(table, dtype=np.int32), local)
    assert "mapping" in caught.value.message and words in caught.value.message
    assert caught.value.function == "moe_dispatcher_create_mapping"


def test_a_table_of_another_dtype_is_refused_not_converted():
    with pytest.raises(fm.InvalidArgumentError, match="mapping"):
        fm.Dispatcher.from_mapping(np.array([0, -1, 1], dtype=np.int64), 2)


@pytest.mark.parametrize("arguments, words", [
    ((10, 4, 0, 0), "ep_size"),                # 4 does not divide the 10 routed experts
    ((8, 4, 4, 0), "ep_rank"),                 # rank out of range
    ((8, 0, 0, 0), "ep_size"),
    ((8, 2, 0, 8), "num_shared_experts"),      # nothing left to route
    ((0, 1, 0, 0), "num_experts"),
])
def test_a_bad_partition_raises_invalid_argument_by_name(arguments, words):
    with pytest.raises(fm.InvalidArgumentError, match=words):
        fm.Dispatcher.contiguous(*arguments)


def test_a_cuda_dispatcher_is_refused_by_name():
    with pytest.raises((fm.UnsupportedError, fm.DeviceError), match="device"):
        fm.Dispatcher.contiguous(8, 2, 0, device="cuda:0")


def test_dispatcher_is_made_only_by_its_constructors():
    with pytest.raises(TypeError, match="contiguous"):
        fm.Dispatcher()


def test_library_supports_dispatch():
    assert fm.supports("dispatch")


# ---------------------------------------------------------------------------------------------
# moe_dispatch.


def global_ids(num_experts, tokens=9, seed=0, dtype=np.int32):
    """Random distinct global ids per token; every third token drops its last route."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :TOP_K].astype(dtype)
    ids[::3, -1] = -1
    return ids


def expected_local(mapping, ids):
    return np.where(ids < 0, -1, np.asarray(mapping)[np.maximum(ids, 0)]).astype(ids.dtype)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_dispatch_maps_global_ids_and_keeps_minus_one(dtype):
    ids = global_ids(9, dtype=dtype)
    before = ids.copy()
    with fm.Dispatcher.contiguous(9, 4, 1, 1) as dispatcher:
        local = dispatcher.dispatch(ids)
        want = expected_local(dispatcher.mapping, ids)
    assert local.dtype == dtype and local.shape == ids.shape
    assert np.array_equal(local, want)
    assert np.all(local[ids < 0] == -1) and np.any(ids < 0)
    assert np.array_equal(ids, before)  # the input is not touched


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_dispatch_in_place_returns_topk_ids_itself(dtype):
    ids = global_ids(8, dtype=dtype)
    want = expected_local(spec_contiguous(8, 2, 1, 0)[0], ids)
    address = data_pointer(ids)
    with fm.Dispatcher.contiguous(8, 2, 1) as dispatcher:
        result = dispatcher.dispatch(ids, out=ids)
    assert result is ids and data_pointer(ids) == address
    assert np.array_equal(ids, want)


def test_dispatch_into_a_given_output_of_another_id_dtype():
    ids = global_ids(8)
    out = np.full(ids.shape, 1234, dtype=np.int64)
    with fm.Dispatcher.contiguous(8, 4, 3) as dispatcher:
        result = dispatcher.dispatch(ids, out=out)
        want = expected_local(dispatcher.mapping, ids)
    assert result is out
    assert np.array_equal(out, want)


def test_an_id_past_the_global_experts_is_refused_and_nothing_is_written():
    ids = global_ids(8)
    ids[4, 1] = 8
    out = np.full(ids.shape, 1234, dtype=np.int32)
    with fm.Dispatcher.contiguous(8, 2, 0) as dispatcher:
        with pytest.raises(fm.InvalidArgumentError, match="topk_ids") as caught:
            dispatcher.dispatch(ids, out=out)
        assert caught.value.function == "moe_dispatch"
        with pytest.raises(fm.InvalidArgumentError, match="topk_ids"):
            dispatcher.dispatch(ids, out=ids)
    assert np.all(out == 1234)
    assert ids[4, 1] == 8


def test_dispatch_refuses_a_wrong_shape_and_a_partly_overlapping_output():
    ids = global_ids(8)
    with fm.Dispatcher.contiguous(8, 2, 0) as dispatcher:
        with pytest.raises(fm.InvalidArgumentError, match="local_topk_ids: shape"):
            dispatcher.dispatch(ids, out=np.empty((ids.shape[0], 1), dtype=np.int32))
        # int64 output over the int32 input's memory: overlapping, not the same tensor.
        memory = np.zeros(2 * ids.nbytes, dtype=np.uint8)
        inside = memory[: ids.nbytes].view(np.int32).reshape(ids.shape)
        inside[:] = ids
        wider = memory.view(np.int64).reshape(ids.shape)
        with pytest.raises(fm.InvalidArgumentError, match="overlaps"):
            dispatcher.dispatch(inside, out=wider)
        assert np.array_equal(inside, ids)


def test_dispatch_refuses_float_ids_and_a_stream_on_the_cpu():
    with fm.Dispatcher.contiguous(8, 2, 0) as dispatcher:
        with pytest.raises(fm.InvalidArgumentError, match="topk_ids: dtype"):
            dispatcher.dispatch(np.zeros((2, 2), dtype=np.float32))
        with pytest.raises(fm.InvalidArgumentError, match="stream"):
            dispatcher.dispatch(global_ids(8), stream=0x1234)


def test_dispatch_of_an_empty_batch():
    with fm.Dispatcher.contiguous(8, 2, 1) as dispatcher:
        assert dispatcher.dispatch(np.empty((0, TOP_K), dtype=np.int32)).shape == (0, TOP_K)


def test_dispatch_from_several_threads_at_once():
    batches = [global_ids(16, tokens=50 + seed, seed=seed) for seed in range(8)]
    with fm.Dispatcher.contiguous(16, 4, 2) as dispatcher:
        mapping = dispatcher.mapping
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(dispatcher.dispatch, batches))
    for ids, local in zip(batches, results):
        assert np.array_equal(local, expected_local(mapping, ids))


# ---------------------------------------------------------------------------------------------
# Handles.


def test_closed_dispatcher_is_refused_and_closing_twice_is_harmless():
    dispatcher = fm.Dispatcher.contiguous(8, 2, 0)
    with dispatcher:
        pass
    dispatcher.close()
    assert dispatcher.closed
    with pytest.raises(ValueError, match="closed"):
        dispatcher.mapping
    with pytest.raises(ValueError, match="closed"):
        dispatcher.dispatch(global_ids(8))


def test_a_dropped_dispatcher_is_freed_by_its_finalizer():
    dispatcher = fm.Dispatcher.from_mapping(np.array([1, 0], dtype=np.int32), 2)
    finalizer = dispatcher.finalizer
    assert finalizer.alive
    del dispatcher
    gc.collect()
    assert not finalizer.alive


# ---------------------------------------------------------------------------------------------
# Expert parallelism end to end (SPEC §6): ep_size ranks, each with its dispatcher and a layer
# holding its experts, sum to the single-rank layer.
#
# Every term of the single-rank output must be computed exactly once over all ranks:
# - a routed expert lives on one rank, which holds all of it, b2 included;
# - a shared expert is replicated on every rank and every rank runs its routes, so it is
#   split tensor-parallel style: rank r keeps the columns of w2 for its slice of the
#   intermediate dimension (zeros elsewhere), and only rank 0 gets its b2 (as gpt-oss does).
#   The activation is elementwise over I and GEMM2 sums over I, so the slices add up.


def random_model(num_experts, tokens=13, seed=0, shared=0):
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    routed = num_experts - shared
    ids = np.argsort(rng.random((tokens, routed)), axis=1)[:, :TOP_K].astype(np.int32)
    if shared:  # SGLang's fused shared experts: the last route goes to a shared expert
        ids[:, -1] = rng.integers(routed, num_experts, tokens)
    ids[::4, 0] = -1
    ids[1::5, -1] = -1
    return dict(
        hidden=f32(rng.uniform(-1, 1, (tokens, HIDDEN))),
        w13=f32(rng.uniform(-1, 1, (num_experts, 2 * INTER, HIDDEN)) / np.sqrt(HIDDEN)),
        w2=f32(rng.uniform(-1, 1, (num_experts, HIDDEN, INTER)) / np.sqrt(INTER)),
        b13=f32(rng.uniform(-0.5, 0.5, (num_experts, 2 * INTER))),
        b2=f32(rng.uniform(-0.5, 0.5, (num_experts, HIDDEN))),
        topk_ids=ids,
        topk_weights=f32(rng.uniform(0.1, 1.0, (tokens, TOP_K))),
    )


def make_layer(num_experts, num_local_experts, w13, w2, b13, b2):
    config = fm.Config(num_experts=num_experts, num_local_experts=num_local_experts,
                       top_k=TOP_K, hidden_size=HIDDEN, intermediate_size=INTER, dtype="f32")
    return fm.Layer(config, w13, w2, b13, b2)


def rank_weights(model, dispatcher, ep_size, ep_rank, shared):
    """The rank's slice: local id l holds global expert g where mapping[g] == l."""
    mapping = dispatcher.mapping
    num_experts = len(mapping)
    holder = np.full(dispatcher.num_local_experts, -1)
    for g, local in enumerate(mapping):
        if local >= 0:
            holder[local] = g
    assert np.all(holder >= 0)
    w13, b13 = model["w13"][holder].copy(), model["b13"][holder].copy()
    w2, b2 = model["w2"][holder].copy(), model["b2"][holder].copy()
    is_shared = holder >= num_experts - shared
    columns = np.arange(INTER) // (INTER // ep_size) == ep_rank
    w2[np.ix_(is_shared, np.arange(HIDDEN), ~columns)] = 0
    if ep_rank > 0:
        b2[is_shared] = 0
    return w13, w2, b13, b2


def single_rank_output(model, num_experts):
    with make_layer(num_experts, num_experts, model["w13"], model["w2"], model["b13"],
                    model["b2"]) as layer:
        out = layer.forward(model["hidden"], model["topk_ids"], model["topk_weights"])
    as_f64 = {k: v if k == "topk_ids" else v.astype(np.float64) for k, v in model.items()}
    assert reference.relative_error(out, reference.moe(**as_f64)) <= 1e-5
    return out


def sum_over_ranks(model, dispatchers, weights):
    total = np.zeros((len(model["hidden"]), HIDDEN), dtype=np.float64)
    for dispatcher, rank_w in zip(dispatchers, weights):
        local_ids = dispatcher.dispatch(model["topk_ids"])
        assert np.all((local_ids >= -1) & (local_ids < dispatcher.num_local_experts))
        with make_layer(dispatcher.num_experts, dispatcher.num_local_experts, *rank_w) as layer:
            assert layer.config.num_local_experts == dispatcher.num_local_experts
            total += layer.forward(model["hidden"], local_ids, model["topk_weights"])
    return total


@pytest.mark.parametrize("shared", [0, 1])
@pytest.mark.parametrize("ep_size", [2, 4])
def test_expert_parallel_ranks_sum_to_the_single_rank_layer(ep_size, shared):
    num_experts = 2 * ep_size + shared  # two routed experts per rank
    model = random_model(num_experts, seed=10 * ep_size + shared, shared=shared)
    single = single_rank_output(model, num_experts)
    dispatchers = [fm.Dispatcher.contiguous(num_experts, ep_size, rank, shared)
                   for rank in range(ep_size)]
    weights = [rank_weights(model, d, ep_size, rank, shared)
               for rank, d in enumerate(dispatchers)]
    total = sum_over_ranks(model, dispatchers, weights)
    for d in dispatchers:
        d.close()
    assert reference.relative_error(total, single) <= 1e-5


def test_expert_parallel_with_an_explicit_placement_sums_to_the_single_rank_layer():
    """EPLB-style: 10 experts scattered over 2 ranks in a random order."""
    num_experts, ep_size = 10, 2
    model = random_model(num_experts, seed=7)
    single = single_rank_output(model, num_experts)
    rng = np.random.default_rng(3)
    placement = rng.permutation(num_experts)
    tables = []
    for rank in range(ep_size):
        mine = placement[rank * 5 : (rank + 1) * 5]
        table = np.full(num_experts, -1, dtype=np.int32)
        table[mine] = rng.permutation(5)
        tables.append(table)
    dispatchers = [fm.Dispatcher.from_mapping(table, 5) for table in tables]
    weights = [rank_weights(model, d, ep_size, rank, 0) for rank, d in enumerate(dispatchers)]
    total = sum_over_ranks(model, dispatchers, weights)
    for d in dispatchers:
        d.close()
    assert reference.relative_error(total, single) <= 1e-5

package fusedmoe

/*
#include "shim.h"

static const moe_device fm_cpu = {MOE_DEVICE_CPU, 0};

static moe_status fm_dispatcher_create_contiguous(int64_t num_experts, int64_t ep_size,
                                                  int64_t ep_rank, int64_t num_shared_experts,
                                                  moe_dispatcher **out, fm_error *err) {
    return fm_keep_error(moe_dispatcher_create_contiguous(num_experts, ep_size, ep_rank,
                                                          num_shared_experts, fm_cpu, out),
                         err);
}

static moe_status fm_dispatcher_create_mapping(int32_t *mapping, fm_shape mapping_shape,
                                               int64_t num_local_experts, moe_dispatcher **out,
                                               fm_error *err) {
    const moe_dtype i32 = {MOE_DTYPE_CODE_INT, 32, 1};
    moe_tensor mapping_t = fm_cpu_tensor(mapping, i32, &mapping_shape);
    return fm_keep_error(
        moe_dispatcher_create_mapping(&mapping_t, num_local_experts, fm_cpu, out), err);
}

static moe_status fm_dispatcher_sizes(const moe_dispatcher *d, int64_t *num_experts,
                                      int64_t *num_local_experts, fm_error *err) {
    moe_status status = moe_dispatcher_num_experts(d, num_experts);
    if (status == MOE_OK) status = moe_dispatcher_num_local_experts(d, num_local_experts);
    return fm_keep_error(status, err);
}

// Which table fm_dispatcher_table copies.
enum { FM_MAPPING = 0, FM_EXPERT_MASK = 1 };

static moe_status fm_dispatcher_table(const moe_dispatcher *d, int which, int32_t *dst,
                                      size_t dst_len, size_t *len, fm_error *err) {
    return fm_keep_error(which == FM_MAPPING ? moe_dispatcher_mapping(d, dst, dst_len, len)
                                             : moe_dispatcher_expert_mask(d, dst, dst_len, len),
                         err);
}

static moe_status fm_dispatch(const moe_dispatcher *d, int32_t *ids, fm_shape ids_shape,
                              int32_t *local_ids, fm_shape local_ids_shape, fm_error *err) {
    const moe_dtype i32 = {MOE_DTYPE_CODE_INT, 32, 1};
    moe_tensor ids_t = fm_cpu_tensor(ids, i32, &ids_shape);
    moe_tensor local_ids_t = fm_cpu_tensor(local_ids, i32, &local_ids_shape);
    return fm_keep_error(moe_dispatch(d, &ids_t, &local_ids_t, NULL), err);
}
*/
import "C"

import (
	"fmt"
	"runtime"
)

// Dispatcher maps global expert ids to the local ids of one expert-parallel rank (SPEC §6):
// the rank's layer stores NumLocalExperts of the model's NumExperts experts, and Dispatch
// turns the router's global topk ids into the local ids its Plan.Prepare takes (-1 for
// experts stored elsewhere). It runs on the CPU. A Dispatcher is immutable: any number of
// goroutines may use it at once.
type Dispatcher struct {
	raw *C.moe_dispatcher
	// Read once from the library when the dispatcher is made; it never changes.
	numExperts, numLocalExperts int
	mapping, mask               []int32
}

// NewContiguousDispatcher is rank epRank of epSize in the contiguous partition of SPEC §6.
// The last numShared global experts are shared: every rank stores them, after its
// R = (numExperts - numShared) / epSize routed experts [epRank·R, (epRank+1)·R), which
// become local ids 0..R; the shared ones become R..R+numShared. epSize must divide
// numExperts - numShared.
//
// A shared expert's routes map to a local id on every rank, so a host that sums the ranks'
// outputs must run each of them on one rank only (see the tests).
func NewContiguousDispatcher(numExperts, epSize, epRank, numShared int) (*Dispatcher, error) {
	if err := checkABI(); err != nil {
		return nil, err
	}
	var raw *C.moe_dispatcher
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_dispatcher_create_contiguous(C.int64_t(numExperts), C.int64_t(epSize),
			C.int64_t(epRank), C.int64_t(numShared), &raw, e)
	})
	if err != nil {
		return nil, err
	}
	return ownDispatcher(raw)
}

// NewMappingDispatcher is a dispatcher with an explicit table (EPLB-style placements):
// mapping[g] is global expert g's local id in [-1, numLocalExperts), -1 where it is stored
// on another rank; no local id may appear twice. The table is copied.
func NewMappingDispatcher(mapping []int32, numLocalExperts int) (*Dispatcher, error) {
	if err := checkABI(); err != nil {
		return nil, err
	}
	shape, err := shapeOf("mapping", len(mapping))
	if err != nil {
		return nil, err
	}
	var raw *C.moe_dispatcher
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_dispatcher_create_mapping((*C.int32_t)(dataOf(mapping)), shape,
			C.int64_t(numLocalExperts), &raw, e)
	})
	if err != nil {
		return nil, err
	}
	return ownDispatcher(raw)
}

// ownDispatcher wraps a dispatcher this package must free, with its sizes and tables.
func ownDispatcher(raw *C.moe_dispatcher) (*Dispatcher, error) {
	d := &Dispatcher{raw: raw}
	var experts, local C.int64_t
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_dispatcher_sizes(raw, &experts, &local, e) })
	if err == nil {
		d.numExperts, d.numLocalExperts = int(experts), int(local)
		d.mapping, err = d.table("mapping", C.FM_MAPPING)
	}
	if err == nil {
		d.mask, err = d.table("expert mask", C.FM_EXPERT_MASK)
	}
	if err != nil {
		C.moe_dispatcher_free(raw)
		return nil, err
	}
	runtime.SetFinalizer(d, (*Dispatcher).Close)
	return d, nil
}

// table reads the mapping or the expert mask: its length first, then its entries.
func (d *Dispatcher) table(name string, which C.int) ([]int32, error) {
	var n C.size_t
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_dispatcher_table(d.raw, which, nil, 0, &n, e) })
	if err != nil {
		return nil, err
	}
	if int(n) != d.numExperts {
		return nil, &Error{StatusInternal, fmt.Sprintf("%s: %d entries, but the dispatcher has %d global experts", name, n, d.numExperts)}
	}
	s := make([]int32, n)
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_dispatcher_table(d.raw, which, (*C.int32_t)(dataOf(s)), C.size_t(len(s)), &n, e)
	})
	return s, err
}

// Close frees the dispatcher; later calls do nothing.
func (d *Dispatcher) Close() {
	if d.raw == nil {
		return
	}
	C.moe_dispatcher_free(d.raw)
	d.raw = nil
	runtime.SetFinalizer(d, nil)
	frees.dispatchers.Add(1)
}

func (d *Dispatcher) ptr() *C.moe_dispatcher {
	if d.raw == nil {
		panic("fusedmoe: Dispatcher used after Close")
	}
	return d.raw
}

// NumExperts is E_g, the experts of the whole model.
func (d *Dispatcher) NumExperts() int {
	d.ptr()
	return d.numExperts
}

// NumLocalExperts is E_local, the experts this rank stores: its layer's num_local_experts.
func (d *Dispatcher) NumLocalExperts() int {
	d.ptr()
	return d.numLocalExperts
}

// Mapping is the table [E_g]: each global expert's local id, or -1. The slice is the
// caller's.
func (d *Dispatcher) Mapping() []int32 {
	d.ptr()
	return append([]int32(nil), d.mapping...)
}

// ExpertMask is [E_g]: 1 where the global expert is stored on this rank, else 0. The slice
// is the caller's.
func (d *Dispatcher) ExpertMask() []int32 {
	d.ptr()
	return append([]int32(nil), d.mask...)
}

// Dispatch writes into out the local id of each global expert id in topkIDs (any shape,
// e.g. [M, K], flattened): -1 for a negative id or an expert stored elsewhere. out must have
// topkIDs' length; it may be topkIDs itself (in place), but must not overlap it otherwise.
// An id ≥ NumExperts is an error, and then out is untouched.
func (d *Dispatcher) Dispatch(topkIDs []int32, out []int32) error {
	idsShape, err := shapeOf("topk_ids", len(topkIDs))
	if err != nil {
		return err
	}
	outShape, err := shapeOf("local_topk_ids", len(out))
	if err != nil {
		return err
	}
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_dispatch(d.ptr(), (*C.int32_t)(dataOf(topkIDs)), idsShape,
			(*C.int32_t)(dataOf(out)), outShape, e)
	})
	runtime.KeepAlive(d)
	return err
}

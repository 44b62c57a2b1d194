package fusedmoe

/*
#include "shim.h"

static moe_status fm_lora_create(const moe_layer *layer, int64_t num_slots, int64_t max_rank,
                                 moe_lora **out, fm_error *err) {
    return fm_keep_error(moe_lora_create(layer, num_slots, max_rank, out), err);
}

static moe_status fm_lora_set_slot(moe_lora *lora, int64_t slot, moe_dtype dtype,
                                   void *gate_up_a, fm_shape gate_up_a_shape,
                                   void *gate_up_b, fm_shape gate_up_b_shape,
                                   void *down_a, fm_shape down_a_shape,
                                   void *down_b, fm_shape down_b_shape,
                                   float scaling, fm_error *err) {
    moe_tensor a = fm_cpu_tensor(gate_up_a, dtype, &gate_up_a_shape);
    moe_tensor b = fm_cpu_tensor(gate_up_b, dtype, &gate_up_b_shape);
    moe_tensor c = fm_cpu_tensor(down_a, dtype, &down_a_shape);
    moe_tensor d = fm_cpu_tensor(down_b, dtype, &down_b_shape);
    return fm_keep_error(moe_lora_set_slot(lora, slot, &a, &b, &c, &d, scaling), err);
}

static moe_status fm_lora_clear_slot(moe_lora *lora, int64_t slot, fm_error *err) {
    return fm_keep_error(moe_lora_clear_slot(lora, slot), err);
}

static moe_status fm_lora_set_enabled(moe_lora *lora, int64_t slot, bool enabled,
                                      fm_error *err) {
    return fm_keep_error(moe_lora_set_enabled(lora, slot, enabled), err);
}

static moe_status fm_lora_workspace_size(const moe_lora *lora, int64_t max_tokens,
                                         size_t *bytes, fm_error *err) {
    return fm_keep_error(moe_lora_workspace_size(lora, max_tokens, bytes), err);
}

// The runner config is borrowed from the wrapper; the clone is the caller's to free.
static moe_status fm_lora_config_clone(const moe_lora *lora, moe_config **out, fm_error *err) {
    const moe_config *own;
    moe_status status = moe_lora_runner_config(lora, &own);
    if (status == MOE_OK) status = moe_config_clone(own, out);
    return fm_keep_error(status, err);
}

// Whether the wrapper's runner config is the very handle moe_layer_config gives for layer.
static int fm_lora_config_is_layers(const moe_lora *lora, const moe_layer *layer) {
    const moe_config *from_lora = NULL, *from_layer = NULL;
    if (moe_lora_runner_config(lora, &from_lora) != MOE_OK) return 0;
    if (moe_layer_config(layer, &from_layer) != MOE_OK) return 0;
    return from_lora == from_layer;
}

static moe_status fm_run_lora(const moe_lora *lora, const moe_plan *plan, moe_dtype dtype,
                              void *hidden, fm_shape hidden_shape, float *weights,
                              fm_shape weights_shape, int32_t *ids, fm_shape ids_shape,
                              int32_t *indptr, fm_shape indptr_shape, int32_t *segs,
                              fm_shape segs_shape, void *out, fm_shape out_shape,
                              fm_error *err) {
    const moe_dtype f32 = {MOE_DTYPE_CODE_FLOAT, 32, 1}, i32 = {MOE_DTYPE_CODE_INT, 32, 1};
    moe_tensor hidden_t = fm_cpu_tensor(hidden, dtype, &hidden_shape);
    moe_tensor weights_t = fm_cpu_tensor(weights, f32, &weights_shape);
    moe_tensor ids_t = fm_cpu_tensor(ids, i32, &ids_shape);
    moe_tensor indptr_t = fm_cpu_tensor(indptr, i32, &indptr_shape);
    moe_tensor segs_t = fm_cpu_tensor(segs, i32, &segs_shape);
    moe_tensor out_t = fm_cpu_tensor(out, dtype, &out_shape);
    return fm_keep_error(moe_run_lora(lora, plan, &hidden_t, &weights_t, fm_optional(&ids_t),
                                      fm_optional(&indptr_t), fm_optional(&segs_t),
                                      fm_optional(&out_t), NULL),
                         err);
}
*/
import "C"

import (
	"runtime"
	"unsafe"
)

// Adapter is one LoRA adapter's weights (SPEC §7), row-major, zero padded to the wrapper's
// max rank r: GateUpA [E or 1, 2r, H] (gated; rows [0, r) gate, [r, 2r) up) or [E or 1, r, H],
// GateUpB [E, N1, r], DownA [E, r, I], DownB [E or 1, H, r]. Scaling multiplies B's products.
type Adapter[T Element] struct {
	GateUpA, GateUpB, DownA, DownB []T
	Scaling                        float32
	// SharedOuter says GateUpA and DownB have expert dimension 1 (shared by all experts).
	SharedOuter bool
}

// AdapterMap gives each token of a batch its adapter slot (-1: none): either PerToken [M],
// or segments, tokens [SegIndptr[s], SegIndptr[s+1]) using SegAdapter[s].
type AdapterMap struct {
	PerToken              []int32
	SegIndptr, SegAdapter []int32
}

// Lora is a LoRA wrapper over a layer: NumSlots adapter slots of rank at most MaxRank. The
// library keeps the layer alive for it, and this wrapper keeps the layer's weights alive, so
// the Layer may be closed first (the wrapper's config and runs with prepared plans stay
// valid). Slots may change while other goroutines run the wrapper.
type Lora[T Element] struct {
	raw               *C.moe_lora
	layer             *Layer[T]
	numSlots, maxRank int
	slots             map[int][4]unsafe.Pointer // C copies of each set slot's weights
}

// NewLora wraps layer with numSlots empty, enabled slots of rank at most maxRank.
func NewLora[T Element](layer *Layer[T], numSlots, maxRank int) (*Lora[T], error) {
	var raw *C.moe_lora
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_lora_create(layer.ptr(), C.int64_t(numSlots), C.int64_t(maxRank), &raw, e)
	})
	runtime.KeepAlive(layer)
	if err != nil {
		return nil, err
	}
	layer.weightUsers.Add(1)
	l := &Lora[T]{raw: raw, layer: layer, numSlots: numSlots, maxRank: maxRank,
		slots: map[int][4]unsafe.Pointer{}}
	runtime.SetFinalizer(l, (*Lora[T]).Close)
	return l, nil
}

// Close frees the wrapper and the copies of its slots' weights (and the layer's weights if
// the layer was closed already); later calls do nothing.
func (l *Lora[T]) Close() {
	if l.raw == nil {
		return
	}
	C.moe_lora_free(l.raw)
	for _, w := range l.slots {
		freeAll(w)
	}
	l.raw, l.slots = nil, nil
	l.layer.releaseWeights()
	runtime.SetFinalizer(l, nil)
}

func (l *Lora[T]) ptr() *C.moe_lora {
	if l.raw == nil {
		panic("fusedmoe: Lora used after Close")
	}
	return l.raw
}

// SetSlot sets slot to an adapter, whose weights it copies.
func (l *Lora[T]) SetSlot(slot int, a Adapter[T]) error {
	s := l.layer.sizes
	outer := -1 // the library checks the expert dimension
	if a.SharedOuter {
		outer = 1
	}
	rows := l.maxRank
	if s.gated {
		rows = 2 * l.maxRank
	}
	var shapes [4]C.fm_shape
	var err error
	for i, spec := range []struct {
		name  string
		n     int
		inner []int
	}{
		{"gate_up_a", len(a.GateUpA), []int{rows, s.hidden}},
		{"gate_up_b", len(a.GateUpB), []int{s.n1(), l.maxRank}},
		{"down_a", len(a.DownA), []int{l.maxRank, s.intermediate}},
		{"down_b", len(a.DownB), []int{s.hidden, l.maxRank}},
	} {
		if shapes[i], err = shapeOf(spec.name, spec.n, spec.inner...); err != nil {
			return err
		}
		if outer == 1 && (i == 0 || i == 3) && shapes[i].dims[0] != 1 {
			return invalidArgument("%s: %d experts, but SharedOuter says 1", spec.name, shapes[i].dims[0])
		}
	}
	copies := [4]unsafe.Pointer{cCopy(a.GateUpA), cCopy(a.GateUpB), cCopy(a.DownA), cCopy(a.DownB)}
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_lora_set_slot(l.ptr(), C.int64_t(slot), s.dtype.c(), copies[0], shapes[0],
			copies[1], shapes[1], copies[2], shapes[2], copies[3], shapes[3], C.float(a.Scaling), e)
	})
	runtime.KeepAlive(l)
	if err != nil {
		freeAll(copies)
		return err
	}
	if old, ok := l.slots[slot]; ok {
		freeAll(old) // the library no longer reads them
	}
	l.slots[slot] = copies
	return nil
}

// ClearSlot empties slot: its tokens get no delta.
func (l *Lora[T]) ClearSlot(slot int) error {
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_lora_clear_slot(l.ptr(), C.int64_t(slot), e) })
	runtime.KeepAlive(l)
	if err == nil {
		if old, ok := l.slots[slot]; ok {
			freeAll(old)
			delete(l.slots, slot)
		}
	}
	return err
}

// SetEnabled enables or disables slot; a disabled slot's tokens get no delta.
func (l *Lora[T]) SetEnabled(slot int, enabled bool) error {
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_lora_set_enabled(l.ptr(), C.int64_t(slot), C.bool(enabled), e)
	})
	runtime.KeepAlive(l)
	return err
}

// RunnerConfig is a copy of the wrapped layer's config (read through the wrapper, whose
// runner config is the layer's own handle); the caller closes it.
func (l *Lora[T]) RunnerConfig() (*Config, error) {
	var raw *C.moe_config
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_lora_config_clone(l.ptr(), &raw, e) })
	runtime.KeepAlive(l)
	if err != nil {
		return nil, err
	}
	return ownConfig(raw), nil
}

// runnerConfigIsLayers reports whether the runner config is the layer's own config handle.
func (l *Lora[T]) runnerConfigIsLayers() bool {
	same := C.fm_lora_config_is_layers(l.ptr(), l.layer.ptr()) != 0
	runtime.KeepAlive(l)
	return same
}

// NewPlan makes a plan of the wrapped layer whose workspace fits LoRA runs of up to
// maxTokens tokens.
func (l *Lora[T]) NewPlan(maxTokens int) (*Plan[T], error) {
	var bytes C.size_t
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_lora_workspace_size(l.ptr(), C.int64_t(maxTokens), &bytes, e)
	})
	runtime.KeepAlive(l)
	if err != nil {
		return nil, err
	}
	return l.layer.newPlan(int(bytes))
}

// Forward is Layer.Forward with each token's adapter from adapters.
func (l *Lora[T]) Forward(hidden []T, topkIDs []int32, topkWeights []float32, adapters AdapterMap, out []T) error {
	p, err := l.NewPlan(len(topkIDs) / l.layer.sizes.topK)
	if err != nil {
		return err
	}
	defer p.Close()
	if err := p.Prepare(topkIDs); err != nil {
		return err
	}
	return p.RunLora(l, hidden, topkWeights, adapters, out)
}

// RunLora is Run with the deltas of lora's slots; the plan must be of lora's layer, made by
// lora.NewPlan. Exactly one form of adapters is given.
func (p *Plan[T]) RunLora(lora *Lora[T], hidden []T, topkWeights []float32, adapters AdapterMap, out []T) error {
	shapes, err := p.runShapes(hidden, topkWeights, out)
	if err != nil {
		return err
	}
	var maps [3]C.fm_shape
	for i, m := range [][]int32{adapters.PerToken, adapters.SegIndptr, adapters.SegAdapter} {
		if maps[i], err = optionalShapeOf("adapters", m); err != nil {
			return err
		}
	}
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_run_lora(lora.ptr(), p.ptr(), p.layer.sizes.dtype.c(),
			dataOf(hidden), shapes[0], (*C.float)(dataOf(topkWeights)), shapes[1],
			(*C.int32_t)(dataOf(adapters.PerToken)), maps[0],
			(*C.int32_t)(dataOf(adapters.SegIndptr)), maps[1],
			(*C.int32_t)(dataOf(adapters.SegAdapter)), maps[2],
			dataOf(out), shapes[2], e)
	})
	runtime.KeepAlive(p)
	runtime.KeepAlive(lora)
	return err
}

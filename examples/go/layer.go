package fusedmoe

/*
#include "shim.h"

static moe_status fm_layer_create(const moe_config *config, moe_dtype dtype,
                                  void *w13, fm_shape w13_shape, void *w2, fm_shape w2_shape,
                                  float *b13, fm_shape b13_shape, float *b2, fm_shape b2_shape,
                                  moe_layer **out, fm_error *err) {
    const moe_dtype f32 = {MOE_DTYPE_CODE_FLOAT, 32, 1};
    moe_tensor w13_t = fm_cpu_tensor(w13, dtype, &w13_shape);
    moe_tensor w2_t = fm_cpu_tensor(w2, dtype, &w2_shape);
    moe_tensor b13_t = fm_cpu_tensor(b13, f32, &b13_shape);
    moe_tensor b2_t = fm_cpu_tensor(b2, f32, &b2_shape);
    return fm_keep_error(
        moe_layer_create(config, &w13_t, &w2_t, fm_optional(&b13_t), fm_optional(&b2_t), out),
        err);
}

// The layer's own config is borrowed from the layer; the clone is the caller's to free.
static moe_status fm_layer_config_clone(const moe_layer *layer, moe_config **out,
                                        fm_error *err) {
    const moe_config *own;
    moe_status status = moe_layer_config(layer, &own);
    if (status == MOE_OK) status = moe_config_clone(own, out);
    return fm_keep_error(status, err);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"sync/atomic"
	"unsafe"
)

// Weights are a layer's expert weights, row-major (SPEC §1). Biases are f32, nil for none.
type Weights[T Element] struct {
	W13 []T       // [E, N1, H]: N1 = 2I when gated (gate and up rows), I otherwise
	W2  []T       // [E, H, I]
	B13 []float32 // [E, N1]
	B2  []float32 // [E, H]
}

// Layer is a validated config with its expert weights. It is immutable: any number of
// goroutines may run it at once, each with its own Plan.
type Layer[T Element] struct {
	raw *C.moe_layer
	// The library borrows the weights for the layer's whole life, past the call that creates
	// it. Go memory cannot be lent that way (the cgo rules forbid C keeping a Go pointer, and
	// Go 1.19 has no runtime.Pinner), so NewLayer copies them into C memory that the layer owns
	// and frees after moe_layer_free. Handing out Go slices over C memory for the caller to
	// fill instead would save that copy but leave slices that dangle after Close.
	weights [4]unsafe.Pointer
	// The layer and each LoRA wrapper over it, which the library keeps the layer alive for:
	// the weights are freed when the last of them closes.
	weightUsers atomic.Int32
	sizes       layerSizes
}

// layerSizes is what a Layer needs from its config to shape its tensors.
type layerSizes struct {
	dtype                      DType
	hidden, intermediate, topK int
	gated, noCombine           bool
}

func readLayerSizes(c *Config) (s layerSizes, err error) {
	s.dtype, err = c.DType()
	if err == nil {
		s.hidden, err = c.HiddenSize()
	}
	if err == nil {
		s.intermediate, err = c.IntermediateSize()
	}
	if err == nil {
		s.topK, err = c.TopK()
	}
	if err == nil {
		s.gated, err = c.Gated()
	}
	if err == nil {
		s.noCombine, err = c.NoCombine()
	}
	return s, err
}

// n1 is the rows of one expert's w13.
func (s layerSizes) n1() int {
	if s.gated {
		return 2 * s.intermediate
	}
	return s.intermediate
}

// outRow is the shape of out past its leading M: [H], or [K, H] with no_combine.
func (s layerSizes) outRow() []int {
	if s.noCombine {
		return []int{s.topK, s.hidden}
	}
	return []int{s.hidden}
}

// NewLayer validates config (copied: the caller may change or close it afterwards) with the
// weights, which it copies. T must fit the config's dtype: float32 for F32, uint16 for F16
// and BF16.
func NewLayer[T Element](config *Config, w Weights[T]) (*Layer[T], error) {
	s, err := readLayerSizes(config)
	if err != nil {
		return nil, err
	}
	if bits := elementBits[T](); bits != int(s.dtype.bits) {
		return nil, invalidArgument("weights: Go elements of %d bits, but the layer's dtype %v has %d", bits, s.dtype, s.dtype.bits)
	}
	shapes, err := weightShapes(s, w)
	if err != nil {
		return nil, err
	}
	weights, err := copyWeights(w)
	if err != nil {
		return nil, err
	}
	var raw *C.moe_layer
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_layer_create(config.ptr(), s.dtype.c(),
			weights[0], shapes[0], weights[1], shapes[1],
			(*C.float)(weights[2]), shapes[2], (*C.float)(weights[3]), shapes[3], &raw, e)
	})
	runtime.KeepAlive(config)
	if err != nil {
		freeAll(weights)
		return nil, err
	}
	l := &Layer[T]{raw: raw, weights: weights, sizes: s}
	l.weightUsers.Store(1)
	runtime.SetFinalizer(l, (*Layer[T]).Close)
	return l, nil
}

// weightShapes are the shapes of w13, w2, b13 and b2.
func weightShapes[T Element](s layerSizes, w Weights[T]) (shapes [4]C.fm_shape, err error) {
	if shapes[0], err = shapeOf("w13", len(w.W13), s.n1(), s.hidden); err != nil {
		return shapes, err
	}
	if shapes[1], err = shapeOf("w2", len(w.W2), s.hidden, s.intermediate); err != nil {
		return shapes, err
	}
	if shapes[2], err = optionalShapeOf("b13", w.B13, s.n1()); err != nil {
		return shapes, err
	}
	shapes[3], err = optionalShapeOf("b2", w.B2, s.hidden)
	return shapes, err
}

// copyWeights copies w13, w2, b13 and b2 into C memory.
func copyWeights[T Element](w Weights[T]) ([4]unsafe.Pointer, error) {
	copies := [4]unsafe.Pointer{cCopy(w.W13), cCopy(w.W2), cCopy(w.B13), cCopy(w.B2)}
	for i, n := range [4]int{len(w.W13), len(w.W2), len(w.B13), len(w.B2)} {
		if n > 0 && copies[i] == nil {
			freeAll(copies)
			name := [4]string{"w13", "w2", "b13", "b2"}[i]
			return copies, &Error{StatusOutOfMemory, fmt.Sprintf("%s: cannot copy %d elements to C memory", name, n)}
		}
	}
	return copies, nil
}

func freeAll(blocks [4]unsafe.Pointer) {
	for _, p := range blocks {
		C.free(p)
	}
}

// Close frees the layer and its weights; later calls do nothing. A Plan of the layer panics
// if used afterwards.
func (l *Layer[T]) Close() {
	if l.raw == nil {
		return
	}
	C.moe_layer_free(l.raw)
	l.releaseWeights() // after the layer, which borrows them
	l.raw = nil
	runtime.SetFinalizer(l, nil)
	frees.layers.Add(1)
}

// releaseWeights frees the weights once the layer and every LoRA wrapper over it closed.
func (l *Layer[T]) releaseWeights() {
	if l.weightUsers.Add(-1) == 0 {
		freeAll(l.weights)
	}
}

func (l *Layer[T]) ptr() *C.moe_layer {
	if l.raw == nil {
		panic("fusedmoe: Layer used after Close")
	}
	return l.raw
}

// Config is a copy of the layer's config, for reading; the caller closes it.
func (l *Layer[T]) Config() (*Config, error) {
	var raw *C.moe_config
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_layer_config_clone(l.ptr(), &raw, e) })
	runtime.KeepAlive(l)
	if err != nil {
		return nil, err
	}
	return ownConfig(raw), nil
}

// Forward runs one batch (SPEC §2): hidden [M, H], topkIDs [M, K] (local expert ids, -1
// drops a route), topkWeights [M, K] and out [M, H] ([M, K, H] with no_combine; nil for an
// inplace layer, which writes into hidden). It makes a Plan and a workspace for the batch
// and frees them; a loop over batches reuses one Plan instead.
func (l *Layer[T]) Forward(hidden []T, topkIDs []int32, topkWeights []float32, out []T) error {
	p, err := l.NewPlan(len(topkIDs) / l.sizes.topK)
	if err != nil {
		return err
	}
	defer p.Close()
	if err := p.Prepare(topkIDs); err != nil {
		return err
	}
	return p.Run(hidden, topkWeights, out)
}

package fusedmoe

/*
#include "shim.h"

static moe_status fm_workspace_size(const moe_layer *layer, int64_t max_tokens, size_t *bytes,
                                    fm_error *err) {
    return fm_keep_error(moe_workspace_size(layer, max_tokens, bytes), err);
}

static moe_status fm_warmup(const moe_layer *layer, int64_t max_tokens, fm_error *err) {
    return fm_keep_error(moe_warmup(layer, max_tokens, NULL), err);
}

// Cache-line aligned, which covers the 16 bytes the library needs; NULL when out of memory.
static void *fm_workspace_alloc(size_t bytes) {
    const size_t align = 64, size = (bytes + align - 1) / align * align;
    return aligned_alloc(align, size == 0 ? align : size);
}

static moe_status fm_plan_create(const moe_layer *layer, moe_plan **out, fm_error *err) {
    return fm_keep_error(moe_plan_create(layer, out), err);
}

static moe_status fm_prepare(const moe_layer *layer, int32_t *ids, fm_shape ids_shape,
                             void *workspace, fm_shape workspace_shape, moe_plan *plan,
                             fm_error *err) {
    const moe_dtype i32 = {MOE_DTYPE_CODE_INT, 32, 1}, u8 = {MOE_DTYPE_CODE_UINT, 8, 1};
    moe_tensor ids_t = fm_cpu_tensor(ids, i32, &ids_shape);
    moe_tensor workspace_t = fm_cpu_tensor(workspace, u8, &workspace_shape);
    return fm_keep_error(moe_prepare(layer, &ids_t, &workspace_t, plan, NULL), err);
}

static moe_status fm_run(const moe_layer *layer, const moe_plan *plan, moe_dtype dtype,
                         void *hidden, fm_shape hidden_shape, float *weights,
                         fm_shape weights_shape, void *out, fm_shape out_shape, fm_error *err) {
    const moe_dtype f32 = {MOE_DTYPE_CODE_FLOAT, 32, 1};
    moe_tensor hidden_t = fm_cpu_tensor(hidden, dtype, &hidden_shape);
    moe_tensor weights_t = fm_cpu_tensor(weights, f32, &weights_shape);
    moe_tensor out_t = fm_cpu_tensor(out, dtype, &out_shape);
    return fm_keep_error(
        moe_run(layer, NULL, plan, &hidden_t, &weights_t, fm_optional(&out_t), NULL), err);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Plan runs batches of up to a fixed number of tokens through a layer: Prepare routes a
// batch, Run computes it. It owns its workspace, which the library's plan refers to between
// the two calls. One goroutine at a time.
type Plan[T Element] struct {
	layer     *Layer[T] // kept reachable: its finalizer must not run while the plan may
	raw       *C.moe_plan
	workspace unsafe.Pointer // C memory: the prepared plan keeps pointing into it
	shape     C.fm_shape     // the workspace's, [bytes]
}

// NewPlan makes a plan with a workspace for batches of up to maxTokens tokens.
func (l *Layer[T]) NewPlan(maxTokens int) (*Plan[T], error) {
	bytes, err := l.workspaceSize(maxTokens)
	if err != nil {
		return nil, err
	}
	return l.newPlan(bytes)
}

// newPlan makes a plan with a workspace of bytes.
func (l *Layer[T]) newPlan(bytes int) (*Plan[T], error) {
	workspace := C.fm_workspace_alloc(C.size_t(bytes))
	if workspace == nil {
		return nil, &Error{StatusOutOfMemory, fmt.Sprintf("workspace: cannot allocate %d bytes", bytes)}
	}
	var raw *C.moe_plan
	err := call(func(e *C.fm_error) C.moe_status { return C.fm_plan_create(l.ptr(), &raw, e) })
	runtime.KeepAlive(l)
	if err != nil {
		C.free(workspace)
		return nil, err
	}
	shape := C.fm_shape{ndim: 1, dims: [4]C.int64_t{C.int64_t(bytes)}}
	p := &Plan[T]{layer: l, raw: raw, workspace: workspace, shape: shape}
	runtime.SetFinalizer(p, (*Plan[T]).Close)
	return p, nil
}

// Warmup compiles every kernel batches of up to maxTokens tokens use. Layers of this
// package run on the CPU, where there is nothing to compile; it checks maxTokens.
func (l *Layer[T]) Warmup(maxTokens int) error {
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_warmup(l.ptr(), C.int64_t(maxTokens), e)
	})
	runtime.KeepAlive(l)
	return err
}

func (l *Layer[T]) workspaceSize(maxTokens int) (int, error) {
	var bytes C.size_t
	err := call(func(e *C.fm_error) C.moe_status {
		return C.fm_workspace_size(l.ptr(), C.int64_t(maxTokens), &bytes, e)
	})
	runtime.KeepAlive(l)
	return int(bytes), err
}

// Close frees the plan and its workspace; later calls do nothing.
func (p *Plan[T]) Close() {
	if p.raw == nil {
		return
	}
	C.moe_plan_free(p.raw)
	C.free(p.workspace) // after the plan, which points into it
	p.raw = nil
	runtime.SetFinalizer(p, nil)
	frees.plans.Add(1)
}

func (p *Plan[T]) ptr() *C.moe_plan {
	if p.raw == nil {
		panic("fusedmoe: Plan used after Close")
	}
	return p.raw
}

// Prepare routes a batch: topkIDs [M, K] holds local expert ids in [-1, E); -1 drops a route.
// M may be 0, and at most the plan's maxTokens.
func (p *Plan[T]) Prepare(topkIDs []int32) error {
	shape, err := shapeOf("topk_ids", len(topkIDs), p.layer.sizes.topK)
	if err != nil {
		return err
	}
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_prepare(p.layer.ptr(), (*C.int32_t)(dataOf(topkIDs)), shape, p.workspace, p.shape, p.ptr(), e)
	})
	runtime.KeepAlive(p)
	return err
}

// Run computes the prepared batch: hidden [M, H], topkWeights [M, K], out [M, H] ([M, K, H]
// with no_combine; nil for an inplace layer, which writes into hidden). On failure out and
// hidden are untouched.
func (p *Plan[T]) Run(hidden []T, topkWeights []float32, out []T) error {
	shapes, err := p.runShapes(hidden, topkWeights, out)
	if err != nil {
		return err
	}
	err = call(func(e *C.fm_error) C.moe_status {
		return C.fm_run(p.layer.ptr(), p.ptr(), p.layer.sizes.dtype.c(),
			dataOf(hidden), shapes[0], (*C.float)(dataOf(topkWeights)), shapes[1],
			dataOf(out), shapes[2], e)
	})
	runtime.KeepAlive(p)
	return err
}

// runShapes are the shapes of hidden, topk_weights and out.
func (p *Plan[T]) runShapes(hidden []T, topkWeights []float32, out []T) (shapes [3]C.fm_shape, err error) {
	s := p.layer.sizes
	if shapes[0], err = shapeOf("hidden", len(hidden), s.hidden); err != nil {
		return shapes, err
	}
	if shapes[1], err = shapeOf("topk_weights", len(topkWeights), s.topK); err != nil {
		return shapes, err
	}
	shapes[2], err = optionalShapeOf("out", out, s.outRow()...)
	return shapes, err
}

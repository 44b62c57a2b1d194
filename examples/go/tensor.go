package fusedmoe

/*
#include "shim.h"

// Unlike C.malloc from Go, which aborts the process when memory runs out, this returns NULL.
static void *fm_malloc(size_t bytes) { return malloc(bytes); }
*/
import "C"

import "unsafe"

// Element is the Go type of a layer's values: float32 for F32 layers, uint16 (the bits) for
// F16 and BF16 layers.
type Element interface{ float32 | uint16 }

func elementBits[T Element]() int {
	var zero T
	return int(unsafe.Sizeof(zero)) * 8
}

// shapeOf is the row-major shape [n / prod(inner), inner...] of a slice of n elements. The
// library checks the leading dimension (E against the config, M against the plan); this
// package checks only that the slice's length fits, which the library cannot see.
func shapeOf(name string, n int, inner ...int) (C.fm_shape, error) {
	rowSize := 1
	for _, d := range inner {
		rowSize *= d
	}
	if n%rowSize != 0 {
		return C.fm_shape{}, invalidArgument("%s: %d elements, not a whole number of rows of %v", name, n, inner)
	}
	shape := C.fm_shape{ndim: C.int32_t(1 + len(inner))}
	shape.dims[0] = C.int64_t(n / rowSize)
	for i, d := range inner {
		shape.dims[1+i] = C.int64_t(d)
	}
	return shape, nil
}

// optionalShapeOf is shapeOf, or "no tensor" for a nil slice.
func optionalShapeOf[E any](name string, s []E, inner ...int) (C.fm_shape, error) {
	if s == nil {
		return C.fm_shape{}, nil
	}
	return shapeOf(name, len(s), inner...)
}

// dataOf is the address of s's first element, or nil when s is empty (as DLPack allows).
func dataOf[E any](s []E) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	return unsafe.Pointer(&s[0])
}

// cCopy copies s into new C memory, which the caller frees with C.free; nil for an empty s
// or when out of memory.
func cCopy[E any](s []E) unsafe.Pointer {
	if len(s) == 0 {
		return nil
	}
	p := C.fm_malloc(C.size_t(len(s)) * C.size_t(unsafe.Sizeof(s[0])))
	if p != nil {
		copy(unsafe.Slice((*E)(p), len(s)), s)
	}
	return p
}

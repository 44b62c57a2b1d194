/* C helpers shared by the cgo preambles of package fusedmoe.
 *
 * Why shims: a shim takes Go memory only as direct call arguments (legal under the cgo pointer
 * rules), builds the moe_tensor structs on the C stack, makes one library call and, on failure,
 * copies moe_last_error() into the caller's fm_error within that same C call. The message is
 * thread-local, and a goroutine may run its next cgo call on another OS thread. */
#ifndef FUSEDMOE_GO_SHIM_H
#define FUSEDMOE_GO_SHIM_H

#include <fusedmoe.h>
#include <stdio.h>
#include <stdlib.h>

/* The message of a failed call; a longer one is truncated. */
typedef struct {
    char message[1024];
} fm_error;

/* A tensor's shape without its data pointer, so Go may build one and pass it by value.
 * ndim 0 stands for "no tensor" (NULL). */
typedef struct {
    int32_t ndim;
    int64_t dims[4];
} fm_shape;

static inline moe_status fm_keep_error(moe_status status, fm_error *err) {
    if (status != MOE_OK) snprintf(err->message, sizeof err->message, "%s", moe_last_error());
    return status;
}

/* A row-major host tensor; it points into *shape, which must outlive its use. */
static inline moe_tensor fm_cpu_tensor(void *data, moe_dtype dtype, fm_shape *shape) {
    moe_tensor t = {data, {MOE_DEVICE_CPU, 0}, shape->ndim, dtype, shape->dims, NULL, 0};
    return t;
}

/* The tensor, or NULL when its shape says "no tensor". */
static inline const moe_tensor *fm_optional(const moe_tensor *t) {
    return t->ndim == 0 ? NULL : t;
}

#endif

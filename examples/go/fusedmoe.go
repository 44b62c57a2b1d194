// Package fusedmoe runs mixture-of-experts (MoE) layers of LLMs on the CPU through the C ABI of
// libfusedmoe (include/fusedmoe.h).
//
// A Config describes a layer; NewLayer validates it with the expert weights; Layer.Forward runs
// one batch, and a Plan runs many batches with one workspace. For expert parallelism, a
// Dispatcher maps the router's global expert ids to the local ids of one rank's layer. A Lora
// wraps a layer with LoRA adapter slots (SPEC §7) that each token picks from. Every
// handle has an idempotent Close, and a finalizer frees a handle that was never closed. A
// Config and a Plan are used by one goroutine at a time; a Layer and a Dispatcher may be shared
// by any number of goroutines. Failures are *Error values, which match ErrInvalidArgument and
// its siblings under errors.Is.
package fusedmoe

/*
#cgo pkg-config: fusedmoe
#include "shim.h"
*/
import "C"

import (
	"fmt"
	"sync/atomic"
	"unsafe"
)

// frees counts the handles freed, by Close or by a finalizer; tests read it to see that a
// finalizer frees what was never closed.
var frees struct{ configs, layers, plans, dispatchers atomic.Int64 }

// Version is the library's version, e.g. "0.1.0".
func Version() string {
	return C.GoString(C.moe_version())
}

// Supports reports whether this build of the library, on this machine, can run feature:
// "f16", "bias", "no_combine", an activation by name ("gelu"), "option:cpu.num_threads", ...
func Supports(feature string) bool {
	name := C.CString(feature)
	defer C.free(unsafe.Pointer(name))
	return bool(C.moe_supports(name))
}

// checkABI refuses a library whose ABI is not the one of the header this package was
// compiled with, as the header asks of every host.
func checkABI() error {
	if got := C.moe_abi_version(); got != C.MOE_ABI_VERSION {
		return &Error{StatusUnsupported, fmt.Sprintf(
			"libfusedmoe has ABI version %d, this package was compiled for %d", got, C.MOE_ABI_VERSION)}
	}
	return nil
}

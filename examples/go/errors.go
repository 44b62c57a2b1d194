package fusedmoe

/*
#include "shim.h"
*/
import "C"

import (
	"errors"
	"fmt"
)

// Status is the library's moe_status: the class of a failure.
type Status uint32

// The statuses of include/fusedmoe.h.
const (
	StatusOK              Status = C.MOE_OK
	StatusInvalidArgument Status = C.MOE_ERR_INVALID_ARGUMENT
	StatusUnsupported     Status = C.MOE_ERR_UNSUPPORTED
	StatusDevice          Status = C.MOE_ERR_DEVICE
	StatusOutOfMemory     Status = C.MOE_ERR_OUT_OF_MEMORY
	StatusInternal        Status = C.MOE_ERR_INTERNAL
)

// String is the library's description of the status, e.g. "invalid argument".
func (s Status) String() string {
	return C.GoString(C.moe_status_string(C.uint32_t(s)))
}

// Sentinels for errors.Is: an *Error matches the one of its Status.
var (
	ErrInvalidArgument = errors.New("fusedmoe: invalid argument")
	ErrUnsupported     = errors.New("fusedmoe: unsupported")
	ErrDevice          = errors.New("fusedmoe: device error")
	ErrOutOfMemory     = errors.New("fusedmoe: out of memory")
	ErrInternal        = errors.New("fusedmoe: internal error")
)

var sentinels = map[Status]error{
	StatusInvalidArgument: ErrInvalidArgument,
	StatusUnsupported:     ErrUnsupported,
	StatusDevice:          ErrDevice,
	StatusOutOfMemory:     ErrOutOfMemory,
	StatusInternal:        ErrInternal,
}

// Error is a failed call: its Status and the library's message, which names the argument,
// e.g. "hidden: dtype f16, expected bf16 like the layer".
type Error struct {
	Status  Status
	Message string
}

func (e *Error) Error() string {
	return "fusedmoe: " + e.Status.String() + ": " + e.Message
}

// Is makes errors.Is(err, ErrInvalidArgument) hold for an *Error of that status.
func (e *Error) Is(target error) bool {
	return target == sentinels[e.Status]
}

// invalidArgument is an error this package finds before calling the library.
func invalidArgument(format string, args ...any) error {
	return &Error{StatusInvalidArgument, fmt.Sprintf(format, args...)}
}

// call runs one shim (see shim.h) and turns its status and message into an error.
func call(shim func(e *C.fm_error) C.moe_status) error {
	var e C.fm_error
	if status := shim(&e); status != C.MOE_OK {
		return &Error{Status(status), C.GoString(&e.message[0])}
	}
	return nil
}

package fusedmoe

import (
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// wantInvalidArgument fails unless err is an *Error of StatusInvalidArgument whose message
// begins with the argument's name.
func wantInvalidArgument(t *testing.T, err error, argument string) {
	t.Helper()
	var e *Error
	if !errors.Is(err, ErrInvalidArgument) || !errors.As(err, &e) || e.Status != StatusInvalidArgument {
		t.Fatalf("got %v, want an invalid argument error", err)
	}
	if errors.Is(err, ErrUnsupported) {
		t.Fatalf("%v also matches ErrUnsupported", err)
	}
	if !strings.HasPrefix(e.Message, argument+": ") {
		t.Fatalf("message %q does not name %s", e.Message, argument)
	}
}

func TestLibraryErrorsNameTheArgument(t *testing.T) {
	r := baseReference()
	b := randomBatch(r, 6, false, 1)
	layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(b))
	plan, err := layer.NewPlan(6)
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()

	b.ids[5] = int32(r.experts) // out of [-1, E)
	wantInvalidArgument(t, plan.Prepare(b.ids), "topk_ids")
	b.ids[5] = 0
	if err := plan.Prepare(b.ids); err != nil {
		t.Fatal(err)
	}
	out := make([]float32, r.outLen(6))
	wantInvalidArgument(t, plan.Run(b.hidden[:5*r.hidden], b.weights, out), "hidden")
	wantInvalidArgument(t, plan.Run(b.hidden, b.weights, b.hidden), "out")
}

func TestHostCheckedErrorsAreInvalidArgumentsToo(t *testing.T) {
	r := baseReference()
	b := randomBatch(r, 2, false, 1)
	c := newTestConfig(t, r, F32)
	_, err := NewLayer(c, Weights[uint16]{W13: make([]uint16, len(b.w13)), W2: make([]uint16, len(b.w2))})
	wantInvalidArgument(t, err, "weights")
	layer := newTestLayer(t, c, f32Weights(b))
	out := make([]float32, r.outLen(2))
	wantInvalidArgument(t, layer.Forward(b.hidden[1:], b.ids, b.weights, out), "hidden")
}

func TestErrorReadsStatusAndMessage(t *testing.T) {
	c := newTestConfig(t, baseReference(), F32)
	err := c.SetTopK(0)
	want := "fusedmoe: invalid argument: top_k: 0, expected in"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("got %v, want %q...", err, want)
	}
}

// The library's message is per OS thread, and goroutines move between threads between cgo
// calls: each message must still be the one of its own call. A stress test: a message read
// in a later cgo call than the failure would now and then be another call's.
func TestErrorMessagesStayWithTheirCallAcrossGoroutines(t *testing.T) {
	var wg sync.WaitGroup
	failures := make(chan string, 1)
	for g := 0; g < 2*runtime.GOMAXPROCS(0)+2; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			c, err := NewConfig()
			if err != nil {
				failures <- err.Error()
				return
			}
			defer c.Close()
			for i := 1; i <= 300; i++ {
				size := -(g*1000 + i)
				err := c.SetHiddenSize(size)
				if want := fmt.Sprintf("hidden_size: %d,", size); err == nil || !strings.Contains(err.Error(), want) {
					select {
					case failures <- fmt.Sprintf("got %v, want %q", err, want):
					default:
					}
					return
				}
				runtime.Gosched()
			}
		}(g)
	}
	wg.Wait()
	close(failures)
	if f, failed := <-failures; failed {
		t.Fatal(f)
	}
}

func TestStatusStringsAreTheLibrarys(t *testing.T) {
	if got := StatusInvalidArgument.String(); got != "invalid argument" {
		t.Fatalf("got %q", got)
	}
	if got := Status(99).String(); got != "unknown status" {
		t.Fatalf("got %q", got)
	}
}

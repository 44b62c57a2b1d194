package fusedmoe

import (
	"errors"
	"runtime"
	"strings"
	"testing"
	"time"
)

// freeCounts reads the counters of freed configs, layers and plans.
func freeCounts() [3]int64 {
	return [3]int64{frees.configs.Load(), frees.layers.Load(), frees.plans.Load()}
}

// newHandles makes a config, a layer from it and a plan of the layer, none closed.
func newHandles(t *testing.T) (*Config, *Layer[float32], *Plan[float32]) {
	r := baseReference()
	b := randomBatch(r, 1, true, 1)
	c, err := NewConfig()
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{c.SetNumExperts(r.experts), c.SetTopK(r.topK), c.SetHiddenSize(r.hidden),
		c.SetIntermediateSize(r.intermediate), c.SetDType(F32)} {
		if err != nil {
			t.Fatal(err)
		}
	}
	layer, err := NewLayer(c, f32Weights(b))
	if err != nil {
		t.Fatal(err)
	}
	if err := layer.Warmup(4); err != nil {
		t.Fatal(err)
	}
	if err := layer.Warmup(-1); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("Warmup(-1): %v, want ErrInvalidArgument", err)
	}
	plan, err := layer.NewPlan(4)
	if err != nil {
		t.Fatal(err)
	}
	return c, layer, plan
}

func TestCloseTwiceFreesOnce(t *testing.T) {
	before := freeCounts()
	config, layer, plan := newHandles(t)
	for i := 0; i < 2; i++ {
		plan.Close()
		layer.Close()
		config.Close()
	}
	if got := freeCounts(); got != [3]int64{before[0] + 1, before[1] + 1, before[2] + 1} {
		t.Fatalf("frees went from %v to %v, want one of each", before, got)
	}
}

func TestHandlesPanicWhenUsedAfterClose(t *testing.T) {
	config, layer, plan := newHandles(t)
	plan.Close()
	wantPanic(t, "Plan used after Close", func() { _ = plan.Prepare(nil) })
	layer.Close()
	wantPanic(t, "Layer used after Close", func() { _, _ = layer.NewPlan(1) })
	config.Close()
	wantPanic(t, "Config used after Close", func() { _ = config.SetTopK(1) })
}

func wantPanic(t *testing.T, message string, f func()) {
	t.Helper()
	defer func() {
		if p := recover(); p == nil || !strings.Contains(p.(string), message) {
			t.Fatalf("recovered %v, want a panic with %q", p, message)
		}
	}()
	f()
}

func TestFinalizersFreeHandlesNeverClosed(t *testing.T) {
	before := freeCounts()
	newHandles(t) // the config, layer and plan are unreachable once it returns
	// A layer's finalizer runs a cycle after its plan's (the plan references it).
	deadline := time.Now().Add(10 * time.Second)
	for got := freeCounts(); got[0] <= before[0] || got[1] <= before[1] || got[2] <= before[2]; got = freeCounts() {
		if time.Now().After(deadline) {
			t.Fatalf("frees went from %v to %v, want at least one more of each", before, got)
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAPlanKeepsItsLayerAlive(t *testing.T) {
	config, _, plan := newHandles(t) // the plan holds the only reference to the layer
	config.Close()
	defer func() { plan.Close(); plan.layer.Close() }() // naming the layer only at the end
	for i := 0; i < 3; i++ {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	r := baseReference()
	b := randomBatch(r, 4, false, 2)
	if err := plan.Prepare(b.ids); err != nil {
		t.Fatal(err)
	}
	if err := plan.Run(b.hidden, b.weights, make([]float32, r.outLen(4))); err != nil {
		t.Fatal(err)
	}
}

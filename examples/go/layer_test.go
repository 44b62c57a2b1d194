package fusedmoe

import (
	"fmt"
	"math/rand"
	"testing"
)

// f32Tolerance is the relative Frobenius error an f32 layer may have against the reference.
const f32Tolerance = 1e-5

// baseReference is a small gated silu layer: E = 4, K = 2, H = 16, I = 8.
func baseReference() reference {
	return reference{experts: 4, hidden: 16, intermediate: 8, topK: 2, activation: ActivationSilu,
		gated: true, layout: GateUpHalves, scale: 1, round: func(x float64) float64 { return x }}
}

// batch is a layer's f32 weights and one batch of inputs.
type batch struct {
	w13, w2, b13, b2, hidden, weights []float32
	ids                               []int32
}

// randomBatch draws weights and tokens; token 1 drops its second route and token 3 (if any)
// drops both.
func randomBatch(r reference, tokens int, withBias bool, seed int64) batch {
	rng := rand.New(rand.NewSource(seed))
	uniform := func(n int, scale float32) []float32 {
		s := make([]float32, n)
		for i := range s {
			s[i] = scale * (2*rng.Float32() - 1)
		}
		return s
	}
	b := batch{
		w13:     uniform(r.experts*r.n1()*r.hidden, 0.5),
		w2:      uniform(r.experts*r.hidden*r.intermediate, 0.5),
		hidden:  uniform(tokens*r.hidden, 1),
		weights: make([]float32, tokens*r.topK),
		ids:     make([]int32, tokens*r.topK),
	}
	if withBias {
		b.b13, b.b2 = uniform(r.experts*r.n1(), 0.2), uniform(r.experts*r.hidden, 0.2)
	}
	for i := range b.ids {
		b.ids[i], b.weights[i] = int32(rng.Intn(r.experts)), rng.Float32()
	}
	for _, route := range []int{1*r.topK + 1, 3 * r.topK, 3*r.topK + 1} {
		if route < len(b.ids) {
			b.ids[route] = -1
		}
	}
	return b
}

// want is the reference's output for the batch.
func (r reference) want(b batch) []float64 {
	return r.forward(widen(b.w13), widen(b.w2), widen(b.b13), widen(b.b2), widen(b.hidden), b.ids, widen(b.weights))
}

// outLen is the elements of out for a batch of tokens.
func (r reference) outLen(tokens int) int {
	if r.noCombine {
		return tokens * r.topK * r.hidden
	}
	return tokens * r.hidden
}

// newTestConfig is a config for the reference's layer; the test closes it.
func newTestConfig(t *testing.T, r reference, dtype DType) *Config {
	t.Helper()
	c, err := NewConfig()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	for _, err := range []error{
		c.SetNumExperts(r.experts), c.SetTopK(r.topK), c.SetHiddenSize(r.hidden),
		c.SetIntermediateSize(r.intermediate), c.SetDType(dtype), c.SetActivation(r.activation),
		c.SetGated(r.gated), c.SetGateUpLayout(r.layout), c.SetRoutedScalingFactor(float32(r.scale)),
		c.SetApplyRouterWeightOnInput(r.onInput), c.SetNoCombine(r.noCombine),
		c.SetNoCombineKeepRouterWeight(r.keepWeight),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
	if r.activation == ActivationSwigluOAI {
		if err := c.SetGemm1Alpha(float32(r.alpha)); err != nil {
			t.Fatal(err)
		}
		if err := c.SetGemm1Limit(float32(r.limit)); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

func newTestLayer[T Element](t *testing.T, c *Config, w Weights[T]) *Layer[T] {
	t.Helper()
	layer, err := NewLayer(c, w)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(layer.Close)
	return layer
}

func f32Weights(b batch) Weights[float32] {
	return Weights[float32]{W13: b.w13, W2: b.w2, B13: b.b13, B2: b.b2}
}

func TestF32LayersMatchTheReference(t *testing.T) {
	cases := []struct {
		name     string
		edit     func(r *reference)
		withBias bool
	}{
		{"silu gated", func(r *reference) {}, false},
		{"silu gated with biases and scaling", func(r *reference) { r.scale = 2.5 }, true},
		{"gelu gated with biases", func(r *reference) { r.activation = ActivationGelu }, true},
		{"swiglu_oai interleaved with biases", func(r *reference) {
			r.activation, r.layout, r.alpha, r.limit = ActivationSwigluOAI, GateUpInterleaved, 1.702, 0.5
		}, true},
		{"relu2 non-gated", func(r *reference) { r.activation, r.gated = ActivationRelu2, false }, false},
		{"silu non-gated with biases", func(r *reference) { r.gated = false }, true},
		{"router weight on input with biases", func(r *reference) { r.onInput = true }, true},
		{"no_combine", func(r *reference) { r.noCombine = true }, false},
		{"no_combine with biases keeping the router weight", func(r *reference) {
			r.noCombine, r.keepWeight = true, true
		}, true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := baseReference()
			c.edit(&r)
			const tokens = 6
			b := randomBatch(r, tokens, c.withBias, int64(i))
			layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(b))
			out := make([]float32, r.outLen(tokens))
			if err := layer.Forward(b.hidden, b.ids, b.weights, out); err != nil {
				t.Fatal(err)
			}
			if e := relativeError(widen(out), r.want(b)); e > f32Tolerance {
				t.Errorf("relative error %.3g > %g", e, f32Tolerance)
			}
		})
	}
}

func TestNoCombineRowsOfDroppedRoutesAreZero(t *testing.T) {
	r := baseReference()
	r.noCombine = true
	b := randomBatch(r, 4, true, 7)
	layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(b))
	out := make([]float32, r.outLen(4))
	for i := range out {
		out[i] = 99 // to see the library write the zeros
	}
	if err := layer.Forward(b.hidden, b.ids, b.weights, out); err != nil {
		t.Fatal(err)
	}
	for route, id := range b.ids {
		row := out[route*r.hidden : (route+1)*r.hidden]
		for _, v := range row {
			if (v == 0) != (id < 0) {
				t.Fatalf("route %d (expert %d): row %v", route, id, row)
			}
		}
	}
}

func TestInplaceLayerWritesIntoHidden(t *testing.T) {
	r := baseReference()
	b := randomBatch(r, 5, true, 11)
	c := newTestConfig(t, r, F32)
	if err := c.SetInplace(true); err != nil {
		t.Fatal(err)
	}
	layer := newTestLayer(t, c, f32Weights(b))
	want := r.want(b)
	if err := layer.Forward(b.hidden, b.ids, b.weights, nil); err != nil {
		t.Fatal(err)
	}
	if e := relativeError(widen(b.hidden), want); e > f32Tolerance {
		t.Errorf("relative error %.3g > %g", e, f32Tolerance)
	}
}

func TestOnePlanRunsBatchesOfUpToItsTokens(t *testing.T) {
	r := baseReference()
	b := randomBatch(r, 1, true, 3) // the weights
	layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(b))
	plan, err := layer.NewPlan(8)
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	for _, tokens := range []int{8, 3, 0, 5} {
		batch := randomBatch(r, tokens, true, int64(10+tokens))
		batch.w13, batch.w2, batch.b13, batch.b2 = b.w13, b.w2, b.b13, b.b2
		out := make([]float32, r.outLen(tokens))
		if err := plan.Prepare(batch.ids); err != nil {
			t.Fatal(err)
		}
		if err := plan.Run(batch.hidden, batch.weights, out); err != nil {
			t.Fatal(err)
		}
		if tokens == 0 {
			continue
		}
		if e := relativeError(widen(out), r.want(batch)); e > f32Tolerance {
			t.Errorf("%d tokens: relative error %.3g > %g", tokens, e, f32Tolerance)
		}
	}
}

func TestOneLayerRunsFromManyGoroutinesAtOnce(t *testing.T) {
	r := baseReference()
	weights := randomBatch(r, 1, true, 4)
	layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(weights))
	errs := make(chan error, 8)
	for g := 0; g < cap(errs); g++ {
		go func(g int) {
			b := randomBatch(r, 4+g, true, int64(100+g))
			b.w13, b.w2, b.b13, b.b2 = weights.w13, weights.w2, weights.b13, weights.b2
			out := make([]float32, r.outLen(4+g))
			err := layer.Forward(b.hidden, b.ids, b.weights, out)
			if e := relativeError(widen(out), r.want(b)); err == nil && e > f32Tolerance {
				err = fmt.Errorf("goroutine %d: relative error %.3g > %g", g, e, f32Tolerance)
			}
			errs <- err
		}(g)
	}
	for g := 0; g < cap(errs); g++ {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

func TestHalfLayersMatchTheReferenceRoundedLikeThem(t *testing.T) {
	cases := []struct {
		dtype     DType
		toBits    func(float32) uint16
		fromBits  func(uint16) float32
		tolerance float64
	}{
		{F16, Float32ToF16, F16ToFloat32, 2e-3},
		{BF16, Float32ToBF16, BF16ToFloat32, 1.6e-2},
	}
	for _, c := range cases {
		t.Run(c.dtype.String(), func(t *testing.T) {
			if !Supports(c.dtype.String()) {
				t.Skipf("this build has no %v", c.dtype)
			}
			r := baseReference()
			r.round = func(x float64) float64 { return float64(c.fromBits(c.toBits(float32(x)))) }
			b := randomBatch(r, 6, true, 5)
			w13, w2, hidden := toHalf(b.w13, c.toBits), toHalf(b.w2, c.toBits), toHalf(b.hidden, c.toBits)
			b.w13, b.w2, b.hidden = fromHalf(w13, c.fromBits), fromHalf(w2, c.fromBits), fromHalf(hidden, c.fromBits)
			layer := newTestLayer(t, newTestConfig(t, r, c.dtype), Weights[uint16]{W13: w13, W2: w2, B13: b.b13, B2: b.b2})
			out := make([]uint16, r.outLen(6))
			if err := layer.Forward(hidden, b.ids, b.weights, out); err != nil {
				t.Fatal(err)
			}
			e := relativeError(widen(fromHalf(out, c.fromBits)), r.want(b))
			if e > c.tolerance {
				t.Errorf("relative error %.3g > %g", e, c.tolerance)
			}
			t.Logf("relative error %.3g", e)
		})
	}
}

func widen(s []float32) []float64 {
	if s == nil {
		return nil
	}
	w := make([]float64, len(s))
	for i, v := range s {
		w[i] = float64(v)
	}
	return w
}

func toHalf(s []float32, toBits func(float32) uint16) []uint16 {
	h := make([]uint16, len(s))
	for i, v := range s {
		h[i] = toBits(v)
	}
	return h
}

func fromHalf(h []uint16, fromBits func(uint16) float32) []float32 {
	s := make([]float32, len(h))
	for i, v := range h {
		s[i] = fromBits(v)
	}
	return s
}

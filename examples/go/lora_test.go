package fusedmoe

import (
	"errors"
	"math"
	"math/rand"
	"strings"
	"testing"
)

// testAdapter draws an f32 adapter of rank, zero padded to maxRank, for the reference r.
func testAdapter(r reference, rank, maxRank int, shared bool, scaling float32, rng *rand.Rand) Adapter[float32] {
	outer := r.experts
	if shared {
		outer = 1
	}
	draw := func(a, rows, cols int, live func(row, col int) bool) []float32 {
		s := make([]float32, a*rows*cols)
		for i := range s {
			if live((i/cols)%rows, i%cols) {
				s[i] = 0.6 * (2*rng.Float32() - 1)
			}
		}
		return s
	}
	liveRow := func(row, _ int) bool { return row%maxRank < rank }
	liveCol := func(_, col int) bool { return col < rank }
	return Adapter[float32]{
		GateUpA:     draw(outer, 2*maxRank, r.hidden, liveRow),
		GateUpB:     draw(r.experts, r.n1(), maxRank, liveCol),
		DownA:       draw(r.experts, maxRank, r.intermediate, liveRow),
		DownB:       draw(outer, r.hidden, maxRank, liveCol),
		Scaling:     scaling,
		SharedOuter: shared,
	}
}

// loraForward is SPEC §2 with §7's deltas in float64 for a gated silu halves f32 layer without
// biases: token m uses adapters[m] (nil: none).
func loraForward(r reference, b batch, adapters []*Adapter[float32], maxRank int) []float64 {
	w13, w2, x := widen(b.w13), widen(b.w2), widen(b.hidden)
	tokens, n1 := len(b.ids)/r.topK, r.n1()
	out := make([]float64, tokens*r.hidden)
	for m := 0; m < tokens; m++ {
		xm := x[m*r.hidden : (m+1)*r.hidden]
		a := adapters[m]
		for k := 0; k < r.topK; k++ {
			route := m*r.topK + k
			e := int(b.ids[route])
			if e < 0 {
				continue
			}
			g1 := make([]float64, n1)
			for n := range g1 {
				g1[n] = dot(xm, w13[(e*n1+n)*r.hidden:])
			}
			if a != nil {
				ea := e
				if a.SharedOuter {
					ea = 0
				}
				t := shrink(widen(a.GateUpA[ea*2*maxRank*r.hidden:]), 2*maxRank, xm)
				for n := range g1 {
					off := 0
					if n >= r.intermediate {
						off = maxRank
					}
					g1[n] += float64(a.Scaling) * dot(t[off:off+maxRank], widen(a.GateUpB[(e*n1+n)*maxRank:]))
				}
			}
			act := make([]float64, r.intermediate)
			for j := range act {
				act[j] = r.act(g1, j)
			}
			u := []float64{}
			if a != nil {
				u = shrink(widen(a.DownA[e*maxRank*r.intermediate:]), maxRank, act)
			}
			for h := 0; h < r.hidden; h++ {
				y := dot(act, w2[(e*r.hidden+h)*r.intermediate:])
				if a != nil {
					eb := e
					if a.SharedOuter {
						eb = 0
					}
					y += float64(a.Scaling) * dot(u, widen(a.DownB[(eb*r.hidden+h)*maxRank:]))
				}
				out[m*r.hidden+h] += y * float64(b.weights[route])
			}
		}
	}
	return out
}

// shrink is A·v for the rows of A (each len(v) long), in f32 rounding (the layer dtype).
func shrink(a []float64, rows int, v []float64) []float64 {
	t := make([]float64, rows)
	for q := range t {
		t[q] = float64(float32(dot(v, a[q*len(v):])))
	}
	return t
}

func TestLoraMatchesTheReferenceAndOutlivesItsLayer(t *testing.T) {
	r := baseReference()
	const tokens, maxRank = 9, 4
	b := randomBatch(r, tokens, false, 42)
	rng := rand.New(rand.NewSource(43))
	adapters := []Adapter[float32]{
		testAdapter(r, 4, maxRank, false, 0.5, rng),
		testAdapter(r, 2, maxRank, true, 2, rng),
		testAdapter(r, 4, maxRank, false, 1, rng),
	}
	layer, err := NewLayer(newTestConfig(t, r, F32), f32Weights(b))
	if err != nil {
		t.Fatal(err)
	}
	lora, err := NewLora(layer, 3, maxRank)
	if err != nil {
		t.Fatal(err)
	}
	defer lora.Close()
	for s, a := range adapters {
		if err := lora.SetSlot(s, a); err != nil {
			t.Fatal(err)
		}
	}
	if err := lora.SetEnabled(2, false); err != nil {
		t.Fatal(err)
	}
	if !lora.runnerConfigIsLayers() {
		t.Error("the LoRA runner config is not the layer's own config handle")
	}
	ids := make([]int32, tokens)
	active := make([]*Adapter[float32], tokens)
	for m := range ids {
		ids[m] = int32(m%4) - 1 // -1, 0, 1, 2 (disabled)
		if ids[m] == 0 || ids[m] == 1 {
			active[m] = &adapters[ids[m]]
		}
	}
	want := loraForward(r, b, active, maxRank)
	out := make([]float32, tokens*r.hidden)
	if err := lora.Forward(b.hidden, b.ids, b.weights, AdapterMap{PerToken: ids}, out); err != nil {
		t.Fatal(err)
	}
	if e := relativeError(widen(out), want); e > f32Tolerance {
		t.Errorf("per-token map: relative error %.3g > %g", e, f32Tolerance)
	}
	if e := relativeError(widen(out), r.want(b)); e < 1e-3 {
		t.Errorf("the deltas change the output by only %.3g", e)
	}

	// Prepare, close the layer, then run through the wrapper with segments (one per token).
	plan, err := lora.NewPlan(tokens)
	if err != nil {
		t.Fatal(err)
	}
	defer plan.Close()
	if err := plan.Prepare(b.ids); err != nil {
		t.Fatal(err)
	}
	layer.Close()
	config, err := lora.RunnerConfig()
	if err != nil {
		t.Fatal(err)
	}
	defer config.Close()
	if k, err := config.TopK(); err != nil || k != r.topK {
		t.Errorf("runner config after the layer closed: top_k %d, %v", k, err)
	}
	indptr := make([]int32, tokens+1)
	for m := range indptr {
		indptr[m] = int32(m)
	}
	for i := range out {
		out[i] = float32(math.NaN())
	}
	if err := plan.RunLora(lora, b.hidden, b.weights, AdapterMap{SegIndptr: indptr, SegAdapter: ids}, out); err != nil {
		t.Fatal(err)
	}
	if e := relativeError(widen(out), want); e > f32Tolerance {
		t.Errorf("segments after the layer closed: relative error %.3g > %g", e, f32Tolerance)
	}

	// An adapter id of num_slots is refused by name.
	bad := append([]int32(nil), ids...)
	bad[3] = 3
	err = plan.RunLora(lora, b.hidden, b.weights, AdapterMap{PerToken: bad}, out)
	if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), "adapter_ids") {
		t.Errorf("adapter id 3: %v", err)
	}
	if !Supports("lora") {
		t.Error(`Supports("lora") is false`)
	}
}

package fusedmoe

import (
	"strings"
	"testing"
)

func TestLayerConfigReadsBackWhatWasSet(t *testing.T) {
	r := baseReference()
	r.activation, r.layout, r.alpha, r.limit = ActivationSwigluOAI, GateUpInterleaved, 1.702, 7
	r.scale, r.onInput, r.noCombine = 2.5, true, true
	c := newTestConfig(t, r, BF16)
	for _, err := range []error{c.SetNumExperts(2 * r.experts), c.SetNumLocalExperts(r.experts),
		c.SetOption("cpu.num_threads", "2")} {
		if err != nil {
			t.Fatal(err)
		}
	}
	b := randomBatch(r, 1, false, 1)
	layer := newTestLayer(t, c, Weights[uint16]{W13: toHalf(b.w13, Float32ToBF16), W2: toHalf(b.w2, Float32ToBF16)})
	got, err := layer.Config()
	if err != nil {
		t.Fatal(err)
	}
	defer got.Close()

	wantEqual(t, "num_experts", must(got.NumExperts()), 2*r.experts)
	wantEqual(t, "num_local_experts", must(got.NumLocalExperts()), r.experts)
	wantEqual(t, "top_k", must(got.TopK()), r.topK)
	wantEqual(t, "hidden_size", must(got.HiddenSize()), r.hidden)
	wantEqual(t, "intermediate_size", must(got.IntermediateSize()), r.intermediate)
	wantEqual(t, "dtype", must(got.DType()), BF16)
	wantEqual(t, "activation", must(got.Activation()), ActivationSwigluOAI)
	wantEqual(t, "gated", must(got.Gated()), true)
	wantEqual(t, "gate_up_layout", must(got.GateUpLayout()), GateUpInterleaved)
	wantEqual(t, "routed_scaling_factor", must(got.RoutedScalingFactor()), float32(2.5))
	wantEqual(t, "apply_router_weight_on_input", must(got.ApplyRouterWeightOnInput()), true)
	wantEqual(t, "no_combine", must(got.NoCombine()), true)
	wantEqual(t, "no_combine_keep_router_weight", must(got.NoCombineKeepRouterWeight()), false)
	wantEqual(t, "inplace", must(got.Inplace()), false)
	wantEqual(t, "cpu.num_threads", must(got.Option("cpu.num_threads")), "2")
	alpha, alphaSet, err := got.Gemm1Alpha()
	wantEqual(t, "gemm1_alpha", alpha, float32(1.702))
	wantEqual(t, "gemm1_alpha set", alphaSet && err == nil, true)
	limit, limitSet, err := got.Gemm1Limit()
	wantEqual(t, "gemm1_limit", limit, float32(7))
	wantEqual(t, "gemm1_limit set", limitSet && err == nil, true)
}

func TestUnsetValuesReadAsUnset(t *testing.T) {
	c, err := NewConfig()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, isSet, err := c.Gemm1Limit()
	wantEqual(t, "gemm1_limit set", isSet || err != nil, false)
	_, err = c.DType()
	wantInvalidArgument(t, err, "config")
	_, err = c.Option("cpu.num_threads")
	wantInvalidArgument(t, err, "key")
}

func TestOptionValuesOfAnyLengthReadBack(t *testing.T) {
	c := newTestConfig(t, baseReference(), F32)
	path := "/nonexistent/" + strings.Repeat("tiles/", 40) + "table.json"
	if err := c.SetOption("tile.config_file", path); err != nil {
		t.Fatal(err)
	}
	wantEqual(t, "tile.config_file", must(c.Option("tile.config_file")), path)
}

func TestVersionAndSupports(t *testing.T) {
	if Version() == "" || !Supports("f32") || Supports("no such feature") {
		t.Fatalf("version %q, f32 %v, no such feature %v", Version(), Supports("f32"), Supports("no such feature"))
	}
}

// must is v, and panics on err: for getters the test expects to succeed.
func must[V any](v V, err error) V {
	if err != nil {
		panic(err)
	}
	return v
}

func wantEqual[V comparable](t *testing.T, what string, got, want V) {
	t.Helper()
	if got != want {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

package fusedmoe

import (
	"fmt"
	"math"
)

// reference is SPEC §2-3 in float64: the layer a test configures, computed the plain way.
type reference struct {
	experts, hidden, intermediate, topK int
	activation                          Activation
	gated                               bool
	layout                              GateUpLayout
	alpha, limit                        float64 // swiglu_oai's
	scale                               float64 // routed_scaling_factor
	onInput, noCombine, keepWeight      bool
	round                               func(float64) float64 // to the layer dtype
}

func (r reference) n1() int {
	if r.gated {
		return 2 * r.intermediate
	}
	return r.intermediate
}

// forward is out for hidden [M, H], ids and weights [M, K]; nil biases are zero.
func (r reference) forward(w13, w2, b13, b2, hidden []float64, ids []int32, weights []float64) []float64 {
	tokens, rowsPerToken := len(ids)/r.topK, 1
	if r.noCombine {
		rowsPerToken = r.topK
	}
	out := make([]float64, tokens*rowsPerToken*r.hidden)
	for m := 0; m < tokens; m++ {
		sum := make([]float64, r.hidden)
		for k := 0; k < r.topK; k++ {
			route := m*r.topK + k
			e := int(ids[route])
			if e < 0 {
				continue // a dropped route contributes zero (and leaves its no_combine row zero)
			}
			y := r.route(w13, w2, b13, b2, hidden[m*r.hidden:(m+1)*r.hidden], e, weights[route])
			if r.noCombine {
				copy(out[route*r.hidden:], y)
				continue
			}
			for h := range sum {
				sum[h] += y[h]
			}
		}
		if !r.noCombine {
			for h, s := range sum {
				out[m*r.hidden+h] = r.round(r.scale * s)
			}
		}
	}
	return out
}

// route is y_mk: GEMM1, activation, GEMM2 for token row x through expert e with weight w.
func (r reference) route(w13, w2, b13, b2, x []float64, e int, w float64) []float64 {
	n1, inWeight, outWeight := r.n1(), 1.0, w
	if r.onInput {
		inWeight, outWeight = w, 1
	} else if r.noCombine && !r.keepWeight {
		outWeight = 1
	}
	g1 := make([]float64, n1)
	for n := range g1 {
		g1[n] = r.round(inWeight * (dot(x, w13[(e*n1+n)*r.hidden:]) + at(b13, e*n1+n)))
	}
	a := make([]float64, r.intermediate)
	for j := range a {
		a[j] = r.round(r.act(g1, j))
	}
	y := make([]float64, r.hidden)
	for h := range y {
		y[h] = r.round((dot(a, w2[(e*r.hidden+h)*r.intermediate:]) + at(b2, e*r.hidden+h)) * outWeight)
	}
	return y
}

// act is the activation's j-th output from GEMM1's row g1.
func (r reference) act(g1 []float64, j int) float64 {
	if !r.gated {
		return r.nonGated(g1[j])
	}
	g, u := g1[j], g1[r.intermediate+j]
	if r.layout == GateUpInterleaved {
		g, u = g1[2*j], g1[2*j+1]
	}
	switch r.activation {
	case ActivationSilu:
		return silu(g) * u
	case ActivationGelu:
		return geluErf(g) * u
	case ActivationSwigluOAI:
		g, u = math.Min(g, r.limit), math.Max(-r.limit, math.Min(u, r.limit))
		return g * sigmoid(r.alpha*g) * (u + 1)
	}
	panic(fmt.Sprintf("reference: no gated activation %d", r.activation))
}

func (r reference) nonGated(x float64) float64 {
	switch r.activation {
	case ActivationSilu:
		return silu(x)
	case ActivationRelu2:
		x = math.Max(x, 0)
		return x * x
	}
	panic(fmt.Sprintf("reference: no non-gated activation %d", r.activation))
}

func sigmoid(x float64) float64 { return 1 / (1 + math.Exp(-x)) }
func silu(x float64) float64    { return x * sigmoid(x) }
func geluErf(x float64) float64 { return 0.5 * x * (1 + math.Erf(x/math.Sqrt2)) }

// dot is the dot product of a with the first len(a) elements of b.
func dot(a, b []float64) float64 {
	s := 0.0
	for i, v := range a {
		s += v * b[i]
	}
	return s
}

// at is bias[i], or 0 without a bias.
func at(bias []float64, i int) float64 {
	if bias == nil {
		return 0
	}
	return bias[i]
}

// relativeError is ‖got − want‖ / ‖want‖ (Frobenius).
func relativeError(got, want []float64) float64 {
	var diff, norm float64
	for i := range want {
		diff += (got[i] - want[i]) * (got[i] - want[i])
		norm += want[i] * want[i]
	}
	return math.Sqrt(diff / norm)
}

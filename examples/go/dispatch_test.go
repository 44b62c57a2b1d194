package fusedmoe

import (
	"fmt"
	"reflect"
	"runtime"
	"testing"
	"time"
)

// wantIDs fails unless got and want hold the same ids.
func wantIDs(t *testing.T, what string, got, want []int32) {
	t.Helper()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

func newTestDispatcher(t *testing.T, numExperts, epSize, epRank, numShared int) *Dispatcher {
	t.Helper()
	d, err := NewContiguousDispatcher(numExperts, epSize, epRank, numShared)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// contiguousMapping is SPEC §6's contiguous partition, written out the plain way.
func contiguousMapping(numExperts, epSize, epRank, numShared int) []int32 {
	perRank := (numExperts - numShared) / epSize
	mapping := make([]int32, numExperts)
	for g := range mapping {
		switch {
		case g >= numExperts-numShared:
			mapping[g] = int32(perRank + g - (numExperts - numShared))
		case g/perRank == epRank:
			mapping[g] = int32(g % perRank)
		default:
			mapping[g] = -1
		}
	}
	return mapping
}

func TestContiguousDispatcherFollowsSpec6(t *testing.T) {
	// E_g 9 with one shared expert on 4 ranks: R = 2; rank 1 stores 2, 3 and the shared 8.
	d := newTestDispatcher(t, 9, 4, 1, 1)
	wantEqual(t, "num_experts", d.NumExperts(), 9)
	wantEqual(t, "num_local_experts", d.NumLocalExperts(), 3)
	wantIDs(t, "mapping", d.Mapping(), []int32{-1, -1, 0, 1, -1, -1, -1, -1, 2})
	wantIDs(t, "expert mask", d.ExpertMask(), []int32{0, 0, 1, 1, 0, 0, 0, 0, 1})

	for _, p := range []struct{ experts, epSize, shared int }{{8, 4, 0}, {9, 4, 1}, {10, 2, 2}, {6, 1, 0}} {
		for rank := 0; rank < p.epSize; rank++ {
			name := fmt.Sprintf("E_g %d, S %d, rank %d of %d", p.experts, p.shared, rank, p.epSize)
			d := newTestDispatcher(t, p.experts, p.epSize, rank, p.shared)
			want := contiguousMapping(p.experts, p.epSize, rank, p.shared)
			wantIDs(t, name+": mapping", d.Mapping(), want)
			wantEqual(t, name+": num_local_experts", d.NumLocalExperts(), (p.experts-p.shared)/p.epSize+p.shared)
			mask := d.ExpertMask()
			for g, l := range want {
				if (mask[g] == 1) != (l >= 0) || mask[g]&^1 != 0 {
					t.Fatalf("%s: mask %v for mapping %v", name, mask, want)
				}
			}
		}
	}
}

func TestMappingDispatcherKeepsACopyOfItsTable(t *testing.T) {
	table := []int32{2, -1, 0, -1, 1, -1}
	d, err := NewMappingDispatcher(table, 4) // local id 3 stays unused: allowed
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	table[0] = -1 // the library copied the table
	wantEqual(t, "num_experts", d.NumExperts(), 6)
	wantEqual(t, "num_local_experts", d.NumLocalExperts(), 4)
	wantIDs(t, "mapping", d.Mapping(), []int32{2, -1, 0, -1, 1, -1})
	wantIDs(t, "expert mask", d.ExpertMask(), []int32{1, 0, 1, 0, 1, 0})
	d.Mapping()[0] = 5 // and so does Mapping
	wantEqual(t, "mapping after a caller wrote into a copy", d.Mapping()[0], int32(2))
}

func TestDispatchMapsIDsAndKeepsDroppedRoutes(t *testing.T) {
	d := newTestDispatcher(t, 9, 4, 1, 1)
	ids := []int32{2, 3, -1, 8, 0, -7, 7, 3}
	want := []int32{0, 1, -1, 2, -1, -1, -1, 1}
	out := make([]int32, len(ids))
	if err := d.Dispatch(ids, out); err != nil {
		t.Fatal(err)
	}
	wantIDs(t, "local ids", out, want)
	wantIDs(t, "topk_ids after dispatching", ids, []int32{2, 3, -1, 8, 0, -7, 7, 3})

	if err := d.Dispatch(ids, ids); err != nil { // in place
		t.Fatal(err)
	}
	wantIDs(t, "local ids in place", ids, want)

	if err := d.Dispatch(nil, nil); err != nil { // an empty batch
		t.Fatal(err)
	}
}

func TestDispatchErrorsNameTheArgumentAndWriteNothing(t *testing.T) {
	d := newTestDispatcher(t, 8, 4, 0, 0)
	ids := []int32{0, 1, 8, -1} // 8 is not below E_g
	out := []int32{42, 42, 42, 42}
	wantInvalidArgument(t, d.Dispatch(ids, out), "topk_ids")
	wantIDs(t, "out after a refused dispatch", out, []int32{42, 42, 42, 42})
	wantInvalidArgument(t, d.Dispatch(ids, ids), "topk_ids")
	wantIDs(t, "topk_ids after a refused dispatch in place", ids, []int32{0, 1, 8, -1})

	ids[2] = 2
	wantInvalidArgument(t, d.Dispatch(ids, out[:3]), "local_topk_ids")
	buf := []int32{0, 1, 2, 3, 4}
	wantInvalidArgument(t, d.Dispatch(buf[:4], buf[1:]), "local_topk_ids") // overlapping, not the same
	wantIDs(t, "overlapping buffer after a refused dispatch", buf, []int32{0, 1, 2, 3, 4})
}

func TestBadDispatchersAreRefusedByName(t *testing.T) {
	_, err := NewMappingDispatcher([]int32{0, 1, -1, 0}, 2) // local id 0 twice
	wantInvalidArgument(t, err, "mapping")
	_, err = NewMappingDispatcher([]int32{0, 2, -1}, 2) // 2 is not below E_local
	wantInvalidArgument(t, err, "mapping")
	_, err = NewMappingDispatcher([]int32{0, -2}, 1)
	wantInvalidArgument(t, err, "mapping")
	_, err = NewMappingDispatcher(nil, 1)
	wantInvalidArgument(t, err, "mapping")
	_, err = NewMappingDispatcher([]int32{0, 1}, 3)
	wantInvalidArgument(t, err, "num_local_experts")
	_, err = NewContiguousDispatcher(10, 4, 0, 0) // 4 does not divide 10
	wantInvalidArgument(t, err, "ep_size")
	_, err = NewContiguousDispatcher(8, 4, 4, 0)
	wantInvalidArgument(t, err, "ep_rank")
	_, err = NewContiguousDispatcher(8, 4, 0, 8)
	wantInvalidArgument(t, err, "num_shared_experts")
	_, err = NewContiguousDispatcher(0, 1, 0, 0)
	wantInvalidArgument(t, err, "num_experts")
}

func TestDispatcherCloseFinalizerAndUseAfterClose(t *testing.T) {
	before := frees.dispatchers.Load()
	d, err := NewContiguousDispatcher(8, 2, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	d.Close()
	wantEqual(t, "dispatchers freed by two Closes", frees.dispatchers.Load()-before, int64(1))
	wantPanic(t, "Dispatcher used after Close", func() { _ = d.Dispatch(nil, nil) })
	wantPanic(t, "Dispatcher used after Close", func() { d.Mapping() })

	before = frees.dispatchers.Load()
	func() {
		if _, err := NewContiguousDispatcher(8, 2, 1, 0); err != nil { // never closed
			t.Fatal(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for frees.dispatchers.Load() == before {
		if time.Now().After(deadline) {
			t.Fatal("the finalizer did not free an unreachable dispatcher")
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
}

func TestOneDispatcherServesManyGoroutinesAtOnce(t *testing.T) {
	d := newTestDispatcher(t, 64, 8, 3, 0)
	errs := make(chan error, 8)
	for g := 0; g < cap(errs); g++ {
		go func(g int) {
			ids := make([]int32, 1000)
			for i := range ids {
				ids[i] = int32((i*7 + g) % 64)
			}
			out := make([]int32, len(ids))
			err := d.Dispatch(ids, out)
			for i := 0; err == nil && i < len(ids); i++ {
				if want := contiguousMapping(64, 8, 3, 0)[ids[i]]; out[i] != want {
					err = fmt.Errorf("goroutine %d: id %d became %d, want %d", g, ids[i], out[i], want)
				}
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

// localWeights is one rank's slice of the model's weights, biases included: local expert l
// holds global expert g where mapping[g] == l.
func localWeights(r reference, b batch, mapping []int32, numLocal int) Weights[float32] {
	n1 := r.n1()
	w := Weights[float32]{
		W13: make([]float32, numLocal*n1*r.hidden),
		W2:  make([]float32, numLocal*r.hidden*r.intermediate),
		B13: make([]float32, numLocal*n1),
		B2:  make([]float32, numLocal*r.hidden),
	}
	for g, l := range mapping {
		if l < 0 {
			continue
		}
		for _, t := range []struct {
			dst, src []float32
			size     int
		}{{w.W13, b.w13, n1 * r.hidden}, {w.W2, b.w2, r.hidden * r.intermediate}, {w.B13, b.b13, n1}, {w.B2, b.b2, r.hidden}} {
			copy(t.dst[int(l)*t.size:(int(l)+1)*t.size], t.src[g*t.size:(g+1)*t.size])
		}
	}
	return w
}

// epBatch is a batch, with biases, of a model whose last numShared global experts are shared:
// every token's last route goes to one of them, except token 4's (dropped).
func epBatch(r reference, tokens, numShared int, seed int64) batch {
	b := randomBatch(r, tokens, true, seed)
	for m := 0; m < tokens && numShared > 0; m++ {
		route := m*r.topK + r.topK - 1
		b.ids[route] = int32(r.experts - numShared + m%numShared)
		if m == 4 {
			b.ids[route] = -1
		}
	}
	return b
}

// sharedWork is how the ranks share the work of the shared experts, which every rank's
// dispatcher maps: a token's route to one of them must add up to one run over the ranks.
type sharedWork int

const (
	// onHomeRank runs each shared route on its token's home rank (token m's is m mod ep_size)
	// only: the host sets it to -1 on the other ranks after Dispatch.
	onHomeRank sharedWork = iota
	// splitIntermediate runs shared routes on every rank, each rank with its 1/ep_size of the
	// shared experts' intermediate dimension (the w2 columns of the rest zeroed) and their b2
	// on rank 0 only, the way tensor parallelism splits an expert.
	splitIntermediate
)

// expertParallelSum runs the batch on each of epSize ranks, each with its contiguous
// dispatcher and its slice of the weights, and sums their outputs.
func expertParallelSum(t *testing.T, r reference, b batch, epSize, numShared int, work sharedWork) []float64 {
	t.Helper()
	tokens := len(b.ids) / r.topK
	sum := make([]float64, r.outLen(tokens))
	runs := make([]int, len(b.ids)) // how many ranks ran each route
	for rank := 0; rank < epSize; rank++ {
		d := newTestDispatcher(t, r.experts, epSize, rank, numShared)
		c := newTestConfig(t, r, F32) // num_experts E_g
		if err := c.SetNumLocalExperts(d.NumLocalExperts()); err != nil {
			t.Fatal(err)
		}
		mapping := d.Mapping()
		w := localWeights(r, b, mapping, d.NumLocalExperts())
		for g := r.experts - numShared; g < r.experts && work == splitIntermediate; g++ {
			l, share := int(mapping[g]), r.intermediate/epSize
			for h := 0; h < r.hidden; h++ {
				row := w.W2[(l*r.hidden+h)*r.intermediate:][:r.intermediate]
				for j := range row {
					if j/share != rank {
						row[j] = 0
					}
				}
				if rank != 0 {
					w.B2[l*r.hidden+h] = 0
				}
			}
		}
		layer := newTestLayer(t, c, w)

		local := make([]int32, len(b.ids))
		if err := d.Dispatch(b.ids, local); err != nil {
			t.Fatal(err)
		}
		for route, g := range b.ids {
			if work == onHomeRank && int(g) >= r.experts-numShared && (route/r.topK)%epSize != rank {
				local[route] = -1
			}
			if local[route] >= 0 {
				runs[route]++
			}
		}
		out := make([]float32, r.outLen(tokens))
		if err := layer.Forward(b.hidden, local, b.weights, out); err != nil {
			t.Fatal(err)
		}
		for i, v := range out {
			sum[i] += float64(v)
		}
	}
	for route, g := range b.ids {
		want := 1
		if g < 0 {
			want = 0
		} else if int(g) >= r.experts-numShared && work == splitIntermediate {
			want = epSize
		}
		if runs[route] != want {
			t.Errorf("route %d (global expert %d) ran on %d ranks, want %d", route, g, runs[route], want)
		}
	}
	return sum
}

// singleRank is the output of one layer holding every expert, run on the global ids.
func singleRank(t *testing.T, r reference, b batch) []float64 {
	t.Helper()
	layer := newTestLayer(t, newTestConfig(t, r, F32), f32Weights(b))
	out := make([]float32, r.outLen(len(b.ids)/r.topK))
	if err := layer.Forward(b.hidden, b.ids, b.weights, out); err != nil {
		t.Fatal(err)
	}
	if e := relativeError(widen(out), r.want(b)); e > f32Tolerance {
		t.Fatalf("single rank: relative error %.3g > %g against the float64 reference", e, f32Tolerance)
	}
	return widen(out)
}

// SPEC §6: the ranks' outputs sum to the single-rank output. With S = 0 the dispatchers
// alone see to that, each routed expert's weights and biases, b2 included, going to the one
// rank storing it. (Given on rank 0 only, as SPEC §6 words it, b2 would be missing from every
// route run elsewhere: "b2 on one rank only" holds for a split expert, as in gpt-oss's
// tensor parallelism, i.e. here for the shared experts split over the ranks.) With S = 1 every
// rank maps the shared expert, and the host makes each of its routes count once.
func TestExpertParallelRanksSumToTheSingleRankOutput(t *testing.T) {
	for _, c := range []struct {
		name   string
		shared int
		work   sharedWork
	}{
		{"S 0", 0, onHomeRank},
		{"S 1, each shared route on one rank", 1, onHomeRank},
		{"S 1, the shared expert split over the ranks", 1, splitIntermediate},
	} {
		t.Run(c.name, func(t *testing.T) {
			const epSize, tokens = 4, 12
			r := baseReference()
			r.experts, r.topK = 8+c.shared, 3 // E_g − S = 8: R = 2 routed experts per rank
			b := epBatch(r, tokens, c.shared, int64(40+c.shared))
			want := singleRank(t, r, b)
			got := expertParallelSum(t, r, b, epSize, c.shared, c.work)
			e := relativeError(got, want)
			if e > f32Tolerance {
				t.Errorf("relative error %.3g > %g", e, f32Tolerance)
			}
			t.Logf("relative error %.3g", e)
		})
	}
}

package fusedmoe_test

import (
	"fmt"
	"log"

	"fusedmoe"
)

// The C quickstart (examples/c/quickstart.c) in Go: one f32 layer on the CPU, same output.
func ExampleLayer_Forward() {
	const E, K, H, I, M = 4, 2, 8, 4, 3
	config, err := fusedmoe.NewConfig()
	if err != nil {
		log.Fatal(err)
	}
	defer config.Close()
	for _, err := range []error{config.SetNumExperts(E), config.SetTopK(K), config.SetHiddenSize(H),
		config.SetIntermediateSize(I), config.SetDType(fusedmoe.F32),
		config.SetActivation(fusedmoe.ActivationSilu)} {
		if err != nil {
			log.Fatal(err)
		}
	}

	w13, w2 := make([]float32, E*2*I*H), make([]float32, E*H*I) // [E, 2I, H], [E, H, I]
	for e := 0; e < E; e++ {
		for n := 0; n < 2*I; n++ {
			for h := 0; h < H; h++ {
				w13[(e*2*I+n)*H+h] = 0.01 * float32((e+n+h)%7)
			}
		}
		for h := 0; h < H; h++ {
			for i := 0; i < I; i++ {
				w2[(e*H+h)*I+i] = 0.02 * float32((e*h+i)%5)
			}
		}
	}
	layer, err := fusedmoe.NewLayer(config, fusedmoe.Weights[float32]{W13: w13, W2: w2})
	if err != nil {
		log.Fatal(err)
	}
	defer layer.Close()

	hidden, out := make([]float32, M*H), make([]float32, M*H)
	for m := 0; m < M; m++ {
		for h := 0; h < H; h++ {
			hidden[m*H+h] = 1 + 0.1*float32(m+h)
		}
	}
	ids := []int32{0, 3, 1, -1, 2, 0} // -1: a dropped route
	weights := []float32{0.75, 0.25, 0.75, 0.25, 0.75, 0.25}
	if err := layer.Forward(hidden, ids, weights, out); err != nil {
		log.Fatal(err)
	}
	for m := 0; m < M; m++ {
		fmt.Printf("out[%d][0..3] = %.5f %.5f %.5f\n", m, out[m*H], out[m*H+1], out[m*H+2])
	}
	// Output:
	// out[0][0..3] = 0.00725 0.00758 0.00846
	// out[1][0..3] = 0.00600 0.01012 0.00930
	// out[2][0..3] = 0.00950 0.01285 0.01132
}

// Rank 1 of 4 in expert parallelism over 9 experts, the last one shared by every rank: its
// layer stores 3 experts, and Dispatch turns the router's global ids into their local ids.
func ExampleDispatcher() {
	d, err := fusedmoe.NewContiguousDispatcher(9, 4, 1, 1)
	if err != nil {
		log.Fatal(err)
	}
	defer d.Close()
	fmt.Println("local experts:", d.NumLocalExperts())
	fmt.Println("mapping:", d.Mapping())
	fmt.Println("mask:   ", d.ExpertMask())
	ids := []int32{2, 8, 5, -1, 3, 0} // [M=3, K=2], global ids; dispatched in place
	if err := d.Dispatch(ids, ids); err != nil {
		log.Fatal(err)
	}
	fmt.Println("local ids:", ids)
	// Output:
	// local experts: 3
	// mapping: [-1 -1 0 1 -1 -1 -1 -1 2]
	// mask:    [0 0 1 1 0 0 0 0 1]
	// local ids: [0 2 -1 -1 1 -1]
}

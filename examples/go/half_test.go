package fusedmoe

import (
	"math"
	"testing"
)

// halfFormat is one 16-bit dtype's conversions and its largest finite value's bits.
type halfFormat struct {
	name       string
	toBits     func(float32) uint16
	fromBits   func(uint16) float32
	maxFinite  uint16
	infinity   uint16
	quietNaNAt uint16 // a NaN's bits after a round trip have this bit set
}

var halfFormats = []halfFormat{
	{"f16", Float32ToF16, F16ToFloat32, 0x7bff, 0x7c00, 0x0200},
	{"bf16", Float32ToBF16, BF16ToFloat32, 0x7f7f, 0x7f80, 0x0040},
}

func TestHalfBitsRoundTripExactly(t *testing.T) {
	for _, f := range halfFormats {
		for h := 0; h <= 0xffff; h++ {
			bits := uint16(h)
			v := f.fromBits(bits)
			if got := f.toBits(v); v == v && got != bits {
				t.Fatalf("%s: %#04x -> %g -> %#04x", f.name, bits, v, got)
			}
			if v != v && f.toBits(v)&f.quietNaNAt == 0 {
				t.Fatalf("%s: NaN %#04x came back as %#04x", f.name, bits, f.toBits(v))
			}
		}
	}
}

// Between two neighbours, a float32 goes to the nearer, and a tie to the even one.
func TestHalfConversionRoundsToNearestEven(t *testing.T) {
	for _, f := range halfFormats {
		for h := uint16(0); h <= f.maxFinite; h++ {
			low, step := f.fromBits(h), f.fromBits(h+1)-f.fromBits(h)
			if h == f.maxFinite {
				step = low - f.fromBits(h-1) // as if the exponent went on: ties go to Inf
			}
			mid := low + step/2 // exact: float32 has bits to spare
			even := h
			if h&1 == 1 {
				even = h + 1
			}
			below, above := math.Nextafter32(mid, 0), math.Nextafter32(mid, float32(math.Inf(1)))
			if f.toBits(below) != h || f.toBits(mid) != even || f.toBits(above) != h+1 {
				t.Fatalf("%s: around %#04x..%#04x got %#04x %#04x %#04x", f.name, h, h+1,
					f.toBits(below), f.toBits(mid), f.toBits(above))
			}
			if f.toBits(-mid) != 0x8000|even {
				t.Fatalf("%s: -%g got %#04x", f.name, mid, f.toBits(-mid))
			}
		}
		if got := f.toBits(float32(math.Inf(-1))); got != 0x8000|f.infinity {
			t.Fatalf("%s: -Inf got %#04x", f.name, got)
		}
	}
}

func TestHalfKnownValues(t *testing.T) {
	for _, c := range []struct {
		v         float32
		f16, bf16 uint16
	}{
		{1, 0x3c00, 0x3f80},
		{-2, 0xc000, 0xc000},
		{65504, 0x7bff, 0x4780},
		{1e-8, 0x0000, 0x322c},
		{float32(math.Inf(1)), 0x7c00, 0x7f80},
	} {
		if got := Float32ToF16(c.v); got != c.f16 {
			t.Errorf("f16 of %g: got %#04x, want %#04x", c.v, got, c.f16)
		}
		if got := Float32ToBF16(c.v); got != c.bf16 {
			t.Errorf("bf16 of %g: got %#04x, want %#04x", c.v, got, c.bf16)
		}
	}
}

package fusedmoe

import "math"

// Conversions between float32 and the bits of the 16-bit layer dtypes, rounding to nearest,
// ties to even (as the library rounds). NaN stays NaN; a value too large becomes ±Inf.

// Float32ToBF16 is the bfloat16 nearest to f, as bits.
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if f != f {
		return uint16(b>>16) | 0x40 // quiet, so a payload only in the low bits stays NaN
	}
	return uint16((b + 0x7fff + (b>>16)&1) >> 16)
}

// BF16ToFloat32 is the value of bfloat16 bits (exact).
func BF16ToFloat32(h uint16) float32 {
	return math.Float32frombits(uint32(h) << 16)
}

// Float32ToF16 is the IEEE binary16 nearest to f, as bits.
func Float32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23&0xff) - 127
	mant := b & 0x7fffff
	switch {
	case f != f:
		return sign | 0x7e00
	case exp > 15: // also ±Inf
		return sign | 0x7c00
	case exp >= -14:
		return sign | roundShift(uint32(exp+15)<<23|mant, 13) // a carry may reach Inf: correct
	case exp >= -25:
		// Subnormal: the units of 2^-24 in 1.mant·2^exp.
		return sign | roundShift(mant|0x800000, uint(-1-exp))
	}
	return sign // below half the smallest subnormal
}

// roundShift is v >> s rounded to nearest, ties to even.
func roundShift(v uint32, s uint) uint16 {
	q, rest, half := v>>s, v&(1<<s-1), uint32(1)<<(s-1)
	if rest > half || rest == half && q&1 == 1 {
		q++
	}
	return uint16(q)
}

// F16ToFloat32 is the value of IEEE binary16 bits (exact).
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h) & 0x3ff
	switch exp {
	case 0x1f: // Inf or NaN
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case 0: // zero or subnormal: mant units of 2^-24
		return math.Float32frombits(sign | math.Float32bits(float32(mant)*0x1p-24))
	}
	return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
}

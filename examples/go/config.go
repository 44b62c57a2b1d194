package fusedmoe

/*
#include "shim.h"

#define FM_SETTER(field, type)                                                           \
    static moe_status fm_config_set_##field(moe_config *c, type value, fm_error *err) { \
        return fm_keep_error(moe_config_set_##field(c, value), err);                      \
    }
#define FM_GETTER(field, type)                                                                \
    static moe_status fm_config_get_##field(const moe_config *c, type *value, fm_error *err) { \
        return fm_keep_error(moe_config_get_##field(c, value), err);                           \
    }

FM_SETTER(num_experts, int64_t)
FM_SETTER(num_local_experts, int64_t)
FM_SETTER(top_k, int64_t)
FM_SETTER(hidden_size, int64_t)
FM_SETTER(intermediate_size, int64_t)
FM_SETTER(dtype, moe_dtype)
FM_SETTER(activation, uint32_t)
FM_SETTER(gated, bool)
FM_SETTER(gate_up_layout, uint32_t)
FM_SETTER(gemm1_alpha, float)
FM_SETTER(gemm1_limit, float)
FM_SETTER(routed_scaling_factor, float)
FM_SETTER(apply_router_weight_on_input, bool)
FM_SETTER(no_combine, bool)
FM_SETTER(no_combine_keep_router_weight, bool)
FM_SETTER(inplace, bool)

FM_GETTER(num_experts, int64_t)
FM_GETTER(num_local_experts, int64_t)
FM_GETTER(top_k, int64_t)
FM_GETTER(hidden_size, int64_t)
FM_GETTER(intermediate_size, int64_t)
FM_GETTER(dtype, moe_dtype)
FM_GETTER(activation, uint32_t)
FM_GETTER(gated, bool)
FM_GETTER(gate_up_layout, uint32_t)
FM_GETTER(routed_scaling_factor, float)
FM_GETTER(apply_router_weight_on_input, bool)
FM_GETTER(no_combine, bool)
FM_GETTER(no_combine_keep_router_weight, bool)
FM_GETTER(inplace, bool)

static moe_status fm_config_create(moe_config **out, fm_error *err) {
    return fm_keep_error(moe_config_create(out), err);
}

static moe_status fm_config_get_gemm1_alpha(const moe_config *c, bool *is_set, float *value,
                                            fm_error *err) {
    return fm_keep_error(moe_config_get_gemm1_alpha(c, is_set, value), err);
}

static moe_status fm_config_get_gemm1_limit(const moe_config *c, bool *is_set, float *value,
                                            fm_error *err) {
    return fm_keep_error(moe_config_get_gemm1_limit(c, is_set, value), err);
}

static moe_status fm_config_set_option(moe_config *c, const char *key, const char *value,
                                       fm_error *err) {
    return fm_keep_error(moe_config_set_option(c, key, value), err);
}

static moe_status fm_config_get_option(const moe_config *c, const char *key, char *buf,
                                       size_t buf_size, size_t *len, fm_error *err) {
    return fm_keep_error(moe_config_get_option(c, key, buf, buf_size, len), err);
}
*/
import "C"

import (
	"fmt"
	"runtime"
	"unsafe"
)

// Activation is a MOE_ACTIVATION_* value (SPEC §3).
type Activation uint32

// The activations; Config.SetGated says whether gate and up are both in w13.
const (
	ActivationSilu         Activation = C.MOE_ACTIVATION_SILU
	ActivationGelu         Activation = C.MOE_ACTIVATION_GELU
	ActivationGeluTanh     Activation = C.MOE_ACTIVATION_GELU_TANH
	ActivationSwigluOAI    Activation = C.MOE_ACTIVATION_SWIGLU_OAI
	ActivationSiluClamp    Activation = C.MOE_ACTIVATION_SILU_CLAMP
	ActivationSiluPreclamp Activation = C.MOE_ACTIVATION_SILU_PRECLAMP
	ActivationRelu2        Activation = C.MOE_ACTIVATION_RELU2
)

// GateUpLayout says where gate and up rows lie in a gated w13.
type GateUpLayout uint32

// The layouts: rows [0, I) gate and [I, 2I) up, or gate and up alternating (gpt-oss).
const (
	GateUpHalves      GateUpLayout = C.MOE_GATE_UP_HALVES
	GateUpInterleaved GateUpLayout = C.MOE_GATE_UP_INTERLEAVED
)

// DType is a layer's element type: F32, F16 or BF16.
type DType struct{ code, bits uint8 }

// The layer dtypes. Slices of an F32 layer are []float32; of F16 and BF16 layers []uint16
// holding the values' bits (see Float32ToF16 and Float32ToBF16).
var (
	F32  = DType{C.MOE_DTYPE_CODE_FLOAT, 32}
	F16  = DType{C.MOE_DTYPE_CODE_FLOAT, 16}
	BF16 = DType{C.MOE_DTYPE_CODE_BFLOAT, 16}
)

func (d DType) String() string {
	switch d {
	case F32:
		return "f32"
	case F16:
		return "f16"
	case BF16:
		return "bf16"
	}
	return fmt.Sprintf("dtype(code %d, %d bits)", d.code, d.bits)
}

func (d DType) c() C.moe_dtype {
	return C.moe_dtype{code: C.uint8_t(d.code), bits: C.uint8_t(d.bits), lanes: 1}
}

// Config describes a layer: sizes, dtype, activation and flags. A layer copies it, so it may
// be changed or closed once NewLayer returns. One goroutine at a time.
type Config struct {
	raw *C.moe_config
}

// NewConfig is an empty config: sizes and dtype unset; gated silu, halves layout, routed
// scaling factor 1, every flag false.
func NewConfig() (*Config, error) {
	if err := checkABI(); err != nil {
		return nil, err
	}
	var raw *C.moe_config
	if err := call(func(e *C.fm_error) C.moe_status { return C.fm_config_create(&raw, e) }); err != nil {
		return nil, err
	}
	return ownConfig(raw), nil
}

// ownConfig wraps a config this package must free.
func ownConfig(raw *C.moe_config) *Config {
	c := &Config{raw}
	runtime.SetFinalizer(c, (*Config).Close)
	return c
}

// Close frees the config; later calls do nothing.
func (c *Config) Close() {
	if c.raw == nil {
		return
	}
	C.moe_config_free(c.raw)
	c.raw = nil
	runtime.SetFinalizer(c, nil)
	frees.configs.Add(1)
}

func (c *Config) ptr() *C.moe_config {
	if c.raw == nil {
		panic("fusedmoe: Config used after Close")
	}
	return c.raw
}

// call runs shim on the config, keeping the config alive until the shim returns.
func (c *Config) call(shim func(p *C.moe_config, e *C.fm_error) C.moe_status) error {
	err := call(func(e *C.fm_error) C.moe_status { return shim(c.ptr(), e) })
	runtime.KeepAlive(c)
	return err
}

// SetNumExperts sets E_g, the experts of the whole model.
func (c *Config) SetNumExperts(n int) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_num_experts(p, C.int64_t(n), e)
	})
}

// SetNumLocalExperts sets E, the experts stored in this layer (defaults to E_g).
func (c *Config) SetNumLocalExperts(n int) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_num_local_experts(p, C.int64_t(n), e)
	})
}

// SetTopK sets K, the routes per token.
func (c *Config) SetTopK(k int) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_top_k(p, C.int64_t(k), e)
	})
}

// SetHiddenSize sets H.
func (c *Config) SetHiddenSize(h int) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_hidden_size(p, C.int64_t(h), e)
	})
}

// SetIntermediateSize sets I, one expert's intermediate size.
func (c *Config) SetIntermediateSize(i int) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_intermediate_size(p, C.int64_t(i), e)
	})
}

// SetDType sets the layer dtype.
func (c *Config) SetDType(d DType) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_dtype(p, d.c(), e)
	})
}

// SetActivation sets the activation; NewLayer checks that it fits SetGated.
func (c *Config) SetActivation(a Activation) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_activation(p, C.uint32_t(a), e)
	})
}

// SetGated sets whether w13 holds gate and up (N1 = 2I, the default) or one projection.
func (c *Config) SetGated(gated bool) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_gated(p, C.bool(gated), e)
	})
}

// SetGateUpLayout sets where gate and up rows lie in a gated w13.
func (c *Config) SetGateUpLayout(l GateUpLayout) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_gate_up_layout(p, C.uint32_t(l), e)
	})
}

// SetGemm1Alpha sets alpha of swiglu_oai (gpt-oss: 1.702).
func (c *Config) SetGemm1Alpha(alpha float32) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_gemm1_alpha(p, C.float(alpha), e)
	})
}

// SetGemm1Limit sets the clamp limit of swiglu_oai, silu_clamp and silu_preclamp.
func (c *Config) SetGemm1Limit(limit float32) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_gemm1_limit(p, C.float(limit), e)
	})
}

// SetRoutedScalingFactor sets the factor applied once to the sum over routes (default 1).
func (c *Config) SetRoutedScalingFactor(f float32) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_routed_scaling_factor(p, C.float(f), e)
	})
}

// SetApplyRouterWeightOnInput sets whether the router weight multiplies GEMM1's output
// (after its bias) instead of GEMM2's.
func (c *Config) SetApplyRouterWeightOnInput(enabled bool) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_apply_router_weight_on_input(p, C.bool(enabled), e)
	})
}

// SetNoCombine sets no_combine: out is [M, K, H], one row per route, without the router
// weight and the scaling factor.
func (c *Config) SetNoCombine(enabled bool) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_no_combine(p, C.bool(enabled), e)
	})
}

// SetNoCombineKeepRouterWeight makes no_combine multiply each route's row by its weight.
func (c *Config) SetNoCombineKeepRouterWeight(enabled bool) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_no_combine_keep_router_weight(p, C.bool(enabled), e)
	})
}

// SetInplace makes a run write its result into hidden (out must then be nil or hidden).
func (c *Config) SetInplace(enabled bool) error {
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_inplace(p, C.bool(enabled), e)
	})
}

// SetOption sets a backend option, e.g. ("cpu.num_threads", "8"); an unknown key or a bad
// value is refused by name.
func (c *Config) SetOption(key, value string) error {
	k, v := C.CString(key), C.CString(value)
	defer C.free(unsafe.Pointer(k))
	defer C.free(unsafe.Pointer(v))
	return c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_set_option(p, k, v, e)
	})
}

// Option reads a backend option's value; a key that is not set is an error.
func (c *Config) Option(key string) (string, error) {
	k := C.CString(key)
	defer C.free(unsafe.Pointer(k))
	var n C.size_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_option(p, k, nil, 0, &n, e) // sizes the value
	})
	if err != nil {
		return "", err
	}
	buf := make([]C.char, n+1) // and its NUL
	err = c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_option(p, k, &buf[0], C.size_t(len(buf)), &n, e)
	})
	return C.GoStringN(&buf[0], C.int(n)), err
}

// NumExperts reads E_g.
func (c *Config) NumExperts() (int, error) {
	var v C.int64_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_num_experts(p, &v, e)
	})
	return int(v), err
}

// NumLocalExperts reads E (E_g when it was not set).
func (c *Config) NumLocalExperts() (int, error) {
	var v C.int64_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_num_local_experts(p, &v, e)
	})
	return int(v), err
}

// TopK reads K.
func (c *Config) TopK() (int, error) {
	var v C.int64_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_top_k(p, &v, e)
	})
	return int(v), err
}

// HiddenSize reads H.
func (c *Config) HiddenSize() (int, error) {
	var v C.int64_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_hidden_size(p, &v, e)
	})
	return int(v), err
}

// IntermediateSize reads I.
func (c *Config) IntermediateSize() (int, error) {
	var v C.int64_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_intermediate_size(p, &v, e)
	})
	return int(v), err
}

// DType reads the layer dtype; an error when it was not set.
func (c *Config) DType() (DType, error) {
	var v C.moe_dtype
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_dtype(p, &v, e)
	})
	return DType{uint8(v.code), uint8(v.bits)}, err
}

// Activation reads the activation.
func (c *Config) Activation() (Activation, error) {
	var v C.uint32_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_activation(p, &v, e)
	})
	return Activation(v), err
}

// Gated reads whether w13 holds gate and up.
func (c *Config) Gated() (bool, error) {
	var v C.bool
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_gated(p, &v, e)
	})
	return bool(v), err
}

// GateUpLayout reads the gate/up layout.
func (c *Config) GateUpLayout() (GateUpLayout, error) {
	var v C.uint32_t
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_gate_up_layout(p, &v, e)
	})
	return GateUpLayout(v), err
}

// Gemm1Alpha reads alpha and whether it was set.
func (c *Config) Gemm1Alpha() (alpha float32, isSet bool, err error) {
	var v C.float
	var set C.bool
	err = c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_gemm1_alpha(p, &set, &v, e)
	})
	return float32(v), bool(set), err
}

// Gemm1Limit reads the clamp limit and whether it was set.
func (c *Config) Gemm1Limit() (limit float32, isSet bool, err error) {
	var v C.float
	var set C.bool
	err = c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_gemm1_limit(p, &set, &v, e)
	})
	return float32(v), bool(set), err
}

// RoutedScalingFactor reads the routed scaling factor.
func (c *Config) RoutedScalingFactor() (float32, error) {
	var v C.float
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_routed_scaling_factor(p, &v, e)
	})
	return float32(v), err
}

// ApplyRouterWeightOnInput reads apply_router_weight_on_input.
func (c *Config) ApplyRouterWeightOnInput() (bool, error) {
	var v C.bool
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_apply_router_weight_on_input(p, &v, e)
	})
	return bool(v), err
}

// NoCombine reads no_combine.
func (c *Config) NoCombine() (bool, error) {
	var v C.bool
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_no_combine(p, &v, e)
	})
	return bool(v), err
}

// NoCombineKeepRouterWeight reads no_combine_keep_router_weight.
func (c *Config) NoCombineKeepRouterWeight() (bool, error) {
	var v C.bool
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_no_combine_keep_router_weight(p, &v, e)
	})
	return bool(v), err
}

// Inplace reads inplace.
func (c *Config) Inplace() (bool, error) {
	var v C.bool
	err := c.call(func(p *C.moe_config, e *C.fm_error) C.moe_status {
		return C.fm_config_get_inplace(p, &v, e)
	})
	return bool(v), err
}

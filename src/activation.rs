//! SPEC §3: the activations, defined once. Every backend computes exactly these formulas
//! (f32 math on the rounded GEMM1 output); the CUDA kernels mirror them line by line.

/// Which activation a layer applies between GEMM1 and GEMM2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    Silu,
    Gelu,
    GeluTanh,
    SwigluOai,
    SiluClamp,
    SiluPreclamp,
    Relu2,
}

/// How gate and up columns sit in w13's N1 rows (gated layers only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GateUpLayout {
    /// Rows [0, I) are gate, [I, 2I) are up.
    Halves,
    /// Row 2j is gate_j, row 2j+1 is up_j (the gpt-oss checkpoint layout).
    Interleaved,
}

/// The activation with its parameters resolved (alpha and limit where the formula uses them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ActFn {
    Silu,
    Gelu,
    GeluTanh,
    SwigluOai { alpha: f32, limit: f32 },
    SiluClamp { limit: f32 },
    SiluPreclamp { limit: f32 },
    Relu2,
}

impl Activation {
    pub const ALL: [Activation; 7] = [
        Activation::Silu,
        Activation::Gelu,
        Activation::GeluTanh,
        Activation::SwigluOai,
        Activation::SiluClamp,
        Activation::SiluPreclamp,
        Activation::Relu2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::SwigluOai => "swiglu_oai",
            Activation::SiluClamp => "silu_clamp",
            Activation::SiluPreclamp => "silu_preclamp",
            Activation::Relu2 => "relu2",
        }
    }

    pub fn supports_gated(self) -> bool {
        !matches!(self, Activation::Relu2)
    }

    pub fn supports_non_gated(self) -> bool {
        matches!(
            self,
            Activation::Silu | Activation::Gelu | Activation::Relu2
        )
    }

    pub fn uses_alpha(self) -> bool {
        matches!(self, Activation::SwigluOai)
    }

    pub fn uses_limit(self) -> bool {
        matches!(
            self,
            Activation::SwigluOai | Activation::SiluClamp | Activation::SiluPreclamp
        )
    }
}

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    // √(2/π) as an f32: the same float as kernels/act.cuh's 0.79788456f
    0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044715 * x * x * x)).tanh())
}

/// erf in f32 through libc's erff (the C library's correctly rounded-ish implementation;
/// Rust's std has no erf).
#[inline(always)]
fn libm_erf(x: f32) -> f32 {
    extern "C" {
        fn erff(x: f32) -> f32;
    }
    unsafe { erff(x) }
}

impl ActFn {
    /// Gated activation of one (gate, up) pair.
    #[inline(always)]
    pub fn gated(self, g: f32, u: f32) -> f32 {
        match self {
            ActFn::Silu => silu(g) * u,
            ActFn::Gelu => gelu_erf(g) * u,
            ActFn::GeluTanh => gelu_tanh(g) * u,
            ActFn::SwigluOai { alpha, limit } => {
                let g = g.min(limit);
                let u = u.clamp(-limit, limit);
                g * sigmoid(alpha * g) * (u + 1.0)
            }
            ActFn::SiluClamp { limit } => silu(g).min(limit) * u.clamp(-limit, limit),
            ActFn::SiluPreclamp { limit } => silu(g.min(limit)) * u.clamp(-limit, limit),
            ActFn::Relu2 => unreachable!("relu2 is non-gated; the config check refuses it gated"),
        }
    }

    /// Non-gated activation of one value.
    #[inline(always)]
    pub fn single(self, x: f32) -> f32 {
        match self {
            ActFn::Silu => silu(x),
            ActFn::Gelu => gelu_erf(x),
            ActFn::Relu2 => {
                let r = x.max(0.0);
                r * r
            }
            _ => unreachable!("the config check refuses this activation non-gated"),
        }
    }
}

impl GateUpLayout {
    /// Row indices (gate, up) of intermediate column `j` in a gated w13 with `i` columns.
    #[inline(always)]
    pub fn gate_up(self, j: usize, i: usize) -> (usize, usize) {
        match self {
            GateUpLayout::Halves => (j, i + j),
            GateUpLayout::Interleaved => (2 * j, 2 * j + 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_oai_clamps_gate_above_and_up_both_sides() {
        let f = ActFn::SwigluOai {
            alpha: 1.702,
            limit: 7.0,
        };
        let g = 7.0f32;
        let expected = g * sigmoid(1.702 * g) * (-7.0 + 1.0);
        assert_eq!(f.gated(100.0, -50.0), expected);
    }

    #[test]
    fn silu_clamp_and_preclamp_differ_in_where_the_limit_applies() {
        let clamp = ActFn::SiluClamp { limit: 1.0 };
        let pre = ActFn::SiluPreclamp { limit: 1.0 };
        assert_eq!(clamp.gated(5.0, 1.0), 1.0);
        assert_eq!(pre.gated(5.0, 1.0), silu(1.0));
    }

    #[test]
    fn gelu_erf_matches_known_values() {
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }

    #[test]
    fn layouts_pick_gate_and_up_rows() {
        assert_eq!(GateUpLayout::Halves.gate_up(2, 5), (2, 7));
        assert_eq!(GateUpLayout::Interleaved.gate_up(2, 5), (4, 5));
    }
}

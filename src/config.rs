//! The runner config (SPEC §1–3): every field a host sets, and the cross-field rules checked
//! when a layer is created from it.

use crate::activation::{ActFn, Activation, GateUpLayout};
use crate::dtype::DType;
use crate::error::{ensure, invalid, Result};
use crate::options::Options;
use crate::tensor::Device;

/// What the host set. Shape fields start unset; the rest have SGLang's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// E_g: experts of the whole model.
    pub num_experts: Option<i64>,
    /// E: experts stored in this layer (defaults to E_g).
    pub num_local_experts: Option<i64>,
    pub top_k: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub dtype: Option<DType>,
    pub activation: Activation,
    pub gated: bool,
    pub gate_up_layout: GateUpLayout,
    pub gemm1_alpha: Option<f32>,
    pub gemm1_limit: Option<f32>,
    pub routed_scaling_factor: f32,
    pub apply_router_weight_on_input: bool,
    pub no_combine: bool,
    pub no_combine_keep_router_weight: bool,
    pub inplace: bool,
    pub device: Device,
    pub options: Options,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            num_experts: None,
            num_local_experts: None,
            top_k: None,
            hidden_size: None,
            intermediate_size: None,
            dtype: None,
            activation: Activation::Silu,
            gated: true,
            gate_up_layout: GateUpLayout::Halves,
            gemm1_alpha: None,
            gemm1_limit: None,
            routed_scaling_factor: 1.0,
            apply_router_weight_on_input: false,
            no_combine: false,
            no_combine_keep_router_weight: false,
            inplace: false,
            device: Device::CPU,
            options: Options::default(),
        }
    }
}

/// The sizes of a validated config, as the backends use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// E_g.
    pub global_experts: usize,
    /// E (local): the weights' expert dimension; ids are in [-1, E).
    pub experts: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub inter: usize,
    /// N1 = 2I gated, I otherwise.
    pub n1: usize,
}

/// A config that passed every rule: what a layer runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub dims: Dims,
    pub dtype: DType,
    pub act: ActFn,
    pub gated: bool,
    pub layout: GateUpLayout,
    pub rsf: f32,
    pub weight_on_input: bool,
    pub no_combine: bool,
    pub keep_router_weight: bool,
    pub inplace: bool,
    pub device: Device,
}

impl Validated {
    /// Whether GEMM2's epilogue multiplies by the router weight (w' in SPEC §2).
    pub fn weight_after_gemm2(&self) -> bool {
        !self.weight_on_input && (!self.no_combine || self.keep_router_weight)
    }
}

fn required(value: Option<i64>, name: &str, setter: &str) -> Result<usize> {
    let v = value.ok_or_else(|| invalid!("config: {name} is not set (call {setter})"))?;
    Ok(v as usize)
}

/// Sizes past this are refused: it keeps every product of sizes far inside usize and i64.
pub(crate) const MAX_DIM: i64 = 1 << 24;

/// Checks a size field at set time.
pub fn check_size(name: &str, value: i64) -> Result<()> {
    ensure!(
        (1..=MAX_DIM).contains(&value),
        "{name}: {value}, expected in [1, {MAX_DIM}]"
    );
    Ok(())
}

/// Checks a float parameter at set time.
pub fn check_finite(name: &str, value: f32) -> Result<()> {
    ensure!(value.is_finite(), "{name}: {value} is not finite");
    Ok(())
}

impl Config {
    /// SPEC §1–3 cross-field rules. Errors name the field at fault.
    pub fn validate(&self) -> Result<Validated> {
        let e_global = required(
            self.num_experts,
            "num_experts",
            "moe_config_set_num_experts",
        )?;
        let experts = self.num_local_experts.map_or(e_global, |e| e as usize);
        ensure!(
            experts <= e_global,
            "num_local_experts: {experts} is more than num_experts {e_global}"
        );
        let top_k = required(self.top_k, "top_k", "moe_config_set_top_k")?;
        let hidden = required(
            self.hidden_size,
            "hidden_size",
            "moe_config_set_hidden_size",
        )?;
        let inter = required(
            self.intermediate_size,
            "intermediate_size",
            "moe_config_set_intermediate_size",
        )?;
        let dtype = self
            .dtype
            .ok_or_else(|| invalid!("config: dtype is not set (call moe_config_set_dtype)"))?;

        let act = self.activation;
        if self.gated {
            ensure!(
                act.supports_gated(),
                "activation: {} is non-gated only, but gated is true",
                act.name()
            );
        } else {
            ensure!(
                act.supports_non_gated(),
                "activation: {} needs gated = true (non-gated layers take silu, gelu or relu2)",
                act.name()
            );
            ensure!(
                self.gate_up_layout == GateUpLayout::Halves,
                "gate_up_layout: interleaved needs gated = true"
            );
        }
        match (self.gemm1_alpha, act.uses_alpha()) {
            (None, true) => {
                return Err(invalid!(
                    "gemm1_alpha: activation {} needs alpha (gpt-oss: 1.702)",
                    act.name()
                ))
            }
            (Some(_), false) => {
                return Err(invalid!(
                    "gemm1_alpha: activation {} takes no alpha",
                    act.name()
                ))
            }
            _ => {}
        }
        match (self.gemm1_limit, act.uses_limit()) {
            (None, true) => {
                return Err(invalid!(
                    "gemm1_limit: activation {} needs a limit (gpt-oss: 7.0)",
                    act.name()
                ))
            }
            (Some(_), false) => {
                return Err(invalid!(
                    "gemm1_limit: activation {} takes no limit",
                    act.name()
                ))
            }
            _ => {}
        }
        let alpha = self.gemm1_alpha.unwrap_or(0.0);
        let limit = self.gemm1_limit.unwrap_or(0.0);
        ensure!(limit >= 0.0, "gemm1_limit: {limit} is negative");
        let act_fn = match act {
            Activation::Silu => ActFn::Silu,
            Activation::Gelu => ActFn::Gelu,
            Activation::GeluTanh => ActFn::GeluTanh,
            Activation::SwigluOai => ActFn::SwigluOai { alpha, limit },
            Activation::SiluClamp => ActFn::SiluClamp { limit },
            Activation::SiluPreclamp => ActFn::SiluPreclamp { limit },
            Activation::Relu2 => ActFn::Relu2,
        };

        check_finite("routed_scaling_factor", self.routed_scaling_factor)?;
        ensure!(
            !(self.no_combine && self.inplace),
            "inplace: contradicts no_combine (out is [M, K, H], hidden is [M, H])"
        );
        ensure!(
            !self.no_combine_keep_router_weight || self.no_combine,
            "no_combine_keep_router_weight: needs no_combine"
        );
        ensure!(
            !(self.no_combine_keep_router_weight && self.apply_router_weight_on_input),
            "no_combine_keep_router_weight: contradicts apply_router_weight_on_input (the router weight would be applied twice)"
        );
        self.options.check_device(self.device.kind)?;

        Ok(Validated {
            dims: Dims {
                global_experts: e_global,
                experts,
                top_k,
                hidden,
                inter,
                n1: if self.gated { 2 * inter } else { inter },
            },
            dtype,
            act: act_fn,
            gated: self.gated,
            layout: self.gate_up_layout,
            rsf: self.routed_scaling_factor,
            weight_on_input: self.apply_router_weight_on_input,
            no_combine: self.no_combine,
            keep_router_weight: self.no_combine_keep_router_weight,
            inplace: self.inplace,
            device: self.device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            num_experts: Some(8),
            top_k: Some(2),
            hidden_size: Some(64),
            intermediate_size: Some(32),
            dtype: Some(DType::BF16),
            ..Config::default()
        }
    }

    fn err(c: &Config) -> String {
        c.validate().unwrap_err().message
    }

    #[test]
    fn a_complete_config_validates_with_defaults() {
        let v = base().validate().unwrap();
        assert_eq!(v.dims.n1, 64);
        assert_eq!(v.dims.experts, 8);
        assert!(v.weight_after_gemm2());
    }

    #[test]
    fn missing_fields_are_named() {
        let c = Config {
            top_k: None,
            ..base()
        };
        assert!(err(&c).contains("top_k is not set"));
    }

    #[test]
    fn swiglu_oai_needs_alpha_and_limit() {
        let mut c = Config {
            activation: Activation::SwigluOai,
            ..base()
        };
        assert!(err(&c).contains("gemm1_alpha"));
        c.gemm1_alpha = Some(1.702);
        assert!(err(&c).contains("gemm1_limit"));
        c.gemm1_limit = Some(7.0);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn alpha_without_limit_is_refused() {
        let c = Config {
            gemm1_alpha: Some(1.0),
            ..base()
        };
        assert!(err(&c).contains("gemm1_alpha: activation silu takes no alpha"));
    }

    #[test]
    fn gatedness_must_fit_the_activation() {
        let c = Config {
            activation: Activation::Relu2,
            ..base()
        };
        assert!(err(&c).contains("non-gated only"));
        let c = Config {
            activation: Activation::SwigluOai,
            gated: false,
            ..base()
        };
        assert!(err(&c).contains("needs gated"));
    }

    #[test]
    fn no_combine_flags_are_checked_together() {
        let c = Config {
            no_combine: true,
            inplace: true,
            ..base()
        };
        assert!(err(&c).contains("inplace"));
        let c = Config {
            no_combine_keep_router_weight: true,
            ..base()
        };
        assert!(err(&c).contains("needs no_combine"));
    }

    #[test]
    fn local_experts_cannot_exceed_global() {
        let c = Config {
            num_local_experts: Some(9),
            ..base()
        };
        assert!(err(&c).contains("num_local_experts"));
    }
}

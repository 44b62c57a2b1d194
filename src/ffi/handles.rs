//! The opaque handles C sees, each starting with a magic word checked on entry, so a stale or
//! foreign pointer is an error where that can be detected instead of a crash (SQLite's habit).

use crate::config::Config;
use crate::error::{invalid, Result};
use crate::layer::Layer;
use crate::plan::Plan;
use std::sync::Arc;

const CONFIG_MAGIC: u64 = u64::from_le_bytes(*b"moe:cfg\0");
const LAYER_MAGIC: u64 = u64::from_le_bytes(*b"moe:lyr\0");
const PLAN_MAGIC: u64 = u64::from_le_bytes(*b"moe:pln\0");
const DISPATCHER_MAGIC: u64 = u64::from_le_bytes(*b"moe:dsp\0");
const LORA_MAGIC: u64 = u64::from_le_bytes(*b"moe:lra\0");
/// Written over a handle's magic when it is freed.
const DEAD_MAGIC: u64 = u64::from_le_bytes(*b"moe:dead");

/// The runner config. A host's own config is mutable (one thread at a time); the config a
/// layer owns is read-only and shared by every thread using the layer.
pub struct moe_config {
    magic: u64,
    pub(crate) read_only: bool,
    pub(crate) config: Config,
}

/// A layer: its validated config, the borrowed weights, its tile choice. Immutable; any
/// thread may use it.
pub struct moe_layer {
    magic: u64,
    pub(crate) layer: Arc<Layer>,
    /// The layer's own config handle (what moe_layer_config returns). An Arc so that
    /// wrappers (LoRA) can hand the very same handle out after the layer handle is freed.
    pub(crate) config: Arc<moe_config>,
}

/// A plan: one batch's align result; one stream at a time.
pub struct moe_plan {
    magic: u64,
    pub(crate) plan: Plan,
}

/// An expert-parallel dispatcher: the global → local expert mapping and its mask. Immutable;
/// any thread may use it.
pub struct moe_dispatcher {
    magic: u64,
    pub(crate) dispatcher: crate::dispatch::Dispatcher,
}

/// A LoRA wrapper over a layer (SPEC §7): L adapter slots and the max rank r. It keeps the
/// layer's internals and config handle alive, so it outlives a freed layer handle safely.
pub struct moe_lora {
    magic: u64,
    pub(crate) lora: crate::lora::Lora,
    /// The wrapped layer's own config handle (the very same Arc the layer handle holds).
    pub(crate) config: Arc<moe_config>,
}

pub(crate) trait Handle {
    const MAGIC: u64;
    const KIND: &'static str;
    fn magic(&self) -> u64;
    fn kill(&mut self);
}

macro_rules! handle {
    ($t:ty, $magic:expr, $kind:expr) => {
        impl Handle for $t {
            const MAGIC: u64 = $magic;
            const KIND: &'static str = $kind;
            fn magic(&self) -> u64 {
                self.magic
            }
            fn kill(&mut self) {
                self.magic = DEAD_MAGIC;
            }
        }
    };
}

handle!(moe_config, CONFIG_MAGIC, "moe_config");
handle!(moe_layer, LAYER_MAGIC, "moe_layer");
handle!(moe_plan, PLAN_MAGIC, "moe_plan");
handle!(moe_dispatcher, DISPATCHER_MAGIC, "moe_dispatcher");
handle!(moe_lora, LORA_MAGIC, "moe_lora");

/// Checks a handle argument: NULL, alignment, and the magic word.
///
/// # Safety
/// `p`, if not NULL, must point to readable memory of the handle's size.
pub(crate) unsafe fn handle_ref<'a, T: Handle>(p: *const T, name: &str) -> Result<&'a T> {
    if p.is_null() {
        return Err(invalid!("{name}: NULL"));
    }
    if (p as usize) % std::mem::align_of::<T>() != 0 {
        return Err(invalid!("{name}: {p:p} is not a {} (misaligned)", T::KIND));
    }
    let h = &*p;
    match h.magic() {
        m if m == T::MAGIC => Ok(h),
        DEAD_MAGIC => Err(invalid!("{name}: this {} was already freed", T::KIND)),
        _ => Err(invalid!(
            "{name}: {p:p} is not a {} (wrong magic word)",
            T::KIND
        )),
    }
}

/// Mutable form of [`handle_ref`].
///
/// # Safety
/// As [`handle_ref`], and no other reference to the handle may be live.
pub(crate) unsafe fn handle_mut<'a, T: Handle>(p: *mut T, name: &str) -> Result<&'a mut T> {
    handle_ref(p as *const T, name)?;
    Ok(&mut *p)
}

/// Frees a boxed handle: NULL is a no-op; the magic word is checked and killed first.
///
/// # Safety
/// `p` must be NULL or a handle of this kind made by the library and not yet freed.
pub(crate) unsafe fn free_boxed<T: Handle>(p: *mut T) -> Result<()> {
    if p.is_null() {
        return Ok(());
    }
    handle_ref(p as *const T, "handle")?;
    (*p).kill();
    drop(Box::from_raw(p));
    Ok(())
}

impl moe_config {
    pub(crate) fn new(config: Config, read_only: bool) -> Self {
        moe_config {
            magic: CONFIG_MAGIC,
            read_only,
            config,
        }
    }
}

impl moe_layer {
    pub(crate) fn new(layer: Layer) -> Self {
        let config = Arc::new(moe_config::new(layer.config.clone(), true));
        moe_layer {
            magic: LAYER_MAGIC,
            layer: Arc::new(layer),
            config,
        }
    }
}

impl moe_dispatcher {
    pub(crate) fn new(dispatcher: crate::dispatch::Dispatcher) -> Self {
        moe_dispatcher {
            magic: DISPATCHER_MAGIC,
            dispatcher,
        }
    }
}

impl moe_lora {
    pub(crate) fn new(lora: crate::lora::Lora, config: Arc<moe_config>) -> Self {
        moe_lora {
            magic: LORA_MAGIC,
            lora,
            config,
        }
    }
}

impl moe_plan {
    pub(crate) fn new(plan: Plan) -> Self {
        moe_plan {
            magic: PLAN_MAGIC,
            plan,
        }
    }
}

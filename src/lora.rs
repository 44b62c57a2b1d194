//! The LoRA wrapper in the core (SPEC §7): L adapter slots over one layer, each slot's
//! borrowed weights checked against the layer and the max rank r, the token → adapter map,
//! and every check of a LoRA run before the backend is called (so a failed call writes
//! nothing).

use crate::dtype::ElemType;
use crate::error::{ensure, invalid, Result};
use crate::layer::Layer;
use crate::plan::{self, Plan};
use crate::tensor::{DeviceKind, Shape, Tensor};
use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Upper bounds on num_slots and max_rank: far past any real adapter set, small enough that
/// the scratch sizes cannot overflow.
const MAX_SLOTS: i64 = 1 << 16;
const MAX_RANK: i64 = 1 << 16;

/// One adapter's weights as the host passed them (borrowed), already checked.
#[derive(Clone, Copy, Debug)]
pub struct SlotWeights {
    /// [E or 1, R1, H]: R1 = 2r gated (rows [0, r) gate, [r, 2r) up), r otherwise.
    pub gate_up_a: Tensor,
    /// [E, N1, r], gate/up rows in the layout of w13.
    pub gate_up_b: Tensor,
    /// [E, r, I].
    pub down_a: Tensor,
    /// [E or 1, H, r].
    pub down_b: Tensor,
    /// s_a (alpha / r), applied to B's product.
    pub scaling: f32,
}

impl SlotWeights {
    /// The expert index into gate_up A: 0 when it is shared by all experts.
    pub fn gate_up_a_expert(&self, e: usize) -> usize {
        if self.gate_up_a.shape()[0] == 1 {
            0
        } else {
            e
        }
    }

    /// The expert index into down B: 0 when it is shared by all experts.
    pub fn down_b_expert(&self, e: usize) -> usize {
        if self.down_b.shape()[0] == 1 {
            0
        } else {
            e
        }
    }

    fn tensors(&self) -> [(&'static str, &Tensor); 4] {
        [
            ("gate_up_a", &self.gate_up_a),
            ("gate_up_b", &self.gate_up_b),
            ("down_a", &self.down_a),
            ("down_b", &self.down_b),
        ]
    }
}

/// A slot: its weights (None when never set or cleared) and its enabled flag.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub weights: Option<SlotWeights>,
    pub enabled: bool,
}

impl Slot {
    /// The weights a token mapped to this slot gets: none when cleared or disabled.
    pub fn active(&self) -> Option<&SlotWeights> {
        self.weights.as_ref().filter(|_| self.enabled)
    }
}

/// The wrapper: a layer (kept alive), L slots and r. Slots change under a lock, so a run on
/// another thread sees each slot as it was before or after a change, never half of it.
pub struct Lora {
    pub layer: Arc<Layer>,
    pub max_rank: usize,
    slots: RwLock<Vec<Slot>>,
}

/// The token → adapter map of one run (SPEC §7), int32 on the layer's device.
#[derive(Clone, Copy, Debug)]
pub enum AdapterMap {
    /// adapter_ids [M].
    PerToken(Tensor),
    /// seg_indptr [S+1] (0 = first ≤ … ≤ last = M) and seg_adapter [S].
    Segments { indptr: Tensor, adapter: Tensor },
}

impl AdapterMap {
    /// The map from the run's optional arguments: exactly one of the two forms.
    pub fn from_args(
        adapter_ids: Option<Tensor>,
        seg_indptr: Option<Tensor>,
        seg_adapter: Option<Tensor>,
    ) -> Result<AdapterMap> {
        match (adapter_ids, seg_indptr, seg_adapter) {
            (Some(ids), None, None) => Ok(AdapterMap::PerToken(ids)),
            (None, Some(indptr), Some(adapter)) => Ok(AdapterMap::Segments { indptr, adapter }),
            (None, Some(_), None) => Err(invalid!("seg_adapter: NULL, but seg_indptr is given")),
            (None, None, Some(_)) => Err(invalid!("seg_indptr: NULL, but seg_adapter is given")),
            (None, None, None) => Err(invalid!(
                "adapter_ids: NULL, and no segments either; give the token → adapter map as \
                 adapter_ids [M] or as seg_indptr [S+1] with seg_adapter [S]"
            )),
            (Some(_), _, _) => Err(invalid!(
                "adapter_ids: given together with segments; give adapter_ids [M] or \
                 seg_indptr [S+1] with seg_adapter [S], not both"
            )),
        }
    }

    fn tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match self {
            AdapterMap::PerToken(t) => vec![("adapter_ids", t)],
            AdapterMap::Segments { indptr, adapter } => {
                vec![("seg_indptr", indptr), ("seg_adapter", adapter)]
            }
        }
    }

    /// Writes each token's adapter (−1 = none) into `dst` [M]. The map was checked.
    ///
    /// # Safety
    /// The map's tensors must be host memory.
    pub unsafe fn per_token(&self, dst: &mut [i32]) {
        match self {
            AdapterMap::PerToken(ids) => dst.copy_from_slice(ids.host_slice::<i32>()),
            AdapterMap::Segments { indptr, adapter } => {
                let (indptr, adapter) = (indptr.host_slice::<i32>(), adapter.host_slice::<i32>());
                for (s, &a) in adapter.iter().enumerate() {
                    dst[indptr[s] as usize..indptr[s + 1] as usize].fill(a);
                }
            }
        }
    }
}

/// Where a LoRA run's scratch lives: after the plan's layout, in the same workspace (memory
/// of the layer's device). A row per kept route: the CPU indexes rows by the align step's
/// compact order, CUDA by route id m·K + k; both are below numel.
#[derive(Clone, Copy, Debug)]
pub struct LoraScratch {
    /// i32 [M]: each token's active slot, −1 for none.
    pub token_slot: *mut i32,
    /// f32 [numel, R1]: round(A_gate_up · x) per kept route.
    pub gate_up: *mut f32,
    /// f32 [numel, r]: round(A_down · act) per kept route.
    pub down: *mut f32,
}

/// What a backend gets for a LoRA run: the slots (read-locked for the run), r, the map and
/// the scratch.
pub struct LoraBatch<'a> {
    pub slots: &'a [Slot],
    pub max_rank: usize,
    pub map: &'a AdapterMap,
    pub scratch: LoraScratch,
}

unsafe impl Send for LoraBatch<'_> {}
unsafe impl Sync for LoraBatch<'_> {}

fn section(bytes: usize) -> usize {
    bytes.div_ceil(64) * 64
}

impl Lora {
    pub fn new(layer: Arc<Layer>, num_slots: i64, max_rank: i64) -> Result<Lora> {
        ensure!(
            (1..=MAX_SLOTS).contains(&num_slots),
            "num_slots: {num_slots}, expected 1..={MAX_SLOTS}"
        );
        ensure!(
            (1..=MAX_RANK).contains(&max_rank),
            "max_rank: {max_rank}, expected 1..={MAX_RANK}"
        );
        layer.backend.attach_lora(&layer, num_slots as usize)?;
        let empty = Slot {
            weights: None,
            enabled: true,
        };
        Ok(Lora {
            layer,
            max_rank: max_rank as usize,
            slots: RwLock::new(vec![empty; num_slots as usize]),
        })
    }

    pub fn num_slots(&self) -> usize {
        self.read().len()
    }

    /// Rows of gate_up A: 2r gated, r otherwise.
    pub fn gate_up_rows(&self) -> usize {
        if self.layer.v.gated {
            2 * self.max_rank
        } else {
            self.max_rank
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Slot>> {
        // A panic while a slot was written cannot leave it half written (slots are Copy).
        self.slots.read().unwrap_or_else(|e| e.into_inner())
    }

    fn with_slot<T>(&self, slot: i64, f: impl FnOnce(&mut Slot) -> T) -> Result<T> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let len = slots.len();
        ensure!(
            (0..len as i64).contains(&slot),
            "slot: {slot}, expected 0..{len} (num_slots {len})"
        );
        Ok(f(&mut slots[slot as usize]))
    }

    /// Checks one weight tensor: device, dtype, then shape against the allowed ones.
    fn check_weight(
        &self,
        t: &Tensor,
        name: &str,
        shapes: &[[i64; 3]],
        meaning: &str,
    ) -> Result<()> {
        let v = &self.layer.v;
        t.expect_device(name, v.device)?;
        t.expect_dtype(name, v.dtype)?;
        ensure!(
            t.ndim == 3 && shapes.iter().any(|s| t.shape() == s),
            "{name}: shape {}, expected {} ({meaning}, r = max_rank {}; a smaller rank is zero padded to r)",
            Shape(t.shape()),
            shapes
                .iter()
                .map(|s| Shape(s).to_string())
                .collect::<Vec<_>>()
                .join(" or "),
            self.max_rank
        );
        Ok(())
    }

    /// Sets a slot's weights (borrowed; checked against the layer and r).
    pub fn set_slot(&self, slot: i64, w: SlotWeights) -> Result<()> {
        self.with_slot(slot, |_| ())?; // the slot's range first, as the argument order
        let d = self.layer.v.dims;
        let (e, n1, h, i, r) = (
            d.experts as i64,
            d.n1 as i64,
            d.hidden as i64,
            d.inter as i64,
            self.max_rank as i64,
        );
        let r1 = self.gate_up_rows() as i64;
        let shared = |rows, cols| {
            if e == 1 {
                vec![[e, rows, cols]]
            } else {
                vec![[e, rows, cols], [1, rows, cols]]
            }
        };
        let rows = if self.layer.v.gated { "2·r" } else { "r" };
        self.check_weight(
            &w.gate_up_a,
            "gate_up_a",
            &shared(r1, h),
            &format!("[E or 1, {rows}, H]"),
        )?;
        self.check_weight(&w.gate_up_b, "gate_up_b", &[[e, n1, r]], "[E, N1, r]")?;
        self.check_weight(&w.down_a, "down_a", &[[e, r, i]], "[E, r, I]")?;
        self.check_weight(&w.down_b, "down_b", &shared(h, r), "[E or 1, H, r]")?;
        ensure!(
            w.scaling.is_finite(),
            "scaling: {}, expected a finite number",
            w.scaling
        );
        self.with_slot(slot, |s| s.weights = Some(w))
    }

    /// Forgets a slot's weights: its tokens get no delta until it is set again.
    pub fn clear_slot(&self, slot: i64) -> Result<()> {
        self.with_slot(slot, |s| s.weights = None)
    }

    pub fn set_enabled(&self, slot: i64, enabled: bool) -> Result<()> {
        self.with_slot(slot, |s| s.enabled = enabled)
    }

    /// Bytes of LoRA scratch a batch of `tokens` tokens needs after the plan's layout.
    fn scratch_bytes(&self, tokens: usize) -> Result<usize> {
        let numel = tokens as u128 * self.layer.v.dims.top_k as u128;
        let bytes =
            tokens as u128 * 4 + 128 + numel * (self.gate_up_rows() + self.max_rank) as u128 * 4;
        ensure!(
            bytes <= isize::MAX as u128 / 4,
            "max_tokens: {tokens} tokens at max_rank {} need a workspace beyond what this \
             machine can address",
            self.max_rank
        );
        let numel = numel as usize;
        Ok(section(tokens * 4)
            + section(numel * self.gate_up_rows() * 4)
            + section(numel * self.max_rank * 4))
    }

    /// Bytes of workspace a LoRA run of up to `max_tokens` tokens needs: the layer's, then
    /// the LoRA scratch.
    pub fn workspace_size(&self, max_tokens: i64) -> Result<usize> {
        let base = self.layer.workspace_size(max_tokens)?;
        Ok(base + self.scratch_bytes(max_tokens as usize)?)
    }
}

/// Checks one map tensor: device, int32, 1-D of the given length.
fn check_map_tensor(
    t: &Tensor,
    name: &str,
    layer: &Layer,
    len: Option<usize>,
    meaning: &str,
) -> Result<()> {
    t.expect_device(name, layer.v.device)?;
    ensure!(
        t.elem == ElemType::I32,
        "{name}: dtype {}, expected int32",
        t.elem.name()
    );
    t.expect_ndim(name, 1, meaning)?;
    if let Some(len) = len {
        t.expect_shape(name, &[len as i64], meaning)?;
    }
    Ok(())
}

/// Checks adapter ids: each in [−1, L).
fn check_adapters(values: &[i32], name: &str, num_slots: usize) -> Result<()> {
    if let Some((at, &a)) = values
        .iter()
        .enumerate()
        .find(|(_, &a)| a < -1 || a as i64 >= num_slots as i64)
    {
        return Err(invalid!(
            "{name}: adapter {a} at index {at} is out of range [-1, {num_slots}) (num_slots {num_slots}; -1 = no adapter)"
        ));
    }
    Ok(())
}

/// Checks the map's tensors against the batch (M tokens), and its values against L where
/// they are host memory. On a device the map's values are the device's to check: CUDA's map
/// kernel treats bad ones as no adapter and counts them for the next call to report (SPEC §4's
/// rule for expert ids), so the hot path never copies or synchronizes.
unsafe fn check_map(
    map: &AdapterMap,
    layer: &Layer,
    tokens: usize,
    num_slots: usize,
) -> Result<()> {
    let on_host = layer.v.device.kind == DeviceKind::Cpu;
    match map {
        AdapterMap::PerToken(ids) => {
            check_map_tensor(
                ids,
                "adapter_ids",
                layer,
                Some(tokens),
                "[M], M from the plan's topk_ids",
            )?;
            if !on_host {
                return Ok(());
            }
            check_adapters(ids.host_slice(), "adapter_ids", num_slots)
        }
        AdapterMap::Segments { indptr, adapter } => {
            check_map_tensor(indptr, "seg_indptr", layer, None, "[S+1]")?;
            ensure!(
                indptr.numel() >= 1,
                "seg_indptr: shape [0], expected [S+1] with at least one entry (0)"
            );
            let segments = indptr.numel() - 1;
            check_map_tensor(
                adapter,
                "seg_adapter",
                layer,
                Some(segments),
                "[S], S + 1 = seg_indptr's length",
            )?;
            if !on_host {
                return Ok(());
            }
            let bounds: &[i32] = indptr.host_slice();
            ensure!(
                bounds[0] == 0 && bounds[segments] as i64 == tokens as i64,
                "seg_indptr: runs from {} to {}, expected from 0 to M = {tokens}",
                bounds[0],
                bounds[segments]
            );
            if let Some(s) = bounds.windows(2).position(|w| w[1] < w[0]) {
                return Err(invalid!(
                    "seg_indptr: decreases at index {} ({} after {}), expected non-decreasing",
                    s + 1,
                    bounds[s + 1],
                    bounds[s]
                ));
            }
            check_adapters(adapter.host_slice(), "seg_adapter", num_slots)
        }
    }
}

/// moe_run_lora in the core: every check, the empty-batch shortcut, then the backend.
#[allow(clippy::too_many_arguments)]
pub fn run(
    lora: &Lora,
    plan: &Plan,
    hidden: &Tensor,
    router_weights: &Tensor,
    map: &AdapterMap,
    out: Option<&Tensor>,
    stream: usize,
) -> Result<()> {
    let layer = &lora.layer;
    ensure!(
        Arc::ptr_eq(&plan.layer, layer),
        "plan: created for another layer than the one the LoRA wrapper wraps"
    );
    let p = plan.prepared()?;
    plan::check_stream(layer, stream)?;
    let io = plan::check_run(layer, p, hidden, router_weights, out)?;
    let slots = lora.read();
    unsafe { check_map(map, layer, p.num_tokens, slots.len())? };

    let offset = p.layout.total;
    let need = offset + lora.scratch_bytes(p.num_tokens)?;
    ensure!(
        p.workspace_bytes >= need,
        "workspace: {} bytes, expected at least {need} for a LoRA run of {} tokens (size it with moe_lora_workspace_size)",
        p.workspace_bytes,
        p.num_tokens
    );
    for (name, t) in map.tensors() {
        ensure!(!io.out.overlaps(t), "out: overlaps {name}");
    }
    for (s, slot) in slots.iter().enumerate() {
        if let Some(w) = &slot.weights {
            for (name, t) in w.tensors() {
                ensure!(!io.out.overlaps(t), "out: overlaps {name} of LoRA slot {s}");
            }
        }
    }
    if p.num_tokens == 0 {
        return Ok(());
    }

    let numel = p.numel;
    let base = unsafe { p.workspace.add(offset) };
    let gate_up_at = section(p.num_tokens * 4);
    let down_at = gate_up_at + section(numel * lora.gate_up_rows() * 4);
    let batch = LoraBatch {
        slots: &slots,
        max_rank: lora.max_rank,
        map,
        scratch: unsafe {
            LoraScratch {
                token_slot: base as *mut i32,
                gate_up: base.add(gate_up_at) as *mut f32,
                down: base.add(down_at) as *mut f32,
            }
        },
    };
    layer.backend.run_lora(layer, p, &io, &batch, stream)
}

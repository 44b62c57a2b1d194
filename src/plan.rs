//! moe_prepare and moe_run in the core: every run-time check (SPEC §1–2, DESIGN §7) happens
//! here, before the backend is called, so that a failed call writes nothing.

use crate::align;
use crate::dtype::{DType, ElemType};
use crate::error::{ensure, invalid, Result};
use crate::layer::Layer;
use crate::tensor::{DeviceKind, Tensor};
use crate::tiles::TileConfig;
use crate::workspace::{section_mut, Layout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Alignment the workspace's address must have (sections are 64-byte aligned within it).
pub(crate) const WORKSPACE_ALIGN: usize = 16;

/// The result of moe_prepare: the batch's size, its tile config and where its arrays are.
#[derive(Clone, Copy, Debug)]
pub struct Prepared {
    pub num_tokens: usize,
    pub numel: usize,
    pub tile: TileConfig,
    pub layout: Layout,
    pub workspace: *mut u8,
    pub workspace_bytes: usize,
    pub num_padded: usize,
}

unsafe impl Send for Prepared {}
unsafe impl Sync for Prepared {}

/// A plan belongs to one layer (it keeps it alive) and holds the last successful prepare.
pub struct Plan {
    pub layer: Arc<Layer>,
    pub prepared: Option<Prepared>,
    /// Unique per plan: marks the workspace this plan prepared last (see WORKSPACE_OWNER).
    stamp: u64,
}

/// Which plan prepared each workspace (by address) last. A plan whose workspace another
/// plan has prepared since would run on that plan's arrays: moe_run refuses it instead. At
/// most one entry per live plan, so hosts that allocate workspaces per batch do not grow it.
static WORKSPACE_OWNER: once_cell::sync::Lazy<std::sync::Mutex<HashMap<usize, u64>>> =
    once_cell::sync::Lazy::new(|| std::sync::Mutex::new(HashMap::new()));

fn owners() -> std::sync::MutexGuard<'static, HashMap<usize, u64>> {
    WORKSPACE_OWNER.lock().unwrap_or_else(|p| p.into_inner())
}

impl Plan {
    pub fn new(layer: Arc<Layer>) -> Plan {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Plan {
            layer,
            prepared: None,
            stamp: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The last prepare, if its workspace still holds this plan's arrays.
    pub fn prepared(&self) -> Result<&Prepared> {
        let p = self
            .prepared
            .as_ref()
            .ok_or_else(|| invalid!("plan: not prepared (call moe_prepare first)"))?;
        ensure!(
            owners().get(&(p.workspace as usize)) == Some(&self.stamp),
            "plan: its workspace was prepared by another plan since this plan's moe_prepare (call moe_prepare again)"
        );
        Ok(p)
    }

    /// Records that this plan's arrays are now in `workspace`.
    fn own(&mut self, workspace: *mut u8) {
        let mut owners = owners();
        if let Some(old) = &self.prepared {
            if owners.get(&(old.workspace as usize)) == Some(&self.stamp) {
                owners.remove(&(old.workspace as usize));
            }
        }
        owners.insert(workspace as usize, self.stamp);
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        if let Some(p) = &self.prepared {
            let mut owners = owners();
            if owners.get(&(p.workspace as usize)) == Some(&self.stamp) {
                owners.remove(&(p.workspace as usize));
            }
        }
    }
}

/// The tensors of one moe_run, checked. `out` is `hidden` when the layer is inplace.
pub struct RunIo {
    pub hidden: Tensor,
    pub router_weights: Tensor,
    pub router_dtype: DType,
    pub out: Tensor,
}

/// Checks the stream, then reports what the device found wrong in earlier work (ids out of
/// range on CUDA) before this call does anything.
pub(crate) fn check_stream(layer: &Layer, stream: usize) -> Result<()> {
    if layer.v.device.kind == DeviceKind::Cpu {
        ensure!(
            stream == 0,
            "stream: {stream:#x}, expected NULL for a CPU layer"
        );
    }
    layer.backend.take_device_errors(layer)
}

fn check_workspace(layer: &Layer, ws: &Tensor, num_tokens: usize, layout: &Layout) -> Result<()> {
    ws.expect_device("workspace", layer.v.device)?;
    ensure!(
        ws.elem == ElemType::U8 && ws.ndim == 1,
        "workspace: dtype {} with ndim {}, expected a 1-D uint8 byte buffer",
        ws.elem.name(),
        ws.ndim
    );
    ensure!(
        ws.nbytes() >= layout.total,
        "workspace: {} bytes, expected at least {} for {num_tokens} tokens (see moe_workspace_size)",
        ws.nbytes(),
        layout.total
    );
    ensure!(
        (ws.data as usize) % WORKSPACE_ALIGN == 0,
        "workspace: address {:p} is not {WORKSPACE_ALIGN}-byte aligned",
        ws.data
    );
    Ok(())
}

/// The align step: checks ids and workspace, then fills the workspace and the plan.
pub fn prepare(
    plan: &mut Plan,
    layer: &Arc<Layer>,
    ids: &Tensor,
    ws: &Tensor,
    stream: usize,
) -> Result<()> {
    ensure!(
        Arc::ptr_eq(&plan.layer, layer),
        "plan: created for another layer"
    );
    check_stream(layer, stream)?;
    let d = layer.v.dims;
    ids.expect_device("topk_ids", layer.v.device)?;
    ensure!(
        ids.elem == ElemType::I32 || ids.elem == ElemType::I64,
        "topk_ids: dtype {}, expected int32 or int64",
        ids.elem.name()
    );
    ids.expect_ndim("topk_ids", 2, "[M, K]")?;
    let num_tokens = ids.shape()[0] as usize;
    ids.expect_shape(
        "topk_ids",
        &[num_tokens as i64, d.top_k as i64],
        "[M, K = top_k]",
    )?;
    ensure!(
        num_tokens as i64 <= crate::config::MAX_DIM,
        "topk_ids: {num_tokens} tokens, expected at most {}",
        crate::config::MAX_DIM
    );
    let tile = layer.tiles.choose(num_tokens);
    let layout = layer.layout(num_tokens, tile.block_m as usize)?;
    check_workspace(layer, ws, num_tokens, &layout)?;
    ensure!(!ids.overlaps(ws), "topk_ids: overlaps the workspace");

    let numel = num_tokens * d.top_k;
    let num_padded = layer
        .backend
        .prepare(layer, ids, ws.data, &layout, tile, stream)?;
    plan.own(ws.data);
    plan.prepared = Some(Prepared {
        num_tokens,
        numel,
        tile,
        layout,
        workspace: ws.data,
        workspace_bytes: ws.nbytes(),
        num_padded,
    });
    Ok(())
}

/// CPU-side align shared by backends that run it on the host: checks every id, narrows
/// int64 ids into the workspace, and runs the align step there. Returns num_padded.
///
/// # Safety
/// `ws` must hold `layout.total` bytes; `ids` must be host memory.
pub unsafe fn align_on_host(
    layer: &Layer,
    ids: &Tensor,
    ws: *mut u8,
    layout: &Layout,
    block_m: usize,
) -> Result<usize> {
    let d = layer.v.dims;
    let ids32: &[i32] = if ids.elem == ElemType::I64 {
        let src: &[i64] = ids.host_slice();
        align::check_ids(src.iter().copied(), d.experts, d.top_k)?;
        let dst: &mut [i32] = section_mut(ws, layout.ids32);
        for (o, &i) in dst.iter_mut().zip(src) {
            *o = i as i32;
        }
        dst
    } else {
        let src: &[i32] = ids.host_slice();
        align::check_ids(src.iter().map(|&i| i as i64), d.experts, d.top_k)?;
        src
    };
    let num_padded = align::align(
        ids32,
        d.experts,
        block_m,
        align::AlignOut {
            sorted_route_ids: section_mut(ws, layout.sorted_route_ids),
            block_expert: section_mut(ws, layout.block_expert),
            expert_offsets: section_mut(ws, layout.expert_offsets),
            compact_routes: section_mut(ws, layout.compact_routes),
            route_slot: section_mut(ws, layout.route_slot),
        },
    );
    section_mut::<i32>(ws, layout.num_padded)[0] = num_padded as i32;
    Ok(num_padded)
}

/// Checks one run's tensors against the layer and the plan; returns them as `RunIo`.
pub fn check_run(
    layer: &Layer,
    p: &Prepared,
    hidden: &Tensor,
    router_weights: &Tensor,
    out: Option<&Tensor>,
) -> Result<RunIo> {
    let v = &layer.v;
    let d = v.dims;
    let (m, k, h) = (p.num_tokens as i64, d.top_k as i64, d.hidden as i64);
    hidden.expect_device("hidden", v.device)?;
    hidden.expect_dtype("hidden", v.dtype)?;
    hidden.expect_shape("hidden", &[m, h], "[M, H], M from the plan's topk_ids")?;
    router_weights.expect_device("topk_weights", v.device)?;
    let router_dtype = router_weights.expect_f32_or("topk_weights", v.dtype)?;
    router_weights.expect_shape(
        "topk_weights",
        &[m, k],
        "[M, K], M from the plan's topk_ids",
    )?;

    let out = if v.inplace {
        if let Some(o) = out {
            ensure!(
                o.data == hidden.data && o.shape() == hidden.shape() && o.elem == hidden.elem,
                "out: must be NULL or hidden itself for an inplace layer"
            );
        }
        *hidden
    } else {
        let o = out.ok_or_else(|| invalid!("out: NULL, but the layer is not inplace"))?;
        o.expect_device("out", v.device)?;
        o.expect_dtype("out", v.dtype)?;
        if v.no_combine {
            o.expect_shape("out", &[m, k, h], "[M, K, H] with no_combine")?;
        } else {
            o.expect_shape("out", &[m, h], "[M, H]")?;
        }
        ensure!(
            !o.overlaps(hidden),
            "out: overlaps hidden, but the layer is not inplace"
        );
        *o
    };
    ensure!(!out.overlaps(router_weights), "out: overlaps topk_weights");
    let ws = Tensor {
        data: p.workspace,
        elem: ElemType::U8,
        ndim: 1,
        dims: [p.workspace_bytes as i64, 0, 0, 0],
        device: v.device,
    };
    ensure!(!hidden.overlaps(&ws), "hidden: overlaps the workspace");
    ensure!(
        !router_weights.overlaps(&ws),
        "topk_weights: overlaps the workspace"
    );
    ensure!(!out.overlaps(&ws), "out: overlaps the workspace");
    let w = &layer.weights;
    for (name, t) in [
        ("w13", Some(&w.w13)),
        ("w2", Some(&w.w2)),
        ("b13", w.b13.as_ref()),
        ("b2", w.b2.as_ref()),
    ] {
        if let Some(t) = t {
            ensure!(!out.overlaps(t), "out: overlaps the layer's {name}");
        }
    }
    Ok(RunIo {
        hidden: *hidden,
        router_weights: *router_weights,
        router_dtype,
        out,
    })
}

/// moe_run in the core: checks, the empty-batch shortcut, then the backend.
pub fn run(
    plan: &Plan,
    layer: &Arc<Layer>,
    hidden: &Tensor,
    router_weights: &Tensor,
    out: Option<&Tensor>,
    stream: usize,
) -> Result<()> {
    ensure!(
        Arc::ptr_eq(&plan.layer, layer),
        "plan: created for another layer"
    );
    let p = plan.prepared()?;
    check_stream(layer, stream)?;
    let io = check_run(layer, p, hidden, router_weights, out)?;
    if p.num_tokens == 0 {
        return Ok(());
    }
    layer.backend.run(layer, p, &io, stream)
}

/// Compiles and loads the kernels of every tile config batches of up to `max_tokens` use.
pub fn warmup(layer: &Layer, max_tokens: i64, stream: usize) -> Result<()> {
    check_stream(layer, stream)?;
    ensure!(max_tokens >= 0, "max_tokens: {max_tokens} is negative");
    ensure!(
        max_tokens <= crate::config::MAX_DIM,
        "max_tokens: {max_tokens}, expected at most {}",
        crate::config::MAX_DIM
    );
    layer.backend.warmup(layer, max_tokens as usize)
}

//! SPEC §6: expert parallelism. A dispatcher owns the mapping from global to local expert ids
//! and the expert mask derived from it (SGLang moved both out of the layer): one owner, made
//! once, used by every backend.

use crate::backend::cuda::dispatch::CudaDispatch;
use crate::dtype::ElemType;
use crate::error::{ensure, Result};
use crate::tensor::{Device, DeviceKind, Tensor};

pub struct Dispatcher {
    /// [E_g]: the local id of each global expert, −1 where it lives on another rank.
    pub mapping: Vec<i32>,
    /// E_local: experts this rank stores.
    pub local_experts: usize,
    pub device: Device,
    /// The device copy of the mapping and the kernels, for a CUDA dispatcher.
    cuda: Option<CudaDispatch>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("mapping", &self.mapping)
            .field("local_experts", &self.local_experts)
            .field("device", &self.device)
            .finish()
    }
}

impl Dispatcher {
    /// The contiguous partition: the last `shared` global experts are replicated on every
    /// rank; the R = (E_g − S)/ep_size routed experts of rank r are [r·R, (r+1)·R), local ids
    /// 0..R, and the shared ones follow as R..R+S.
    pub fn contiguous(
        global: i64,
        ep_size: i64,
        ep_rank: i64,
        shared: i64,
        device: Device,
    ) -> Result<Self> {
        ensure!(
            (1..=1 << 24).contains(&global),
            "num_experts: {global}, expected in [1, 2^24]"
        );
        ensure!(ep_size >= 1, "ep_size: {ep_size}, expected at least 1");
        ensure!(
            (0..ep_size).contains(&ep_rank),
            "ep_rank: {ep_rank}, expected in [0, {ep_size})"
        );
        ensure!(
            (0..global).contains(&shared),
            "num_shared_experts: {shared}, expected in [0, {global})"
        );
        let routed = global - shared;
        ensure!(
            routed % ep_size == 0,
            "ep_size: {ep_size} does not divide the {routed} routed experts (num_experts {global} − {shared} shared)"
        );
        let per_rank = routed / ep_size;
        let mut mapping = vec![-1i32; global as usize];
        for i in 0..per_rank {
            mapping[(ep_rank * per_rank + i) as usize] = i as i32;
        }
        for s in 0..shared {
            mapping[(routed + s) as usize] = (per_rank + s) as i32;
        }
        Self::checked(mapping, (per_rank + shared) as usize, device)
    }

    /// An explicit table (EPLB placements): `mapping[g]` in [−1, E_local), no local id twice.
    pub fn from_mapping(mapping: &[i32], local_experts: i64, device: Device) -> Result<Self> {
        ensure!(
            (1..=1 << 24).contains(&local_experts),
            "num_local_experts: {local_experts}, expected in [1, 2^24]"
        );
        Self::checked(mapping.to_vec(), local_experts as usize, device)
    }

    fn checked(mapping: Vec<i32>, local_experts: usize, device: Device) -> Result<Self> {
        ensure!(
            (1..=1 << 24).contains(&mapping.len()),
            "mapping: {} entries, expected one per global expert (1 to 2^24)",
            mapping.len()
        );
        ensure!(
            local_experts <= mapping.len(),
            "num_local_experts: {local_experts} is more than the {} global experts",
            mapping.len()
        );
        let mut owner = vec![-1i64; local_experts];
        for (g, &l) in mapping.iter().enumerate() {
            ensure!(
                l >= -1 && (l as i64) < local_experts as i64,
                "mapping: mapping[{g}] = {l}, expected a local id in [-1, {local_experts})"
            );
            if l >= 0 {
                let first = owner[l as usize];
                ensure!(
                    first < 0,
                    "mapping: local id {l} is used twice (global experts {first} and {g})"
                );
                owner[l as usize] = g as i64;
            }
        }
        let cuda = match device.kind {
            DeviceKind::Cpu => None,
            DeviceKind::Cuda => {
                crate::backend::cuda::backend(device)?;
                Some(CudaDispatch::new(device.id as usize, &mapping)?)
            }
        };
        Ok(Dispatcher {
            mapping,
            local_experts,
            device,
            cuda,
        })
    }

    pub fn global_experts(&self) -> usize {
        self.mapping.len()
    }

    /// SPEC §6: 1 where the global expert is stored on this rank.
    pub fn expert_mask(&self) -> Vec<i32> {
        self.mapping
            .iter()
            .map(|&l| (l >= 0 && (l as usize) < self.local_experts) as i32)
            .collect()
    }

    /// local = id < 0 ? −1 : mapping[id], from `ids` into `out` (which may be `ids` itself).
    /// Checks everything, ids included, before writing.
    pub fn dispatch(&self, ids: &Tensor, out: &Tensor, stream: usize) -> Result<()> {
        match &self.cuda {
            None => ensure!(
                stream == 0,
                "stream: {stream:#x}, expected NULL for a CPU dispatcher"
            ),
            Some(c) => c.take_errors(self.global_experts())?,
        }
        for (name, t) in [("topk_ids", ids), ("local_topk_ids", out)] {
            ensure!(
                t.device == self.device,
                "{name}: on {}, expected {} like the dispatcher",
                t.device,
                self.device
            );
            ensure!(
                t.elem == ElemType::I32 || t.elem == ElemType::I64,
                "{name}: dtype {}, expected int32 or int64",
                t.elem.name()
            );
        }
        ensure!(
            out.shape() == ids.shape(),
            "local_topk_ids: shape {}, expected {} like topk_ids",
            crate::tensor::Shape(out.shape()),
            crate::tensor::Shape(ids.shape())
        );
        let same = out.data == ids.data;
        ensure!(
            !out.overlaps(ids) || (same && out.elem == ids.elem),
            "local_topk_ids: overlaps topk_ids without being the same tensor of the same dtype"
        );
        if let Some(c) = &self.cuda {
            // ids >= E_g are counted on the device and reported by the next call
            return c.launch(
                ids.data as u64,
                ids.elem == ElemType::I64,
                out.data as u64,
                out.elem == ElemType::I64,
                ids.numel(),
                self.global_experts(),
                stream,
            );
        }
        let read = |r: usize| unsafe {
            if ids.elem == ElemType::I64 {
                *(ids.data as *const i64).add(r)
            } else {
                *(ids.data as *const i32).add(r) as i64
            }
        };
        let n = ids.numel();
        let global = self.global_experts() as i64;
        for r in 0..n {
            let id = read(r);
            ensure!(
                id < global,
                "topk_ids: element {r} = {id}, expected a global expert id below {global}"
            );
        }
        for r in 0..n {
            let id = read(r);
            let local = if id < 0 {
                -1
            } else {
                self.mapping[id as usize]
            };
            unsafe {
                if out.elem == ElemType::I64 {
                    *(out.data as *mut i64).add(r) = local as i64;
                } else {
                    *(out.data as *mut i32).add(r) = local;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contiguous_partition_follows_spec_6() {
        // E_g 9 with one shared expert, 4 ranks: R = 2; rank 1 owns 2, 3 and the shared 8.
        let d = Dispatcher::contiguous(9, 4, 1, 1, Device::CPU).unwrap();
        assert_eq!(d.mapping, vec![-1, -1, 0, 1, -1, -1, -1, -1, 2]);
        assert_eq!(d.local_experts, 3);
        assert_eq!(d.expert_mask(), vec![0, 0, 1, 1, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn bad_partitions_and_tables_are_refused_by_name() {
        let e = |r: Result<Dispatcher>| r.unwrap_err().message;
        assert!(e(Dispatcher::contiguous(10, 4, 0, 0, Device::CPU))
            .contains("ep_size: 4 does not divide"));
        assert!(e(Dispatcher::contiguous(8, 4, 4, 0, Device::CPU)).contains("ep_rank: 4"));
        assert!(e(Dispatcher::from_mapping(&[0, 1, 0], 2, Device::CPU))
            .contains("local id 0 is used twice"));
        assert!(e(Dispatcher::from_mapping(&[0, 2], 2, Device::CPU)).contains("mapping[1] = 2"));
        assert!(e(Dispatcher::from_mapping(&[], 1, Device::CPU)).contains("mapping: 0 entries"));
    }
}

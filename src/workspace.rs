//! Where things live in the host's workspace: the align step's arrays, then the backend's
//! scratch. Every section starts on a 64-byte boundary.

use crate::align;

const SECTION_ALIGN: usize = 64;

/// A section: byte offset into the workspace and element count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    pub offset: usize,
    pub len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// i32 [capacity]
    pub sorted_route_ids: Section,
    /// i32 [max_blocks]
    pub block_expert: Section,
    /// i32 [1]
    pub num_padded: Section,
    /// i32 [E + 1]
    pub expert_offsets: Section,
    /// i32 [numel]; the CUDA prepare, which does not fill it, borrows it for the many-block
    /// align step's chunk counts (backend/cuda/variant.rs, align_chunks)
    pub compact_routes: Section,
    /// i32 [numel]
    pub route_slot: Section,
    /// i32 [numel]: int64 ids narrowed to int32 (checked first)
    pub ids32: Section,
    /// the backend's scratch, in bytes
    pub scratch: Section,
    pub total: usize,
}

impl Layout {
    pub fn new(numel: usize, experts: usize, block_m: usize, scratch_bytes: usize) -> Layout {
        let capacity = align::capacity(numel, experts, block_m);
        let mut end = 0usize;
        let mut take = |len: usize, elem: usize| {
            let offset = end.div_ceil(SECTION_ALIGN) * SECTION_ALIGN;
            end = offset + len * elem;
            Section { offset, len }
        };
        let sorted_route_ids = take(capacity, 4);
        let block_expert = take(align::max_blocks(capacity, block_m), 4);
        let num_padded = take(1, 4);
        let expert_offsets = take(experts + 1, 4);
        let compact_routes = take(numel, 4);
        let route_slot = take(numel, 4);
        let ids32 = take(numel, 4);
        let scratch = take(scratch_bytes, 1);
        Layout {
            sorted_route_ids,
            block_expert,
            num_padded,
            expert_offsets,
            compact_routes,
            route_slot,
            ids32,
            scratch,
            total: end.div_ceil(SECTION_ALIGN) * SECTION_ALIGN,
        }
    }
}

/// A typed view of a section.
///
/// # Safety
/// `base` must be the workspace the layout was made for, at least `layout.total` bytes, and
/// no other live reference may cover the section.
pub unsafe fn section_mut<'a, T>(base: *mut u8, s: Section) -> &'a mut [T] {
    std::slice::from_raw_parts_mut(base.add(s.offset) as *mut T, s.len)
}

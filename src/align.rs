//! SPEC §4: the align step. Routes are bucketed by local expert in increasing route index
//! (a stable counting sort: the same routing gives the same order, run after run), each
//! expert's bucket padded to a multiple of BLOCK_M with the sentinel M·K. Dropped routes (id −1)
//! are left out. This module is the definition; the CUDA kernel computes the same arrays.

use crate::error::{invalid, Result};

/// Entries of `sorted_route_ids` the workspace reserves for `numel` routes over `experts`
/// experts (SGLang's bound, counting the −1 bucket it keeps and we do not), rounded up to 4.
pub fn capacity(numel: usize, experts: usize, block_m: usize) -> usize {
    let raw = if numel < experts + 1 {
        numel * block_m
    } else {
        numel + (experts + 1) * (block_m - 1)
    };
    raw.div_ceil(4) * 4
}

/// Blocks `block_expert` reserves: one per BLOCK_M entries of the capacity.
pub fn max_blocks(capacity: usize, block_m: usize) -> usize {
    capacity.div_ceil(block_m)
}

/// The arrays the align step writes (slices into the workspace).
pub struct AlignOut<'a> {
    /// [capacity] route indices by expert, padded per expert with `numel`; the unused tail too.
    pub sorted_route_ids: &'a mut [i32],
    /// [max_blocks] the expert of each block; −1 past the used blocks.
    pub block_expert: &'a mut [i32],
    /// [E + 1] start of each expert's routes in `compact_routes`.
    pub expert_offsets: &'a mut [i32],
    /// [numel] the routes without padding, in the same order.
    pub compact_routes: &'a mut [i32],
    /// [numel] each route's index in `compact_routes`, −1 for a dropped route.
    pub route_slot: &'a mut [i32],
}

/// Checks every id against [−1, experts) before anything is written (a failed call writes
/// nothing). `ids` yields the flat [M, K] ids; `top_k` names positions in the error.
pub fn check_ids(ids: impl Iterator<Item = i64>, experts: usize, top_k: usize) -> Result<()> {
    for (r, id) in ids.enumerate() {
        if id < -1 || id >= experts as i64 {
            return Err(invalid!(
                "topk_ids: topk_ids[{}, {}] = {id}, expected an expert id in [-1, {experts})",
                r / top_k,
                r % top_k
            ));
        }
    }
    Ok(())
}

/// Runs the align step on checked ids; returns num_padded. Allocates nothing.
pub fn align(ids: &[i32], experts: usize, block_m: usize, out: AlignOut<'_>) -> usize {
    let numel = ids.len();
    let offsets = out.expert_offsets;

    // Counting sort with offsets shifted by one: after the prefix sum offsets[e + 1] is the
    // start of expert e, and the scatter advances it to the end of e, i.e. the start of e + 1.
    offsets.fill(0);
    for &id in ids {
        if id >= 0 && (id as usize) + 2 <= experts {
            offsets[id as usize + 2] += 1;
        }
    }
    for e in 2..=experts {
        offsets[e] += offsets[e - 1];
    }
    out.route_slot.fill(-1);
    for (r, &id) in ids.iter().enumerate() {
        if id >= 0 {
            let slot = offsets[id as usize + 1];
            offsets[id as usize + 1] += 1;
            out.compact_routes[slot as usize] = r as i32;
            out.route_slot[r] = slot;
        }
    }

    // Pad each expert's bucket to BLOCK_M and tag its blocks.
    out.sorted_route_ids.fill(numel as i32);
    out.block_expert.fill(-1);
    let mut pos = 0usize;
    for e in 0..experts {
        let (start, end) = (offsets[e] as usize, offsets[e + 1] as usize);
        let count = end - start;
        if count == 0 {
            continue;
        }
        out.sorted_route_ids[pos..pos + count].copy_from_slice(&out.compact_routes[start..end]);
        let padded = count.div_ceil(block_m) * block_m;
        out.block_expert[pos / block_m..(pos + padded) / block_m].fill(e as i32);
        pos += padded;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bufs {
        sorted: Vec<i32>,
        blocks: Vec<i32>,
        offsets: Vec<i32>,
        compact: Vec<i32>,
        slot: Vec<i32>,
    }

    fn run(ids: &[i32], experts: usize, block_m: usize) -> (Bufs, usize) {
        let cap = capacity(ids.len(), experts, block_m);
        let mut b = Bufs {
            sorted: vec![7777; cap],
            blocks: vec![7777; max_blocks(cap, block_m)],
            offsets: vec![7777; experts + 1],
            compact: vec![7777; ids.len()],
            slot: vec![7777; ids.len()],
        };
        let n = align(
            ids,
            experts,
            block_m,
            AlignOut {
                sorted_route_ids: &mut b.sorted,
                block_expert: &mut b.blocks,
                expert_offsets: &mut b.offsets,
                compact_routes: &mut b.compact,
                route_slot: &mut b.slot,
            },
        );
        (b, n)
    }

    #[test]
    fn capacity_follows_the_formula_rounded_to_four() {
        assert_eq!(capacity(3, 8, 16), 48); // numel < E + 1: numel · BLOCK_M
        assert_eq!(capacity(9, 8, 16), 9 + 9 * 15); // 144
        assert_eq!(capacity(10, 8, 16), 148); // 10 + 135 = 145 → 148
        assert_eq!(capacity(0, 8, 16), 0);
    }

    #[test]
    fn routes_are_grouped_by_expert_in_route_order_and_padded() {
        // M = 3, K = 2; experts 0..4; one dropped route.
        let ids = [2, 0, 2, -1, 0, 2];
        let (b, n) = run(&ids, 4, 4);
        let s = 6; // sentinel M·K
        assert_eq!(n, 8);
        assert_eq!(&b.sorted[..8], &[1, 4, s, s, 0, 2, 5, s]);
        assert!(b.sorted[8..].iter().all(|&v| v == s));
        assert_eq!(&b.blocks[..2], &[0, 2]);
        assert!(b.blocks[2..].iter().all(|&v| v == -1), "tail blocks are -1");
        assert_eq!(b.offsets, vec![0, 2, 2, 5, 5]);
        assert_eq!(b.compact[..5], [1, 4, 0, 2, 5]);
        assert_eq!(b.slot, vec![2, 0, 3, -1, 1, 4]);
    }

    #[test]
    fn padded_count_never_exceeds_capacity() {
        for experts in [1usize, 3, 8, 64] {
            for block_m in [16usize, 64] {
                for numel in [0usize, 1, 5, 9, 64, 65, 300] {
                    // worst case: every expert hit once, the rest on expert 0
                    let ids: Vec<i32> = (0..numel).map(|r| (r % experts) as i32).collect();
                    let (b, n) = run(&ids, experts, block_m);
                    assert!(
                        n <= b.sorted.len(),
                        "E={experts} BM={block_m} numel={numel}"
                    );
                    assert_eq!(n % block_m, 0);
                }
            }
        }
    }

    #[test]
    fn ids_out_of_range_are_named_with_their_position() {
        let e = check_ids([0i64, 1, 8].into_iter(), 8, 2).unwrap_err();
        assert!(e.message.contains("topk_ids[1, 0] = 8"), "{}", e.message);
        assert!(check_ids([-2i64].into_iter(), 8, 1).is_err());
        assert!(check_ids([-1i64, 7].into_iter(), 8, 2).is_ok());
    }
}

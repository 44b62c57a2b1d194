//! Expert parallelism in tests: one rank's layer cut from a single-rank problem (SPEC §6).
//!
//! Every rank computes the routes of the replicated shared experts. So that the sum over ranks
//! counts them once, rank r holds the r-th 1/ep_size slice of their intermediate dimension
//! (zero elsewhere: every activation maps a zero gate and up to zero), and only rank 0 holds
//! their b2: the tensor-parallel sharding DeepSeek uses for its shared expert. A routed expert
//! lives on one rank, with its own bias.

use super::*;

/// The single-rank problem the EP tests split: 16 routed experts (2 per rank at ep_size 8)
/// plus `shared` replicated ones, biases, rsf and dropped routes, seeded per partition.
pub fn problem(dt: Dt, ep_size: usize, shared: usize) -> Case {
    Case {
        dt,
        experts: 16 + shared,
        top_k: 4,
        tokens: 24,
        hidden: 40,
        inter: 32,
        b13: true,
        b2: true,
        rsf: 1.5,
        drop: 0.1,
        seed: (ep_size * 10 + shared) as u64,
        ..Case::default()
    }
}

/// The rank's Setup: a layer of `local` experts holding those `mapping` places here (local id
/// = mapping[g])
/// and their share of the weights, and the full problem's batch: hidden, router weights and
/// the *global* ids (int32; the caller replaces them with the dispatched ones).
pub fn rank_setup(
    full: &Setup,
    mapping: &[i32],
    local: usize,
    rank: usize,
    ep_size: usize,
    shared: usize,
) -> Setup {
    let c = &full.case;
    let e_g = c.experts;
    let rank_case = Case {
        global_experts: Some(e_g),
        experts: local,
        ..c.clone()
    };
    let mut s = Setup::new(&rank_case);
    let (h, i, n1) = (c.hidden, c.inter, c.n1());
    let (w13, w2) = (full.w13.values(), full.w2.values());
    let (b13, b2) = (
        full.b13.as_ref().map(|t| t.values()),
        full.b2.as_ref().map(|t| t.values()),
    );
    let slice = i / ep_size; // the shared experts' intermediate columns this rank holds
    let (mut rw13, mut rw2) = (vec![0.0; local * n1 * h], vec![0.0; local * h * i]);
    let (mut rb13, mut rb2) = (vec![0.0; local * n1], vec![0.0; local * h]);
    for (g, &l) in mapping.iter().enumerate() {
        if l < 0 {
            continue;
        }
        let l = l as usize;
        let is_shared = g >= e_g - shared;
        let owns = |j: usize| !is_shared || (j / slice.max(1)).min(ep_size - 1) == rank;
        for n in 0..n1 {
            let j = if n < i { n } else { n - i }; // halves layout: gate j and up j
            if owns(j) {
                rw13[(l * n1 + n) * h..][..h].copy_from_slice(&w13[(g * n1 + n) * h..][..h]);
                if let Some(b) = &b13 {
                    rb13[l * n1 + n] = b[g * n1 + n];
                }
            }
        }
        rw2[l * h * i..][..h * i].copy_from_slice(&w2[g * h * i..][..h * i]);
        if let Some(b) = &b2 {
            if !is_shared || rank == 0 {
                rb2[l * h..][..h].copy_from_slice(&b[g * h..][..h]);
            }
        }
    }
    let dt = c.dt;
    s.w13 = HostTensor::from_f64(dt, &[local as i64, n1 as i64, h as i64], &rw13);
    s.w2 = HostTensor::from_f64(dt, &[local as i64, h as i64, i as i64], &rw2);
    s.b13 = b13.map(|_| HostTensor::from_f64(dt, &[local as i64, n1 as i64], &rb13));
    s.b2 = b2.map(|_| HostTensor::from_f64(dt, &[local as i64, h as i64], &rb2));
    ok(s.create_layer(), "rank layer");
    s.hidden = HostTensor::from_f64(dt, &[c.tokens as i64, h as i64], &full.hidden_in);
    s.hidden_in = full.hidden_in.clone(); // what a device batch uploads
    s.router = HostTensor::from_f64(
        Dt::F32,
        &[c.tokens as i64, c.top_k as i64],
        &full.router.values(),
    );
    s.ids = HostTensor::from_f64(
        Dt::I32,
        &[c.tokens as i64, c.top_k as i64],
        &full.ids.values(),
    );
    s
}

//! Decode with some non-resident layers on the CPU: while the CPU computes a block of layers from
//! host memory, the GPU's queue copies the next streamed layers into the ring (the GPU has nothing
//! else to do then), so PCIe and the CPU's memory bandwidth add up instead of taking turns.
//!
//! A token's layers: the resident ones on the GPU, then the non-resident ones as alternating
//! blocks, `[CPU block][streamed group]...`, each streamed group at most as long as the ring, so
//! its copies can all be queued before the CPU block ahead of it starts. Prompt chunks still
//! stream every non-resident layer (the GPU's GEMMs are far faster than the CPU on many tokens).

/// Where a layer runs in a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerRole {
    Resident,
    Streamed,
    Cpu,
}

/// Seconds per operation, measured once at load on this machine (see `engine::hybrid`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HybridCosts {
    /// One layer's decode step on the CPU (its weights read from host memory).
    pub cpu_layer_s: f64,
    /// One layer's copy from host memory into a ring slot.
    pub copy_layer_s: f64,
    /// One layer's decode step on the GPU (weights already on the device), with a submission.
    pub gpu_layer_s: f64,
    /// Moving the hidden state GPU → CPU → GPU (a read-back and a write).
    pub handoff_s: f64,
}

/// The roles of `layers` layers: `resident` first, then `cpu` CPU layers and the rest streamed,
/// in alternating blocks (CPU, then at most `ring_slots` streamed), the CPU layers spread evenly.
pub fn layout(layers: usize, resident: usize, ring_slots: usize, cpu: usize) -> Vec<LayerRole> {
    let rest = layers - resident.min(layers);
    let cpu = cpu.min(rest);
    let streamed = rest - cpu;
    let groups = streamed.div_ceil(ring_slots.max(1));
    let blocks = groups.max(usize::from(cpu > 0));
    let mut roles = vec![LayerRole::Resident; layers - rest];
    for b in 0..blocks {
        roles.extend(std::iter::repeat_n(LayerRole::Cpu, share(cpu, blocks, b)));
        roles.extend(std::iter::repeat_n(
            LayerRole::Streamed,
            share(streamed, groups.max(1), b),
        ));
    }
    roles
}

/// Part `i` of `n` split into `parts` as evenly as possible (the first parts one larger).
fn share(n: usize, parts: usize, i: usize) -> usize {
    n / parts + usize::from(i < n % parts)
}

/// Consecutive layers that run on the same side, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Gpu(std::ops::Range<usize>),
    Cpu(std::ops::Range<usize>),
}

/// The decode step as GPU and CPU segments.
pub fn segments(roles: &[LayerRole]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (l, r) in roles.iter().enumerate() {
        let cpu = *r == LayerRole::Cpu;
        match out.last_mut() {
            Some(Segment::Cpu(range)) if cpu => range.end = l + 1,
            Some(Segment::Gpu(range)) if !cpu => range.end = l + 1,
            _ => out.push(match cpu {
                true => Segment::Cpu(l..l + 1),
                false => Segment::Gpu(l..l + 1),
            }),
        }
    }
    out
}

/// Expected seconds of one decode step (layers only): a CPU block overlaps the copies of the
/// first `ring_slots` streamed layers after it; other copies take turns with the kernels.
pub fn expected_step_seconds(roles: &[LayerRole], ring_slots: usize, costs: &HybridCosts) -> f64 {
    let segs = segments(roles);
    let mut t = 0.0;
    let mut overlap = 0.0; // CPU time of the block just before, which the next copies can hide in
    for seg in &segs {
        match seg {
            Segment::Cpu(r) => {
                overlap = r.len() as f64 * costs.cpu_layer_s;
                t += 2.0 * costs.handoff_s;
            }
            Segment::Gpu(r) => {
                let streamed = roles[r.clone()]
                    .iter()
                    .filter(|&&x| x == LayerRole::Streamed)
                    .count();
                let ahead = streamed.min(ring_slots) as f64 * costs.copy_layer_s;
                let inline = (streamed - streamed.min(ring_slots)) as f64 * costs.copy_layer_s;
                t += overlap.max(ahead) + inline + r.len() as f64 * costs.gpu_layer_s;
                overlap = 0.0;
            }
        }
    }
    // A CPU block at the very end has no copies to hide.
    t + overlap
}

/// The number of CPU layers (0 ..= the non-resident ones) that makes the step fastest by
/// [`expected_step_seconds`], with that time.
pub fn best_cpu_layers(
    layers: usize,
    resident: usize,
    ring_slots: usize,
    costs: &HybridCosts,
) -> (usize, f64) {
    (0..=layers - resident.min(layers))
        .map(|c| {
            let roles = layout(layers, resident, ring_slots, c);
            (c, expected_step_seconds(&roles, ring_slots, costs))
        })
        .fold(
            (0, f64::INFINITY),
            |best, x| if x.1 < best.1 { x } else { best },
        )
}

#[cfg(test)]
mod tests {
    use super::LayerRole::{Cpu, Resident as R, Streamed as S};
    use super::*;

    #[test]
    fn layout_alternates_cpu_blocks_and_ring_sized_groups() {
        assert_eq!(layout(4, 4, 2, 3), vec![R; 4]);
        assert_eq!(layout(6, 1, 2, 0), vec![R, S, S, S, S, S]);
        assert_eq!(layout(8, 1, 2, 3), vec![R, Cpu, Cpu, S, S, Cpu, S, S]);
        assert_eq!(layout(5, 0, 2, 5), vec![Cpu; 5]);
        assert_eq!(layout(6, 1, 2, 4), vec![R, Cpu, Cpu, Cpu, Cpu, S]);
        // Every group fits the ring, and the counts add up.
        for (layers, resident, slots, cpu) in [(64, 5, 2, 36), (64, 37, 2, 16), (9, 0, 1, 5)] {
            let roles = layout(layers, resident, slots, cpu);
            assert_eq!(roles.len(), layers);
            assert_eq!(roles.iter().filter(|&&r| r == Cpu).count(), cpu);
            for seg in segments(&roles) {
                if let Segment::Gpu(r) = seg {
                    let s = roles[r].iter().filter(|&&x| x == S).count();
                    assert!(s <= slots, "{roles:?}");
                }
            }
        }
    }

    #[test]
    fn segments_split_where_the_side_changes() {
        let roles = [R, R, Cpu, S, S, Cpu, Cpu];
        assert_eq!(
            segments(&roles),
            vec![
                Segment::Gpu(0..2),
                Segment::Cpu(2..3),
                Segment::Gpu(3..5),
                Segment::Cpu(5..7)
            ]
        );
    }

    #[test]
    fn the_best_split_balances_cpu_and_copies() {
        // The H200's host: a layer on the CPU 3.3 ms, its copy 5 ms.
        let costs = HybridCosts {
            cpu_layer_s: 3.3e-3,
            copy_layer_s: 5.0e-3,
            gpu_layer_s: 0.2e-3,
            handoff_s: 0.1e-3,
        };
        let (cpu, t) = best_cpu_layers(64, 5, 2, &costs);
        let streaming = expected_step_seconds(&layout(64, 5, 2, 0), 2, &costs);
        let all_cpu = expected_step_seconds(&layout(64, 5, 2, 59), 2, &costs);
        assert!(cpu > 20 && cpu < 59, "{cpu}");
        assert!(
            t < 0.6 * streaming && t < all_cpu,
            "{t} {streaming} {all_cpu}"
        );
        // A CPU layer slower than the two copies it could hide takes none.
        let slow = HybridCosts {
            cpu_layer_s: 20e-3,
            ..costs
        };
        assert_eq!(best_cpu_layers(64, 5, 2, &slow).0, 0);
        // Nothing to place when everything is resident.
        assert_eq!(best_cpu_layers(64, 64, 2, &costs).0, 0);
    }
}

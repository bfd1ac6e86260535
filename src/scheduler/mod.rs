//! Residency under a VRAM budget: which layers stay on the GPU, which stream from host memory
//! through a ring of device slots, and how one layer's INT4 matrices are packed into one buffer.

pub mod hybrid;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant::{blocks_per_row, WORDS_PER_BLOCK};

/// Offsets inside one buffer are aligned for storage bindings (min_storage_buffer_offset_alignment ≤ 256).
pub const ALIGN: u64 = 256;

fn align(x: u64) -> u64 {
    x.next_multiple_of(ALIGN)
}

/// One INT4 matrix inside a layer pack: byte offsets of its words and of its scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub qweight_offset: u64,
    pub qweight_bytes: u64,
    pub scales_offset: u64,
    pub scales_bytes: u64,
}

/// The byte layout shared by every layer (all layers have the same shapes): fused q|k|v rows,
/// o, fused gate|up rows, down. The same layout serves resident buffers and ring slots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerPack {
    pub qkv: PackedMatrix,
    pub o: PackedMatrix,
    pub gate_up: PackedMatrix,
    pub down: PackedMatrix,
    pub bytes: u64,
}

impl LayerPack {
    pub fn new(c: &ModelConfig) -> LayerPack {
        let mut at = 0u64;
        let mut place = |rows: usize, cols: usize| {
            let bpr = blocks_per_row(cols);
            let qweight_bytes = (rows * bpr * WORDS_PER_BLOCK * 4) as u64;
            let scales_bytes = (rows * bpr * 2) as u64;
            let m = PackedMatrix {
                rows,
                cols,
                qweight_offset: at,
                qweight_bytes,
                scales_offset: align(at + qweight_bytes),
                scales_bytes,
            };
            at = align(m.scales_offset + scales_bytes);
            m
        };
        let h = c.hidden_size;
        let qkv = place(c.q_dim() + 2 * c.kv_dim(), h);
        let o = place(h, c.q_dim());
        let gate_up = place(2 * c.intermediate_size, h);
        let down = place(h, c.intermediate_size);
        LayerPack {
            qkv,
            o,
            gate_up,
            down,
            bytes: at,
        }
    }

    pub fn matrices(&self) -> [&PackedMatrix; 4] {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
    }
}

/// What the planner decided, with the numbers behind it (printed by `info` and `run`).
#[derive(Clone, Debug, PartialEq)]
pub struct ResidencyPlan {
    pub budget: u64,
    /// KV cache, activations, lm_head, norms and other buffers that are always on the GPU.
    pub fixed_bytes: u64,
    pub layer_bytes: u64,
    pub layers: usize,
    pub resident_layers: usize,
    /// Device slots of the ring for streamed layers (0 when all layers are resident).
    pub ring_slots: usize,
}

impl ResidencyPlan {
    pub fn streamed_layers(&self) -> usize {
        self.layers - self.resident_layers
    }

    /// Layers 0..resident_layers stay; the rest stream.
    pub fn is_resident(&self, layer: usize) -> bool {
        layer < self.resident_layers
    }

    pub fn resident_bytes(&self) -> u64 {
        self.resident_layers as u64 * self.layer_bytes
    }

    pub fn streamed_bytes(&self) -> u64 {
        self.streamed_layers() as u64 * self.layer_bytes
    }

    pub fn device_bytes(&self) -> u64 {
        self.fixed_bytes + (self.resident_layers + self.ring_slots) as u64 * self.layer_bytes
    }

    /// DESIGN.md §5: copies and kernels serialize on one queue, so time per token is the sum of
    /// reading what is resident (and fixed) at device bandwidth and copying what streams over PCIe.
    pub fn expected_tokens_per_second(
        &self,
        device_bytes_per_s: f64,
        pcie_bytes_per_s: f64,
    ) -> f64 {
        let t = (self.resident_bytes() + self.fixed_read_bytes()) as f64 / device_bytes_per_s
            + self.streamed_bytes() as f64 / pcie_bytes_per_s;
        1.0 / t
    }

    /// Fixed bytes read per token: approximated by the fixed buffers (lm_head dominates).
    fn fixed_read_bytes(&self) -> u64 {
        self.fixed_bytes
    }

    /// The plan in one line. No speed estimate: figures of one GPU would mislead on another
    /// (`q4wgpu bench` measures the adapter at hand).
    pub fn describe(&self) -> String {
        let gb = |b: u64| b as f64 / 1e9;
        format!(
            "budget {:.2} GB: fixed {:.2} GB (buffers, and room for the driver and load-time uploads), {} of {} layers resident ({:.2} GB), {} streamed ({:.2} GB per token) through {} ring slot(s) of {:.3} GB",
            gb(self.budget),
            gb(self.fixed_bytes),
            self.resident_layers,
            self.layers,
            gb(self.resident_bytes()),
            self.streamed_layers(),
            gb(self.streamed_bytes()),
            self.ring_slots,
            gb(self.layer_bytes)
        )
    }
}

/// Plans residency: fixed buffers first, then as many layers as fit; if not all fit, the rest
/// stream through `prefetch_depth` ring slots (at least one). Refuses a budget below the minimum.
pub fn plan(
    budget: u64,
    fixed_bytes: u64,
    layer_bytes: u64,
    layers: usize,
    prefetch_depth: usize,
) -> Result<ResidencyPlan> {
    let all = fixed_bytes + layers as u64 * layer_bytes;
    if budget >= all {
        return Ok(ResidencyPlan {
            budget,
            fixed_bytes,
            layer_bytes,
            layers,
            resident_layers: layers,
            ring_slots: 0,
        });
    }
    let ring_slots = prefetch_depth.clamp(1, layers);
    let minimum = fixed_bytes + layer_bytes;
    if budget < minimum {
        return Err(Error::Invalid(format!(
            "a VRAM budget of {:.2} GB cannot run this model: the fixed buffers (KV cache, activations, lm_head, and room for the driver and load-time uploads) take {:.2} GB and one streamed layer {:.2} GB, so the minimum is {:.2} GB; raise --vram-budget or lower --ctx-size",
            budget as f64 / 1e9,
            fixed_bytes as f64 / 1e9,
            layer_bytes as f64 / 1e9,
            minimum as f64 / 1e9
        )));
    }
    // Fewer slots than asked if the budget only has room for those.
    let ring_slots = ring_slots
        .min(((budget - fixed_bytes) / layer_bytes) as usize)
        .max(1);
    let resident_layers = (((budget - fixed_bytes) / layer_bytes) as usize)
        .saturating_sub(ring_slots)
        .min(layers);
    Ok(ResidencyPlan {
        budget,
        fixed_bytes,
        layer_bytes,
        layers,
        resident_layers,
        ring_slots,
    })
}

/// Host memory the streamed layers need (they are copied into host-visible staging buffers at
/// load) must be available: a model larger than host RAM is refused up front with the numbers.
pub fn check_host_memory(plan: &ResidencyPlan) -> Result<()> {
    let Some(available) = host_memory_available() else {
        return Ok(());
    };
    let needed = plan.streamed_bytes();
    if needed > available {
        return Err(Error::Invalid(format!(
            "{} streamed layers need {:.2} GB of host memory but only {:.2} GB is available; raise --vram-budget, free memory, or use a machine with more RAM",
            plan.streamed_layers(),
            needed as f64 / 1e9,
            available as f64 / 1e9
        )));
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo (Linux); `None` elsewhere.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses "24GB", "8GiB", "512MB", "1.5G", or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::Invalid(format!(
            "{text:?} is not a size; write e.g. 24GB, 8GiB or 512MB"
        ))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(Error::Invalid(format!(
                "unknown size unit {other:?} in {text:?}; use B, KB, MB, GB, KiB, MiB or GiB"
            )))
        }
    };
    Ok((value * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_decimal_and_binary_units() {
        assert_eq!(parse_size("24GB").ok(), Some(24_000_000_000));
        assert_eq!(parse_size("8GiB").ok(), Some(8 << 30));
        assert_eq!(parse_size("1.5g").ok(), Some(1_500_000_000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }

    #[test]
    fn plan_keeps_everything_when_it_fits_and_streams_the_rest_otherwise() {
        let p = plan(100, 10, 10, 9, 2).expect("fits");
        assert_eq!((p.resident_layers, p.ring_slots), (9, 0));
        let p = plan(75, 10, 10, 9, 2).expect("streams");
        assert_eq!((p.resident_layers, p.ring_slots), (4, 2));
        assert!(p.device_bytes() <= 75);
        let p = plan(25, 10, 10, 9, 2).expect("one slot");
        assert_eq!((p.resident_layers, p.ring_slots), (0, 1));
        let err = plan(15, 10, 10, 9, 2).expect_err("too small").to_string();
        assert!(err.contains("minimum is"), "{err}");
    }
}

//! Several sequences on one engine (`serve --parallel N`): the kernels are bound to one working
//! KV cache per layer, so each sequence keeps a saved copy of its cache and `select_kv_slot`
//! swaps it in: the positions the current sequence wrote since it was loaded are copied out, the
//! next sequence's positions copied in (GPU copies of `len × kv_dim` f16 values per layer, the
//! same order of bytes the attention of one step reads). Copies are exact, so a sequence's logits
//! do not depend on what ran in between.
//!
//! This interleaves single-sequence steps. One pass over the weights for all sequences needs the
//! decode step to take up to 8 tokens of different sequences (the prompt-chunk GEMM path) with
//! attention per sequence over its own cache region; then these copies go away.

use super::GpuModel;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// The saved caches and which sequence the working cache holds.
pub struct KvSlots {
    /// Per slot, per layer: saved (K, V) caches, the working caches' layout. Empty with one slot.
    saved: Vec<Vec<(wgpu::Buffer, wgpu::Buffer)>>,
    /// Tokens each slot holds (the active one's count is the engine's `position`).
    len: Vec<usize>,
    active: usize,
    /// First position of the working cache written since the active slot was loaded.
    dirty_from: usize,
}

impl KvSlots {
    /// Full KV caches allocated besides the working one for `slots` sequences.
    pub fn saved_copies(slots: usize) -> usize {
        if slots > 1 {
            slots
        } else {
            0
        }
    }

    pub(super) fn new(
        gpu: &Gpu,
        working: &[(wgpu::Buffer, wgpu::Buffer)],
        slots: usize,
    ) -> Result<KvSlots> {
        if slots == 0 {
            return Err(Error::Invalid("the engine needs at least one KV slot".into()));
        }
        let saved = (0..Self::saved_copies(slots))
            .map(|s| {
                working
                    .iter()
                    .enumerate()
                    .map(|(l, (k, v))| {
                        (
                            gpu.storage_buffer(&format!("slot {s} k cache {l}"), k.size()),
                            gpu.storage_buffer(&format!("slot {s} v cache {l}"), v.size()),
                        )
                    })
                    .collect()
            })
            .collect();
        Ok(KvSlots {
            saved,
            len: vec![0; slots],
            active: 0,
            dirty_from: 0,
        })
    }
}

impl GpuModel<'_> {
    /// Sequences the engine keeps KV caches for (`EngineOptions::kv_slots`).
    pub fn kv_slots(&self) -> usize {
        self.slots.len.len()
    }

    /// Tokens `slot` holds.
    pub fn slot_len(&self, slot: usize) -> usize {
        if slot == self.slots.active {
            self.position
        } else {
            self.slots.len.get(slot).copied().unwrap_or(0)
        }
    }

    /// Keeps only the first `len` tokens of the current sequence (the prompt cache reuses them).
    pub fn truncate(&mut self, len: usize) {
        self.position = self.position.min(len);
        self.slots.dirty_from = self.slots.dirty_from.min(self.position);
    }

    /// Makes `slot` the sequence that `step`, `logits` and `truncate` act on.
    pub fn select_kv_slot(&mut self, slot: usize) -> Result<()> {
        let n = self.kv_slots();
        if slot >= n {
            return Err(Error::Invalid(format!(
                "KV slot {slot} does not exist (the engine has {n})"
            )));
        }
        if slot == self.slots.active {
            return Ok(());
        }
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kv slot swap"),
            });
        let (old, from) = (self.slots.active, self.slots.dirty_from);
        self.copy_positions(&mut enc, old, from, self.position, true);
        self.slots.len[old] = self.position;
        let len = self.slots.len[slot];
        self.copy_positions(&mut enc, slot, 0, len, false);
        self.gpu.queue.submit([enc.finish()]);
        self.slots.active = slot;
        self.slots.dirty_from = len;
        self.position = len;
        Ok(())
    }

    /// Records copies of positions `from..to` between the working caches and `slot`'s saved
    /// ones (`save`: working → saved). Layout `[kv_head][ctx][head_dim]` in f16.
    fn copy_positions(
        &self,
        enc: &mut wgpu::CommandEncoder,
        slot: usize,
        from: usize,
        to: usize,
        save: bool,
    ) {
        if from >= to {
            return;
        }
        let row = (self.config.head_dim() * 2) as u64;
        let ctx = self.opts.ctx_size as u64;
        for ((wk, wv), (sk, sv)) in self.kv.iter().zip(&self.slots.saved[slot]) {
            for (work, saved) in [(wk, sk), (wv, sv)] {
                let (src, dst) = if save { (work, saved) } else { (saved, work) };
                for head in 0..self.config.num_kv_heads() as u64 {
                    let offset = (head * ctx + from as u64) * row;
                    let size = (to - from) as u64 * row;
                    enc.copy_buffer_to_buffer(src, offset, dst, offset, size);
                }
            }
        }
    }
}

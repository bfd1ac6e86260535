//! Several sequences on one engine (`serve --parallel N`). Each layer has one buffer per K and V
//! holding every sequence's cache, slot s in region s (`[slot][kv_head][ctx][head_dim]` f16).
//! The batched decode step (`batch.rs`) reads and writes those regions directly: one pass over
//! the weights for all its sequences. The one-sequence kernels (prompt chunks, a lone step) are
//! bound to a working cache per layer, so `select_kv_slot` swaps a sequence in: the positions the
//! current sequence wrote since it was loaded are copied out to its region, the next sequence's
//! copied in (GPU copies of `len × kv_dim` f16 values per layer). Before a batched step the
//! working cache is "parked": its new positions saved, after which it holds no sequence until the
//! next selection. Copies are exact, so a sequence's logits do not depend on what ran in between.

use super::GpuModel;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// The slots' caches and which sequence the working cache holds.
pub struct KvSlots {
    /// Per layer: (K, V) of every slot, slot s at `s * region_bytes`. Empty with one slot.
    saved: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    /// Bytes of one slot's region (the working cache's size).
    region_bytes: u64,
    /// Tokens each slot holds (the active one's count is the engine's `position` unless parked).
    len: Vec<usize>,
    active: usize,
    /// First position of the working cache written since the active slot was loaded.
    dirty_from: usize,
    /// The working cache is not in use: every slot is whole in its region (the working cache
    /// still holds the active slot's first `parked_valid` positions).
    parked: bool,
    parked_valid: usize,
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
            return Err(Error::Invalid(
                "the engine needs at least one KV slot".into(),
            ));
        }
        let region_bytes = working.first().map_or(0, |(k, _)| k.size());
        let total = region_bytes * Self::saved_copies(slots) as u64;
        if total > gpu.limits.max_buffer_size {
            return Err(Error::Invalid(format!(
                "{slots} sequences' KV caches take {total} bytes per layer, more than this GPU's \
                 largest buffer ({}): use fewer parallel sequences or a smaller context",
                gpu.limits.max_buffer_size
            )));
        }
        let saved = match Self::saved_copies(slots) {
            0 => Vec::new(),
            _ => (0..working.len())
                .map(|l| {
                    (
                        gpu.storage_buffer(&format!("slots' k cache {l}"), total),
                        gpu.storage_buffer(&format!("slots' v cache {l}"), total),
                    )
                })
                .collect(),
        };
        Ok(KvSlots {
            saved,
            region_bytes,
            len: vec![0; slots],
            active: 0,
            dirty_from: 0,
            parked: false,
            parked_valid: 0,
        })
    }

    /// The slot the one-sequence steps act on.
    pub(super) fn active(&self) -> usize {
        self.active
    }

    /// Layer `l`'s caches of every slot (the batched step binds them); `None` with one slot.
    pub(super) fn layer(&self, l: usize) -> Option<&(wgpu::Buffer, wgpu::Buffer)> {
        self.saved.get(l)
    }
}

impl GpuModel<'_> {
    /// Sequences the engine keeps KV caches for (`EngineOptions::kv_slots`).
    pub fn kv_slots(&self) -> usize {
        self.slots.len.len()
    }

    /// Tokens `slot` holds.
    pub fn slot_len(&self, slot: usize) -> usize {
        if slot == self.slots.active && !self.slots.parked {
            self.position
        } else {
            self.slots.len.get(slot).copied().unwrap_or(0)
        }
    }

    /// Keeps only the first `len` tokens of the current sequence (the prompt cache reuses them).
    pub fn truncate(&mut self, len: usize) {
        if self.slots.parked {
            let active = &mut self.slots.len[self.slots.active];
            *active = (*active).min(len);
            self.slots.parked_valid = self.slots.parked_valid.min(len);
            return;
        }
        self.position = self.position.min(len);
        self.slots.dirty_from = self.slots.dirty_from.min(self.position);
        if let Some(hy) = self.hybrid.as_mut() {
            hy.truncate(len);
        }
    }

    /// Makes `slot` the sequence that `step`, `logits` and `truncate` act on.
    pub fn select_kv_slot(&mut self, slot: usize) -> Result<()> {
        let n = self.kv_slots();
        if slot >= n {
            return Err(Error::Invalid(format!(
                "KV slot {slot} does not exist (the engine has {n})"
            )));
        }
        if slot == self.slots.active && !self.slots.parked {
            return Ok(());
        }
        self.park();
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kv slot swap"),
            });
        self.slots.parked = false;
        let len = self.slots.len[slot];
        // What the working cache still holds of the slot parked in it need not be copied again.
        let from = match slot == self.slots.active {
            true => self.slots.parked_valid.min(len),
            false => 0,
        };
        self.copy_positions(&mut enc, slot, from, len, false);
        self.gpu.queue.submit([enc.finish()]);
        self.slots.active = slot;
        self.slots.dirty_from = len;
        self.position = len;
        Ok(())
    }

    /// Saves the active slot's new positions to its region; the working cache then holds no
    /// slot (a batched step is about to change the regions).
    pub(super) fn park(&mut self) {
        if self.slots.parked || self.slots.saved.is_empty() {
            return;
        }
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kv slot park"),
            });
        let (old, from) = (self.slots.active, self.slots.dirty_from);
        self.copy_positions(&mut enc, old, from, self.position, true);
        self.gpu.queue.submit([enc.finish()]);
        self.slots.len[old] = self.position;
        self.slots.parked = true;
        self.slots.parked_valid = self.position;
    }

    /// Every slot's length, for a batched step on parked caches (see [`Self::park`]).
    pub(super) fn parked_lens(&mut self) -> &mut [usize] {
        debug_assert!(self.slots.parked);
        &mut self.slots.len
    }

    /// Byte offset and size of positions `from..to` of KV head `head` in one layer's K or V
    /// cache, laid out `[kv_head][ctx][head_dim]` in f16.
    pub(super) fn kv_head_bytes(&self, head: usize, from: usize, to: usize) -> (u64, u64) {
        let row = (self.config.head_dim() * 2) as u64;
        let start = (head * self.opts.ctx_size + from) as u64 * row;
        (start, to.saturating_sub(from) as u64 * row)
    }

    /// Records copies of positions `from..to` between the working caches and `slot`'s region
    /// (`save`: working → region). Layout `[kv_head][ctx][head_dim]` in f16.
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
        let region = slot as u64 * self.slots.region_bytes;
        for ((wk, wv), (sk, sv)) in self.kv.iter().zip(&self.slots.saved) {
            for (work, saved) in [(wk, sk), (wv, sv)] {
                for head in 0..self.config.num_kv_heads() {
                    let (offset, size) = self.kv_head_bytes(head, from, to);
                    if save {
                        enc.copy_buffer_to_buffer(work, offset, saved, region + offset, size);
                    } else {
                        enc.copy_buffer_to_buffer(saved, region + offset, work, offset, size);
                    }
                }
            }
        }
    }
}

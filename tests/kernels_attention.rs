//! Attention kernels against a CPU reference: f64 causal softmax attention over the same
//! f16-rounded K/V values the GPU reads. The cache is filled directly by the test (packed f16);
//! positions past `kv_len` hold f16 NaN and query rows past `n_tokens` hold NaN, so a kernel that
//! reads either fails. Outputs start as NaN: rows past `n_tokens` must stay NaN.
//!
//! Tolerance: max |got − want| ≤ TOL × max |want|. The GPU computes scores, exponentials and sums
//! in f32 in a different order (tiles, splits); errors seen are around 1e-6. A wrong scale, mask or
//! rescaling changes outputs by far more than TOL.

use half::f16;
use q4wgpu::gpu::testing::{assert_close, gpu, poisoned, run_dispatches, Rng};
use q4wgpu::kernels::attention::{Attention, AttentionDispatches, DecodeKernel, DecodeOptions};
use q4wgpu::kernels::quant_act::{ActInput, ActQ8Buffers, QuantAct};
use q4wgpu::kernels::{Dispatch, StepParams};
use std::sync::OnceLock;

const TOL: f32 = 3e-5;

fn attention() -> &'static Attention {
    static ATT: OnceLock<Attention> = OnceLock::new();
    ATT.get_or_init(|| Attention::new(gpu()).expect("attention kernels"))
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    ctx: usize,
    m_max: usize,
}

impl Shape {
    fn row(&self) -> usize {
        self.n_heads * self.head_dim
    }
}

/// One bound attention over random inputs: `q` rows `0..n_tokens` random (rows past it NaN),
/// cache positions `0..kv_len` random f16 values (as f32 for the reference), the rest f16 NaN.
struct Case {
    shape: Shape,
    pos: usize,
    n_tokens: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out: wgpu::Buffer,
    step: wgpu::Buffer,
    att: AttentionDispatches,
    _inputs: [wgpu::Buffer; 3],
}

/// Packs f32 values (already f16-exact) two per word, the first in the low half (pack2x16float).
fn pack_f16(values: &[f32]) -> Vec<u32> {
    values
        .chunks(2)
        .map(|p| {
            f16::from_f32(p[0]).to_bits() as u32 | (f16::from_f32(p[1]).to_bits() as u32) << 16
        })
        .collect()
}

fn random_cache(rng: &mut Rng, s: &Shape, kv_len: usize) -> Vec<f32> {
    let mut c = vec![f32::NAN; s.n_kv_heads * s.ctx * s.head_dim];
    for kvh in 0..s.n_kv_heads {
        for p in 0..kv_len {
            for d in 0..s.head_dim {
                c[(kvh * s.ctx + p) * s.head_dim + d] = f16::from_f32(rng.normal(1.0)).to_f32();
            }
        }
    }
    c
}

/// f64 attention of one query row (all heads) over positions `0..len` of caches laid out
/// `[kv_head][ctx][head_dim]`: the reference every decode kernel is checked against.
fn attend(s: &Shape, q: &[f32], k: &[f32], v: &[f32], len: usize) -> Vec<f32> {
    let (hd, group) = (s.head_dim, s.n_heads / s.n_kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0.0f32; s.row()];
    for h in 0..s.n_heads {
        let kvh = h / group;
        let qrow = &q[h * hd..][..hd];
        let cache_row = |c: &[f32], p: usize| c[(kvh * s.ctx + p) * hd..][..hd].to_vec();
        let scores: Vec<f64> = (0..len)
            .map(|p| {
                cache_row(k, p)
                    .iter()
                    .zip(qrow)
                    .map(|(&k, &q)| k as f64 * q as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        for d in 0..hd {
            let o: f64 = (0..len)
                .map(|p| weights[p] * v[(kvh * s.ctx + p) * hd + d] as f64)
                .sum();
            out[h * hd + d] = (o / total) as f32;
        }
    }
    out
}

impl Case {
    fn new(what: &str, shape: Shape, pos: usize, n_tokens: usize, q_std: f32) -> Case {
        Case::with(attention(), what, shape, pos, n_tokens, q_std)
    }

    fn with(
        kernels: &Attention,
        what: &str,
        shape: Shape,
        pos: usize,
        n_tokens: usize,
        q_std: f32,
    ) -> Case {
        let g = gpu();
        let mut rng = Rng::fresh(what);
        let kv_len = pos + n_tokens;
        let mut q = vec![f32::NAN; shape.m_max * shape.row()];
        for x in &mut q[..n_tokens * shape.row()] {
            *x = rng.normal(q_std);
        }
        let k = random_cache(&mut rng, &shape, kv_len);
        let v = random_cache(&mut rng, &shape, kv_len);
        let q_buf = g.storage_from("q", &q);
        let k_buf = g.storage_from("k_cache", &pack_f16(&k));
        let v_buf = g.storage_from("v_cache", &pack_f16(&v));
        let out = poisoned(g, "out", shape.m_max * shape.row());
        let step_value = StepParams {
            pos: pos as u32,
            n_tokens: n_tokens as u32,
            kv_len: kv_len as u32,
            _pad: 0,
        };
        let step = g.uniform("step", &step_value);
        let att = kernels
            .bind(
                g,
                &q_buf,
                &k_buf,
                &v_buf,
                &out,
                shape.n_heads,
                shape.n_kv_heads,
                shape.head_dim,
                shape.ctx,
                shape.m_max,
                &step,
            )
            .expect("bind attention");
        Case {
            shape,
            pos,
            n_tokens,
            q,
            k,
            v,
            out,
            step,
            att,
            _inputs: [q_buf, k_buf, v_buf],
        }
    }

    /// Runs `dispatches` on a NaN-filled output and reads all `m_max` rows back.
    fn run(&self, dispatches: &[Dispatch]) -> Vec<f32> {
        let g = gpu();
        let n = self.shape.m_max * self.shape.row();
        g.queue
            .write_buffer(&self.out, 0, bytemuck::cast_slice(&vec![f32::NAN; n]));
        run_dispatches(g, dispatches);
        g.read_f32(&self.out, n).expect("read attention output")
    }

    /// f64 causal attention for the step's tokens: `n_tokens` rows.
    fn reference(&self) -> Vec<f32> {
        let row = self.shape.row();
        (0..self.n_tokens)
            .flat_map(|t| {
                let q = &self.q[t * row..(t + 1) * row];
                attend(&self.shape, q, &self.k, &self.v, self.pos + t + 1)
            })
            .collect()
    }

    /// Rows `0..n_tokens` match the reference; rows past them are still NaN.
    #[track_caller]
    fn check(&self, what: &str, got: &[f32]) {
        let n = self.n_tokens * self.shape.row();
        assert_close(what, &got[..n], &self.reference(), TOL);
        if let Some(i) = got[n..].iter().position(|x| !x.is_nan()) {
            panic!(
                "{what}: output row {} (past n_tokens = {}) was written",
                (n + i) / self.shape.row(),
                self.n_tokens
            );
        }
    }
}

fn shape(n_heads: usize, n_kv_heads: usize, head_dim: usize, ctx: usize, m_max: usize) -> Shape {
    Shape {
        n_heads,
        n_kv_heads,
        head_dim,
        ctx,
        m_max,
    }
}

fn check_decode(shape: Shape, kv_len: usize, q_std: f32) {
    check_decode_with(attention(), shape, kv_len, q_std);
}

fn check_decode_with(kernels: &Attention, shape: Shape, kv_len: usize, q_std: f32) {
    let what = format!("decode {shape:?} kv_len {kv_len} q_std {q_std}");
    let case = Case::with(kernels, &what, shape, kv_len - 1, 1, q_std);
    let got = case.run(&case.att.decode);
    case.check(&what, &got);
}

/// Attention whose decode splits into few workgroups: long sequences then split by the most
/// positions a split holds, so each split covers several tiles and the last one is partial.
fn few_splits() -> &'static Attention {
    static ATT: OnceLock<Attention> = OnceLock::new();
    ATT.get_or_init(|| {
        let options = DecodeOptions {
            target_workgroups: 2,
            ..DecodeOptions::default()
        };
        Attention::with_decode(gpu(), options).expect("attention kernels")
    })
}

/// The grouped flash-decoding kernel (shaders/attention_decode.wgsl, the default decode) against
/// the CPU reference on odd lengths.
#[test]
fn decode_odd_lengths_across_gqa_groups_and_head_dims() {
    // GQA groups 1, 5 (Qwen2-32B: 40 / 8, head dim 128) and 7 (Qwen2.5-0.5B: 14 / 2, head dim 64).
    let shapes = [
        shape(2, 2, 128, 300, 1),
        shape(10, 2, 128, 300, 1),
        shape(14, 2, 64, 300, 1),
        shape(7, 1, 128, 300, 1),
        shape(5, 1, 64, 300, 1),
    ];
    for s in shapes {
        for kv_len in [1, 2, 31, 257] {
            check_decode(s, kv_len, 1.5);
        }
    }
}

#[test]
fn decode_long_sequences_cross_many_splits() {
    let att = attention();
    // The 32B shape: 8 KV heads of 5 query heads, head dim 128.
    let s = shape(40, 8, 128, 2100, 1);
    let layout = att.decode_layout(40, 8, 128, 2049).expect("layout");
    assert!(layout.splits >= 16, "2049 positions in {layout:?}");
    check_decode(s, 2049, 1.0);
    let s = shape(14, 2, 64, 4200, 1);
    assert!(att.decode_layout(14, 2, 64, 4099).expect("layout").splits >= 16);
    check_decode(s, 4099, 1.0);
}

#[test]
fn decode_splits_of_several_tiles() {
    // Splits of up to 256 (head dim 128, 5 heads) or 512 positions, the last tile partial.
    let att = few_splits();
    for (s, kv_len) in [
        (shape(10, 2, 128, 2000, 1), 1999),
        (shape(14, 2, 64, 1500, 1), 1283),
        (shape(4, 1, 128, 1500, 1), 1057),
        (shape(9, 3, 32, 1100, 1), 1100),
    ] {
        let layout = att
            .decode_layout(s.n_heads, s.n_kv_heads, s.head_dim, kv_len)
            .expect("layout");
        assert!(
            layout.splits >= 3 && layout.chunk >= 128,
            "{s:?} at {kv_len}: {layout:?}"
        );
        check_decode_with(att, s, kv_len, 2.0);
    }
}

#[test]
fn legacy_decode_kernel_still_matches() {
    // The bench's A/B baseline.
    static ATT: OnceLock<Attention> = OnceLock::new();
    let att = ATT.get_or_init(|| {
        let options = DecodeOptions {
            kernel: DecodeKernel::Legacy,
            ..DecodeOptions::default()
        };
        Attention::with_decode(gpu(), options).expect("attention kernels")
    });
    check_decode_with(att, shape(10, 2, 128, 700, 1), 613, 1.0);
    check_decode_with(att, shape(14, 2, 64, 41, 1), 37, 1.0);
}

#[test]
fn decode_without_the_v_tail_guard_still_matches() {
    // The bench's A/B baseline for the guarded V prefetch (DecodeOptions::v_tail_guard).
    let options = DecodeOptions {
        v_tail_guard: false,
        ..DecodeOptions::default()
    };
    let att = Attention::with_decode(gpu(), options).expect("attention kernels");
    check_decode_with(&att, shape(10, 2, 128, 700, 1), 613, 1.0);
    check_decode_with(&att, shape(9, 3, 32, 41, 1), 37, 1.0);
}

#[test]
fn decode_short_sequences() {
    // 14 query heads over 2 KV heads, as Qwen2.5-0.5B.
    for kv_len in [1, 2, 37] {
        check_decode(shape(14, 2, 64, 41, 1), kv_len, 1.0);
    }
    check_decode(shape(3, 1, 32, 5, 1), 2, 1.0);
}

#[test]
fn decode_long_sequences_across_gqa_ratios_and_head_dims() {
    check_decode(shape(7, 1, 128, 301, 1), 300, 1.0);
    check_decode(shape(9, 3, 32, 1000, 1), 1000, 1.0);
    check_decode(shape(5, 5, 64, 1013, 1), 1000, 1.0);
    check_decode(shape(14, 2, 128, 1000, 1), 1000, 1.0);
}

#[test]
fn decode_with_sharp_softmax() {
    // Scores with a spread of about ±40: exp overflows unless each split and the combine subtract
    // a running max.
    check_decode(shape(14, 2, 64, 700, 1), 650, 12.0);
}

#[test]
fn decode_past_4096_positions() {
    // With 8 KV heads the splits per head are capped at 64, so a split covers several tiles and
    // the last one is partial.
    check_decode(shape(8, 8, 64, 5003, 1), 4101, 1.0);
    check_decode(shape(7, 1, 128, 5000, 1), 4999, 1.0);
    // One KV head: about 160 splits, more than the combine has threads.
    check_decode(shape(7, 1, 32, 20_000, 1), 19_999, 1.0);
}

#[test]
fn decode_with_more_than_eight_heads_per_kv_head() {
    // 9 query heads per KV head: two workgroups per KV head (5 and 4 heads).
    check_decode(shape(18, 2, 32, 300, 1), 257, 1.0);
}

#[test]
fn prefill_causal_chunks() {
    let shapes = [
        shape(14, 2, 64, 127, 16),
        shape(7, 1, 128, 123, 16),
        shape(9, 3, 32, 120, 16),
        shape(4, 4, 64, 117, 16),
    ];
    for s in shapes {
        for pos in [0, 100] {
            for n_tokens in [1, 5, 16] {
                let what = format!("prefill {s:?} pos {pos} n_tokens {n_tokens}");
                let case = Case::new(&what, s, pos, n_tokens, 2.0);
                let got = case.run(&case.att.prefill);
                case.check(&what, &got);
            }
        }
    }
}

#[test]
fn prefill_long_prompt_with_sharp_softmax() {
    // Several key tiles per row and scores far from 0.
    let what = "prefill long";
    let case = Case::new(what, shape(14, 2, 64, 400, 37), 333, 37, 12.0);
    let got = case.run(&case.att.prefill);
    case.check(what, &got);
}

#[test]
fn decode_and_prefill_agree_on_one_token() {
    for s in [shape(14, 2, 64, 300, 16), shape(3, 3, 128, 300, 4)] {
        let what = format!("one token {s:?}");
        let case = Case::new(&what, s, 211, 1, 2.0);
        let decode = case.run(case.att.for_tokens(1));
        let prefill = case.run(&case.att.prefill);
        case.check(&format!("{what} decode"), &decode);
        case.check(&format!("{what} prefill"), &prefill);
        let n = s.row();
        assert_close(
            &format!("{what}: decode against prefill"),
            &decode[..n],
            &prefill[..n],
            TOL,
        );
    }
}

#[test]
fn decode_splits_follow_kv_len() {
    // One binding, run at growing lengths: the split layout is recomputed from kv_len each step.
    let s = shape(7, 1, 64, 2000, 1);
    let mut case = Case::new("growing", s, 1999, 1, 1.0);
    for kv_len in [1usize, 64, 65, 900, 2000] {
        case.pos = kv_len - 1;
        let step = StepParams {
            pos: case.pos as u32,
            n_tokens: 1,
            kv_len: kv_len as u32,
            _pad: 0,
        };
        gpu()
            .queue
            .write_buffer(&case.step, 0, bytemuck::bytes_of(&step));
        let got = case.run(&case.att.decode);
        case.check(&format!("growing, kv_len {kv_len}"), &got);
    }
}

#[test]
fn bind_refuses_unsupported_shapes() {
    let g = gpu();
    let buf = g.storage_buffer("any", 1 << 20);
    let step = g.uniform("step", &StepParams::default());
    let bind = |n_heads, n_kv_heads, head_dim, ctx, m_max| {
        attention()
            .bind(
                g, &buf, &buf, &buf, &buf, n_heads, n_kv_heads, head_dim, ctx, m_max, &step,
            )
            .err()
            .map(|e| e.to_string())
    };
    let err = bind(4, 4, 96, 16, 1).expect("head_dim 96 must be refused");
    assert!(
        err.contains("head_dim 96") && err.contains("[32, 64, 128]"),
        "{err}"
    );
    let err = bind(10, 3, 64, 16, 1).expect("10 heads over 3 KV heads must be refused");
    assert!(err.contains("10 query heads"), "{err}");
    let err = bind(8, 8, 128, 100_000, 1).expect("a cache larger than the buffer must be refused");
    assert!(err.contains("k_cache"), "{err}");
    assert!(
        bind(8, 8, 128, 64, 4).is_none(),
        "a shape that fits must bind"
    );
}

/// Int8 buffers of `capacity` values, every byte 0xFF (int8 -1, NaN scales).
fn poisoned_q8(capacity: usize) -> ActQ8Buffers {
    let g = gpu();
    let b = ActQ8Buffers::new(g, "poisoned q8", capacity);
    for buf in [&b.words, &b.scales] {
        let ones = vec![0xFFu8; buf.size() as usize];
        g.queue.write_buffer(buf, 0, &ones);
    }
    b
}

fn read_words(b: &wgpu::Buffer) -> Vec<u32> {
    bytemuck::pod_collect_to_vec(&gpu().read_bytes(b, 0, b.size()).expect("read back"))
}

/// The combine that also writes the o projection's int8 input (DecodeFusion::attention_combine):
/// its f32 output still matches the reference, and its int8 blocks and scales are bit-identical
/// to what quant_act makes of that output, padding blocks (to weight blocks of 128) included;
/// nothing past them is written. Head dims 32, 64, 128; q_dim 96 and 320 need padding.
#[test]
fn decode_combine_writes_the_o_input_in_int8() {
    let g = gpu();
    let quant = QuantAct::new(g).expect("quant_act compiles");
    for (s, kv_len) in [
        (shape(3, 1, 32, 40, 1), 37),
        (shape(5, 1, 64, 300, 1), 257),
        (shape(10, 2, 128, 300, 1), 31),
        (shape(14, 2, 64, 2100, 1), 2049),
    ] {
        let what = format!("int8 combine {s:?} kv_len {kv_len}");
        let case = Case::new(&what, s, kv_len - 1, 1, 1.5);
        let q_dim = s.row();
        // Room past the padding, to see that nothing there is written.
        let fused = poisoned_q8(q_dim + 512);
        let ds = attention()
            .decode_q8_output(g, &case.att, &fused)
            .expect("bind")
            .expect("the grouped decode writes int8");
        let got = case.run(&ds);
        case.check(&what, &got);
        let separate = poisoned_q8(q_dim + 512);
        run_dispatches(
            gpu(),
            &[quant
                .bind(g, ActInput::Plain, &case.out, q_dim, &separate)
                .expect("quant_act binds")],
        );
        let blocks = q_dim.div_ceil(128) * 4;
        let (fw, sw) = (read_words(&fused.words), read_words(&separate.words));
        let (fs, ss) = (read_words(&fused.scales), read_words(&separate.scales));
        assert!(
            fw[..8 * blocks] == sw[..8 * blocks],
            "{what}: int8 words differ"
        );
        assert!(
            fs[..2 * blocks] == ss[..2 * blocks],
            "{what}: scales differ"
        );
        assert!(
            fw[8 * blocks..]
                .iter()
                .chain(&fs[2 * blocks..])
                .all(|&w| w == u32::MAX),
            "{what}: wrote past the padded input"
        );
        // The zero padding and real blocks are there (not both kernels leaving poison).
        assert!(fs[..2 * blocks].iter().all(|&w| w != u32::MAX), "{what}");
    }
    // The legacy decode kernel has no int8 combine: the engine quantizes separately.
    let legacy = Attention::with_decode(
        g,
        DecodeOptions {
            kernel: DecodeKernel::Legacy,
            ..DecodeOptions::default()
        },
    )
    .expect("attention kernels");
    let case = Case::with(&legacy, "legacy int8", shape(4, 1, 64, 40, 1), 10, 1, 1.0);
    let xq = poisoned_q8(256);
    assert!(legacy
        .decode_q8_output(g, &case.att, &xq)
        .expect("no error")
        .is_none());
    let small = poisoned_q8(128);
    let case = Case::new("small int8", shape(4, 1, 64, 40, 1), 10, 1, 1.0);
    let e = attention()
        .decode_q8_output(g, &case.att, &small)
        .err()
        .expect("256 values into buffers for 128");
    assert!(e.to_string().contains("hold 128"), "{e}");
}

/// The batched decode (`Attention::bind_batch_decode`: attention_decode.wgsl with
/// batch_step.wgsl's rows uniform): rows of different lengths, each in its own slot of caches that
/// hold three sequences, in an order unlike the slots', match the reference attention over that
/// slot alone; the bound row past `n_rows` stays NaN.
#[test]
fn batched_decode_rows_attend_over_their_own_slots() {
    use q4wgpu::kernels::BatchStep;
    let g = gpu();
    let mut rng = Rng::fresh("batched decode");
    let s = shape(10, 2, 64, 300, 1);
    // (slot, positions held after this step), one per live row; one more row is bound.
    let live = [(2usize, 257usize), (0, 1), (1, 130)];
    let (slots, bound) = (3, live.len() + 1);
    let mut by_slot: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); slots];
    for &(slot, len) in &live {
        by_slot[slot] = (
            random_cache(&mut rng, &s, len),
            random_cache(&mut rng, &s, len),
        );
    }
    let k_all: Vec<f32> = by_slot.iter().flat_map(|c| c.0.clone()).collect();
    let v_all: Vec<f32> = by_slot.iter().flat_map(|c| c.1.clone()).collect();
    let mut q = vec![f32::NAN; bound * s.row()];
    for x in &mut q[..live.len() * s.row()] {
        *x = rng.normal(1.0);
    }
    let q_buf = g.storage_from("q rows", &q);
    let k_buf = g.storage_from("k caches", &pack_f16(&k_all));
    let v_buf = g.storage_from("v caches", &pack_f16(&v_all));
    let out = poisoned(g, "out rows", bound * s.row());
    let rows: Vec<(usize, usize)> = live.iter().map(|&(slot, len)| (slot, len - 1)).collect();
    let batch = g.uniform("batch rows", &BatchStep::new(&rows));
    let heads = (s.n_heads, s.n_kv_heads, s.head_dim);
    let ds = attention()
        .bind_batch_decode(
            g,
            &q_buf,
            [&k_buf, &v_buf],
            &out,
            heads,
            s.ctx,
            slots,
            bound,
            &batch,
        )
        .expect("bind batched decode");
    run_dispatches(g, &ds);
    let got = g.read_f32(&out, bound * s.row()).expect("read rows");
    for (r, &(slot, len)) in live.iter().enumerate() {
        let q_row = &q[r * s.row()..(r + 1) * s.row()];
        let want = attend(&s, q_row, &by_slot[slot].0, &by_slot[slot].1, len);
        let what = format!("batched decode row {r} (slot {slot}, {len} positions)");
        assert_close(&what, &got[r * s.row()..(r + 1) * s.row()], &want, TOL);
    }
    let past = &got[live.len() * s.row()..];
    assert!(
        past.iter().all(|x| x.is_nan()),
        "the row past n_rows was written"
    );
}

//! GGUF reader: block formats on hand-built blocks, header round trips through a small writer
//! below, corrupt files (each a clear error, never a panic), the config and weights of real files.

use half::{bf16, f16};
use q4wgpu::formats::gguf::{
    config_from_gguf, dequantize, is_gguf_file, llama_rope_permute, llama_rope_unpermute,
    read_header, GgmlType, GgufFile, GgufSource, MetaValue,
};
use q4wgpu::weights::WeightSource;
use q4wgpu::{Error, ModelConfig};
use rand::{Rng, RngCore};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A real model file, fetched into the cache (once) by the same fetcher the CLI uses.
fn real_model(name: &str) -> PathBuf {
    let known = q4wgpu::fetch::KNOWN_MODELS
        .iter()
        .find(|m| m.file_name == name)
        .unwrap_or_else(|| panic!("{name} is not a model the fetcher knows"));
    q4wgpu::fetch::ensure(known).unwrap_or_else(|e| panic!("fetching {name}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// A minimal GGUF writer (little-endian), written from the format description in gguf.rs.

struct TestTensor {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
}

impl TestTensor {
    fn new(name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> TestTensor {
        TestTensor {
            name: name.into(),
            dims: dims.to_vec(),
            type_id: ty.id(),
            data,
        }
    }

    fn f32(name: &str, dims: &[u64], values: &[f32]) -> TestTensor {
        TestTensor::new(
            name,
            dims,
            GgmlType::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }
}

fn meta_type(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.extend(x.to_le_bytes()),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(items) => {
            // An empty array is written as an array of u8.
            out.extend(items.first().map_or(0, meta_type).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
    }
}

/// A GGUF file: the alignment is taken from `general.alignment` in `meta` (default 32).
fn gguf_bytes(version: u32, meta: &[(&str, MetaValue)], tensors: &[TestTensor]) -> Vec<u8> {
    let align = meta
        .iter()
        .find(|(k, _)| *k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .unwrap_or(32) as usize;
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        out.extend(meta_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(t.type_id.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().next_multiple_of(align), 0);
    }
    out
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("q4wgpu-gguf-{}-{name}.gguf", std::process::id()));
    std::fs::write(&path, bytes).expect("writing a test file to the temp dir");
    path
}

fn err_msg<T>(r: q4wgpu::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Block formats. Each test builds blocks from element-level values with its own encoder and
// compares with the format's formula. The decoder does the same f32 operations, so the results
// should be equal; the tolerance (1e-6 relative) only spares us from depending on association order.

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Each element within 1e-6 of |want| (at least 1e-12 absolute); a NaN or infinity on either
/// side fails. The message gives the first bad index and the largest errors.
#[track_caller]
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let (mut first_bad, mut bad, mut max_abs, mut max_rel) = (None, 0usize, 0.0f32, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = if g.is_finite() && w.is_finite() {
            (g - w).abs()
        } else {
            f32::INFINITY
        };
        let rel = err / w.abs().max(1e-6);
        if !(rel <= 1e-6) {
            bad += 1;
            first_bad.get_or_insert(i);
        }
        (max_abs, max_rel) = (max_abs.max(err), max_rel.max(rel));
    }
    if let Some(i) = first_bad {
        panic!(
            "{what}: first bad element {i}: got {}, want {}; {bad} bad of {}; max abs error {max_abs:e}, \
             max relative error {max_rel:e} (tolerance 1e-6)",
            got[i],
            want[i],
            got.len()
        );
    }
}

fn nibbles(q: &[u8]) -> Vec<u8> {
    (0..16).map(|j| q[j] | (q[j + 16] << 4)).collect()
}

fn high_bits(q: &[u8]) -> [u8; 4] {
    let qh: u32 = q
        .iter()
        .enumerate()
        .map(|(j, &v)| ((v as u32 >> 4) & 1) << j)
        .sum();
    qh.to_le_bytes()
}

#[test]
fn q8_0_known_block() {
    let qs: Vec<i8> = (0..32).map(|i| (i * 8 - 128) as i8).collect();
    let mut block = h(0.5).to_vec();
    block.extend(qs.iter().map(|&q| q as u8));
    let got = dequantize(GgmlType::Q8_0, &block, 32).expect("valid block");
    let want: Vec<f32> = qs.iter().map(|&q| 0.5 * q as f32).collect();
    assert_eq!(got, want);
    assert_eq!(got[0], -64.0);
    assert_eq!(got[31], 60.0);
}

#[test]
fn q4_0_and_q4_1_blocks() {
    let mut rng = rand::rng();
    for _ in 0..3 {
        let q: Vec<u8> = (0..32).map(|_| rng.random_range(0..16)).collect();
        let d = f16::from_f32(rng.random_range(-2.0..2.0f32));
        let m = f16::from_f32(rng.random_range(-2.0..2.0f32));

        let mut b0 = d.to_le_bytes().to_vec();
        b0.extend(nibbles(&q));
        let want0: Vec<f32> = q.iter().map(|&v| d.to_f32() * (v as f32 - 8.0)).collect();
        assert_close(
            &dequantize(GgmlType::Q4_0, &b0, 32).expect("q4_0"),
            &want0,
            "Q4_0",
        );

        let mut b1 = d.to_le_bytes().to_vec();
        b1.extend(m.to_le_bytes());
        b1.extend(nibbles(&q));
        let want1: Vec<f32> = q
            .iter()
            .map(|&v| d.to_f32() * v as f32 + m.to_f32())
            .collect();
        assert_close(
            &dequantize(GgmlType::Q4_1, &b1, 32).expect("q4_1"),
            &want1,
            "Q4_1",
        );
    }
}

#[test]
fn q5_0_and_q5_1_blocks_take_the_fifth_bit_from_qh() {
    let mut rng = rand::rng();
    // Element j has value j: exercises every 5-bit value and every qh bit once.
    let ordered: Vec<u8> = (0..32).collect();
    let random: Vec<u8> = (0..32).map(|_| rng.random_range(0..32)).collect();
    for q in [ordered, random] {
        let d = f16::from_f32(0.25);
        let m = f16::from_f32(-1.5);

        let mut b0 = d.to_le_bytes().to_vec();
        b0.extend(high_bits(&q));
        b0.extend(nibbles(&q.iter().map(|v| v & 15).collect::<Vec<_>>()));
        let want0: Vec<f32> = q.iter().map(|&v| 0.25 * (v as f32 - 16.0)).collect();
        assert_close(
            &dequantize(GgmlType::Q5_0, &b0, 32).expect("q5_0"),
            &want0,
            "Q5_0",
        );

        let mut b1 = d.to_le_bytes().to_vec();
        b1.extend(m.to_le_bytes());
        b1.extend(high_bits(&q));
        b1.extend(nibbles(&q.iter().map(|v| v & 15).collect::<Vec<_>>()));
        let want1: Vec<f32> = q.iter().map(|&v| 0.25 * v as f32 - 1.5).collect();
        assert_close(
            &dequantize(GgmlType::Q5_1, &b1, 32).expect("q5_1"),
            &want1,
            "Q5_1",
        );
    }
}

/// The 12 bytes of 6-bit scales and mins of Q4_K/Q5_K: sub-blocks 0..4 in the low 6 bits of
/// bytes 0..4 (scales) and 4..8 (mins); sub-blocks 4..8 in the nibbles of bytes 8..12 (scale low,
/// min high) with their top 2 bits in the top bits of bytes 0..4 (scales) and 4..8 (mins).
fn pack_k_scales(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
    }
    s
}

/// Chosen so that sub-blocks 4..8 need their top two bits (values ≥ 16).
const K_SCALES: [u8; 8] = [1, 7, 63, 32, 17, 48, 63, 5];
const K_MINS: [u8; 8] = [0, 63, 9, 40, 33, 2, 16, 62];

fn k_expected(q: &[u8], d: f32, dmin: f32) -> Vec<f32> {
    (0..256)
        .map(|e| d * K_SCALES[e / 32] as f32 * q[e] as f32 - dmin * K_MINS[e / 32] as f32)
        .collect()
}

/// Sub-block s, element l lives in byte 32·(s/2) + l, low nibble for even s, high for odd.
fn k_nibbles(q: &[u8]) -> Vec<u8> {
    let mut qs = vec![0u8; 128];
    for (e, &v) in q.iter().enumerate() {
        let (s, l) = (e / 32, e % 32);
        qs[32 * (s / 2) + l] |= (v & 15) << (4 * (s % 2));
    }
    qs
}

#[test]
fn q4_k_block_with_chosen_scales_and_mins() {
    let mut rng = rand::rng();
    let q: Vec<u8> = (0..256).map(|_| rng.random_range(0..16)).collect();
    let (d, dmin) = (0.125f32, 0.0625f32);
    let mut block = h(d).to_vec();
    block.extend(h(dmin));
    block.extend(pack_k_scales(&K_SCALES, &K_MINS));
    block.extend(k_nibbles(&q));
    assert_eq!(block.len(), GgmlType::Q4_K.block_bytes());
    let got = dequantize(GgmlType::Q4_K, &block, 256).expect("q4_k");
    assert_close(&got, &k_expected(&q, d, dmin), "Q4_K");
}

#[test]
fn q5_k_block_with_chosen_scales_and_mins() {
    let mut rng = rand::rng();
    let q: Vec<u8> = (0..256).map(|_| rng.random_range(0..32)).collect();
    let (d, dmin) = (0.03125f32, 0.5f32);
    let mut qh = [0u8; 32];
    for (e, &v) in q.iter().enumerate() {
        qh[e % 32] |= (v >> 4) << (e / 32);
    }
    let mut block = h(d).to_vec();
    block.extend(h(dmin));
    block.extend(pack_k_scales(&K_SCALES, &K_MINS));
    block.extend(qh);
    block.extend(k_nibbles(&q));
    assert_eq!(block.len(), GgmlType::Q5_K.block_bytes());
    let got = dequantize(GgmlType::Q5_K, &block, 256).expect("q5_k");
    assert_close(&got, &k_expected(&q, d, dmin), "Q5_K");
}

#[test]
fn q6_k_block() {
    let mut rng = rand::rng();
    let q: Vec<u8> = (0..256).map(|_| rng.random_range(0..64)).collect();
    let scales: Vec<i8> = (0..16).map(|_| rng.random_range(-128..=127)).collect();
    let d = 0.01171875f32;
    // Element 128h + 32k + l: low nibble in ql[64h + 32(k%2) + l] (high nibble when k ≥ 2),
    // high two bits in qh[32h + l] at bit 2k.
    let (mut ql, mut qh) = (vec![0u8; 128], vec![0u8; 64]);
    for (e, &v) in q.iter().enumerate() {
        let (hh, k, l) = (e / 128, (e % 128) / 32, e % 32);
        ql[64 * hh + 32 * (k % 2) + l] |= (v & 15) << (4 * (k / 2));
        qh[32 * hh + l] |= (v >> 4) << (2 * k);
    }
    let mut block = ql;
    block.extend(qh);
    block.extend(scales.iter().map(|&s| s as u8));
    block.extend(h(d));
    assert_eq!(block.len(), GgmlType::Q6_K.block_bytes());
    let want: Vec<f32> = (0..256)
        .map(|e| d * scales[e / 16] as f32 * (q[e] as f32 - 32.0))
        .collect();
    assert_close(
        &dequantize(GgmlType::Q6_K, &block, 256).expect("q6_k"),
        &want,
        "Q6_K",
    );
}

#[test]
fn float_types_and_many_blocks() {
    let mut rng = rand::rng();
    // An odd count, more than one rayon task (65536 elements per task).
    let values: Vec<f32> = (0..70_001)
        .map(|_| rng.random_range(-100.0..100.0f32))
        .collect();
    let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        dequantize(GgmlType::F32, &f32_bytes, values.len()).expect("f32"),
        values
    );

    let halfs: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let bytes: Vec<u8> = halfs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let want: Vec<f32> = halfs.iter().map(|v| v.to_f32()).collect();
    assert_eq!(
        dequantize(GgmlType::F16, &bytes, values.len()).expect("f16"),
        want
    );

    let bfs: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let bytes: Vec<u8> = bfs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let want: Vec<f32> = bfs.iter().map(|v| v.to_f32()).collect();
    assert_eq!(
        dequantize(GgmlType::BF16, &bytes, values.len()).expect("bf16"),
        want
    );

    // 2051 Q8_0 blocks (several rayon tasks): block b has d = 2^-(b % 8) and q = element index mod 256.
    let n_blocks = 2051;
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for b in 0..n_blocks {
        let d = 1.0 / (1 << (b % 8)) as f32;
        bytes.extend(h(d));
        for i in 0..32 {
            let q = ((b * 32 + i) % 256) as u8 as i8;
            bytes.push(q as u8);
            want.push(d * q as f32);
        }
    }
    assert_eq!(
        dequantize(GgmlType::Q8_0, &bytes, n_blocks * 32).expect("q8_0"),
        want
    );
}

#[test]
fn dequantize_refuses_wrong_sizes() {
    let msg = err_msg(dequantize(GgmlType::Q4_K, &[0u8; 144], 255));
    assert!(msg.contains("255") && msg.contains("Q4_K"), "{msg}");
    let msg = err_msg(dequantize(GgmlType::Q8_0, &[0u8; 33], 32));
    assert!(msg.contains("33 bytes"), "{msg}");
}

#[test]
fn ggml_type_ids_and_sizes() {
    for ty in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
    }
    assert_eq!(GgmlType::from_id(12), Some(GgmlType::Q4_K));
    assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
    assert_eq!(GgmlType::from_id(23), None);
    assert_eq!(
        (GgmlType::Q6_K.block_size(), GgmlType::Q6_K.block_bytes()),
        (256, 210)
    );
}

// ---------------------------------------------------------------------------------------------
// Header round trips and corrupt files.

fn every_meta_type() -> Vec<(&'static str, MetaValue)> {
    use MetaValue::*;
    vec![
        ("general.architecture", String("llama".into())),
        ("general.alignment", U32(64)),
        ("t.u8", U8(200)),
        ("t.i8", I8(-7)),
        ("t.u16", U16(65535)),
        ("t.i16", I16(-300)),
        ("t.i32", I32(-70000)),
        ("t.u64", U64(1 << 40)),
        ("t.i64", I64(-(1 << 40))),
        ("t.f32", F32(1.5e-6)),
        ("t.f64", F64(-2.25e300)),
        ("t.bool", Bool(true)),
        ("t.string", String("héllo ✓".into())),
        ("t.empty_string", String("".into())),
        ("t.array_u32", Array(vec![U32(1), U32(2), U32(3)])),
        (
            "t.array_str",
            Array(vec![
                String("a".into()),
                String("".into()),
                String("ccc".into()),
            ]),
        ),
        (
            "t.nested",
            Array(vec![Array(vec![I16(1), I16(-2)]), Array(vec![I16(3)])]),
        ),
        ("t.empty_array", Array(vec![])),
    ]
}

fn two_tensors() -> (Vec<TestTensor>, Vec<f32>, Vec<f32>) {
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let mut q8 = Vec::new();
    let mut b = Vec::new();
    for blk in 0..2 {
        q8.extend(h(0.25));
        for i in 0..32 {
            let q = (blk * 32 + i) as i8 - 30;
            q8.push(q as u8);
            b.push(0.25 * q as f32);
        }
    }
    let tensors = vec![
        TestTensor::f32("a", &[3, 2], &a),
        TestTensor::new("b", &[32, 2], GgmlType::Q8_0, q8),
    ];
    (tensors, a, b)
}

#[test]
fn v3_and_v2_round_trip_with_every_metadata_type() {
    for version in [3u32, 2] {
        let meta = every_meta_type();
        let (tensors, a, b) = two_tensors();
        let path = temp_file(
            &format!("roundtrip-v{version}"),
            &gguf_bytes(version, &meta, &tensors),
        );
        let h = read_header(&path).expect("valid file");
        assert_eq!(h.version, version);
        let want: BTreeMap<String, MetaValue> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        assert_eq!(h.metadata, want);
        assert_eq!(h.alignment, 64);
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(
            (h.tensors[0].name.as_str(), h.tensors[0].dims.as_slice()),
            ("a", &[3u64, 2][..])
        );
        assert_eq!(h.tensors[1].ggml_type, GgmlType::Q8_0);
        assert_eq!(
            h.tensors[1].offset, 64,
            "the second tensor starts at the next multiple of 64"
        );
        assert_eq!(
            (h.tensors[1].n_elements(), h.tensors[1].byte_len()),
            (64, 68)
        );
        assert_eq!(h.tensors[0].shape(), vec![2, 3]);

        let f = GgufFile::open(&path).expect("complete file");
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.meta_str("t.string"), Some("héllo ✓"));
        assert_eq!(f.meta_u64("t.u16"), Some(65535));
        assert_eq!(f.meta_u64("t.i8"), None, "a negative value is no u64");
        assert_eq!(f.meta_f64("t.f64"), Some(-2.25e300));
        assert_eq!(f.tensor_f32(&f.header().tensors[0]).expect("a"), a);
        assert_eq!(f.tensor_f32(&f.header().tensors[1]).expect("b"), b);
        assert_eq!(f.tensor_bytes(&f.header().tensors[1]).expect("b").len(), 68);
        assert!(is_gguf_file(&path));
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn default_alignment_is_32() {
    let meta = vec![("general.architecture", MetaValue::String("qwen2".into()))];
    let path = temp_file("align32", &gguf_bytes(3, &meta, &two_tensors().0));
    let h = read_header(&path).expect("valid");
    assert_eq!(h.alignment, 32);
    assert_eq!(h.data_offset % 32, 0);
    assert_eq!(h.tensors[1].offset, 32);
    GgufFile::open(&path).expect("complete");
    std::fs::remove_file(&path).ok();
}

/// Writes `bytes`, reads the header, and returns the error message.
fn header_error(name: &str, bytes: &[u8]) -> String {
    let path = temp_file(name, bytes);
    let msg = err_msg(read_header(&path));
    std::fs::remove_file(&path).ok();
    msg
}

fn arch_meta() -> Vec<(&'static str, MetaValue)> {
    vec![("general.architecture", MetaValue::String("llama".into()))]
}

#[test]
fn corrupt_magic_and_versions_are_refused() {
    let mut bytes = gguf_bytes(3, &arch_meta(), &[]);
    bytes[..4].copy_from_slice(b"GGML");
    let msg = header_error("magic", &bytes);
    assert!(msg.contains("not a GGUF file"), "{msg}");
    let path = temp_file("magic2", &bytes);
    let looks_like_gguf = is_gguf_file(&path);
    let _ = std::fs::remove_file(&path);
    assert!(!looks_like_gguf);

    let msg = header_error("v1", &gguf_bytes(1, &arch_meta(), &[]));
    assert!(
        msg.contains("version 1") && msg.contains("2 and 3"),
        "{msg}"
    );
    let msg = header_error("v7", &gguf_bytes(7, &arch_meta(), &[]));
    assert!(msg.contains("version 7"), "{msg}");
    let msg = header_error(
        "big-endian",
        &gguf_bytes(3u32.swap_bytes(), &arch_meta(), &[]),
    );
    assert!(msg.contains("big-endian"), "{msg}");
    let msg = header_error("short", b"GG");
    assert!(msg.contains("not a GGUF file"), "{msg}");
}

#[test]
fn huge_counts_are_errors_not_allocations() {
    // Tensor count at bytes 8..16, metadata count at 16..24.
    let mut bytes = gguf_bytes(3, &arch_meta(), &[]);
    bytes[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let msg = header_error("huge-tensors", &bytes);
    assert!(
        msg.contains("tensor count") && msg.contains("corrupt"),
        "{msg}"
    );

    let mut bytes = gguf_bytes(3, &arch_meta(), &[]);
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = header_error("huge-kv", &bytes);
    assert!(
        msg.contains("metadata count") && msg.contains("corrupt"),
        "{msg}"
    );

    // An array of 2^60 u64 values: count at the end of the header after its element type.
    let meta = vec![("big", MetaValue::Array(vec![MetaValue::U64(1)]))];
    let mut bytes = gguf_bytes(3, &meta, &[]);
    let count_at = 24 + 8 + 3 + 4 + 4;
    bytes[count_at..count_at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let msg = header_error("huge-array", &bytes);
    assert!(msg.contains("\"big\"") && msg.contains("corrupt"), "{msg}");
}

#[test]
fn string_length_past_the_end_is_an_error() {
    let meta = vec![("k", MetaValue::String("short".into()))];
    let mut bytes = gguf_bytes(3, &meta, &[]);
    // The value's length field follows the key (8 + 1 bytes) and its type (4 bytes).
    let len_at = 24 + 9 + 4;
    bytes[len_at..len_at + 8].copy_from_slice(&1000u64.to_le_bytes());
    let msg = header_error("long-string", &bytes);
    assert!(
        msg.contains("\"k\"") && msg.contains("1000 bytes") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn unknown_tensor_type_is_unsupported_with_its_name_and_id() {
    let t = TestTensor {
        name: "blk.0.attn_q.weight".into(),
        dims: vec![256, 1],
        type_id: 23,
        data: vec![0; 136],
    };
    let path = temp_file("iq4", &gguf_bytes(3, &arch_meta(), &[t]));
    let err = read_header(&path).expect_err("type 23 is not read");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("23") && msg.contains("IQ4_XS"),
        "{msg}"
    );
    assert!(
        msg.contains("Q4_K"),
        "the message lists the supported types: {msg}"
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn bad_tensor_entries_are_refused() {
    let five_dims = TestTensor::f32("t5", &[1, 1, 1, 1, 1], &[1.0]);
    let msg = header_error("dims5", &gguf_bytes(3, &arch_meta(), &[five_dims]));
    assert!(msg.contains("t5") && msg.contains("5 dimensions"), "{msg}");

    let ragged = TestTensor::new("odd", &[48, 1], GgmlType::Q8_0, vec![0; 51]);
    let msg = header_error("ragged", &gguf_bytes(3, &arch_meta(), &[ragged]));
    assert!(msg.contains("odd") && msg.contains("48"), "{msg}");

    let overflow = TestTensor::f32("big", &[1 << 32, 1 << 32, 1 << 32], &[]);
    let msg = header_error("overflow", &gguf_bytes(3, &arch_meta(), &[overflow]));
    assert!(msg.contains("big") && msg.contains("overflow"), "{msg}");

    let twice = vec![
        TestTensor::f32("same", &[1], &[1.0]),
        TestTensor::f32("same", &[1], &[2.0]),
    ];
    let msg = header_error("twice", &gguf_bytes(3, &arch_meta(), &twice));
    assert!(msg.contains("same") && msg.contains("twice"), "{msg}");

    let meta = vec![("general.alignment", MetaValue::U32(24))];
    let msg = header_error("align24", &gguf_bytes(3, &meta, &[]));
    assert!(
        msg.contains("alignment") && msg.contains("power of two"),
        "{msg}"
    );
}

#[test]
fn bad_metadata_is_refused() {
    let mut deep = MetaValue::Array(vec![MetaValue::U8(1)]);
    for _ in 0..20 {
        deep = MetaValue::Array(vec![deep]);
    }
    let msg = header_error("deep", &gguf_bytes(3, &[("deep", deep)], &[]));
    assert!(msg.contains("nested"), "{msg}");

    let mut bytes = gguf_bytes(3, &[("flag", MetaValue::Bool(true))], &[]);
    let last = bytes.iter().rposition(|&b| b == 1).expect("the bool byte");
    bytes[last] = 7;
    let msg = header_error("bool7", &bytes);
    assert!(msg.contains("flag") && msg.contains("boolean"), "{msg}");

    let mut bytes = gguf_bytes(3, &[("x", MetaValue::U8(1))], &[]);
    bytes[24 + 9..24 + 13].copy_from_slice(&99u32.to_le_bytes());
    let msg = header_error("type99", &bytes);
    assert!(msg.contains("\"x\"") && msg.contains("99"), "{msg}");

    let dup = vec![("k", MetaValue::U8(1)), ("k", MetaValue::U8(2))];
    let msg = header_error("dupkey", &gguf_bytes(3, &dup, &[]));
    assert!(msg.contains("\"k\"") && msg.contains("twice"), "{msg}");
}

#[test]
fn truncated_tensor_data_reads_the_header_but_not_the_file() {
    let (tensors, _, _) = two_tensors();
    let full = gguf_bytes(3, &every_meta_type(), &tensors);
    // Tensor "b" (68 bytes) starts 64 bytes into the data and is followed by 60 bytes of padding.
    let path = temp_file("truncated", &full[..full.len() - 100]);
    let h = read_header(&path).expect("the header is complete");
    assert_eq!(h.tensors.len(), 2);
    let msg = err_msg(GgufFile::open(&path));
    assert!(
        msg.contains("\"b\"") && msg.contains("truncated") && msg.contains("download"),
        "{msg}"
    );
    std::fs::remove_file(&path).ok();
}

#[test]
fn every_prefix_and_random_corruption_gives_errors_not_panics() {
    let (tensors, _, _) = two_tensors();
    let full = gguf_bytes(3, &every_meta_type(), &tensors);
    let path = temp_file("prefix", &full);
    let header_end = read_header(&path).expect("valid").data_offset as usize;
    // Every cut inside the header is an error (the padding before the data is not needed).
    for cut in 0..header_end - 64 {
        std::fs::write(&path, &full[..cut]).expect("write");
        assert!(
            read_header(&path).is_err(),
            "a header cut at byte {cut} was accepted"
        );
    }
    let mut rng = rand::rng();
    for _ in 0..300 {
        let mut bytes = full.clone();
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(4..header_end);
            bytes[at] = rng.next_u32() as u8;
        }
        std::fs::write(&path, &bytes).expect("write");
        // Either outcome is fine; a panic fails the test.
        if let Ok(f) = GgufFile::open(&path) {
            for t in &f.header().tensors {
                let _ = f.tensor_f32(t);
            }
        }
    }
    std::fs::remove_file(&path).ok();
}

// ---------------------------------------------------------------------------------------------
// Llama's q/k row permutation.

#[test]
fn rope_permutation_matches_the_converter_and_round_trips() {
    // llama.cpp: w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2).reshape(w.shape). With 2 heads of
    // 8 rows, head 0 [0 1 2 3 4 5 6 7] becomes [0 4 1 5 2 6 3 7] (hd = 8: not an involution, so
    // this also tells the two directions apart).
    let hf: Vec<f32> = (0..16).map(|i| i as f32).collect();
    let stored = llama_rope_permute(&hf, 16, 1, 2).expect("permute");
    let want: Vec<f32> = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
        .map(|i| i as f32)
        .to_vec();
    assert_eq!(stored, want);
    assert_eq!(
        llama_rope_unpermute(&stored, 16, 1, 2).expect("unpermute"),
        hf
    );

    let mut rng = rand::rng();
    let (heads, hd, cols) = (3, 10, 7);
    let w: Vec<f32> = (0..heads * hd * cols)
        .map(|_| rng.random_range(-1.0..1.0f32))
        .collect();
    let p = llama_rope_permute(&w, heads * hd, cols, heads).expect("permute");
    assert_ne!(p, w);
    assert_eq!(
        llama_rope_unpermute(&p, heads * hd, cols, heads).expect("unpermute"),
        w
    );

    let msg = err_msg(llama_rope_unpermute(&w, heads * hd, cols, 4));
    assert!(msg.contains("heads"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Config and GgufSource.

fn model_meta(arch: &str, layers: u32) -> Vec<(String, MetaValue)> {
    use MetaValue::*;
    let k = |s: &str| format!("{arch}.{s}");
    vec![
        ("general.architecture".into(), String(arch.into())),
        (k("embedding_length"), U32(16)),
        (k("block_count"), U32(layers)),
        (k("feed_forward_length"), U32(12)),
        (k("attention.head_count"), U32(2)),
        (k("attention.head_count_kv"), U32(1)),
        (k("attention.layer_norm_rms_epsilon"), F32(1e-5)),
        (k("rope.freq_base"), F32(500000.0)),
        (k("context_length"), U32(256)),
        (
            "tokenizer.ggml.tokens".into(),
            Array((0..5).map(|i| String(format!("t{i}"))).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), U32(2)),
    ]
}

fn write_model(name: &str, meta: &[(String, MetaValue)], tensors: &[TestTensor]) -> PathBuf {
    let meta: Vec<(&str, MetaValue)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    temp_file(name, &gguf_bytes(3, &meta, tensors))
}

fn rand_vec(n: usize) -> Vec<f32> {
    let mut rng = rand::rng();
    (0..n).map(|_| rng.random_range(-1.0..1.0f32)).collect()
}

/// A one-layer model (hidden 16, 2 heads of 8, 1 KV head, FFN 12, vocab 5) with q/k stored as
/// `store` returns them. Head dim 8, so a wrong permutation direction would show.
fn tiny_model(
    arch: &str,
    store: impl Fn(&[f32], usize, usize, usize) -> Vec<f32>,
) -> (PathBuf, [Vec<f32>; 4]) {
    let (q, k, qb, kb) = (
        rand_vec(16 * 16),
        rand_vec(8 * 16),
        rand_vec(16),
        rand_vec(8),
    );
    let tensors = vec![
        TestTensor::f32("token_embd.weight", &[16, 5], &rand_vec(80)),
        TestTensor::f32("output_norm.weight", &[16], &rand_vec(16)),
        TestTensor::f32("blk.0.attn_norm.weight", &[16], &rand_vec(16)),
        TestTensor::f32("blk.0.attn_q.weight", &[16, 16], &store(&q, 16, 16, 2)),
        TestTensor::f32("blk.0.attn_q.bias", &[16], &store(&qb, 16, 1, 2)),
        TestTensor::f32("blk.0.attn_k.weight", &[16, 8], &store(&k, 8, 16, 1)),
        TestTensor::f32("blk.0.attn_k.bias", &[8], &store(&kb, 8, 1, 1)),
        TestTensor::f32("blk.0.attn_v.weight", &[16, 8], &rand_vec(128)),
        TestTensor::f32("blk.0.attn_output.weight", &[16, 16], &rand_vec(256)),
        TestTensor::f32("blk.0.ffn_norm.weight", &[16], &rand_vec(16)),
        TestTensor::f32("blk.0.ffn_gate.weight", &[16, 12], &rand_vec(192)),
        TestTensor::f32("blk.0.ffn_up.weight", &[16, 12], &rand_vec(192)),
        TestTensor::f32("blk.0.ffn_down.weight", &[12, 16], &rand_vec(192)),
        TestTensor::f32("blk.0.mystery.weight", &[3], &[1.0, 2.0, 3.0]),
    ];
    (
        write_model(&format!("tiny-{arch}"), &model_meta(arch, 1), &tensors),
        [q, k, qb, kb],
    )
}

#[test]
fn llama_source_undoes_the_permutation_and_uses_hf_names_and_shapes() {
    let permute =
        |w: &[f32], rows, cols, heads| llama_rope_permute(w, rows, cols, heads).expect("permute");
    let (path, [q, k, qb, kb]) = tiny_model("llama", permute);
    let src = GgufSource::open(&path).expect("valid model");
    let c = src.config();
    assert_eq!(c.architectures, vec!["LlamaForCausalLM".to_string()]);
    assert_eq!(
        (
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.head_dim(),
            c.vocab_size
        ),
        (16, 2, 1, 8, 5)
    );
    assert_eq!(
        (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings),
        (1e-5, 500000.0, 256)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(c.attention_bias, Some(true));
    assert_eq!(c.eos_token_ids(), vec![2]);

    let p = "model.layers.0";
    assert_eq!(
        src.read_f32(&format!("{p}.self_attn.q_proj.weight"))
            .expect("q")
            .data,
        q
    );
    assert_eq!(
        src.read_f32(&format!("{p}.self_attn.k_proj.weight"))
            .expect("k")
            .data,
        k
    );
    assert_eq!(
        src.read_f32(&format!("{p}.self_attn.q_proj.bias"))
            .expect("qb")
            .data,
        qb
    );
    assert_eq!(
        src.read_f32(&format!("{p}.self_attn.k_proj.bias"))
            .expect("kb")
            .data,
        kb
    );
    assert_eq!(
        src.shape(&format!("{p}.self_attn.k_proj.weight"))
            .expect("k"),
        vec![8, 16]
    );
    assert_eq!(
        src.shape(&format!("{p}.mlp.down_proj.weight"))
            .expect("down"),
        vec![16, 12]
    );
    assert_eq!(
        src.shape("model.embed_tokens.weight").expect("embd"),
        vec![5, 16]
    );
    assert_eq!(src.shape("model.norm.weight").expect("norm"), vec![16]);
    let names = src.tensor_names();
    assert_eq!(names.len(), 13);
    for n in ModelConfig::layer_linear_names(0) {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(names.contains(&format!("{p}.input_layernorm.weight")));
    assert!(names.contains(&format!("{p}.post_attention_layernorm.weight")));
    assert_eq!(src.skipped(), ["blk.0.mystery.weight".to_string()]);
    let msg = err_msg(src.read_f32("lm_head.weight"));
    assert!(msg.contains("lm_head.weight"), "{msg}");
    std::fs::remove_file(&path).ok();
}

#[test]
fn qwen2_source_reads_q_and_k_as_stored() {
    let (path, [q, k, qb, _]) = tiny_model("qwen2", |w: &[f32], _, _, _| w.to_vec());
    let src = GgufSource::open(&path).expect("valid model");
    assert_eq!(
        src.config().architectures,
        vec!["Qwen2ForCausalLM".to_string()]
    );
    assert_eq!(src.config().attention_bias, None);
    assert!(src.config().qkv_bias());
    assert_eq!(
        src.read_f32("model.layers.0.self_attn.q_proj.weight")
            .expect("q")
            .data,
        q
    );
    assert_eq!(
        src.read_f32("model.layers.0.self_attn.k_proj.weight")
            .expect("k")
            .data,
        k
    );
    assert_eq!(
        src.read_f32("model.layers.0.self_attn.q_proj.bias")
            .expect("qb")
            .data,
        qb
    );
    std::fs::remove_file(&path).ok();
}

fn header_of(
    name: &str,
    meta: &[(String, MetaValue)],
    tensors: &[TestTensor],
) -> q4wgpu::formats::gguf::GgufHeader {
    let path = write_model(name, meta, tensors);
    let h = read_header(&path).expect("valid header");
    std::fs::remove_file(&path).ok();
    h
}

/// Values that later divide or size buffers are refused by name, never a panic (issue 13 item 4).
#[test]
fn zero_or_absurd_dimensions_are_config_errors_not_panics() {
    for (key, value, named) in [
        (
            "llama.attention.head_count_kv",
            MetaValue::U32(0),
            "num_key_value_heads",
        ),
        (
            "llama.attention.head_count",
            MetaValue::U32(0),
            "num_attention_heads",
        ),
        ("llama.embedding_length", MetaValue::U32(0), "hidden_size"),
        (
            "llama.context_length",
            MetaValue::U32(0),
            "max_position_embeddings",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(f32::NAN),
            "rms_norm_eps",
        ),
        (
            "llama.embedding_length",
            MetaValue::U32(u32::MAX),
            "hidden_size",
        ),
    ] {
        let mut meta = model_meta("llama", 1);
        for (k, v) in meta.iter_mut() {
            if k == key {
                *v = value.clone();
            }
        }
        let result = std::panic::catch_unwind(|| {
            config_from_gguf(&header_of(&format!("bad-{named}"), &meta, &[]))
        });
        let msg = err_msg(result.unwrap_or_else(|_| panic!("{key} = {value:?} panicked")));
        assert!(msg.contains(named), "{key} = {value:?}: {msg}");
    }
}

#[test]
fn unknown_architecture_and_unmapped_rope_scaling_are_refused() {
    let mut meta = model_meta("mamba", 1);
    meta[0].1 = MetaValue::String("mamba".into());
    let err =
        config_from_gguf(&header_of("mamba", &meta, &[])).expect_err("mamba is not supported");
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("mamba") && msg.contains("Qwen2ForCausalLM") && msg.contains("llama"),
        "{msg}"
    );

    let freqs = TestTensor::f32("rope_freqs.weight", &[2], &[1.0, 8.0]);
    let msg = err_msg(config_from_gguf(&header_of(
        "ropefreqs",
        &model_meta("llama", 1),
        &[freqs],
    )));
    assert!(msg.contains("rope_freqs"), "{msg}");

    let mut meta = model_meta("llama", 1);
    meta.push((
        "llama.rope.scaling.type".into(),
        MetaValue::String("yarn".into()),
    ));
    let msg = err_msg(config_from_gguf(&header_of("yarn", &meta, &[])));
    assert!(msg.contains("yarn"), "{msg}");

    let meta: Vec<_> = model_meta("llama", 1)
        .into_iter()
        .filter(|(k, _)| k != "llama.block_count")
        .collect();
    let msg = err_msg(config_from_gguf(&header_of("noblocks", &meta, &[])));
    assert!(msg.contains("llama.block_count"), "{msg}");

    let no_tokens: Vec<_> = model_meta("llama", 1)
        .into_iter()
        .filter(|(k, _)| k != "tokenizer.ggml.tokens")
        .collect();
    let msg = err_msg(config_from_gguf(&header_of("notokens", &no_tokens, &[])));
    assert!(
        msg.contains("tokenizer.ggml.tokens") && msg.contains("llama.vocab_size"),
        "{msg}"
    );
    let embd = TestTensor::f32("token_embd.weight", &[16, 7], &rand_vec(112));
    let c = config_from_gguf(&header_of("embdvocab", &no_tokens, &[embd]))
        .expect("vocab from the table");
    assert_eq!(c.vocab_size, 7);

    let embd = TestTensor::f32("token_embd.weight", &[16, 6], &rand_vec(96));
    let msg = err_msg(config_from_gguf(&header_of(
        "vocab",
        &model_meta("llama", 1),
        &[embd],
    )));
    assert!(msg.contains("5 tokens") && msg.contains("6 rows"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Real files.

const QWEN: &str = "qwen2.5-coder-0.5b-instruct.gguf";
const SMOLLM: &str = "smollm2-135m-instruct-q4_1.gguf";

#[test]
fn qwen2_5_config_from_the_real_file() {
    let h = read_header(&real_model(QWEN)).expect("valid GGUF");
    let c = config_from_gguf(&h).expect("supported model");
    assert_eq!(c.arch().expect("arch"), q4wgpu::Arch::Qwen2);
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.intermediate_size),
        (896, 24, 4864)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_kv_heads(), c.head_dim()),
        (14, 2, 64)
    );
    assert_eq!(c.vocab_size, 151936);
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert_eq!(c.max_position_embeddings, 32768);
    assert!(
        !c.tie_word_embeddings,
        "this file has its own output.weight"
    );
    assert_eq!(c.eos_token_ids(), vec![151645]);
}

#[test]
fn smollm2_config_from_the_real_file() {
    let h = read_header(&real_model(SMOLLM)).expect("valid GGUF");
    let c = config_from_gguf(&h).expect("supported model");
    assert_eq!(c.arch().expect("arch"), q4wgpu::Arch::Llama);
    assert_eq!(
        (c.hidden_size, c.num_hidden_layers, c.intermediate_size),
        (576, 30, 1536)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_kv_heads(), c.head_dim()),
        (9, 3, 64)
    );
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.attention_bias, Some(false));
    assert_eq!(c.bos_token_id.as_ref().map(|t| t.to_vec()), Some(vec![1]));
    assert_eq!(c.eos_token_ids(), vec![2]);
}

#[test]
fn every_smollm2_tensor_reads_through_gguf_source() {
    let src = GgufSource::open(&real_model(SMOLLM)).expect("complete file");
    let names = src.tensor_names();
    assert_eq!(
        names.len(),
        2 + 30 * 9,
        "embedding, final norm and 9 tensors per layer"
    );
    assert!(src.skipped().is_empty(), "{:?}", src.skipped());
    for layer in [0, 29] {
        for n in ModelConfig::layer_linear_names(layer) {
            assert!(names.contains(&n), "{n} missing");
        }
    }
    assert_eq!(
        src.shape("model.embed_tokens.weight").expect("embd"),
        vec![49152, 576]
    );
    assert_eq!(
        src.shape("model.layers.0.self_attn.k_proj.weight")
            .expect("k"),
        vec![192, 576]
    );
    assert_eq!(
        src.shape("model.layers.0.mlp.down_proj.weight")
            .expect("down"),
        vec![576, 1536]
    );
    for name in &names {
        let t = src.read_f32(name).expect("readable tensor");
        assert_eq!(t.data.len(), t.shape.iter().product::<usize>(), "{name}");
        assert!(
            t.data.iter().all(|v| v.is_finite()),
            "{name} has a non-finite value"
        );
        assert!(t.data.iter().any(|&v| v != 0.0), "{name} is all zero");
    }
}

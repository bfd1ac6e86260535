//! Our quantizer and our llama3 RoPE frequencies against values computed without our code:
//! `scripts/oracle-fixtures.py` implements the README's INT4 format (the PyTorch method's
//! quantizer) and transformers' `_compute_llama3_parameters` in numpy and writes the expected
//! bytes and frequencies to tests/fixtures/. Regenerate with that script after a deliberate change
//! of either spec (never to make this test pass).

use q4wgpu::config::ModelConfig;
use q4wgpu::quant::{QMatrix, BLOCK, WORDS_PER_BLOCK};
use q4wgpu::quantize::quantize_tensor;
use q4wgpu::weights::{F32Tensor, Weight};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Case {
    name: String,
    rows: usize,
    cols: usize,
    input: Vec<f32>,
    qweight: Vec<u32>,
    scales: Vec<u16>,
}

fn read_cases() -> (Vec<Case>, bool) {
    let path = fixture("quant-oracle.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).expect("fixture header");
    let meta = meta.metadata().clone().expect("fixture __metadata__");
    let real = meta.get("real_tensors").map(String::as_str) == Some("yes");
    let st = SafeTensors::deserialize(&bytes).expect("fixture is safetensors");
    let tensor = |name: &str| st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let words = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let cases = meta["cases"]
        .split(',')
        .map(|name| {
            let input = tensor(&format!("{name}.input"));
            let &[rows, cols] = input.shape() else {
                panic!("{name}.input is not 2-D")
            };
            Case {
                name: name.to_string(),
                rows,
                cols,
                input: words(input.data())
                    .into_iter()
                    .map(f32::from_bits)
                    .collect(),
                qweight: words(tensor(&format!("{name}.qweight")).data()),
                scales: tensor(&format!("{name}.scales"))
                    .data()
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect(),
            }
        })
        .collect();
    (cases, real)
}

/// The first difference between our words and the expected ones, as a readable element.
fn first_difference(case: &Case, got_words: &[u32], got_scales: &[u16]) -> Option<String> {
    let bpr = case.cols.div_ceil(BLOCK);
    if let Some(j) = (0..case.scales.len()).find(|&j| got_scales[j] != case.scales[j]) {
        return Some(format!(
            "{}: scale of row {} block {}: got bf16 {:#06x}, want {:#06x}",
            case.name,
            j / bpr,
            j % bpr,
            got_scales[j],
            case.scales[j]
        ));
    }
    let w = (0..case.qweight.len()).find(|&w| got_words[w] != case.qweight[w])?;
    let nib = |word: u32, k: usize| (word >> (4 * k)) & 0xF;
    let k = (0..8)
        .find(|&k| nib(got_words[w], k) != nib(case.qweight[w], k))
        .unwrap_or(0);
    let (row, block) = (w / (bpr * WORDS_PER_BLOCK), w / WORDS_PER_BLOCK % bpr);
    let col = block * BLOCK + (w % WORDS_PER_BLOCK) * 8 + k;
    let value = case.input.get(row * case.cols + col).copied();
    Some(format!(
        "{}: row {row} column {col} (input {value:?}, scale bf16 {:#06x}): got q {}, want q {}",
        case.name,
        case.scales[row * bpr + block],
        nib(got_words[w], k) as i32 - 8,
        nib(case.qweight[w], k) as i32 - 8,
    ))
}

#[test]
fn quantizer_matches_the_independent_numpy_quantizer_byte_for_byte() {
    let (cases, real) = read_cases();
    // The fixture must cover what it claims: a truncated or regenerated-without-GGUF file fails.
    assert!(
        cases.len() >= 16,
        "only {} cases in the fixture",
        cases.len()
    );
    assert!(
        real,
        "the fixture was written without --gguf: no real tensors"
    );
    let (mut elements, mut ties) = (0usize, 0usize);
    for case in &cases {
        let bpr = case.cols.div_ceil(BLOCK);
        assert_eq!(case.input.len(), case.rows * case.cols, "{}", case.name);
        assert_eq!(case.scales.len(), case.rows * bpr, "{}", case.name);
        let m = QMatrix::quantize(&case.input, case.rows, case.cols);
        if let Some(diff) = first_difference(case, &m.qweight, &m.scales) {
            panic!("QMatrix::quantize differs from the numpy quantizer: {diff}");
        }
        // The path a checkpoint takes (src/quantize.rs), compared as stored bytes.
        let name = "model.layers.0.mlp.down_proj.weight";
        let t = F32Tensor {
            shape: vec![case.rows, case.cols],
            data: case.input.clone(),
        };
        let Ok(Weight::Q4 {
            qweight, scales, ..
        }) = quantize_tensor(name, t)
        else {
            panic!("{}: quantize_tensor did not make an INT4 matrix", case.name)
        };
        let want_q: Vec<u8> = case.qweight.iter().flat_map(|w| w.to_le_bytes()).collect();
        let want_s: Vec<u8> = case.scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        assert!(
            qweight.bytes() == want_q.as_slice() && scales.bytes() == want_s.as_slice(),
            "{}: quantize_tensor's stored bytes differ from the numpy quantizer's",
            case.name
        );
        // Count the elements that sit exactly on a rounding tie (w / scale = k + 0.5).
        for (i, &w) in case.input.iter().enumerate() {
            let s = f32::from_bits(
                (case.scales[i / case.cols * bpr + i % case.cols / BLOCK] as u32) << 16,
            );
            let r = w / s;
            ties += (r.fract().abs() == 0.5) as usize;
        }
        elements += case.input.len();
    }
    assert!(ties >= 100, "the fixture has only {ties} rounding ties");
    eprintln!(
        "{} cases, {elements} elements ({ties} on a .5 tie): identical bytes",
        cases.len()
    );
}

#[test]
fn llama3_rope_frequencies_match_the_transformers_formula_at_every_index() {
    let path = fixture("rope-llama3.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let cases = doc["cases"].as_array().expect("cases");
    // A correctly rounded f32 of the exact value is within half an ulp (2^-24 relative); one ulp
    // allows for pow() differing in its last f64 bit. A wrong ramp is off by far more.
    let tol = f64::powi(2.0, -23);
    let (mut checked, mut in_ramp, mut worst) = (0usize, 0usize, 0.0f64);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let config: ModelConfig =
            serde_json::from_value(case["config"].clone()).expect("config.json of the case");
        config.validate().expect("valid config");
        let got = config.rope_inv_freq();
        let want: Vec<f64> = case["inv_freq"]
            .as_array()
            .expect("inv_freq")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        let band: Vec<&str> = case["band"]
            .as_array()
            .expect("band")
            .iter()
            .map(|v| v.as_str().expect("band name"))
            .collect();
        assert_eq!(got.len(), want.len(), "{name}: number of frequencies");
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            let rel = (g as f64 - w).abs() / w;
            assert!(
                rel <= tol,
                "{name}: frequency index {i} ({}): got {g:e}, want {w:e} (relative error {rel:e})",
                band[i]
            );
            worst = worst.max(rel);
            in_ramp += (band[i] == "ramp") as usize;
        }
        checked += got.len();
    }
    let seventy_b = cases.iter().find(|c| c["name"] == "llama-3.1-70b");
    assert_eq!(
        seventy_b
            .and_then(|c| c["inv_freq"].as_array())
            .map(Vec::len),
        Some(64),
        "the 70B configuration is checked at all 64 indices"
    );
    assert!(in_ramp >= 60, "only {in_ramp} indices inside the ramp");
    eprintln!("{checked} frequencies ({in_ramp} in the ramp): max relative error {worst:e}");
}

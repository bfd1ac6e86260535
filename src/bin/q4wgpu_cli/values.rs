//! Command-line values: range-checked parsers (so a bad value fails when arguments are parsed,
//! before anything loads), the seed, and sizes for people.

use q4wgpu::sampling;

/// Parses a float option, then checks its range with the sampler's own check.
fn float(text: &str, check: impl Fn(f32) -> q4wgpu::Result<()>) -> Result<f32, String> {
    let v: f32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    check(v).map_err(|e| e.to_string())?;
    Ok(v)
}

pub fn parse_temperature(text: &str) -> Result<f32, String> {
    float(text, sampling::check_temperature)
}

pub fn parse_top_p(text: &str) -> Result<f32, String> {
    float(text, |v| sampling::check_unit("--top-p", v))
}

pub fn parse_min_p(text: &str) -> Result<f32, String> {
    float(text, |v| sampling::check_unit("--min-p", v))
}

pub fn parse_repeat_penalty(text: &str) -> Result<f32, String> {
    float(text, sampling::check_repeat_penalty)
}

/// `--seed`: a number, or -1 for a random one (llama.cpp's convention).
#[derive(Clone, Copy, Debug)]
pub struct Seed(pub Option<u64>);

pub fn parse_seed(text: &str) -> Result<Seed, String> {
    match text.trim() {
        "-1" => Ok(Seed(None)),
        t => t
            .parse::<u64>()
            .map(|s| Seed(Some(s)))
            .map_err(|_| format!("{text:?} is not a seed: use a whole number from 0, or -1 for a random one")),
    }
}

/// A seed that differs from run to run (the standard library's per-process random hash keys,
/// mixed with the time).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.write_u32(std::process::id());
    // Below 2^53, so the seed survives JSON readers that use doubles.
    h.finish() >> 11
}

/// Bytes for people: "1.23 GB", "512 MB", "12 KB", "100 bytes".
pub fn gb(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{bytes} bytes")
    }
}

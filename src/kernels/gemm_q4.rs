//! INT4 matrix-matrix product for prompt processing: `Y[m, n] = sum_k X[m, k] W[n, k] (+ bias[n])`,
//! stored or added to Y, for `m < n_tokens` (read each step from the [`StepParams`] uniform, at
//! most `m_max` fixed at bind time). Rows of Y at or past `n_tokens` are left untouched.
//!
//! Kernels ([`GemmVariant`]), chosen per bind from the adapter and the shape:
//! - shaders/gemm_q4_mma.wgsl ([`GemmVariant::CoopTile`], the default with cooperative matrices):
//!   tensor cores, f16 operands with f32 accumulation, tiles of 32·tm tokens × 32·tn weight rows
//!   (128 × 128 for long prompts, smaller for short ones), register double buffering. Needs
//!   [`GemmQ4::coop_supported`] and K a multiple of 4. Operands are rounded to f16 (X and the
//!   dequantized weights), so results differ from f32 by about 1e-3 relative.
//!   [`TileOpts`] (split-K with a fixed-order reduction, f16 X, K steps of 64, double-buffered
//!   tiles) are for the bench's sweep; none is a default yet.
//! - shaders/gemm_q4_reg.wgsl ([`GemmVariant::Reg`], the default elsewhere): portable, f32
//!   throughout, register-tiled (8 × rm outputs per thread), K a multiple of 4.
//! - shaders/gemm_q4_coop.wgsl and shaders/gemm_q4.wgsl ([`GemmVariant::Coop`],
//!   [`GemmVariant::Tiled`]): the first 64 × 64 kernels, used for K not a multiple of 4 and
//!   kept for comparison in benches/kernels.rs.
//!
//! All read W through the same row-range bindings as [`GemvQ4`](super::gemv_q4::GemvQ4).
//! [`GemmQ4::new_emulated`] builds the cooperative-matrix tiles with the matrix operations
//! emulated in plain WGSL, so the tests check their tiling on adapters without tensor cores.
//!
//! [`StepParams`]: super::StepParams

use super::gemv_q4::{check_matrix, check_operands, check_vector, row_chunks, Epilogue, RowChunk};
use super::{BufRange, Dispatch, Q4Ref};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::quant::blocks_per_row;

const PORTABLE: &str = include_str!("../../shaders/gemm_q4.wgsl");
const COOP: &str = include_str!("../../shaders/gemm_q4_coop.wgsl");
const MMA: &str = include_str!("../../shaders/gemm_q4_mma.wgsl");
const MMA_COOP: &str = include_str!("../../shaders/gemm_q4_mma_coop.wgsl");
const MMA_EMULATED: &str = include_str!("../../shaders/gemm_q4_mma_emulated.wgsl");
const MMA_LOAD: &str = include_str!("../../shaders/gemm_q4_mma_load.wgsl");
const MMA_LOAD_PACKED: &str = include_str!("../../shaders/gemm_q4_mma_load_packed.wgsl");
const REG: &str = include_str!("../../shaders/gemm_q4_reg.wgsl");
const SPLITK: &str = include_str!("../../shaders/gemm_q4_splitk.wgsl");
const X16: &str = include_str!("../../shaders/gemm_q4_x16.wgsl");

/// Y tile of one workgroup of the first kernels ([`GemmVariant::Tiled`], [`GemmVariant::Coop`]).
const TILE_M: usize = 64;
const TILE_N: usize = 64;

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmVariant {
    /// The first portable kernel: f32, 64x64 tiles, 4x4 outputs per thread. Any K.
    Tiled,
    /// Portable, register-tiled: f32, tiles of 16·rm tokens × 128 rows, rm × 8 outputs per
    /// thread; rm is 2, 4 or 8. K a multiple of 4.
    Reg { rm: u32 },
    /// The first cooperative-matrix kernel: 64x64 tiles, 2x2 accumulators per subgroup. Any K.
    Coop,
    /// Cooperative matrices, tiles of 32·tm tokens × 32·tn rows, tm × tn 16x16 accumulators per
    /// subgroup; tm and tn are 1, 2 or 4. With `prefetch`, the next K step's global loads
    /// overlap the current step's multiplies (more registers). K a multiple of 4. `opts`: the
    /// experimental options of [`TileOpts`] (the default is the plain kernel).
    CoopTile {
        tm: u32,
        tn: u32,
        prefetch: bool,
        opts: TileOpts,
    },
}

/// Options of a [`GemmVariant::CoopTile`] kernel, for the GEMM sweep of benches/kernels.rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileOpts {
    /// Split-K: K cut into this many slices (1 to 16; fewer where K is short), one workgroup
    /// per tile and slice, partial sums in a scratch buffer, then a reduction dispatch that adds
    /// them in a fixed order (shaders/gemm_q4_splitk.wgsl). Results differ from the unsplit
    /// kernel by f32 rounding (another summation order), but never from run to run.
    pub split_k: u32,
    /// X converted to f16 once per binding by a dispatch before the product
    /// (shaders/gemm_q4_x16.wgsl), so the tiles read half the bytes and convert nothing. Same
    /// results as without (same rounding).
    pub x_f16: bool,
    /// Operands moved 16 bytes at a time (shaders/gemm_q4_mma_load_packed.wgsl): X converted to
    /// f16 by a dispatch before the product, in groups of 8 in the order W's words dequantize
    /// to, W loaded 32 weights at a time. Fewer load, convert and store instructions per step
    /// than the f32 path; the same f16 operands, summed in another order. `x_f16` is then
    /// ignored.
    pub packed: bool,
    /// K steps of 64 instead of 32: half the barriers per multiply, twice the workgroup
    /// memory for the tiles (the accumulators then leave one column at a time). Same results.
    pub bk64: bool,
    /// Two copies of the workgroup tiles: one barrier per K step instead of two, and the next
    /// step's stores overlap other subgroups' multiplies (twice the tile memory; not with
    /// `bk64` on the 128-wide tiles, over 48 KiB). Same results.
    pub double_buffer: bool,
    /// Bench only, the results are wrong: parts of the K loop left out to see what each costs
    /// ([`ABLATE_LOADS`], [`ABLATE_STORES`], [`ABLATE_MMA`]; 0 = nothing left out).
    pub ablate: u32,
}

/// [`TileOpts::ablate`]: no global loads after the first K step (so the dequantization of the
/// constant words left folds away too: it times the stores and the multiplies).
pub const ABLATE_LOADS: u32 = 1;
/// [`TileOpts::ablate`]: no dequantization and stores to the workgroup tiles.
pub const ABLATE_STORES: u32 = 2;
/// [`TileOpts::ablate`]: no matrix loads and multiply-adds (the loads then have no time to
/// arrive before their stores: this times more than what is left).
pub const ABLATE_MMA: u32 = 4;

impl Default for TileOpts {
    fn default() -> Self {
        TileOpts {
            split_k: 1,
            x_f16: false,
            packed: false,
            bk64: false,
            double_buffer: false,
            ablate: 0,
        }
    }
}

impl TileOpts {
    /// Workgroup memory of a tm x tn tile with these options, in bytes (as mma_shader_with
    /// lays it out: the X and W tiles, times two with double buffers, and the staging tile).
    pub fn workgroup_bytes(self, tm: u32, tn: u32) -> u64 {
        let row = (self.bk() / 2 + 4) as u64 * 4;
        let copies = if self.double_buffer { 2 } else { 1 };
        let stn = if self.bk64 || self.double_buffer {
            1
        } else {
            tn
        };
        copies * 32 * (tm + tn) as u64 * row + 4 * 16 * (16 * stn + 4) as u64 * 4
    }

    /// The K step.
    fn bk(self) -> u32 {
        if self.bk64 {
            64
        } else {
            32
        }
    }

    /// K elements per split-K slice (a multiple of the K step) and the number of slices, for K.
    fn slices(self, k: usize) -> (usize, usize) {
        let bk = self.bk() as usize;
        let per = k
            .div_ceil(self.split_k.max(1) as usize)
            .next_multiple_of(bk)
            .max(bk);
        (per, k.div_ceil(per).max(1))
    }
}

impl GemmVariant {
    /// A [`GemmVariant::CoopTile`] with the default options.
    pub fn coop_tile(tm: u32, tn: u32, prefetch: bool) -> GemmVariant {
        GemmVariant::CoopTile {
            tm,
            tn,
            prefetch,
            opts: TileOpts::default(),
        }
    }

    /// A short name for tables: `coop 4x4 pf`, `coop 4x4 pf x16 bk64 split4`.
    pub fn short_name(self) -> String {
        match self {
            GemmVariant::CoopTile {
                tm,
                tn,
                prefetch,
                opts,
            } => {
                let mut s = format!("coop {}x{}", 32 * tm, 32 * tn);
                if prefetch {
                    s += " pf";
                }
                if opts.packed {
                    s += " pk";
                } else if opts.x_f16 {
                    s += " x16";
                }
                if opts.bk64 {
                    s += " bk64";
                }
                if opts.double_buffer {
                    s += " db";
                }
                if opts.split_k > 1 {
                    s += &format!(" split{}", opts.split_k);
                }
                for (bit, name) in [
                    (ABLATE_LOADS, "loads"),
                    (ABLATE_STORES, "stores"),
                    (ABLATE_MMA, "mma"),
                ] {
                    if opts.ablate & bit != 0 {
                        s += &format!(" -{name}");
                    }
                }
                s
            }
            other => format!("{other:?}"),
        }
    }

    /// Y tile of one workgroup: (tokens, weight rows).
    pub fn tile(self) -> (usize, usize) {
        match self {
            GemmVariant::Tiled | GemmVariant::Coop => (TILE_M, TILE_N),
            GemmVariant::Reg { rm } => (16 * rm as usize, 128),
            GemmVariant::CoopTile { tm, tn, .. } => (32 * tm as usize, 32 * tn as usize),
        }
    }

    /// Whether the kernel runs on cooperative matrices.
    pub fn is_coop(self) -> bool {
        matches!(self, GemmVariant::Coop | GemmVariant::CoopTile { .. })
    }

    /// Whether the kernel reads X as vec4 (K must be a multiple of 4).
    fn needs_k4(self) -> bool {
        self.gated()
    }

    /// Whether the kernel honours `m_lo`/`m_hi` (exits unless `m_lo < n_tokens <= m_hi`).
    fn gated(self) -> bool {
        matches!(self, GemmVariant::Reg { .. } | GemmVariant::CoopTile { .. })
    }

    fn valid(self) -> bool {
        match self {
            GemmVariant::Reg { rm } => [2, 4, 8].contains(&rm),
            GemmVariant::CoopTile { tm, tn, opts, .. } => {
                [1, 2, 4].contains(&tm)
                    && [1, 2, 4].contains(&tn)
                    && (1..=16).contains(&opts.split_k)
            }
            _ => true,
        }
    }

    /// The variant [`GemmQ4::bind`] picks for `m_max` tokens, N = `n` weight rows and K = `k`.
    /// Cooperative-matrix tiles: the smallest height that covers the tokens (up to 128), then the
    /// widest tile (up to 128 x 128) whose grid still has [`FILL_GROUPS`] workgroups, so short
    /// matrices (o, down) keep every multiprocessor busy.
    pub fn default_for(coop: bool, m_max: usize, n: usize, k: usize) -> GemmVariant {
        let fit = |unit: usize| -> u32 {
            match m_max.div_ceil(unit) {
                0 | 1 => 1,
                2 => 2,
                _ => 4,
            }
        };
        match (coop, k % 4 == 0) {
            (true, true) => {
                let tm = fit(32);
                let groups = |tm: u32, tn: u32| {
                    m_max.div_ceil(32 * tm as usize) * n.div_ceil(32 * tn as usize)
                };
                let mut tile = (tm, 4);
                for cand in [(tm, 4), (tm.min(2), 4), (tm.min(2), 2), (1, 2)] {
                    tile = cand;
                    if groups(cand.0, cand.1) >= FILL_GROUPS {
                        break;
                    }
                }
                // Too few 128 x 128 tiles for one full wave: K in slices (split-K), so that the
                // last, partly filled wave costs less.
                let split_k =
                    if tile == (4, 4) && groups(4, 4) <= SPLIT_K_MAX_GROUPS && k >= SPLIT_K_MIN_K {
                        SPLIT_K
                    } else {
                        1
                    };
                GemmVariant::CoopTile {
                    tm: tile.0,
                    tn: tile.1,
                    prefetch: true,
                    opts: TileOpts {
                        split_k,
                        packed: true,
                        ..TileOpts::default()
                    },
                }
            }
            (true, false) => GemmVariant::Coop,
            (false, true) => GemmVariant::Reg { rm: 2 * fit(32) },
            (false, false) => GemmVariant::Tiled,
        }
    }
}

/// Below this many workgroups a smaller tile is tried. On the H200 at M = 512 the 128 x 128
/// tile won over 64 x 128 even with 160 and 224 tiles (o, qkv: 59 and 82 TFLOP/s against 44
/// and 46; benchmarks/runs/2026-11-30-h200-gemm-sweep).
const FILL_GROUPS: usize = 128;

/// Split-K for 128 x 128 tiles: 4 slices where there are at most 160 tiles (about 1.2 waves on
/// the H200's 132 multiprocessors) and K is long. Measured there at M = 512: o (160 tiles)
/// 59 → 74 TFLOP/s, down (160 tiles, K = 27648) 56 → 89; qkv (224 tiles) lost (82 → 75).
const SPLIT_K: u32 = 4;
const SPLIT_K_MAX_GROUPS: usize = 160;
const SPLIT_K_MIN_K: usize = 4096;

/// The most bytes of split-K partial sums the default kernels need (slices x tokens x rows of
/// at most SPLIT_K_MAX_GROUPS 128 x 128 tiles), whatever the shape: for the VRAM plan.
pub const SPLIT_K_SCRATCH_BYTES: u64 = SPLIT_K as u64 * SPLIT_K_MAX_GROUPS as u64 * 128 * 128 * 4;

/// The source of a [`GemmVariant::CoopTile`] kernel with default options (see [`mma_shader_with`]).
pub fn mma_shader(tm: u32, tn: u32, prefetch: bool, sg: u32, emulated: bool) -> String {
    mma_shader_with(tm, tn, prefetch, TileOpts::default(), sg, emulated)
}

/// The source of a [`GemmVariant::CoopTile`] kernel: tile constants, the matrix operations
/// (cooperative matrices, or their plain-WGSL emulation, which needs `sg` = 32), the kernel.
/// `opts.split_k` does not change the source (the slice comes from the dispatch).
pub fn mma_shader_with(
    tm: u32,
    tn: u32,
    prefetch: bool,
    opts: TileOpts,
    sg: u32,
    emulated: bool,
) -> String {
    let ops = if emulated { MMA_EMULATED } else { MMA_COOP };
    // With BK = 64 or double buffers the 128-wide tiles take 36-40 KiB; staging one accumulator
    // column at a time (5 KiB instead of 17) keeps the total under the 48 KiB most adapters allow.
    let stn = if opts.bk64 || opts.double_buffer {
        1
    } else {
        tn
    };
    // Accumulators and fragments as named variables, every index a constant, so the driver can
    // keep them in registers (see the kernel's comment at acc_i_j).
    let mut decl = String::new();
    let mut step = String::new();
    let mut epilogue = String::new();
    for j in 0..tn {
        step += &format!("let b_{j} = load_b(wb + (qn + {}u) * AS2 + kk);\n", 16 * j);
    }
    for i in 0..tm {
        step += &format!("{{\nlet a = load_a(xb + (qm + {}u) * AS2 + kk);\n", 16 * i);
        for j in 0..tn {
            decl += &format!("var acc_{i}_{j} = acc_zero();\n");
            step += &format!("acc_{i}_{j} = mma(a, b_{j}, acc_{i}_{j});\n");
        }
        step += "}\n";
        for j0 in (0..tn).step_by(stn as usize) {
            for j in j0..j0 + stn {
                epilogue += &format!(
                    "store_acc(acc_{i}_{j}, sg * 16u * SS + {}u);\n",
                    16 * (j - j0)
                );
            }
            epilogue += &format!(
                "workgroupBarrier();\nwrite_stage(sg, m0 + qm + {}u, n0 + qn + {}u, m_count, y_off);\nworkgroupBarrier();\n",
                16 * i,
                16 * j0
            );
        }
    }
    let loader = if opts.packed {
        MMA_LOAD_PACKED.to_string()
    } else if opts.x_f16 {
        // The pair as one u32 (the converter's vec2<f16> bytes; exact through f32): with a
        // private array of vec2<f16> the tile ran 3 x slower on the H200 (local memory?).
        format!("alias XElem = u32;\nfn x_to_f16(v: XElem) -> vec2<f16> {{\n    return vec2<f16>(unpack2x16float(v));\n}}\n{MMA_LOAD}")
    } else {
        format!("alias XElem = vec2<f32>;\nfn x_to_f16(v: XElem) -> vec2<f16> {{\n    return vec2<f16>(v);\n}}\n{MMA_LOAD}")
    };
    if opts.ablate & ABLATE_MMA != 0 {
        step.clear();
    }
    let body = MMA
        .replace("    //#ACC_DECL\n", &decl)
        .replace("            //#MMA_STEP\n", &step)
        .replace("    //#EPILOGUE\n", &epilogue);
    format!(
        "const SG: u32 = {sg}u;\nconst TM: u32 = {tm}u;\nconst TN: u32 = {tn}u;\n\
         const PREFETCH: bool = {prefetch};\nconst DB: bool = {};\nconst BK: u32 = {}u;\n\
         const STN: u32 = {stn}u;\nconst ABLATE: u32 = {}u;\n{ops}\n{body}\n{loader}",
        opts.double_buffer,
        opts.bk(),
        opts.ablate
    )
}

/// The source of a [`GemmVariant::Reg`] kernel.
pub fn reg_shader(rm: u32) -> String {
    // Accumulators as named variables (see mma_shader).
    let (mut decl, mut step, mut epilogue) = (String::new(), String::new(), String::new());
    for i in 0..rm {
        step += &format!("let x_{i} = xs[(l.y + {}u) * RS + kq];\n", 16 * i);
    }
    for j in 0..8 {
        step += &format!("{{\nlet w = ws[(l.x + {}u) * RS + kq];\n", 16 * j);
        for i in 0..rm {
            decl += &format!("var acc_{i}_{j} = 0.0;\n");
            step += &format!("acc_{i}_{j} = mac4(acc_{i}_{j}, x_{i}, w);\n");
            epilogue += &format!(
                "write_out(m0 + l.y + {}u, n0 + l.x + {}u, m_count, acc_{i}_{j});\n",
                16 * i,
                16 * j
            );
        }
        step += "}\n";
    }
    let body = REG
        .replace("    //#ACC_DECL\n", &decl)
        .replace("            //#MAC_STEP\n", &step)
        .replace("    //#EPILOGUE\n", &epilogue);
    format!("const RM: u32 = {rm}u;\n{body}")
}

/// Overrides for [`GemmQ4::bind_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmOptions {
    /// Kernel instead of the one [`GemmVariant::default_for`] picks.
    pub variant: Option<GemmVariant>,
    /// Largest binding in bytes instead of the adapter's `max_storage_buffer_binding_size`.
    pub max_binding_bytes: Option<u64>,
}

/// Steps of at most this many tokens use the short-step tile (see [`GemmQ4::bind_with`]).
pub const SMALL_M: usize = 64;

/// One dispatch of a binding: a kernel and the token counts it runs for.
struct Part {
    variant: GemmVariant,
    m_lo: u32,
    m_hi: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    k: u32,
    bpr: u32,
    row_base: u32,
    ldy: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
    /// The new kernels run only for `m_lo < n_tokens <= m_hi` (the first two ignore these).
    m_lo: u32,
    m_hi: u32,
    /// Split-K: K elements per slice (K without split) and elements between Y slices (0).
    k_split: u32,
    y_slice: u32,
}

/// Parameters of shaders/gemm_q4_splitk.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct SplitParams {
    n: u32,
    ldy: u32,
    row_base: u32,
    m_max: u32,
    accumulate: u32,
    has_bias: u32,
    m_lo: u32,
    m_hi: u32,
    slices: u32,
    slice: u32,
    pad: [u32; 2],
}

/// Bytes of packed f16 X (shaders/gemm_q4_x16.wgsl, `main_packed`) for `m_max` tokens: rows of K rounded
/// up to 8 halves. With the largest K, the default kernels' f16 X scratch (for the VRAM plan).
pub fn packed_x_bytes(m_max: usize, k: usize) -> u64 {
    (m_max * k.div_ceil(8) * 16) as u64
}

/// Parameters of shaders/gemm_q4_x16.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct X16Params {
    k2: u32,
    m_max: u32,
    m_lo: u32,
    m_hi: u32,
}

/// The operands of one [`GemmQ4::bind_with`] binding, for each of its dispatches.
struct Operands<'a> {
    w: Q4Ref<'a>,
    x: BufRange<'a>,
    /// X as f16 for the kernels that read it (converted by the binding's first dispatch).
    x16: Option<&'a wgpu::Buffer>,
    y: BufRange<'a>,
    bias: Option<BufRange<'a>>,
    mode: Epilogue,
    m_max: usize,
    step: &'a wgpu::Buffer,
}

impl Operands<'_> {
    /// The bias binding; without a bias the binding still needs a buffer: x's, never read
    /// through it.
    fn bias_binding(&self) -> (&wgpu::Buffer, u64, Option<u64>) {
        match &self.bias {
            Some(b) => (b.buffer, b.offset, Some(self.w.rows as u64 * 4)),
            None => (
                self.x.buffer,
                self.x.offset,
                Some(self.x.size.min(self.w.cols as u64 * 4)),
            ),
        }
    }
}

/// Bytes of the step uniform every kernel binds.
const STEP_BYTES: u64 = std::mem::size_of::<super::StepParams>() as u64;

/// How the cooperative-matrix kernels are built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CoopMode {
    None,
    Hardware,
    Emulated,
}

pub struct GemmQ4 {
    coop: CoopMode,
    subgroup: u32,
    /// Pipelines compiled so far (each on first use: most processes need one or two).
    pipelines: std::sync::Mutex<std::collections::HashMap<GemmVariant, wgpu::ComputePipeline>>,
    /// The split-K reduction and the f16 conversion of X, by name, compiled on first use.
    helpers: std::sync::Mutex<std::collections::HashMap<&'static str, wgpu::ComputePipeline>>,
    /// Split-K partial sums, one buffer shared by every binding (their dispatches run one after
    /// another, each reduction before the next product), grown to the largest asked for.
    partials: std::sync::Mutex<Option<wgpu::Buffer>>,
    /// f16 X, shared the same way (each binding converts its X right before its products).
    x16: std::sync::Mutex<Option<wgpu::Buffer>>,
}

impl GemmQ4 {
    /// The product on this adapter: cooperative-matrix kernels where [`coop_supported`]
    /// (Self::coop_supported), portable ones always. Kernels compile on first use.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let coop = if Self::coop_supported(gpu) {
            CoopMode::Hardware
        } else {
            CoopMode::None
        };
        let kernel = Self::with_mode(gpu, coop);
        // Compile the default kernel now, so a broken shader fails here rather than mid-prompt.
        kernel.pipeline(
            gpu,
            GemmVariant::default_for(coop == CoopMode::Hardware, 128, 4096, 128),
        )?;
        Ok(kernel)
    }

    /// For tests on adapters without cooperative matrices: [`GemmVariant::CoopTile`] kernels
    /// with the matrix operations emulated in plain WGSL (slow, same tiling and semantics).
    /// [`GemmVariant::Coop`] is unavailable.
    pub fn new_emulated(gpu: &Gpu) -> Self {
        Self::with_mode(gpu, CoopMode::Emulated)
    }

    fn with_mode(gpu: &Gpu, coop: CoopMode) -> Self {
        GemmQ4 {
            coop,
            subgroup: gpu.caps.subgroup_max_size,
            pipelines: Default::default(),
            helpers: Default::default(),
            partials: Default::default(),
            x16: Default::default(),
        }
    }

    /// Whether the adapter runs the cooperative-matrix kernels: f16 16x16x16 matrices, f16 and
    /// subgroups, and one fixed subgroup size (the kernels' workgroups are exactly 4 subgroups).
    pub fn coop_supported(gpu: &Gpu) -> bool {
        let c = &gpu.caps;
        c.coop_matrix_f16
            && c.subgroups
            && c.shader_f16
            && c.subgroup_min_size == c.subgroup_max_size
            && c.subgroup_max_size > 0
    }

    /// Whether [`GemmVariant::CoopTile`] kernels are available (on hardware or emulated).
    pub fn has_coop(&self) -> bool {
        self.coop != CoopMode::None
    }

    /// Whether they run on the hardware's cooperative matrices.
    pub fn has_hardware_coop(&self) -> bool {
        self.coop == CoopMode::Hardware
    }

    /// The kernel [`bind`](Self::bind) uses for `m_max` tokens, `n` weight rows and K = `k`.
    pub fn variant_for(&self, m_max: usize, n: usize, k: usize) -> GemmVariant {
        let v = GemmVariant::default_for(self.has_coop(), m_max, n, k);
        if v == GemmVariant::Coop && self.coop == CoopMode::Emulated {
            GemmVariant::Tiled
        } else {
            v
        }
    }

    /// The kernels of one binding. A chosen variant runs alone. By default, where `m_max` is
    /// above [`SMALL_M`] and the tile for short steps differs, two dispatches are bound: the
    /// short-step tile runs when `n_tokens <= SMALL_M`, the long-prompt tile otherwise (the other
    /// exits at once), so a chunk of a few tokens does not pay for 128-token tiles.
    fn plan(
        &self,
        m_max: usize,
        n: usize,
        k: usize,
        chosen: Option<GemmVariant>,
    ) -> Result<Vec<Part>> {
        let what = "gemm_q4";
        let all = |variant| Part {
            variant,
            m_lo: 0,
            m_hi: u32::MAX,
        };
        let parts = match chosen {
            Some(v) => vec![all(v)],
            None => {
                let large = self.variant_for(m_max, n, k);
                let small = self.variant_for(m_max.min(SMALL_M), n, k);
                if small == large || !large.gated() || !small.gated() {
                    vec![all(large)]
                } else {
                    vec![
                        Part {
                            variant: small,
                            m_lo: 0,
                            m_hi: SMALL_M as u32,
                        },
                        Part {
                            variant: large,
                            m_lo: SMALL_M as u32,
                            m_hi: u32::MAX,
                        },
                    ]
                }
            }
        };
        for p in &parts {
            let v = p.variant;
            if !v.valid() {
                return Err(Error::Invalid(format!("{what}: no kernel {v:?}")));
            }
            if v.needs_k4() && k % 4 != 0 {
                return Err(Error::Unsupported(format!(
                    "{what}: {v:?} needs K a multiple of 4, got {k}; use {:?}",
                    GemmVariant::default_for(self.has_hardware_coop(), m_max, n, k)
                )));
            }
        }
        Ok(parts)
    }

    /// The pipeline of `v`, compiled on first use.
    fn pipeline(&self, gpu: &Gpu, v: GemmVariant) -> Result<wgpu::ComputePipeline> {
        let what = "gemm_q4";
        if !v.valid() {
            return Err(Error::Invalid(format!("{what}: no kernel {v:?}")));
        }
        let hw = self.coop == CoopMode::Hardware;
        if v.is_coop() && !(hw || (self.coop == CoopMode::Emulated && v != GemmVariant::Coop)) {
            return Err(Error::Unsupported(format!(
                "{what}: the adapter has no f16 16x16x16 cooperative matrices ({v:?})"
            )));
        }
        // Split-K does not change the kernel's source: one pipeline for every split.
        let v = match v {
            GemmVariant::CoopTile {
                tm,
                tn,
                prefetch,
                opts,
            } => GemmVariant::CoopTile {
                tm,
                tn,
                prefetch,
                opts: TileOpts { split_k: 1, ..opts },
            },
            other => other,
        };
        let mut cache = self
            .pipelines
            .lock()
            .map_err(|_| Error::Gpu(format!("{what}: pipeline cache poisoned")))?;
        if let Some(p) = cache.get(&v) {
            return Ok(p.clone());
        }
        let label = format!("gemm_q4/{v:?}");
        // The tiled kernels stay in bounds by construction (every index is checked against the
        // shape before use, shapes at bind time) and their loops have constant or shape bounds:
        // they run without naga's checks, which keep the driver from unrolling the inner loops.
        let p = match v {
            GemmVariant::Tiled => gpu.compute_pipeline(&label, PORTABLE, "main", &[])?,
            GemmVariant::Coop => {
                // Exactly 4 subgroups: every subgroup computes a quarter of the tile.
                let wg = 4 * self.subgroup;
                gpu.compute_pipeline(&label, COOP, "main", &[("WG", wg as f64)])?
            }
            GemmVariant::Reg { rm } => {
                gpu.compute_pipeline_unchecked(&label, &reg_shader(rm), "main", &[])?
            }
            GemmVariant::CoopTile {
                tm,
                tn,
                prefetch,
                opts,
            } => {
                // A clear error rather than a driver failure. Checked on the hardware only:
                // lavapipe reports 32 KiB but runs the plain 128 x 128 tile's 37 KiB, which the
                // emulated tests rely on.
                let bytes = opts.workgroup_bytes(tm, tn);
                let limit = gpu.limits.max_compute_workgroup_storage_size as u64;
                if hw && bytes > limit {
                    return Err(Error::Unsupported(format!(
                        "{what}: {} needs {bytes} bytes of workgroup memory, the adapter has \
                         {limit}; use a smaller tile or fewer options",
                        v.short_name()
                    )));
                }
                let (sg, emulated) = if hw {
                    (self.subgroup, false)
                } else {
                    (32, true)
                };
                gpu.compute_pipeline_unchecked(
                    &label,
                    &mma_shader_with(tm, tn, prefetch, opts, sg, emulated),
                    "main",
                    &[],
                )?
            }
        };
        cache.insert(v, p.clone());
        Ok(p)
    }

    /// The pipeline of a helper kernel (`splitk`, `x16` or `x16p`), compiled on first use.
    fn helper(&self, gpu: &Gpu, name: &'static str) -> Result<wgpu::ComputePipeline> {
        let mut cache = self
            .helpers
            .lock()
            .map_err(|_| Error::Gpu("gemm_q4: pipeline cache poisoned".into()))?;
        if let Some(p) = cache.get(name) {
            return Ok(p.clone());
        }
        let (source, entry) = match name {
            "splitk" => (SPLITK, "main"),
            "x16p" => (X16, "main_packed"),
            _ => (X16, "main"),
        };
        let p = gpu.compute_pipeline(&format!("gemm_q4/{name}"), source, entry, &[])?;
        cache.insert(name, p.clone());
        Ok(p)
    }

    /// Binds `Y = X Wᵀ` (see [`Epilogue`]) for `x: [m_max, cols]`, `y: [m_max, rows]`,
    /// `bias: [rows]` f32, row-major; `step` is the shared [`StepParams`](super::StepParams)
    /// uniform. Returns one dispatch per row range of W, or two where the
    /// default picks different tiles for short steps and long prompts (see [`SMALL_M`]), to
    /// encode in order.
    #[allow(clippy::too_many_arguments)]
    pub fn bind(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        m_max: usize,
        step: &wgpu::Buffer,
    ) -> Result<Vec<Dispatch>> {
        self.bind_with(
            gpu,
            w,
            x,
            y,
            bias,
            mode,
            m_max,
            step,
            &GemmOptions::default(),
        )
    }

    /// [`bind`](Self::bind) with a chosen kernel or binding limit.
    #[allow(clippy::too_many_arguments)]
    pub fn bind_with(
        &self,
        gpu: &Gpu,
        w: Q4Ref,
        x: BufRange,
        y: BufRange,
        bias: Option<BufRange>,
        mode: Epilogue,
        m_max: usize,
        step: &wgpu::Buffer,
        opts: &GemmOptions,
    ) -> Result<Vec<Dispatch>> {
        let what = "gemm_q4";
        check_matrix(gpu, what, &w)?;
        if m_max == 0 {
            return Err(Error::Invalid(format!("{what}: m_max must be at least 1")));
        }
        let m = m_max as u64;
        check_operands(
            gpu,
            what,
            &x,
            m * w.cols as u64 * 4,
            &y,
            m * w.rows as u64 * 4,
        )?;
        if let Some(b) = &bias {
            check_vector(gpu, what, "bias", b, w.rows as u64 * 4)?;
        }
        if m * (w.cols.max(w.rows) as u64) > u32::MAX as u64 {
            return Err(Error::Unsupported(format!(
                "{what}: {m_max}x{} too large for 32-bit indexing",
                w.cols.max(w.rows)
            )));
        }
        let parts = self.plan(m_max, w.rows, w.cols, opts.variant)?;
        let max_binding = opts
            .max_binding_bytes
            .unwrap_or(gpu.limits.max_storage_buffer_binding_size);
        let mut out = Vec::new();
        // f16 X: converted once, before every product of the binding that reads it.
        let x16 = self.x16_dispatch(gpu, &parts, x, m_max, w.cols, step)?;
        let x16 = x16.map(|(d, b)| {
            out.push(d);
            b
        });
        let operands = Operands {
            w,
            x,
            x16: x16.as_ref(),
            y,
            bias,
            mode,
            m_max,
            step,
        };
        for c in row_chunks(gpu, what, &w, max_binding)? {
            for part in &parts {
                out.extend(self.bind_part(gpu, &operands, &c, part)?);
            }
        }
        Ok(out)
    }

    /// The product of one row range of W by one kernel of the binding (see [`Part`]), and with
    /// split-K the reduction after it.
    fn bind_part(
        &self,
        gpu: &Gpu,
        o: &Operands,
        c: &RowChunk,
        part: &Part,
    ) -> Result<Vec<Dispatch>> {
        let (w, m_max) = (&o.w, o.m_max);
        let m = m_max as u64;
        let (tile_m, tile_n) = part.variant.tile();
        let opts = match part.variant {
            GemmVariant::CoopTile { opts, .. } => opts,
            _ => TileOpts::default(),
        };
        let (k_split, slices) = opts.slices(w.cols);
        let split = slices > 1;
        let n_groups = c.rows.div_ceil(tile_n) as u32;
        let m_rows = m_max.min(part.m_hi as usize);
        let m_groups = m_rows.div_ceil(tile_m) as u32;
        let max_groups = gpu.limits.max_compute_workgroups_per_dimension;
        if n_groups > max_groups || m_groups > max_groups || (split && m_rows as u32 > max_groups) {
            return Err(Error::Unsupported(format!(
                "gemm_q4: {m_max}x{} needs too many workgroups",
                c.rows
            )));
        }
        let params = Params {
            n: c.rows as u32,
            k: w.cols as u32,
            bpr: blocks_per_row(w.cols) as u32,
            row_base: if split { 0 } else { c.row0 as u32 },
            ldy: if split { c.rows } else { w.rows } as u32,
            m_max: m_max as u32,
            accumulate: (!split && o.mode == Epilogue::Accumulate) as u32,
            has_bias: (!split && o.bias.is_some()) as u32,
            m_lo: part.m_lo,
            m_hi: part.m_hi,
            k_split: k_split as u32,
            y_slice: if split { (m_max * c.rows) as u32 } else { 0 },
        };
        let label = format!(
            "gemm_q4/{} {}x{} rows {}..{} m_max {m_max}",
            part.variant.short_name(),
            w.rows,
            w.cols,
            c.row0,
            c.row0 + c.rows
        );
        // Split-K partial sums: slices x m_max x chunk rows, summed by a second dispatch.
        let scratch = if split {
            Some(self.partials_buffer(gpu, slices, m_max, c.rows)?)
        } else {
            None
        };
        let x_binding = match o.x16 {
            Some(b) if opts.packed => (b, 0, Some(packed_x_bytes(m_max, w.cols))),
            Some(b) if opts.x_f16 => (b, 0, Some(m * w.cols as u64 * 2)),
            _ => (o.x.buffer, o.x.offset, Some(m * w.cols as u64 * 4)),
        };
        let y_whole = (o.y.buffer, o.y.offset, Some(m * w.rows as u64 * 4));
        let y_binding = match &scratch {
            Some(b) => (b, 0, None),
            None => y_whole,
        };
        let bias = o.bias_binding();
        let pipeline = self.pipeline(gpu, part.variant)?;
        let params_buf = gpu.uniform(&label, &params);
        let bind_group = gpu.bind_group_ranges(
            &label,
            &pipeline,
            &[
                (&params_buf, 0, None),
                (o.step, 0, Some(STEP_BYTES)),
                (w.qweight.buffer, c.qweight.0, Some(c.qweight.1)),
                (w.scales.buffer, c.scales.0, Some(c.scales.1)),
                x_binding,
                bias,
                y_binding,
            ],
        );
        let mut out = vec![Dispatch {
            label: label.clone(),
            pipeline,
            bind_group,
            workgroups: [n_groups, m_groups, slices as u32],
            params: Some(params_buf),
        }];
        if let Some(partials) = &scratch {
            let sp = SplitParams {
                n: c.rows as u32,
                ldy: w.rows as u32,
                row_base: c.row0 as u32,
                m_max: m_max as u32,
                accumulate: (o.mode == Epilogue::Accumulate) as u32,
                has_bias: o.bias.is_some() as u32,
                m_lo: part.m_lo,
                m_hi: part.m_hi,
                slices: slices as u32,
                slice: (m_max * c.rows) as u32,
                pad: [0; 2],
            };
            out.push(self.splitk_dispatch(
                gpu,
                &format!("{label} split-K sum"),
                &sp,
                o.step,
                [(partials, 0, None), bias, y_whole],
                [c.rows.div_ceil(256) as u32, m_rows as u32, 1],
            )?);
        }
        Ok(out)
    }

    /// The split-K reduction of one row range: `ranges` are the partial sums, bias and Y.
    fn splitk_dispatch(
        &self,
        gpu: &Gpu,
        label: &str,
        params: &SplitParams,
        step: &wgpu::Buffer,
        ranges: [(&wgpu::Buffer, u64, Option<u64>); 3],
        workgroups: [u32; 3],
    ) -> Result<Dispatch> {
        let pipeline = self.helper(gpu, "splitk")?;
        let params_buf = gpu.uniform(label, params);
        let step_bytes = Some(STEP_BYTES);
        let [partials, bias, y] = ranges;
        let bind_group = gpu.bind_group_ranges(
            label,
            &pipeline,
            &[
                (&params_buf, 0, None),
                (step, 0, step_bytes),
                partials,
                bias,
                y,
            ],
        );
        Ok(Dispatch {
            label: label.to_string(),
            pipeline,
            bind_group,
            workgroups,
            params: Some(params_buf),
        })
    }

    /// The conversion of X to f16 for the parts that read it ([`TileOpts::x_f16`] or
    /// [`TileOpts::packed`]; one binding's readers all want the same layout): a dispatch running
    /// whenever one of them does, and the f16 buffer (m_max x K, or m_max x K rounded up to 8
    /// when packed).
    fn x16_dispatch(
        &self,
        gpu: &Gpu,
        parts: &[Part],
        x: BufRange,
        m_max: usize,
        k: usize,
        step: &wgpu::Buffer,
    ) -> Result<Option<(Dispatch, wgpu::Buffer)>> {
        let opts_of = |p: &&Part| match p.variant {
            GemmVariant::CoopTile { opts, .. } => Some(opts),
            _ => None,
        };
        let readers: Vec<&Part> = parts
            .iter()
            .filter(|p| opts_of(p).is_some_and(|o| o.x_f16 || o.packed))
            .collect();
        let packed = readers.iter().any(|p| opts_of(p).is_some_and(|o| o.packed));
        if packed && !readers.iter().all(|p| opts_of(p).is_some_and(|o| o.packed)) {
            return Err(Error::Invalid(
                "gemm_q4: one binding cannot mix packed and pairwise f16 X".into(),
            ));
        }
        let (Some(lo), Some(hi)) = (
            readers.iter().map(|p| p.m_lo).min(),
            readers.iter().map(|p| p.m_hi).max(),
        ) else {
            return Ok(None);
        };
        let rows = m_max.min(hi as usize);
        if rows as u64 > gpu.limits.max_compute_workgroups_per_dimension as u64 {
            return Err(Error::Unsupported(format!(
                "gemm_q4: f16 X of {m_max} tokens needs too many workgroups; use x_f16 = false"
            )));
        }
        let (name, bytes, threads) = if packed {
            ("x16p", packed_x_bytes(m_max, k), k.div_ceil(8))
        } else {
            ("x16", (m_max * k * 2) as u64, k / 2)
        };
        let label = format!("gemm_q4/{name} {m_max}x{k}");
        let buf = shared_buffer(gpu, &self.x16, "gemm_q4 f16 X", bytes)?;
        let params = X16Params {
            k2: (k / 2) as u32,
            m_max: m_max as u32,
            m_lo: lo,
            m_hi: hi,
        };
        let pipeline = self.helper(gpu, name)?;
        let params_buf = gpu.uniform(&label, &params);
        let bind_group = gpu.bind_group_ranges(
            &label,
            &pipeline,
            &[
                (&params_buf, 0, None),
                (step, 0, Some(STEP_BYTES)),
                (x.buffer, x.offset, Some((m_max * k * 4) as u64)),
                (&buf, 0, None),
            ],
        );
        let d = Dispatch {
            label,
            pipeline,
            bind_group,
            workgroups: [threads.div_ceil(256) as u32, rows as u32, 1],
            params: Some(params_buf),
        };
        Ok(Some((d, buf)))
    }
}

impl GemmQ4 {
    /// The shared buffer of split-K partial sums, at least `slices` x `m_max` x `rows` f32.
    fn partials_buffer(
        &self,
        gpu: &Gpu,
        slices: usize,
        m_max: usize,
        rows: usize,
    ) -> Result<wgpu::Buffer> {
        let bytes = (slices * m_max * rows * 4) as u64;
        shared_buffer(gpu, &self.partials, "gemm_q4 split-K partials", bytes)
    }
}

/// The buffer in `slot` if it holds `bytes`, else a new one that replaces it there (bindings made
/// before keep the old one): scratch that every binding's dispatches use one after another.
fn shared_buffer(
    gpu: &Gpu,
    slot: &std::sync::Mutex<Option<wgpu::Buffer>>,
    label: &str,
    bytes: u64,
) -> Result<wgpu::Buffer> {
    let mut shared = slot
        .lock()
        .map_err(|_| Error::Gpu(format!("{label}: lock poisoned")))?;
    if let Some(b) = shared.as_ref().filter(|b| b.size() >= bytes) {
        return Ok(b.clone());
    }
    let limit = gpu
        .limits
        .max_storage_buffer_binding_size
        .min(gpu.limits.max_buffer_size);
    if bytes > limit {
        return Err(Error::Unsupported(format!(
            "{label}: {bytes} bytes, over the adapter's {limit}; use fewer tokens per chunk \
             (--chunk) or fewer split-K slices"
        )));
    }
    let b = gpu.storage_buffer(label, bytes);
    *shared = Some(b.clone());
    Ok(b)
}

//! The GPU device: adapter choice, features and limits, buffers, pipelines, read-back.
//! The only module (with `kernels/`) that calls wgpu directly.

use crate::error::{Error, Result};
use wgpu::util::DeviceExt;

pub mod testing;

/// What the adapter can do, as far as kernel choice is concerned.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    /// f16 16x16x16 cooperative matrices with an f32 accumulator (tensor cores).
    pub coop_matrix_f16: bool,
    pub mappable_primary_buffers: bool,
    pub timestamps: bool,
}

pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pub caps: Caps,
    /// The driver's compiled pipelines, loaded from and saved to the q4wgpu cache folder where the
    /// adapter supports it (Vulkan's VkPipelineCache), so later runs skip most compilation.
    pipeline_cache: Option<(wgpu::PipelineCache, std::path::PathBuf)>,
}

const NO_ADAPTER_HELP: &str =
    "no Vulkan adapter found. Install a Vulkan driver: your GPU vendor's \
driver (NVIDIA, AMD, Intel), or Mesa's CPU driver for testing (Debian/Ubuntu: \
`apt-get install mesa-vulkan-drivers`), and the loader (`libvulkan1`). `vulkaninfo --summary` \
should list a device.";

fn instance() -> wgpu::Instance {
    let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::VULKAN);
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

/// All adapters, for `q4wgpu info`.
pub fn list_adapters() -> Vec<wgpu::AdapterInfo> {
    let inst = instance();
    pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|a| a.get_info())
        .collect()
}

fn device_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

impl Gpu {
    /// Opens the best adapter: a discrete GPU first. `name_filter` (from `--adapter` or
    /// `WGPU_ADAPTER_NAME`) picks the first adapter whose name contains it, case-insensitively.
    pub fn new(name_filter: Option<&str>) -> Result<Gpu> {
        Self::new_with(name_filter, true)
    }

    /// Like [`new`](Self::new); with `cooperative_matrices` false the adapter's cooperative
    /// matrices go unused (`--no-coop`: the portable kernels that other adapters run, measured
    /// on this one).
    pub fn new_with(name_filter: Option<&str>, cooperative_matrices: bool) -> Result<Gpu> {
        let inst = instance();
        let mut adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::all()));
        if adapters.is_empty() {
            return Err(Error::Gpu(NO_ADAPTER_HELP.into()));
        }
        let env_filter = std::env::var("WGPU_ADAPTER_NAME").ok();
        let filter = name_filter.map(str::to_string).or(env_filter);
        adapters.sort_by_key(|a| device_rank(a.get_info().device_type));
        let adapter = match &filter {
            Some(f) => {
                let f_low = f.to_lowercase();
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&f_low))
                    .ok_or_else(|| {
                        Error::Gpu(format!("no adapter matches {f:?}; available: {names:?}"))
                    })?
            }
            None => adapters.remove(0),
        };
        Self::from_adapter(adapter, cooperative_matrices)
    }

    fn from_adapter(adapter: wgpu::Adapter, cooperative_matrices: bool) -> Result<Gpu> {
        let info = adapter.get_info();
        let offered = adapter.features();
        let wanted = wgpu::Features::SHADER_F16
            | wgpu::Features::SUBGROUP
            | wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
            | wgpu::Features::PIPELINE_CACHE;
        let features = offered & wanted;
        let coop_matrix_f16 = cooperative_matrices
            && features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && adapter.cooperative_matrix_properties().iter().any(|p| {
                p.m_size == 16
                    && p.n_size == 16
                    && p.k_size == 16
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            });
        let features = if coop_matrix_f16 {
            features
        } else {
            features - wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        };
        // Ask for everything the adapter offers: large bindings and buffers are what big models need.
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("q4wgpu"),
            required_features: features,
            required_limits: limits.clone(),
            // SAFETY: cooperative matrices are only used through kernels that check `caps`, and
            // their results are tested against the CPU reference.
            experimental_features: unsafe { wgpu::ExperimentalFeatures::enabled() },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .map_err(|e| Error::Gpu(format!("opening {}: {e}", info.name)))?;
        let caps = Caps {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            coop_matrix_f16,
            mappable_primary_buffers: features.contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
        };
        let pipeline_cache = features
            .contains(wgpu::Features::PIPELINE_CACHE)
            .then(|| open_pipeline_cache(&device, &info))
            .flatten();
        Ok(Gpu {
            adapter,
            device,
            queue,
            info,
            limits,
            features,
            caps,
            pipeline_cache,
        })
    }

    /// Writes the driver's compiled pipelines to the cache folder (through a temporary file and a
    /// rename), for the next run. Does nothing where the adapter has no pipeline cache.
    pub fn save_pipeline_cache(&self) -> Result<()> {
        let Some((cache, path)) = &self.pipeline_cache else {
            return Ok(());
        };
        let Some(data) = cache.get_data() else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io("creating the pipeline cache folder", dir, e))?;
        }
        crate::formats::hf::write_atomically(path, &data)
    }

    /// Where this adapter's pipeline cache is kept, if it has one.
    pub fn pipeline_cache_path(&self) -> Option<&std::path::Path> {
        self.pipeline_cache.as_ref().map(|(_, p)| p.as_path())
    }

    /// True for a CPU driver (lavapipe/llvmpipe, SwiftShader): the GPU path emulated on the CPU.
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The size of the largest device-local memory heap, from Vulkan's memory properties
    /// (`None` on other backends). On a CPU driver this is system memory.
    pub fn device_local_bytes(&self) -> Option<u64> {
        // SAFETY: the raw handles are only used for a read-only query while the adapter lives.
        unsafe {
            let hal = self.adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
            let instance = hal.shared_instance().raw_instance();
            let props = instance.get_physical_device_memory_properties(hal.raw_physical_device());
            props.memory_heaps[..props.memory_heap_count as usize]
                .iter()
                .filter(|h| h.flags.contains(ash::vk::MemoryHeapFlags::DEVICE_LOCAL))
                .map(|h| h.size)
                .max()
        }
    }

    /// The VRAM budget when none is given: the device-local heap less a margin of 10 % (at least
    /// 512 MiB) for the driver, other programs and transient upload buffers. Says where it came from.
    pub fn default_vram_budget(&self) -> Option<(u64, String)> {
        let heap = self.device_local_bytes()?;
        let margin = (heap / 10).max(512 << 20);
        let budget = heap.saturating_sub(margin);
        Some((
            budget,
            format!(
                "device-local heap of {:.2} GB (Vulkan memory properties) less a {:.2} GB margin",
                heap as f64 / 1e9,
                margin as f64 / 1e9
            ),
        ))
    }

    /// One line naming the adapter, for stderr and `info`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name,
            self.info.device_type,
            self.info.backend,
            self.info.driver,
            self.info.driver_info
        )
    }

    /// A storage buffer that kernels read and write, and that copies go to and from.
    pub fn storage_buffer(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// A storage buffer filled with `data` (padded to a multiple of 4 bytes).
    pub fn storage_from_bytes(&self, label: &str, data: &[u8]) -> wgpu::Buffer {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        if data.len() % 4 == 0 && !data.is_empty() {
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: data,
                    usage,
                })
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4).max(4), 0);
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: &padded,
                    usage,
                })
        }
    }

    pub fn storage_from<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> wgpu::Buffer {
        self.storage_from_bytes(label, bytemuck::cast_slice(data))
    }

    /// A uniform buffer holding one `#[repr(C)]` params struct; written again with `write_uniform`.
    pub fn uniform<T: bytemuck::Pod>(&self, label: &str, value: &T) -> wgpu::Buffer {
        let bytes = bytemuck::bytes_of(value);
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(16).max(16), 0);
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Compiles a kernel: `shaders/common.wgsl` followed by the kernel's own file, with
    /// `override` constants set. Validation errors come back as `Error::Gpu` naming the kernel.
    /// Buffer accesses stay bounds-checked; naga's loop counter is left out, because it keeps the
    /// driver from unrolling loops (see `compute_pipeline_unchecked`) and every loop of our kernels
    /// is bounded by its shape parameters.
    pub fn compute_pipeline(
        &self,
        label: &str,
        source: &str,
        entry_point: &str,
        overrides: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        let checks = wgpu::ShaderRuntimeChecks {
            force_loop_bounding: false,
            ..wgpu::ShaderRuntimeChecks::checked()
        };
        self.pipeline_with_checks(label, source, entry_point, overrides, checks)
    }

    /// Like `compute_pipeline`, without the checks naga otherwise adds to the shader: index
    /// clamping on every buffer access and a counter that bounds every loop. The counter keeps the
    /// driver from unrolling loops, so per-thread arrays go to local memory: on the H100 a tiled
    /// attention kernel ran 6.5 times faster without the checks (2.2 → 14 TFLOP/s).
    /// Only for kernels whose indices stay in bounds by construction (shapes checked at bind
    /// time, per-step values clamped in the shader) and whose loops all terminate.
    pub fn compute_pipeline_unchecked(
        &self,
        label: &str,
        source: &str,
        entry_point: &str,
        overrides: &[(&str, f64)],
    ) -> Result<wgpu::ComputePipeline> {
        self.pipeline_with_checks(
            label,
            source,
            entry_point,
            overrides,
            wgpu::ShaderRuntimeChecks::unchecked(),
        )
    }

    fn pipeline_with_checks(
        &self,
        label: &str,
        source: &str,
        entry_point: &str,
        overrides: &[(&str, f64)],
        checks: wgpu::ShaderRuntimeChecks,
    ) -> Result<wgpu::ComputePipeline> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let desc = wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(shader_source(source).into()),
        };
        // SAFETY: with `checked()` this is `create_shader_module`; otherwise the caller's kernel
        // stays in bounds and terminates (see `compute_pipeline_unchecked`).
        let module = unsafe { self.device.create_shader_module_trusted(desc, checks) };
        let constants: Vec<(&str, f64)> = overrides.to_vec();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(label),
                layout: None,
                module: &module,
                entry_point: Some(entry_point),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: self.pipeline_cache.as_ref().map(|(c, _)| c),
            });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!("compiling kernel {label}: {err}")));
        }
        Ok(pipeline)
    }

    /// A bind group over `buffers` bound at 0, 1, 2, ... of group 0 (whole buffers).
    pub fn bind_group(
        &self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Like `bind_group`, with explicit byte ranges (for tensors split across bindings, ring slots).
    pub fn bind_group_ranges(
        &self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        ranges: &[(&wgpu::Buffer, u64, Option<u64>)],
    ) -> wgpu::BindGroup {
        let numbered: Vec<_> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(b, offset, size))| (i as u32, b, offset, size))
            .collect();
        self.bind_group_numbered(label, pipeline, &numbered)
    }

    /// Like `bind_group_ranges`, with each entry's binding number given (for a layout with gaps).
    pub fn bind_group_numbered(
        &self,
        label: &str,
        pipeline: &wgpu::ComputePipeline,
        ranges: &[(u32, &wgpu::Buffer, u64, Option<u64>)],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = ranges
            .iter()
            .map(|&(binding, b, offset, size)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b,
                    offset,
                    size: size.and_then(wgpu::BufferSize::new),
                }),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(label),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Waits until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))
    }

    /// Copies `size` bytes at `offset` of `buffer` back to the host (blocking).
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("readback"),
            });
        enc.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        self.map_and_read(&staging, size)
    }

    /// Maps a MAP_READ buffer that a submitted command fills, and copies its first `size` bytes out.
    pub fn map_and_read(&self, staging: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        self.map_and_read_after(staging, size, None)
    }

    /// [`map_and_read`](Self::map_and_read), waiting only for `submission` (the one that fills
    /// `staging`) when given, not for work submitted after it.
    pub fn map_and_read_after(
        &self,
        staging: &wgpu::Buffer,
        size: u64,
        submission: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        let slice = staging.slice(..size);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: submission,
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        rx.recv()
            .map_err(|_| Error::Gpu("read-back callback never ran".into()))?
            .map_err(|e| Error::Gpu(format!("mapping a read-back buffer: {e}")))?;
        let out = slice
            .get_mapped_range()
            .map_err(|e| Error::Gpu(format!("reading a mapped buffer: {e}")))?
            .to_vec();
        staging.unmap();
        Ok(out)
    }

    pub fn read_f32(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, 0, (len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    pub fn read_u32(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u32>> {
        let bytes = self.read_bytes(buffer, 0, (len * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// The pipeline cache of `info`'s adapter, seeded from `<cache>/pipelines/` when a saved one is
/// there. wgpu checks the saved data's header against the driver and starts empty on a mismatch
/// (`fallback`), so a stale or foreign file only costs the compile it would have saved.
fn open_pipeline_cache(
    device: &wgpu::Device,
    info: &wgpu::AdapterInfo,
) -> Option<(wgpu::PipelineCache, std::path::PathBuf)> {
    let key = wgpu::util::pipeline_cache_key(info)?;
    let path = crate::fetch::cache_dir()
        .join("pipelines")
        .join(format!("{key}.bin"));
    let data = std::fs::read(&path).ok();
    // SAFETY: the data is what `PipelineCache::get_data` returned in an earlier run (we write
    // nothing else to this path), and wgpu validates its header before the driver sees it.
    let cache = unsafe {
        device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
            label: Some("q4wgpu pipelines"),
            data: data.as_deref(),
            fallback: true,
        })
    };
    Some((cache, path))
}

/// Mesa's Vulkan device-selection layer (an implicit layer on most Linux systems) connects to the
/// window system while devices are enumerated, and prints `error: XDG_RUNTIME_DIR is invalid or
/// not set` on every command of a headless machine. q4wgpu picks its adapter itself, so the layer
/// is switched off (its documented `NODEVICE_SELECT=1`) unless the user set it up explicitly
/// (`MESA_VK_DEVICE_SELECT`). Call before any thread starts: it sets an environment variable.
pub fn quiet_device_select_layer() {
    let user_chose = std::env::var_os("MESA_VK_DEVICE_SELECT").is_some()
        || std::env::var_os("NODEVICE_SELECT").is_some();
    if !user_chose {
        // SAFETY (edition 2021: a safe call): the caller runs this before spawning threads.
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

/// The shared helpers (`shaders/common.wgsl`) followed by a kernel's source. A kernel's `enable`
/// directives must open the module, so they are moved before the helpers.
pub fn shader_source(kernel: &str) -> String {
    let (enables, body): (Vec<&str>, Vec<&str>) = kernel
        .lines()
        .partition(|l| l.trim_start().starts_with("enable "));
    format!(
        "{}\n{}\n{}",
        enables.join("\n"),
        include_str!("../../shaders/common.wgsl"),
        body.join("\n")
    )
}

/// Workgroup count for `n` items at `per_group` each.
pub fn groups(n: usize, per_group: usize) -> u32 {
    n.div_ceil(per_group) as u32
}

/// Splits a 1-D dispatch of `groups` workgroups into (x, y) within the 65535 per-dimension limit;
/// kernels recover the linear id as `wid.x + wid.y * num_workgroups.x`.
pub fn dispatch_2d(groups: u32) -> (u32, u32) {
    if groups <= 65535 {
        (groups, 1)
    } else {
        let y = groups.div_ceil(65535);
        (groups.div_ceil(y), y)
    }
}

//! What the Vulkan driver made of each kernel variant: the statistics of
//! VK_KHR_pipeline_executable_properties (on NVIDIA: register count, shared memory and more),
//! without Nsight. A kernel that spills or runs with few warps per multiprocessor shows here
//! before it shows in a timing.
//!
//! `cargo bench --bench shader_stats` (scripts/device-prepare.sh ships it as
//! .device-bin/tests/shader-stats). `Q4WGPU_ADAPTER=name` picks the device (default: the first
//! that is not a CPU); `Q4WGPU_STATS_FILTER=text` keeps the kernels whose name contains it.
//!
//! The WGSL goes through wgpu's naga with the options of our unchecked pipelines (no bounds
//! checks, no loop counter, SPIR-V 1.6), so the driver compiles the code wgpu would give it.

use std::error::Error;
use std::ffi::CStr;

use ash::vk;
use q4wgpu::gpu::testing::translate_to_spirv;
use q4wgpu::kernels::gemm_q4::{mma_shader_with, TileOpts};
use q4wgpu::kernels::gemv_q4_q8;

type Res<T> = Result<T, Box<dyn Error>>;

/// One kernel to compile: a name for the table, its WGSL (before `shader_source`), overrides.
struct Kernel {
    name: String,
    source: String,
    overrides: Vec<(&'static str, f64)>,
}

fn kernels() -> Vec<Kernel> {
    let mut out = Vec::new();
    let tile_opts = [
        ("", TileOpts::default()),
        (
            " x16",
            TileOpts {
                x_f16: true,
                ..TileOpts::default()
            },
        ),
        (
            " pk",
            TileOpts {
                packed: true,
                ..TileOpts::default()
            },
        ),
        (
            " db",
            TileOpts {
                double_buffer: true,
                ..TileOpts::default()
            },
        ),
        (
            " bk64",
            TileOpts {
                bk64: true,
                ..TileOpts::default()
            },
        ),
    ];
    for (tm, tn) in [(4, 4), (4, 2), (2, 4), (2, 2), (1, 4)] {
        for prefetch in [true, false] {
            for (suffix, opts) in tile_opts {
                out.push(Kernel {
                    name: format!(
                        "gemm coop {}x{}{}{suffix}",
                        32 * tm,
                        32 * tn,
                        if prefetch { " pf" } else { "" }
                    ),
                    source: mma_shader_with(tm, tn, prefetch, opts, 32, false),
                    overrides: vec![],
                });
            }
        }
    }
    for (wg, rows) in [(32, 4), (128, 1), (32, 2), (32, 8)] {
        out.push(Kernel {
            name: format!("gemv_q4_q8 wg{wg} rows{rows}"),
            source: gemv_q4_q8::shader(true, 0),
            overrides: vec![("WG", wg as f64), ("ROWS", rows as f64)],
        });
        for cols in [2, 4, 8] {
            for (lanes, layout) in [(false, ""), (true, " lanes")] {
                out.push(Kernel {
                    name: format!("gemv_q4_q8 x{cols}{layout} wg{wg} rows{rows}"),
                    source: gemv_q4_q8::batch_shader(true, cols, lanes),
                    overrides: vec![("WG", wg as f64), ("ROWS", rows as f64)],
                });
            }
        }
    }
    out
}

/// WGSL to SPIR-V words for entry point `main`, overrides applied, no runtime checks.
fn spirv(kernel: &Kernel) -> Res<Vec<u32>> {
    translate_to_spirv(&kernel.source, &kernel.overrides, true)
        .map_err(|e| format!("{}: {e}", kernel.name).into())
}

/// The (group, binding, descriptor type) of every buffer the kernel declares.
fn bindings(kernel: &Kernel) -> Res<Vec<(u32, u32, vk::DescriptorType)>> {
    use wgpu::naga;
    let source = q4wgpu::gpu::shader_source(&kernel.source);
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (_, var) in module.global_variables.iter() {
        let Some(b) = &var.binding else { continue };
        let ty = match var.space {
            naga::AddressSpace::Uniform => vk::DescriptorType::UNIFORM_BUFFER,
            naga::AddressSpace::Storage { .. } => vk::DescriptorType::STORAGE_BUFFER,
            other => return Err(format!("{}: binding in {other:?}", kernel.name).into()),
        };
        out.push((b.group, b.binding, ty));
    }
    Ok(out)
}

/// A logical device with pipeline statistics, and the features our kernels use where present.
struct Device {
    _entry: ash::Entry,
    instance: ash::Instance,
    device: ash::Device,
    stats: ash::khr::pipeline_executable_properties::Device,
    name: String,
}

impl Device {
    fn open() -> Res<Device> {
        // SAFETY: loading the system's Vulkan loader; its functions are used as Vulkan specifies.
        let entry = unsafe { ash::Entry::load()? };
        let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
        let instance = unsafe {
            entry.create_instance(
                &vk::InstanceCreateInfo::default().application_info(&app),
                None,
            )?
        };
        let wanted = std::env::var("Q4WGPU_ADAPTER")
            .unwrap_or_default()
            .to_lowercase();
        let mut chosen = None;
        for pd in unsafe { instance.enumerate_physical_devices()? } {
            let props = unsafe { instance.get_physical_device_properties(pd) };
            let name = props
                .device_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default();
            let fits = if wanted.is_empty() {
                props.device_type != vk::PhysicalDeviceType::CPU
            } else {
                name.to_lowercase().contains(&wanted)
            };
            if fits || chosen.is_none() {
                chosen = Some((pd, name));
                if fits {
                    break;
                }
            }
        }
        let (pd, name) = chosen.ok_or("no Vulkan device")?;
        let exts = unsafe { instance.enumerate_device_extension_properties(pd)? };
        let has = |want: &CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(want));
        if !has(ash::khr::pipeline_executable_properties::NAME) {
            return Err(format!("{name} lacks VK_KHR_pipeline_executable_properties").into());
        }
        let coop = has(ash::khr::cooperative_matrix::NAME);
        let mut ext_names = vec![ash::khr::pipeline_executable_properties::NAME.as_ptr()];
        if coop {
            ext_names.push(ash::khr::cooperative_matrix::NAME.as_ptr());
        }
        // Ask which features exist, then enable exactly those (robust buffer access stays off:
        // wgpu's unchecked pipelines do not rely on it and it changes the code).
        let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
        let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
        let mut fexec = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
        let mut fcoop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
        let mut features = vk::PhysicalDeviceFeatures2::default()
            .push_next(&mut f11)
            .push_next(&mut f12)
            .push_next(&mut f13)
            .push_next(&mut fexec);
        if coop {
            features = features.push_next(&mut fcoop);
        }
        unsafe { instance.get_physical_device_features2(pd, &mut features) };
        features.features = vk::PhysicalDeviceFeatures {
            shader_int16: features.features.shader_int16,
            shader_int64: features.features.shader_int64,
            ..Default::default()
        };
        let family = unsafe { instance.get_physical_device_queue_family_properties(pd) }
            .iter()
            .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
            .ok_or("no compute queue")? as u32;
        let priorities = [1.0];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&ext_names)
            .push_next(&mut features);
        let device = unsafe { instance.create_device(pd, &info, None)? };
        let stats = ash::khr::pipeline_executable_properties::Device::new(&instance, &device);
        Ok(Device {
            _entry: entry,
            instance,
            device,
            stats,
            name,
        })
    }

    /// Compiles `kernel` with statistics captured; returns (executable name, statistic, value).
    fn statistics(&self, kernel: &Kernel, words: &[u32]) -> Res<Vec<(String, String, String)>> {
        let d = &self.device;
        let mut by_group: Vec<Vec<vk::DescriptorSetLayoutBinding>> = Vec::new();
        for (group, binding, ty) in bindings(kernel)? {
            let g = group as usize;
            if by_group.len() <= g {
                by_group.resize(g + 1, Vec::new());
            }
            by_group[g].push(
                vk::DescriptorSetLayoutBinding::default()
                    .binding(binding)
                    .descriptor_type(ty)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE),
            );
        }
        unsafe {
            let set_layouts = by_group
                .iter()
                .map(|b| {
                    d.create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default().bindings(b),
                        None,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let layout = d.create_pipeline_layout(
                &vk::PipelineLayoutCreateInfo::default().set_layouts(&set_layouts),
                None,
            )?;
            let module =
                d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(words), None)?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(module)
                .name(c"main");
            let info = vk::ComputePipelineCreateInfo::default()
                .stage(stage)
                .layout(layout)
                .flags(vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR);
            let pipeline = d
                .create_compute_pipelines(vk::PipelineCache::null(), &[info], None)
                .map_err(|(_, e)| format!("{}: pipeline: {e}", kernel.name))?[0];
            let pinfo = vk::PipelineInfoKHR::default().pipeline(pipeline);
            let mut out = Vec::new();
            for (i, exe) in self
                .stats
                .get_pipeline_executable_properties(&pinfo)?
                .iter()
                .enumerate()
            {
                let exe_name = exe
                    .name_as_c_str()
                    .map(|c| c.to_string_lossy().into_owned())?;
                let einfo = vk::PipelineExecutableInfoKHR::default()
                    .pipeline(pipeline)
                    .executable_index(i as u32);
                for s in self.stats.get_pipeline_executable_statistics(&einfo)? {
                    let name = s.name_as_c_str()?.to_string_lossy().into_owned();
                    let value = match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => s.value.b32.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => s.value.u64.to_string(),
                        _ => format!("{:.3}", s.value.f64),
                    };
                    out.push((exe_name.clone(), name, value));
                }
            }
            d.destroy_pipeline(pipeline, None);
            d.destroy_shader_module(module, None);
            d.destroy_pipeline_layout(layout, None);
            for l in set_layouts {
                d.destroy_descriptor_set_layout(l, None);
            }
            Ok(out)
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        unsafe {
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

fn main() -> Res<()> {
    let filter = std::env::var("Q4WGPU_STATS_FILTER").unwrap_or_default();
    // SPIR-V first, so that a machine without the extension still checks the translation.
    let mut compiled = Vec::new();
    for kernel in kernels().into_iter().filter(|k| k.name.contains(&filter)) {
        match spirv(&kernel) {
            Ok(words) => compiled.push((kernel, words)),
            Err(e) => println!("{}: {e}", kernel.name),
        }
    }
    eprintln!(
        "shader_stats: {} kernels translated to SPIR-V",
        compiled.len()
    );
    let device = Device::open()?;
    println!("# Kernel statistics from the driver ({})\n", device.name);
    // One table: a row per kernel, a column per statistic the driver reports.
    let mut columns: Vec<String> = Vec::new();
    let mut rows: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (kernel, words) in compiled {
        match device.statistics(&kernel, &words) {
            Ok(stats) => {
                let mut row = Vec::new();
                for (exe, stat, value) in stats {
                    let col = if exe.is_empty() {
                        stat
                    } else {
                        format!("{exe}: {stat}")
                    };
                    if !columns.contains(&col) {
                        columns.push(col.clone());
                    }
                    row.push((col, value));
                }
                rows.push((kernel.name, row));
            }
            Err(e) => println!("{}: {e}", kernel.name),
        }
    }
    println!("| kernel | {} |", columns.join(" | "));
    println!("| --- |{}", " ---: |".repeat(columns.len()));
    for (name, row) in rows {
        let cells: Vec<&str> = columns
            .iter()
            .map(|c| {
                row.iter()
                    .find(|(k, _)| k == c)
                    .map(|(_, v)| v.as_str())
                    .unwrap_or("")
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

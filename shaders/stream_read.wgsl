//! Streaming read: the device-memory bandwidth a kernel can reach, the yardstick of the benchmark's
//! memory-limit column. Each thread reads vec4<u32> (16 bytes) with a grid-stride loop over the
//! bound range and folds them with xor; the result is stored only if it equals a value random data
//! never gives, which keeps the loads alive without writing memory.

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sink: array<vec4<u32>>;

override WG: u32 = 256u;

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * WG;
    var acc = vec4<u32>(0u);
    for (var i = gid.x; i < arrayLength(&src); i += stride) {
        acc ^= src[i];
    }
    if (all(acc == vec4<u32>(0x9E3779B9u))) {
        sink[gid.x % arrayLength(&sink)] = acc;
    }
}

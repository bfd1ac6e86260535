// gemv_q4's workgroup reduction with subgroup operations: subgroupAdd within each subgroup, one
// value per subgroup and row through workgroup memory, then thread r adds row r's values.
// Subgroups are taken to be consecutive ranges of local_invocation_index (true of Vulkan drivers
// for one-dimensional workgroups); their size comes from the hardware (8 on lavapipe, 32 on NVIDIA).
// (naga 30 has no `enable subgroups;`: subgroup operations need the SUBGROUP device feature only.)

// The first of this reduction's slots in `red` (a batched product's column has its own).
var<private> red_base: u32;

fn workgroup_sums(acc: array<f32, MAX_ROWS>, lid: u32) -> f32 {
    let size = subgroupAdd(1u);
    for (var r = 0u; r < ROWS; r++) {
        let s = subgroupAdd(acc[r]);
        if (lid % size == 0u) {
            red[red_base + r * WG + lid / size] = s;
        }
    }
    workgroupBarrier();
    var total = 0.0;
    if (lid < ROWS) {
        for (var g = 0u; g < WG / size; g++) {
            total += red[red_base + lid * WG + g];
        }
    }
    return total;
}

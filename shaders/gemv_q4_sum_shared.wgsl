// gemv_q4's workgroup reduction without subgroup operations: a tree in workgroup memory (WG is a
// power of two). Thread r returns row r's total.
fn workgroup_sums(acc: array<f32, MAX_ROWS>, lid: u32) -> f32 {
    for (var r = 0u; r < ROWS; r++) {
        red[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            for (var r = 0u; r < ROWS; r++) {
                red[r * WG + lid] += red[r * WG + lid + stride];
            }
        }
        workgroupBarrier();
    }
    return red[min(lid, ROWS - 1u) * WG];
}

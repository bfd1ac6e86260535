// gemv_q4's workgroup reduction without subgroup operations: a tree in workgroup memory. Thread r returns row r's total.
fn workgroup_sums(acc: array<f32, MAX_ROWS>, lid: u32) -> f32 {
    for (var r = 0u; r < ROWS; r++) {
        red[r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    // Halve the live range [0, n) until one value is left (n need not be a power of two).
    for (var n = WG; n > 1u; n = (n + 1u) / 2u) {
        let half = (n + 1u) / 2u;
        if (lid < n - half) {
            for (var r = 0u; r < ROWS; r++) {
                red[r * WG + lid] += red[r * WG + lid + half];
            }
        }
        workgroupBarrier();
    }
    return red[min(lid, ROWS - 1u) * WG];
}

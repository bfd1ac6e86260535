// gemv_q4's workgroup reduction without subgroup operations: a tree in workgroup memory. Thread r returns row r's total.
// The first of this reduction's slots in `red` (a batched product's column has its own).
var<private> red_base: u32;

fn workgroup_sums(acc: array<f32, MAX_ROWS>, lid: u32) -> f32 {
    for (var r = 0u; r < ROWS; r++) {
        red[red_base + r * WG + lid] = acc[r];
    }
    workgroupBarrier();
    // Halve the live range [0, n) until one value is left (n need not be a power of two).
    for (var n = WG; n > 1u; n = (n + 1u) / 2u) {
        let half = (n + 1u) / 2u;
        if (lid < n - half) {
            for (var r = 0u; r < ROWS; r++) {
                red[red_base + r * WG + lid] += red[red_base + r * WG + lid + half];
            }
        }
        workgroupBarrier();
    }
    return red[red_base + min(lid, ROWS - 1u) * WG];
}

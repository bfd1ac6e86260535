// gemv_q4_q8's plain output: workgroup u computes rows u * ROWS .. of this row range and writes
// y[row_base + row] (+ bias), or adds to it; a batched product's column c at c * y_stride.

@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;

fn out_units() -> u32 {
    return (p.rows + ROWS - 1u) / ROWS;
}

// Past the last row a workgroup re-reads the last row (its result is not written).
fn out_row(unit: u32, r: u32) -> u32 {
    return min(unit * ROWS + r, p.rows - 1u);
}

// `total` is row `lid`'s sum of column `col` in threads lid < ROWS; written if `live`.
fn write_out(unit: u32, col: u32, live: bool, total: f32, lid: u32) {
    let row = unit * ROWS + lid;
    if (live && lid < ROWS && row < p.rows) {
        let out = p.row_base + row;
        var v = total;
        if (p.has_bias != 0u) {
            v += bias[out];
        }
        let at = col * p.y_stride + out;
        if (p.accumulate != 0u) {
            v += y[at];
        }
        y[at] = v;
    }
}

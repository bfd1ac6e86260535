// Matrix operations of gemm_q4_mma.wgsl on cooperative matrices (tensor cores): 16x16 f16 tiles
// of X (A, row-major: tokens x k) and W (B, column-major: k x rows) from the workgroup tiles,
// f32 accumulators stored row-major to the staging tile. Offsets count f16 pairs (tiles) or f32
// (staging); strides are constants (naga 30 panics on a runtime coopStore stride).
enable wgpu_cooperative_matrix;

alias Frag_A = coop_mat16x16<f16, A>;
alias Frag_B = coop_mat16x16<f16, B>;
alias Acc = coop_mat16x16<f32, C>;

fn acc_zero() -> Acc {
    return Acc();
}

fn load_a(off: u32) -> Frag_A {
    return coopLoadT<Frag_A>(&xs[off], AS2);
}

fn load_b(off: u32) -> Frag_B {
    return coopLoad<Frag_B>(&ws[off], AS2);
}

fn mma(a: Frag_A, b: Frag_B, c: Acc) -> Acc {
    return coopMultiplyAdd(a, b, c);
}

fn store_acc(c: Acc, off: u32) {
    coopStoreT(c, &stage[off], SS);
}

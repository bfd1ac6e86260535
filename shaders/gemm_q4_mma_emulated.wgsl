// Matrix operations of gemm_q4_mma.wgsl in plain WGSL, for tests on adapters without cooperative
// matrices (lavapipe): same semantics as shaders/gemm_q4_mma_coop.wgsl, not meant to be fast.
// A fragment is its offset in the workgroup tile (the kernel loads fragments after a barrier and
// uses them before the next, so reading the tile at multiply time sees the same values); an
// accumulator is the 8 elements lane `lane` owns: row-major elements 8 lane .. 8 lane + 7 of the
// 16x16 tile (two lanes per row). SG must be 32.
alias Frag_A = u32;
alias Frag_B = u32;
alias Acc = array<f32, 8>;

fn acc_zero() -> Acc {
    return Acc();
}

fn load_a(off: u32) -> Frag_A {
    return off;
}

fn load_b(off: u32) -> Frag_B {
    return off;
}

fn mma(a: Frag_A, b: Frag_B, c: Acc) -> Acc {
    var r = c;
    for (var e = 0u; e < 8u; e++) {
        let row = (8u * lane + e) / 16u;
        let col = (8u * lane + e) % 16u;
        var sum = 0.0;
        for (var k = 0u; k < 16u; k++) {
            sum += f32(xs[a + row * AS2 + k / 2u][k % 2u]) * f32(ws[b + col * AS2 + k / 2u][k % 2u]);
        }
        r[e] += sum;
    }
    return r;
}

fn store_acc(c: Acc, off: u32) {
    for (var e = 0u; e < 8u; e++) {
        let row = (8u * lane + e) / 16u;
        let col = (8u * lane + e) % 16u;
        stage[off + row * SS + col] = c[e];
    }
}

// The batched decode step's rows (src/engine/batch.rs writes it before each step): row r < n_rows
// appends one token to sequence `slot` at position `pos`, after which the sequence holds
// `kv_len` = pos + 1 positions. The KV caches of a batched step hold every slot's region,
// `slot * n_kv_heads * ctx` cache rows from the start.
const MAX_BATCH: u32 = 8u;

struct BatchRow {
    slot: u32,
    pos: u32,
    kv_len: u32,
    pad: u32,
}

struct BatchStep {
    n_rows: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    rows: array<BatchRow, MAX_BATCH>,
}

"""The original method's weight streaming: every packed layer weight in pinned host memory, and a
preload thread with its own CUDA stream that copies the weights in forward order into a device
cache of N entries, reusing the entries of weights already used.

The compute side takes the weights in the same order (`with cache.next(kind) as (qweight, scales)`):
it waits until the weight is in the cache (host side: the preload thread has queued its copy;
device side: the compute stream waits for the copy's event), dequantizes it, and on leaving the
block records an event after the dequantization, from which on the entry may be overwritten. The
preload thread runs at most N weights ahead of the compute thread and makes its copy stream wait
for that event before it overwrites an entry; so copies of the next weights, across token
boundaries too, overlap the compute of the current ones.

N = every weight is the resident mode (so is any N whose slots, below, cover every layer): the
first pass fills the cache, the preload thread then stops, and later passes look each weight up
with no copy and no handshake. With fewer slots, a weight is always evicted before its next use
(forward order is a cycle longer than the cache), so every weight is uploaded once per token and N
only sets how far ahead the copies run.

Entries are preallocated slots, one pool per weight kind (q, k, v, o, gate, up, down), each pool
holding ceil(N / 7) weights: any N consecutive weights in forward order hold at most that many of
one kind, so a free entry for the next weight is always the one used 7 * ceil(N / 7) weights
earlier. Preallocation keeps the cache's memory fixed and known, and keeps PyTorch's caching
allocator (and its cross-stream frees) out of the loop.

On the CPU (the smoke test and --check under TRITON_INTERPRET=1) there are no streams or events:
copies are synchronous and each op has finished when it returns. The preload thread and the
host-side handshake (the condition variable) run unchanged, so slot choice, eviction order and
the N-ahead limit are exercised; only the device-side waits become no-ops.
"""

import contextlib
import math
import threading

import torch

from dequant import WORDS_PER_BLOCK, blocks_per_row, random_q4

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
ALIGN = 256  # bytes: each weight's blob starts on this boundary, on the host and in a slot


class Sync:
    """CUDA streams and events, or their absence on the CPU, where every op is done on return."""

    def __init__(self, device):
        self.cuda = device != "cpu"

    def stream(self):
        return torch.cuda.Stream() if self.cuda else None

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def record(self, event):
        """Records `event` on the current stream; returns it (None on the CPU)."""
        if event is not None:
            event.record()
        return event

    def wait(self, event):
        """The current stream waits (on the device; the host goes on) for `event`."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()


class Packed:
    """The byte layout of one packed weight: int32 words, then bf16 scales, padded to ALIGN."""

    def __init__(self, rows, cols):
        self.rows, self.cols = rows, cols
        self.bpr = blocks_per_row(cols)
        self.q_bytes = rows * self.bpr * WORDS_PER_BLOCK * 4
        self.nbytes = self.q_bytes + rows * self.bpr * 2
        self.padded = -(-self.nbytes // ALIGN) * ALIGN

    def views(self, blob):
        """(qweight int32 [rows, bpr*16], scales bf16 [rows, bpr]) over a uint8 blob."""
        qw = blob[: self.q_bytes].view(torch.int32).view(self.rows, self.bpr * WORDS_PER_BLOCK)
        sc = blob[self.q_bytes: self.nbytes].view(torch.bfloat16).view(self.rows, self.bpr)
        return qw, sc


class HostStore:
    """Every layer weight, in forward order (layer by layer, KINDS order within a layer), as uint8
    blobs in host memory: pinned on a CUDA machine. The pinned memory is taken as chunks of at
    most 1 GiB (PyTorch's pinned allocator rounds each allocation up to a power of two: one
    allocation for 16 GB of weights would pin 32 GiB)."""

    CHUNK = 1 << 30

    def __init__(self, kinds, layers, device, pin):
        self.kinds = kinds  # {name: Packed}, in KINDS order
        self.layers = layers
        self.count = layers * len(KINDS)
        self.layer_bytes = sum(p.nbytes for p in kinds.values())
        self.blobs = []
        self.chunks = []
        free = 0
        for _ in range(layers):
            for name in KINDS:
                p = kinds[name]
                assert p.padded <= self.CHUNK, f"{name} weight of {p.padded} bytes exceeds a pinned chunk"
                if p.padded > free:
                    left = (self.count - len(self.blobs)) * max(k.padded for k in kinds.values())
                    self.chunks.append(torch.empty(min(self.CHUNK, left), dtype=torch.uint8, pin_memory=pin))
                    # Unpinned memory would make every copy synchronous: not the method measured.
                    assert not pin or self.chunks[-1].is_pinned(), "pinned host memory was asked for, not given"
                    free = self.chunks[-1].numel()
                chunk = self.chunks[-1]
                at = chunk.numel() - free
                blob = chunk[at: at + p.padded]
                free -= p.padded
                qw, sc = p.views(blob)
                words, scales = random_q4(p.rows, p.cols, device)  # made where it is fast, then copied
                qw.copy_(words)
                sc.copy_(scales)
                self.blobs.append(blob)
        self.pinned_bytes = sum(c.numel() for c in self.chunks) if pin else 0

    def kind_of(self, index):
        return KINDS[index % len(KINDS)]


class WeightCache:
    """N device entries fed by a preload thread (see the module's docstring)."""

    def __init__(self, store, entries, device, sync):
        assert entries >= 1
        self.store, self.sync = store, sync
        self.entries = min(entries, store.count)
        per_kind = store.layers if self.entries >= store.count else math.ceil(self.entries / len(KINDS))
        self.slots_per_kind = per_kind
        self.resident = per_kind >= store.layers  # a slot for every weight: each is copied once
        self.slots, self.views = {}, {}
        for name, p in store.kinds.items():
            # One allocation per kind: the caching allocator rounds each one up (to 2 MiB).
            pool = torch.empty(per_kind * p.padded, dtype=torch.uint8, device=device)
            self.slots[name] = [pool[i * p.padded:(i + 1) * p.padded] for i in range(per_kind)]
            self.views[name] = [p.views(s) for s in self.slots[name]]
        self.nbytes = per_kind * sum(p.padded for p in store.kinds.values())
        # Preload thread only: which weight each slot holds, and the event after its last copy.
        self.held = {name: [-1] * per_kind for name in KINDS}
        self.copied = {name: [sync.event() for _ in range(per_kind)] for name in KINDS}
        # The event after each slot's last dequantization (recorded by the compute thread; never
        # re-recorded before the preload thread has queued its wait: see next()).
        self.freed = {name: [sync.event() for _ in range(per_kind)] for name in KINDS}
        self.issued = 0    # weights in forward order the preload thread has queued (or found held)
        self.consumed = 0  # weights whose dequantization the compute thread has queued
        self.ready = {}    # position -> (kind, slot, event to wait for or None)
        self.error = None
        self.stop = False
        self.cond = threading.Condition()
        self.bytes_copied = 0  # counters of the preload thread; read them after sync.synchronize()
        self.copies = 0
        self.next_pos = 0
        self.copy_stream = sync.stream()
        self.thread = threading.Thread(target=self._preload, name="preload", daemon=True)
        self.thread.start()

    def slot_of(self, pos):
        """(kind, slot) of the weight at forward position pos (counted across tokens)."""
        return self.store.kind_of(pos), (pos // len(KINDS)) % self.slots_per_kind

    def _preload(self):
        try:
            with self.sync.on(self.copy_stream):
                while True:
                    with self.cond:
                        while not self.stop and self.issued - self.consumed >= self.entries:
                            self.cond.wait()
                        if self.stop:
                            return
                        pos = self.issued
                        kind, s = self.slot_of(pos)
                        freed = self.freed[kind][s]
                    index = pos % self.store.count
                    event = None  # a weight found held was waited for at its first use
                    if self.held[kind][s] != index:
                        self.sync.wait(freed)  # the slot's previous weight has been dequantized
                        self.slots[kind][s].copy_(self.store.blobs[index], non_blocking=True)
                        event = self.sync.record(self.copied[kind][s])
                        self.held[kind][s] = index
                        self.bytes_copied += self.slots[kind][s].numel()
                        self.copies += 1
                    with self.cond:
                        self.ready[pos] = (kind, s, event)
                        self.issued += 1
                        self.cond.notify_all()
                    if self.resident and self.issued == self.store.count:
                        return  # every weight has its own slot now; next() needs no more handshakes
        except BaseException as e:  # handed to the compute thread, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    @contextlib.contextmanager
    def next(self, kind):
        """The next weight in forward order, which must be of `kind`: (qweight, scales) on the
        device, valid inside the block. Leave the block once its dequantization is queued."""
        pos = self.next_pos
        if self.resident and pos >= self.store.count:
            # After the first pass a resident cache holds every weight, each waited for at its
            # first use, and nothing overwrites them: a plain lookup.
            if self.store.kind_of(pos) != kind:
                raise RuntimeError(f"weight {pos} in forward order is {self.store.kind_of(pos)}, but the model asked for {kind}")
            self.next_pos += 1
            yield self.views[kind][self.slot_of(pos)[1]]
            return
        with self.cond:
            while pos not in self.ready and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError("the preload thread failed") from self.error
            got, s, event = self.ready.pop(pos)
        if got != kind:
            raise RuntimeError(f"weight {pos} in forward order is {got}, but the model asked for {kind}")
        self.sync.wait(event)
        self.next_pos += 1
        yield self.views[kind][s]
        # The slot's next weight is queued only after this, and its copy waits for this event.
        self.sync.record(self.freed[kind][s])
        with self.cond:
            self.consumed = pos + 1
            self.cond.notify_all()

    def close(self):
        """Stops the preload thread and waits for every queued copy (the slots may then be freed)."""
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join()
        self.sync.synchronize()
        if self.error is not None:
            raise RuntimeError("the preload thread failed") from self.error


def cache_bytes(store, entries):
    """Device bytes of a cache of `entries` entries (the slot pools), before it is made."""
    per_kind = store.layers if entries >= store.count else math.ceil(entries / len(KINDS))
    return per_kind * sum(p.padded for p in store.kinds.values())


def entries_for(store, cache_budget):
    """The most entries (whole layers' worth: 7 per layer) whose slots fit in cache_budget bytes."""
    layers = min(store.layers, cache_budget // sum(p.padded for p in store.kinds.values()))
    return int(layers) * len(KINDS)

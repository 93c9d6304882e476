"""The activation cache, byte for byte as the device stores it.

Per sample, one line of `line_bytes`: every adapter input (all layers, concatenated in
layer order) as int8 bytes, or at 4 bits as two codes per byte (the earlier element in
the low nibble), followed by the base logits as little-endian int16. A valid bit per
line. The width (8 or 4) is the run's mode. Capacity comes from
`AccelConfig.cache_samples`; sample ``i`` lives in line ``i``
and samples ``i >= capacity`` are never stored: they are recomputed every epoch
(counted as misses). docs/numerics.md, "Activation cache".
"""

import numpy as np

from .fixed_model import codes4

__all__ = ["ActivationCache"]


class ActivationCache:
    def __init__(self, model, cfg, bits=8):
        if bits not in (4, 8):
            raise ValueError(f"the cache stores 8 or 4 bits, not {bits}")
        self.cfg = cfg
        self.bits = bits
        self.sizes = model.adapter_inputs
        self.classes = model.classes
        self.capacity = cfg.cache_samples
        if sum(self.sizes) > cfg.cache_act_words:
            raise ValueError(f"model needs {sum(self.sizes)} cached activations per sample; "
                             f"the configuration holds {cfg.cache_act_words}")
        self.shift4 = model.meta.get("cache4_shift")
        self.signed4 = model.meta.get("cache4_signed")
        n_act = sum(self.sizes)
        self.act_bytes = n_act if self.bits == 8 else (n_act + 1) // 2
        self.line_bytes = self.act_bytes + 2 * self.classes
        self.lines = np.zeros((self.capacity, self.line_bytes), dtype=np.uint8)
        self.valid = np.zeros(self.capacity, dtype=bool)
        self.hits = 0
        self.misses = 0

    def invalidate(self):
        self.valid[:] = False

    def _encode(self, xs, base):
        n = base.shape[0]
        if self.bits == 8:
            act = np.concatenate(xs, axis=1).astype(np.int8).view(np.uint8)
        else:
            codes = []
            for l, x in enumerate(xs):
                codes.append(codes4(x, self.shift4[l], self.signed4[l]) & 0xF)
            c = np.concatenate(codes, axis=1)
            if c.shape[1] % 2:
                c = np.concatenate([c, np.zeros((n, 1), np.int64)], axis=1)
            act = (c[:, 0::2] | (c[:, 1::2] << 4)).astype(np.uint8)
        logits = base.astype("<i2").view(np.uint8).reshape(n, -1)
        return np.concatenate([act, logits], axis=1)

    def _decode(self, lines):
        n = lines.shape[0]
        n_act = sum(self.sizes)
        if self.bits == 8:
            flat = lines[:, :n_act].view(np.int8).astype(np.int64)
        else:
            b = lines[:, :self.act_bytes].astype(np.int64)
            flat = np.empty((n, 2 * self.act_bytes), np.int64)
            flat[:, 0::2], flat[:, 1::2] = b & 0xF, b >> 4
            flat = flat[:, :n_act]
        xs, off = [], 0
        for l, d in enumerate(self.sizes):
            x = flat[:, off:off + d]
            if self.bits == 4:
                if self.signed4[l]:
                    x = np.where(x >= 8, x - 16, x)
                x = x << self.shift4[l]
            xs.append(x)
            off += d
        base = np.ascontiguousarray(lines[:, self.act_bytes:]).view("<i2").astype(np.int64)
        return xs, base.reshape(n, self.classes)

    def fill(self, idx, xs, base):
        """Store the samples ``idx`` that fit; the rest are left to be recomputed."""
        idx = np.asarray(idx)
        fits = idx < self.capacity
        if fits.any():
            lines = self._encode([x[fits] for x in xs], base[fits])
            self.lines[idx[fits]] = lines
            self.valid[idx[fits]] = True

    def holds(self, idx):
        """Which of the samples ``idx`` have a valid line (a bool mask)."""
        idx = np.asarray(idx)
        held = np.zeros(len(idx), bool)
        inside = idx < self.capacity
        held[inside] = self.valid[idx[inside]]
        return held

    def lookup(self, idx):
        """Which of ``idx`` hit (a bool mask), counting hits and misses."""
        hit = self.holds(idx)
        self.hits += int(hit.sum())
        self.misses += int((~hit).sum())
        return hit

    def read(self, idx):
        return self._decode(self.lines[np.asarray(idx)])

    def roundtrip(self, xs, base):
        """What a line holds once written and read back (the adapter-input format)."""
        return self._decode(self._encode(xs, base))

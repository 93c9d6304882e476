"""The instruction-level golden model of the device: its memories, its host port and its
sequencer, one instruction at a time (docs/isa.md).

`Machine(cfg)` holds every memory of the host port (`firmware.memmap`) as arrays and
serves the port with `write(address, word)` / `read(address)`: chunks of wide words are
staged in one staging register (shared by the regions, as in the gateware) and the last
chunk commits the word; while a program runs (only after `run` stopped at
``max_steps``) every region but REGS is refused. `run(entry, max_steps)` (or a CONTROL
START write) executes the program memory per docs/isa.md: decode with
`firmware.isa.decode`, registers with `firmware.isa.unpack`, errors (OPCODE, PC, LOOP,
INDEX, CACHE) stop it with status ERROR and the code.

Every number comes from the golden functions of `sim/`, on what the memories and
registers hold (never a QuantModel):

- LAYER decodes the conv descriptor into a `sim.network.Layer` (geometry, kernel, pads,
  stride ``step_iw[0]``, pooling, relu) with ``g_out * C`` output channels and runs
  `sim.fixed_model.layer_forward` on the input unpacked from the activation buffer, with
  the weights and biases of the weight and bias memories; the result goes back packed
  (int8 to the activation buffer, or int16 to the logit memory when ``wide``). The
  descriptor's walk fields (``k_row_step``, ``m_pix``, ``tiles``, ``wp``, the steps
  but ``step_iw[0]``, ``addr0``) are the conv unit's address arithmetic: the model
  computes the same layer from the geometry and does not read them.
- GATHER reads ``x_l`` and the base logits as the GATHER register places them; a fill
  goes to a `sim.cache.ActivationCache` built from the CACHE register, the LoRA engine
  gets them in the cache's format (`sim.fixed_model.cache_format`).
- The LoRA engine runs `adapter_forward`, `loss_grad` and `adapter_grads` and sums the
  gradients exactly (int64) until UPDATE applies `sim.fixed_model.update` with the LR
  register's rate and the `sim.fixed.Lfsr` loaded by CLEAR seed. The shifts these
  functions take from a model come from the registers: ``s_x[l] = h_shift - F_w + F_h``
  for the forward pass, ``fshift[l].a - F_e + F_n`` for the update. Samples handed to the
  engine wait in a queue and go through it as one batch at the next UPDATE, SYNC (or
  any instruction that implies one) or stop: the masters only change at UPDATE and
  every function is row-wise, so the results are bit-identical to one at a time.
- LOAD CACHE keeps the cache's lines when the line format (mode, sizes, classes, 4-bit
  shifts) is unchanged, and starts an empty cache otherwise; a CACHE register the golden
  cache cannot hold (no layers, lines over ``cache_act_words``) leaves no cache: every
  LOOKUP misses and every fill is refused (error CACHE).

Not modelled: time. The cycle counters (CYCLES, the phase counters, LAYER_CYCLES,
LORA_FWD, LORA_UPD) read 0. A program or a memory the golden functions cannot express
(a descriptor outside the memories or of a shape `sim.network.Layer` has no kind for, a
label beyond the classes, a learning-rate mantissa that `lr_mantissa` would not produce,
an accumulator overflow) raises `MachineFault` (or OverflowError) instead of computing
what the hardware would.
"""

import dataclasses
import math

import numpy as np

from firmware.isa import (CONV_WORDS, LOOP_DEPTH, WORD_BITS, Cond, Error, IsaError, Phase, Reg,
                          decode, layout_words, register_layout, unpack)
from firmware.layers import ConvDescriptor, from_words, pack_activations, to_words, unpack_activations
from firmware.memmap import (ID_MAGIC, OFFSET_BITS, WRITABLE, Control, Region, Regs, Status,
                             adapter_span, chunk_bits, read_adapters, region_words, word_bits,
                             write_adapters)
from gateware.config import DEFAULT

from .cache import ActivationCache
from .fixed import Lfsr
from .fixed_model import (adapter_forward, adapter_grads, argmax, cache_format, layer_forward,
                          loss_grad, lr_mantissa, update)
from .network import Layer

__all__ = ["Machine", "MachineFault"]

_MASK = (1 << WORD_BITS) - 1
_INDEX_MASK = 0xFFFF


class MachineFault(RuntimeError):
    """A program or memory content that the golden model cannot interpret (not an error
    of the instruction set: the hardware would compute something unspecified)."""


class _Stop(Exception):
    def __init__(self, error):
        self.error = error


@dataclasses.dataclass
class _Setup:
    """What a golden function reads from a model, taken from the registers."""
    s_x: list
    adapter_inputs: list
    classes: int
    meta: dict = dataclasses.field(default_factory=dict)


class Machine:
    """The device, instruction by instruction. Memories (int64 arrays of lane values):
    ``program`` (words), ``samples`` (bytes, uint8), ``labels``, ``weights`` (words x C
    int8), ``biases`` (words x C int32), ``adapters`` (uint32 words), ``results``,
    ``act`` (words x C int8), ``logits`` (words x C int16). ``loaded``, ``starts``: the host
    link's model flag and START count (`host.protocol.serve` keeps them)."""

    def __init__(self, cfg=DEFAULT):
        self.cfg = cfg
        C = cfg.array_cols
        self.program = np.zeros(cfg.program_words, np.int64)
        self.samples = np.zeros(4 * region_words(Region.SAMPLES, cfg), np.uint8)
        self.labels = np.zeros(cfg.max_samples, np.int64)
        self.weights = np.zeros((region_words(Region.WEIGHTS, cfg), C), np.int64)
        self.biases = np.zeros((region_words(Region.BIASES, cfg), C), np.int64)
        self.adapters = np.zeros(cfg.adapter_words, np.uint32)
        self.results = np.zeros(cfg.max_samples, np.int64)
        self.act = np.zeros((cfg.act_words, C), np.int64)
        self.logits = np.zeros((region_words(Region.LOGITS, cfg), C), np.int64)
        self._staging = [0] * max(-(-word_bits(r, cfg) // 32) for r in Region)
        # sequencer
        self.pc = self.index = 0
        self.hit = False
        self.loops = []                   # [start pc, count]
        self.phase = Phase.NONE
        self.running = self.done = self.refused = False
        self.error = Error.NONE
        # the host link's model flag (docs/protocol.md): kept by host.protocol.serve, which
        # sets it on LOADED, clears it on a WRITE to WEIGHTS or BIASES and refuses START
        # without it; the port itself never reads it, as in the gateware (gateware/link.py)
        self.loaded = False
        self.starts = 0                   # ... and its count of STARTs served (STATUS)
        # LoRA engine: gradient accumulators and moments per weight address
        self._grad = np.zeros(cfg.adapter_words, np.int64)
        self._m = np.zeros(cfg.adapter_words, np.int64)
        self._v = np.zeros(cfg.adapter_words, np.int64)
        self._queue = []                  # (xs, base, label, results slot)
        self.lfsr = Lfsr(0, cfg.lfsr_taps)
        self.cache = None
        self._cache_key = None
        # counters
        self.updates = self.n_samples = self.n_correct = 0
        self.cache_hits = self.cache_misses = 0
        self.results_ptr = 0
        self._decoded = {}
        self._layers = {}
        self.regs = {}
        for reg in Reg:
            self._set_register(reg, [0] * layout_words(register_layout(reg, cfg)))

    # ------------------------------------------------------------ host port --------

    def _wide(self, region):
        """(array, lane bits) of a memory of lane words."""
        return {Region.WEIGHTS: (self.weights, 8), Region.BIASES: (self.biases, 32),
                Region.ACT: (self.act, 8), Region.LOGITS: (self.logits, 16)}.get(region, (None, 0))

    def _locate(self, address):
        """(region, word, chunk, chunks per word), or None outside every memory."""
        try:
            region = Region(address >> OFFSET_BITS)
        except ValueError:
            return None
        offset = address & ((1 << OFFSET_BITS) - 1)
        cb = chunk_bits(region, self.cfg)
        n = -(-word_bits(region, self.cfg) // 32)
        word, chunk = offset >> cb, offset & ((1 << cb) - 1)
        if word >= region_words(region, self.cfg) or chunk >= n:
            return None
        return region, word, chunk, n

    def write(self, address, word):
        """A port write (firmware.memmap)."""
        word = int(word) & _MASK
        where = self._locate(int(address))
        if where is None:
            return
        region, w, chunk, n = where
        if region is Region.REGS:
            if w == Regs.CONTROL:
                self._control(word)
            return
        if self.running:
            self.refused = True
            return
        if region not in WRITABLE:
            return
        if chunk < n - 1:
            self._staging[chunk] = word
            return
        value = sum(c << (32 * k) for k, c in enumerate(self._staging[:n - 1] + [word]))
        array, bits = self._wide(region)
        if array is not None:
            array[w] = from_words([value], self.cfg.array_cols, bits)[0]
        elif region is Region.SAMPLES:
            self.samples[4 * w:4 * w + 4] = list(value.to_bytes(4, "little"))
        else:
            {Region.PROGRAM: self.program, Region.LABELS: self.labels,
             Region.ADAPTERS: self.adapters}[region][w] = value

    def read(self, address):
        """A port read (firmware.memmap)."""
        where = self._locate(int(address))
        if where is None:
            return 0
        region, w, chunk, _ = where
        if region is Region.REGS:
            return self._register(w) & _MASK
        if self.running:
            self.refused = True
            return 0
        array, bits = self._wide(region)
        if array is not None:
            value = to_words(array[w:w + 1], bits)[0]
        elif region is Region.SAMPLES:
            value = int.from_bytes(self.samples[4 * w:4 * w + 4].tobytes(), "little")
        else:
            value = int({Region.PROGRAM: self.program, Region.LABELS: self.labels,
                         Region.ADAPTERS: self.adapters, Region.RESULTS: self.results}[region][w])
        return (value >> (32 * chunk)) & _MASK

    def _control(self, word):
        if word & Control.ABORT and self.running:
            self._flush()
            self.running = False
        elif word & Control.START and not self.running:
            self.run(word >> 16)

    @property
    def status(self):
        return (int(self.running) * Status.RUNNING | int(self.done) * Status.DONE
                | int(self.error != Error.NONE) * Status.ERROR | int(self.refused) * Status.REFUSED
                | self.error.value << 8 | self.phase.value << 16)

    def _register(self, reg):
        cfg = self.cfg
        return {
            Regs.ID: ID_MAGIC, Regs.CONFIG_HASH: cfg.hash,
            Regs.GEOMETRY: (cfg.array_rows | cfg.array_cols << 8 | cfg.max_classes << 16
                            | cfg.max_layers << 24),
            Regs.STATUS: self.status, Regs.PC: self.pc, Regs.INDEX: self.index,
            Regs.UPDATES: self.updates, Regs.SAMPLES: self.n_samples, Regs.CORRECT: self.n_correct,
            Regs.CACHE_HITS: self.cache_hits, Regs.CACHE_MISSES: self.cache_misses,
            Regs.LFSR: self.lfsr.state,
        }.get(reg, 0)

    # ------------------------------------------------------------ running ----------

    def run(self, entry=0, max_steps=None):
        """Start at ``entry`` and execute until HALT, an error, or ``max_steps``
        instructions (then the program is still running: `resume` goes on). Returns the
        error (Error.NONE unless it stopped with one)."""
        self.pc, self.loops = entry, []
        self.running, self.done, self.refused, self.error = True, False, False, Error.NONE
        self._layers = {}
        return self.resume(max_steps)

    def resume(self, max_steps=None):
        steps = 0
        try:
            while self.running and (max_steps is None or steps < max_steps):
                self.step()
                steps += 1
        except _Stop as stop:
            self._flush()
            self.running, self.error = False, stop.error
        except Exception:
            self.running = False
            raise
        return self.error

    def step(self):
        """Execute one instruction (raises _Stop on an error)."""
        pc = self.pc
        if not 0 <= pc < len(self.program):
            raise _Stop(Error.PC)
        word = int(self.program[pc])
        if word not in self._decoded:
            try:
                self._decoded[word] = decode(word)
            except IsaError:
                self._decoded[word] = None
        if self._decoded[word] is None:
            raise _Stop(Error.OPCODE)
        op, fields = self._decoded[word]
        self.pc = pc + 1
        getattr(self, "_" + op.name.lower())(**fields)

    def _program_words(self, addr, n):
        if addr + n > len(self.program):
            raise _Stop(Error.PC)
        return tuple(int(w) for w in self.program[addr:addr + n])

    # ------------------------------------------------------------ instructions -----

    def _halt(self):
        self._flush()
        self.running, self.done = False, True

    def _sync(self):
        self._flush()

    def _phase(self, phase):
        self._flush()
        self.phase = phase

    def _load(self, addr, reg):
        self._flush()
        self._set_register(reg, self._program_words(addr, layout_words(register_layout(reg, self.cfg))))

    def _loop(self, count):
        if count == 0 or len(self.loops) >= LOOP_DEPTH:
            raise _Stop(Error.LOOP)
        self.loops.append([self.pc, count])

    def _endloop(self):
        if not self.loops:
            raise _Stop(Error.LOOP)
        top = self.loops[-1]
        if top[1] > 1:
            top[1] -= 1
            self.pc = top[0]
        else:
            self.loops.pop()

    def _setidx(self, index):
        self.index = index

    def _incidx(self):
        self.index = (self.index + 1) & _INDEX_MASK

    def _branch(self, target, cond):
        if cond is Cond.ALWAYS or (cond is Cond.HIT) == self.hit:
            self.pc = target

    def _move(self, stride):
        base, pixels, groups, tail = self._gather_table[0] if self._gather_table else (0, 0, 0, 0)
        ch = self._channels(groups, tail)
        start = self.index * stride
        if start + pixels * ch > len(self.samples):
            raise _Stop(Error.INDEX)
        C = self.cfg.array_cols
        words = np.zeros((pixels, groups * C), np.int64)
        words[:, :ch] = self.samples[start:start + pixels * ch].view(np.int8).reshape(pixels, ch)
        self._act_store(base, words.reshape(-1, C))

    def _channels(self, groups, tail):
        """Channels of a pixel of ``groups`` words, ``tail`` lanes valid in the last."""
        return (groups - 1) * self.cfg.array_cols + tail if groups else 0

    def _layer(self, addr):
        words = self._program_words(addr, CONV_WORDS)
        if words not in self._layers:
            self._layers[words] = self._conv(unpack(ConvDescriptor, words))
        layer, d, geometry = self._layers[words]
        C = self.cfg.array_cols
        k, g_out = layer.fan_in, d["g_out"]
        x = unpack_activations(self._act_load(d["in_base"], geometry[0] * geometry[1] * d["g_in"]),
                               geometry, C)
        w = self._rows(self.weights, d["w_base"], g_out * k, "weights")
        w = w.reshape(g_out, k, C).transpose(1, 0, 2).reshape(k, g_out * C)
        b = self._rows(self.biases, d["b_base"], g_out, "biases").reshape(-1)
        bits = self.cfg.logit_bits if d["wide"] else self.cfg.act_bits
        y = layer_forward(x[None], layer, w, b, d["shift"], bits, self.cfg)
        out = pack_activations(y[0], C)
        if d["wide"]:
            self._rows(self.logits, d["out_base"], len(out), "logits")[:] = out
        else:
            self._act_store(d["out_base"], out)

    def _conv(self, v):
        """(Layer, fields, input geometry) of a decoded conv descriptor."""
        d = {name: v[name] for name in ("in_h", "in_w", "cin", "g_in", "kh", "kw", "pad_h",
                                        "pad_w", "pool_h", "pool_w", "g_out", "shift", "relu",
                                        "wide", "in_base", "out_base", "w_base", "b_base")}
        d["stride"] = v.step_iw[0]
        C = self.cfg.array_cols
        geometry = (d["in_h"], d["in_w"], d["cin"])
        if d["g_in"] != math.ceil(d["cin"] / C):
            raise MachineFault(f"descriptor: g_in {d['g_in']} for {d['cin']} channels")
        if d["pad_h"] == d["pad_w"] and d["pool_h"] == d["pool_w"]:
            kind = "conv2d"
        elif d["in_h"] == d["kh"] == 1 and d["pad_h"] == 0 and d["pool_h"] == 1:
            kind = "conv1d"
        else:
            raise MachineFault(f"descriptor: pads {d['pad_h']}, {d['pad_w']} and pools "
                               f"{d['pool_h']}, {d['pool_w']} are no layer kind")
        try:
            layer = Layer(kind, geometry, d["g_out"] * C, (d["kh"], d["kw"]), pad=d["pad_w"],
                          stride=d["stride"], relu=bool(d["relu"]), pool=d["pool_w"])
        except ValueError as exc:
            raise MachineFault(f"descriptor: {exc}") from None
        return layer, d, geometry

    def _rows(self, array, start, n, what):
        if start + n > len(array):
            raise MachineFault(f"{what} words {start}..{start + n - 1} outside the memory")
        return array[start:start + n]

    def _act_load(self, base, n):
        return self._rows(self.act, base, n, "activation")

    def _act_store(self, base, words):
        self._rows(self.act, base, len(words), "activation")[:] = words

    def _gather(self, lora, fill):
        if self.index >= len(self.labels):
            raise _Stop(Error.INDEX)
        C = self.cfg.array_cols
        xs = []
        for base, pixels, groups, tail in self._gather_table:
            ch = self._channels(groups, tail)
            words = self._act_load(base, pixels * groups).reshape(pixels, groups * C)
            xs.append(words[:, :ch].reshape(1, -1).copy())
        base = self.logits.reshape(-1)[None, :self._gather_classes].copy()
        if fill:
            cache = self.cache
            if cache is None or cache.sizes != [x.shape[1] for x in xs] or \
                    cache.classes != base.shape[1]:
                raise _Stop(Error.CACHE)
            cache.fill([self.index], xs, base)
        if lora:
            if self._cache_setup["bits4"]:
                xs = cache_format(self._cache_model, xs, 4)
            self._enqueue(xs, base)

    def _lookup(self):
        self.hit = self.cache is not None and bool(self.cache.holds([self.index])[0])
        if self.hit:
            self.cache_hits += 1
            if self.index >= len(self.labels):
                raise _Stop(Error.INDEX)
            self._enqueue(*self.cache.read([self.index]))
        else:
            self.cache_misses += 1

    def _update(self):
        self._flush()
        lora, cfg = self._lora, self.cfg
        mant, exp = self._lr
        lr = mant * 2.0 ** -exp
        if mant == 0 or lr_mantissa(lr, cfg) != (mant, exp):
            raise MachineFault(f"LR mantissa {mant} is not normalized (lr_mantissa would not produce it)")
        if any(b != cfg.F_h + cfg.F_g - cfg.F_n for b in lora["fshift_b"]):
            raise MachineFault("fshift b other than F_h + F_g - F_n: the golden update fixes it")
        model = _Setup([a - cfg.F_e + cfg.F_n for a in lora["fshift_a"]], lora["sizes"], lora["classes"])
        masters = self._split(self.adapters.view(np.int32).astype(np.int64))
        moments = (self._split(self._m), self._split(self._v))
        new, (m, v) = update(model, masters, moments, self._split(self._grad), lr, self.lfsr, cfg)
        words = self.adapters.view(np.int32).astype(np.int64)
        write_adapters(words, new, cfg)
        self.adapters[:] = words.astype(np.int32).view(np.uint32)
        write_adapters(self._m, m, cfg)
        write_adapters(self._v, v, cfg)
        self._grad[:] = 0
        self.updates += 1

    def _clear(self, grads, moments, seed, cache, counters):
        self._flush()
        if grads:
            self._grad[:] = 0
        if moments:
            self._m[:] = 0
            self._v[:] = 0
        if seed:
            self.lfsr = Lfsr(self._seed, self.cfg.lfsr_taps)
        if cache and self.cache is not None:
            self.cache.invalidate()
        if counters:
            self.updates = self.n_samples = self.n_correct = 0
            self.cache_hits = self.cache_misses = self.results_ptr = 0

    # ------------------------------------------------------------ registers --------

    def _set_register(self, reg, words):
        cfg = self.cfg
        self.regs[reg] = v = unpack(register_layout(reg, cfg), words)
        if reg is Reg.ADAPTER:
            a, n = v.adapter, v.adapter.n_layers
            layers = [a.layers[l] for l in range(n)]
            self._lora = {"rank": a.rank, "classes": a.classes,
                          "sizes": [e.size for e in layers],
                          "s_x": [e.h_shift - cfg.F_w + cfg.F_h for e in layers],
                          "fshift_a": [v.fshift[l].a for l in range(n)],
                          "fshift_b": [v.fshift[l].b for l in range(n)]}
        elif reg is Reg.CACHE:
            layers = [v.layers[l] for l in range(v.n_layers)]
            self._cache_setup = {"bits4": v.bits4}
            self._cache_model = _Setup([], [e.size for e in layers], v.classes, {
                "cache4_shift": [e.shift for e in layers],
                "cache4_signed": [bool(e.signed) for e in layers]})
            key = (v.bits4, tuple(self._cache_model.adapter_inputs), v.classes,
                   tuple(self._cache_model.meta["cache4_shift"]),
                   tuple(self._cache_model.meta["cache4_signed"]))
            if key != self._cache_key:
                self._cache_key = key
                try:
                    self.cache = ActivationCache(self._cache_model, cfg, 4 if v.bits4 else 8)
                except ValueError:
                    self.cache = None          # every lookup misses, every fill is refused
                if self.cache is not None and not layers:
                    self.cache = None
        elif reg is Reg.GATHER:
            self._gather_table = [(e.base, e.pixels, e.groups, e.tail)
                                  for e in (v.layers[l] for l in range(v.n_layers))]
            self._gather_classes = v.classes
        elif reg is Reg.LR:
            self._lr = (v.mant, v.exp)
        else:
            self._seed = v.seed

    # ------------------------------------------------------------ LoRA engine ------

    def _split(self, words):
        """[(A_l, B_l)] from a per-word array of the ADAPTERS region, as the ADAPTER
        register lays the weights out (`firmware.memmap.adapter_bases`)."""
        lora = self._lora
        try:
            span = adapter_span(lora["sizes"], lora["rank"], self.cfg)
        except ValueError as e:
            raise MachineFault(str(e)) from None
        if span > self.cfg.adapter_words:
            raise MachineFault(f"the adapters need {span} words; the memory has {self.cfg.adapter_words}")
        return read_adapters(words, lora["sizes"], lora["rank"], lora["classes"], self.cfg)

    def masters(self):
        """[(A_l, B_l)] int64 master weights, as the ADAPTER register lays them out."""
        return [(a.copy(), b.copy()) for a, b in self._split(self.adapters.view(np.int32).astype(np.int64))]

    def _enqueue(self, xs, base):
        label = int(self.labels[self.index])
        slot = self.results_ptr if self.results_ptr < len(self.results) else None
        self.results_ptr = min(self.results_ptr + 1, len(self.results))
        self._queue.append((xs, base, label, slot))

    def _flush(self):
        """The queued samples through the adapters and the loss: gradients summed into
        the accumulators, predictions into RESULTS."""
        if not self._queue:
            return
        queue, self._queue = self._queue, []
        lora, cfg = self._lora, self.cfg
        xs = [np.concatenate([q[0][l] for q in queue]) for l in range(len(queue[0][0]))]
        if [x.shape[1] for x in xs] != lora["sizes"]:
            raise MachineFault(f"adapter inputs of {[x.shape[1] for x in xs]} for adapters "
                               f"of {lora['sizes']}")
        base = np.concatenate([q[1] for q in queue])
        y = np.array([q[2] for q in queue], np.int64)
        if base.shape[1] != lora["classes"] or (y >= lora["classes"]).any():
            raise MachineFault(f"{base.shape[1]} base logits and labels up to {y.max()} "
                               f"for {lora['classes']} classes")
        model = _Setup(lora["s_x"], lora["sizes"], lora["classes"])
        masters = self._split(self.adapters.view(np.int32).astype(np.int64))
        z, hs = adapter_forward(model, xs, base, masters, cfg)
        grads = adapter_grads(model, xs, hs, loss_grad(z, y, cfg), masters, cfg)
        write_adapters(self._grad, grads, cfg, add=True)
        pred = argmax(z)
        correct = pred == y
        for (_, _, _, slot), p, c in zip(queue, pred, correct):
            if slot is not None:
                self.results[slot] = int(p) | int(c) << 8
        self.n_samples += len(y)
        self.n_correct += int(correct.sum())

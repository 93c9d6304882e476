"""From a quantized model and a fine-tuning schedule to the device's programs and memory
images (docs/isa.md, "The compiled programs").

- `compile_finetune(model, schedule, cfg, n_samples)` and `compile_infer(model, cfg,
  n_samples, rank=4)` return a `Program`: the program memory's words (code, then the
  register values and layer descriptors that LOAD and LAYER copy), its listing and what a
  host needs to run it.
- `finetune_images` and `infer_images` return the data a program reads, as an image:
  ``{Region: [(offset, [word, ...]), ...]}``, runs of 32-bit port words to write at
  consecutive offsets of the region, each run one burst. Memories of words wider than
  32 bits (weights, biases) are listed chunk by chunk, chunk 0 (lowest lanes) first,
  word by word; where a word has fewer chunks than ``2**chunk_bits`` the offsets have
  gaps and every word is its own run. `image_writes` flattens an image into ``(address,
  word)`` pairs in write order (every chunked word ends on its last chunk, which commits
  it).
- `read_masters(words, model, rank, cfg)` reads the adapters back from the ADAPTERS
  region; `master_words(masters, cfg)` is its inverse (the layout is
  `firmware.memmap.adapter_bases`).

Activations: every layer's input stays in the activation buffer until the GATHER of its
sample, so the layers do not ping-pong: layer 0's input is at word 0, each layer writes
its output just past its input, and the last one writes its logits (wide) at word 0 of
the logit memory. Weights and biases are packed one layer after another from word 0.
"""

import dataclasses
import math

import numpy as np
from amaranth import Shape
from amaranth.lib import data

from sim.finetune import (Schedule, ScheduleError, batch_order, check_limits, init_adapters,
                          lfsr_seed)
from sim.fixed_model import lr_mantissa, quantize_input

from .asm import Assembler, AsmError
from .isa import COUNT_BITS, WORD_BITS, Cond, Opcode, Phase, Reg, pack, register_layout
from .layers import ConvDescriptor, LayoutError, pack_biases, pack_weights, plan_network, to_words
from .memmap import OFFSET_BITS, Region, adapter_span, chunk_bits, read_adapters, word_bits, write_adapters

__all__ = ["Program", "compile_finetune", "compile_infer", "plan_activations",
           "register_values", "finetune_images", "infer_images", "frozen_images",
           "sample_images", "image_writes", "master_words", "read_masters", "adapter_count",
           "ScheduleError", "LayoutError"]

_MASK = (1 << WORD_BITS) - 1


@dataclasses.dataclass
class Program:
    """A compiled program: write ``words`` at PROGRAM offset 0, start at ``entry``."""
    kind: str                 # "finetune" or "infer"
    words: list               # the program memory: code, then data words
    code_words: int           # instructions; the rest are LOAD / LAYER data
    listing: str              # the disassembly, with the compiler's labels
    symbols: dict             # label -> program address
    n_samples: int
    sample_bytes: int         # d_0: bytes per sample in the sample memory (MOVE stride)
    rank: int
    epochs: int               # 1 for inference
    batches: int              # UPDATEs per epoch (0 for inference)
    plans: list               # firmware.layers.LayerPlan per layer
    registers: dict           # Reg -> the value LOAD copies (a dict shaped like its layout)
    schedule: Schedule | None = None
    entry: int = 0

    @property
    def updates(self):
        """The UPDATES counter at HALT."""
        return self.epochs * self.batches

    @property
    def data_words(self):
        return len(self.words) - self.code_words


# ---------------------------------------------------------------- placement ----------


def plan_activations(model, cfg):
    """Plans of every layer: inputs stacked from word 0 of the activation buffer, never
    overwritten within a sample; logits at word 0 of the logit memory; weights and biases
    packed from word 0 (`firmware.layers.plan_network` with ``stack``). Raises
    LayoutError when something does not fit."""
    return plan_network(model, cfg, stack=True)


# ---------------------------------------------------------------- registers ----------


def _check_value(shape, value, path):
    """Every leaf of ``value`` inside its field of ``shape`` (pack would wrap it)."""
    if isinstance(shape, data.StructLayout):
        for name, field in shape:
            if name in value:
                _check_value(field.shape, value[name], f"{path}.{name}")
    elif isinstance(shape, data.ArrayLayout):
        if len(value) > shape.length:
            raise LayoutError(f"{path} has {len(value)} entries; the register holds {shape.length}")
        for i, v in enumerate(value):
            _check_value(shape.elem_shape, v, f"{path}[{i}]")
    else:
        s = Shape.cast(shape)
        lo, hi = (-(1 << (s.width - 1)), (1 << (s.width - 1)) - 1) if s.signed else (0, (1 << s.width) - 1)
        if not lo <= int(value) <= hi:
            raise LayoutError(f"{path} = {value} does not fit its field ({lo}..{hi})")


def _pack(layout, value, what):
    _check_value(layout, value, what)
    return pack(layout, value)


def register_values(model, plans, cfg, *, rank, cache_bits=8, lr=None, seed=None):
    """The values LOAD copies into each register, as dicts shaped like their layouts
    (LR and SEED only when ``lr`` / ``seed`` are given)."""
    C = cfg.array_cols
    sizes = model.adapter_inputs
    shift4 = model.meta.get("cache4_shift", [0] * len(sizes))
    signed4 = model.meta.get("cache4_signed", [False] * len(sizes))
    gather = []
    for plan in plans:
        h, w, c = plan.geometry
        groups = math.ceil(c / C)
        gather.append({"base": plan.fields["in_base"], "pixels": h * w, "groups": groups,
                       "tail": c - (groups - 1) * C})
    regs = {
        Reg.ADAPTER: {
            "adapter": {"n_layers": len(sizes), "rank": rank, "classes": model.classes,
                        "layers": [{"size": d, "h_shift": model.s_x[l] + cfg.F_w - cfg.F_h}
                                   for l, d in enumerate(sizes)]},
            "fshift": [{"a": model.s_x[l] + cfg.F_e - cfg.F_n, "b": cfg.F_h + cfg.F_g - cfg.F_n}
                       for l in range(len(sizes))]},
        Reg.CACHE: {"bits4": int(cache_bits == 4), "classes": model.classes,
                    "n_layers": len(sizes),
                    "layers": [{"size": d, "shift": int(shift4[l]), "signed": int(signed4[l])}
                               for l, d in enumerate(sizes)]},
        Reg.GATHER: {"n_layers": len(sizes), "classes": model.classes, "layers": gather},
    }
    if lr is not None:
        mant, exp = lr_mantissa(lr, cfg)
        regs[Reg.LR] = {"mant": mant, "exp": exp}
    if seed is not None:
        regs[Reg.SEED] = {"seed": lfsr_seed(seed)}
    return regs


# ---------------------------------------------------------------- programs -----------


class _Builder(Assembler):
    """An Assembler with the compiled programs' pieces."""

    def __init__(self, cfg, plans, regs):
        super().__init__(cfg)
        self.plans = plans
        self.regs = regs
        self.sample_bytes = _sample_bytes(plans[0])
        self._tags = 0

    def loop(self, count, what):
        if not 1 <= count < (1 << COUNT_BITS):
            raise ScheduleError(f"{what} = {count}: a LOOP counts 1..{(1 << COUNT_BITS) - 1}")
        self.emit(Opcode.LOOP, count=count)

    def prologue(self, clear):
        for reg in self.regs:
            self.emit(Opcode.LOAD, reg=reg, addr=f"reg_{reg.name.lower()}")
        self.emit(Opcode.CLEAR, **{name: 1 for name in clear})

    def sample(self, cache):
        """One sample: the frozen network (skipped on a cache hit) and the GATHER."""
        if cache:
            self._tags += 1
            tag = f"hit{self._tags}"
            self.emit(Opcode.LOOKUP)
            self.emit(Opcode.BRANCH, cond=Cond.HIT, target=tag)
        self.emit(Opcode.MOVE, stride=self.sample_bytes)
        for l in range(len(self.plans)):
            self.emit(Opcode.LAYER, addr=f"layer{l}")
        self.emit(Opcode.GATHER, lora=1, fill=int(cache))
        if cache:
            self.label(tag)
        self.emit(Opcode.INCIDX)

    def epoch(self, n, batch, cache):
        self.emit(Opcode.SETIDX, index=0)
        full, last = divmod(n, batch)
        if full:
            self.loop(full, "full batches")
            self.loop(batch, "batch")
            self.sample(cache)
            self.emit(Opcode.ENDLOOP)
            self.emit(Opcode.UPDATE)
            self.emit(Opcode.ENDLOOP)
        if last:
            self.loop(last, "last batch")
            self.sample(cache)
            self.emit(Opcode.ENDLOOP)
            self.emit(Opcode.UPDATE)

    def finish(self, kind, **meta):
        self.emit(Opcode.PHASE, phase=Phase.NONE)
        self.emit(Opcode.HALT)
        for reg, value in self.regs.items():
            self.data(f"reg_{reg.name.lower()}",
                      _pack(register_layout(reg, self.cfg), value, f"register {reg.name}"))
        for l, plan in enumerate(self.plans):
            self.data(f"layer{l}", _pack(ConvDescriptor, plan.fields, f"layer {l}"))
        try:
            words = self.assemble()
        except AsmError as exc:
            raise LayoutError(str(exc)) from None
        return Program(kind, words, self.code_words, self.listing(), dict(self.symbols),
                       sample_bytes=self.sample_bytes, plans=self.plans, registers=self.regs,
                       **meta)


def _sample_bytes(plan):
    h, w, c = plan.geometry
    return h * w * c


def _check_samples(model, cfg, n):
    d0 = model.adapter_inputs[0]
    if not 1 <= n <= cfg.max_samples:
        raise ScheduleError(f"{n} samples: the device holds 1..{cfg.max_samples}")
    if n * d0 > 4 * (cfg.sample_words // 4):
        raise ScheduleError(f"{n} samples of {d0} bytes exceed the sample memory "
                            f"({4 * (cfg.sample_words // 4)} bytes)")
    if d0 >= 1 << COUNT_BITS:
        raise ScheduleError(f"samples of {d0} bytes: MOVE strides are below {1 << COUNT_BITS}")


def compile_finetune(model, schedule, cfg, n_samples):
    """The fine-tune program of docs/isa.md for ``n_samples`` samples stored in the
    schedule's batch order. With the cache on and one epoch there is no PHASE CACHED
    section (a LOOP cannot count 0)."""
    check_limits(model, schedule, cfg)
    _check_samples(model, cfg, n_samples)
    plans = plan_activations(model, cfg)
    regs = register_values(model, plans, cfg, rank=schedule.rank, cache_bits=schedule.cache_bits,
                           lr=schedule.lr, seed=schedule.seed)
    b = _Builder(cfg, plans, regs)
    b.prologue(("grads", "moments", "seed", "cache", "counters"))
    b.emit(Opcode.PHASE, phase=Phase.FROZEN)
    n, batch, epochs = n_samples, schedule.batch, schedule.epochs
    if schedule.cache:
        b.epoch(n, batch, cache=True)
        if epochs > 1:
            b.emit(Opcode.PHASE, phase=Phase.CACHED)
            b.loop(epochs - 1, "epochs - 1")
            b.epoch(n, batch, cache=True)
            b.emit(Opcode.ENDLOOP)
    else:
        b.loop(epochs, "epochs")
        b.epoch(n, batch, cache=False)
        b.emit(Opcode.ENDLOOP)
    return b.finish("finetune", n_samples=n, rank=schedule.rank, epochs=epochs,
                    batches=math.ceil(n / batch), schedule=schedule)


def compile_infer(model, cfg, n_samples, rank=Schedule.rank):
    """The inference program: ``n_samples`` samples through the frozen network and the
    rank-``rank`` adapters already in the device (8-bit format, no cache), under PHASE
    INFER; predictions in RESULTS, SAMPLES / CORRECT count them. It loads ADAPTER, CACHE
    and GATHER (not LR and SEED) and clears the gradients and the counters (RESULTS
    from word 0); the moments, the LFSR and the cache stay."""
    check_limits(model, Schedule(rank=rank, cache=False), cfg)
    _check_samples(model, cfg, n_samples)
    plans = plan_activations(model, cfg)
    regs = register_values(model, plans, cfg, rank=rank, cache_bits=8)
    b = _Builder(cfg, plans, regs)
    b.prologue(("grads", "counters"))
    b.emit(Opcode.PHASE, phase=Phase.INFER)
    b.emit(Opcode.SETIDX, index=0)
    b.loop(n_samples, "samples")
    b.sample(cache=False)
    b.emit(Opcode.ENDLOOP)
    return b.finish("infer", n_samples=n_samples, rank=rank, epochs=1, batches=0)


# ---------------------------------------------------------------- images -------------


def _runs(region, lane_words, cfg):
    """Runs of 32-bit chunks of memory words (ints of ``word_bits(region)`` bits) written
    from word 0."""
    n = -(-word_bits(region, cfg) // 32)
    cb = chunk_bits(region, cfg)
    chunks = [[(w >> (32 * k)) & _MASK for k in range(n)] for w in lane_words]
    if n == 1 << cb:
        return [(0, [c for word in chunks for c in word])] if chunks else []
    return [(i << cb, word) for i, word in enumerate(chunks)]


def frozen_images(model, cfg):
    """WEIGHTS and BIASES of every layer, where `plan_activations` puts them."""
    C = cfg.array_cols
    weights, biases = [], []
    for l in range(len(model.layers)):
        weights += to_words(pack_weights(model.weights[l], C), 8)
        biases += to_words(pack_biases(model.biases[l], C), 32)
    return {Region.WEIGHTS: _runs(Region.WEIGHTS, weights, cfg),
            Region.BIASES: _runs(Region.BIASES, biases, cfg)}


def sample_images(model, x, y, cfg, order=None):
    """SAMPLES (quantized, (i, j, c) order, d_0 bytes each, four per word little end
    first) and LABELS (one per word) of samples ``order`` (default: as given)."""
    xq = quantize_input(model, x, cfg)
    y = np.asarray(y, np.int64)
    n = len(y)
    _check_samples(model, cfg, n)
    order = np.arange(n) if order is None else np.asarray(order)
    raw = xq[order].reshape(n, -1).astype(np.int8).tobytes()
    raw += bytes(-len(raw) % 4)
    samples = np.frombuffer(raw, "<u4").tolist()
    return {Region.SAMPLES: [(0, samples)],
            Region.LABELS: [(0, [int(v) & _MASK for v in y[order]])]}


def master_words(masters, cfg):
    """ADAPTERS words from offset 0 of masters [(A_l, B_l)], int32 as unsigned 32-bit
    words, at their `adapter_addresses` (padding zero)."""
    rank = masters[0][0].shape[1] if masters else 1
    words = np.zeros(adapter_span([a.shape[0] for a, _ in masters], rank, cfg), np.int64)
    write_adapters(words, masters, cfg)
    return [int(v) & _MASK for v in words]


def adapter_count(model, rank, cfg):
    """ADAPTERS words the adapters of ``model`` at rank ``rank`` take from offset 0
    (weights and the layout's padding)."""
    return adapter_span(model.adapter_inputs, rank, cfg)


def read_masters(words, model, rank, cfg):
    """[(A_l, B_l)] int64 arrays from the ADAPTERS words (from offset 0)."""
    need = adapter_count(model, rank, cfg)
    if len(words) < need:
        raise ValueError(f"{len(words)} adapter words; rank {rank} needs {need}")
    raw = np.asarray([int(w) & _MASK for w in words[:need]], np.uint32).view(np.int32).astype(np.int64)
    return read_adapters(raw, model.adapter_inputs, rank, model.classes, cfg)


def finetune_images(model, x, y, schedule, cfg):
    """Everything a fine-tune program reads: SAMPLES and LABELS in the schedule's batch
    order (every epoch walks the memory from 0), WEIGHTS, BIASES, and the initial
    ADAPTERS (`sim.finetune.init_adapters`)."""
    order = np.concatenate(batch_order(len(y), schedule.batch, schedule.seed))
    images = sample_images(model, x, y, cfg, order)
    images.update(frozen_images(model, cfg))
    masters = init_adapters(model, schedule.rank, schedule.seed, cfg)
    images[Region.ADAPTERS] = [(0, master_words(masters, cfg))]
    return images


def infer_images(model, x, y, cfg, frozen=True):
    """SAMPLES and LABELS of evaluation samples in their given order, and (``frozen``)
    WEIGHTS and BIASES; no ADAPTERS: the fine-tuned ones stay in the device."""
    images = sample_images(model, x, y, cfg)
    if frozen:
        images.update(frozen_images(model, cfg))
    return images


def image_writes(images):
    """``(address, word)`` port writes of an image (or of ``{Region: [(offset, words)]}``
    in general), region by region, each run in order."""
    return [((Region(region).value << OFFSET_BITS) | (offset + i), w)
            for region, runs in images.items() for offset, words in runs
            for i, w in enumerate(words)]

"""The gather unit (gateware/gather.py) on the real layer engine, in Amaranth's simulator.

The activations of real samples (their frozen forward pass, `sim.fixed_model`) are laid
into the engine's activation buffer as `firmware.layers.pack_activations` lays them out,
each layer's input right after the previous one, and the base logits into its logit
memory by a one-pixel "wide" layer whose biases are the logits. GATHER must stream exactly
`cache_format` (8 and 4 bits) and the base logits to ``lora``, the raw values to ``fill``,
with random backpressure on either; MOVE must write a sample stored compactly at an odd
byte address of the sample memory exactly as `pack_activations` does. Every check is ==.
"""

import random

import numpy as np
import pytest
from amaranth.hdl import Module, Mux
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In
from amaranth.sim import Simulator

from firmware.layers import (ADDR_BITS, from_words, pack_activations, pack_biases,
                             plan_layer, to_words)
from gateware.config import DEFAULT
from gateware.gather import GatherUnit
from gateware.layer_engine import MEM_ACT, MEM_BIAS, LayerEngine, load_layout
from gateware.segmented import SegmentedRAM
from sim.fixed_model import cache_format
from sim.network import Layer
from tests.gateware.amaranth_streams import pulse
from tests.gateware.test_cache import fill_beats, real_samples, setup_value, split_layers
from tests.gateware.test_lora import sample_beats

CFG = DEFAULT
C = CFG.array_cols
JUNK = 0x5A                     # a byte that is neither an activation lane nor zero padding


class Bench(wiring.Component):
    """A `GatherUnit` on a `LayerEngine` and a sample memory of ``words`` (32 bits), as
    the top level connects them. ``host`` writes the engine's memories while the unit is
    idle; ``stall`` holds the unit's ``load`` (the engine itself is always ready);
    ``peek`` hands the engine's read port to ``peek_mem``/``peek_addr``."""

    def __init__(self, cfg, words):
        self.gu = GatherUnit(cfg)
        self.engine = LayerEngine(cfg)
        self._words = [int(w) for w in words]
        super().__init__({
            "host": In(stream.Signature(load_layout(cfg.array_cols, cfg.acc_bits))),
            "stall": In(1),
            "peek": In(1), "peek_mem": In(2), "peek_addr": In(ADDR_BITS),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.gu = gu = self.gu
        m.submodules.engine = engine = self.engine
        m.submodules.smp = smp = SegmentedRAM(32, len(self._words), init=self._words)
        go = gu.load.valid & ~self.stall
        m.d.comb += [
            smp.r_addr.eq(gu.smp_addr),
            gu.smp_data.eq(smp.r_data),
            engine.load.valid.eq(go | self.host.valid),
            engine.load.payload.eq(Mux(go, gu.load.payload, self.host.payload)),
            gu.load.ready.eq(engine.load.ready & ~self.stall),
            self.host.ready.eq(engine.load.ready & ~go),
            engine.rd_mem.eq(Mux(self.peek, self.peek_mem, gu.rd_mem)),
            engine.rd_addr.eq(Mux(self.peek, self.peek_addr, gu.rd_addr)),
            gu.rd_data.eq(engine.rd_data),
        ]
        return m


# ---------------------------------------------------------------- data

def regions(geometries):
    """The GATHER entries of inputs of (H, W, Cin) ``geometries`` placed one after another
    from word 0, and the words they take."""
    layers, base = [], 0
    for h, w, c in geometries:
        groups = -(-c // C)
        layers.append({"base": base, "pixels": h * w, "groups": groups,
                       "tail": c - (groups - 1) * C})
        base += h * w * groups
    return layers, base


def gather_setup(model, n_layers=None):
    """The GATHER register of ``model``'s inputs at their `regions`; ``n_layers`` of them
    gathered (all by default)."""
    layers, _ = regions([layer.in_shape for layer in model.layers])
    pad = [{"base": 0, "pixels": 0, "groups": 0, "tail": 0}] * (CFG.max_layers - len(layers))
    n_layers = len(layers) if n_layers is None else n_layers
    return {"n_layers": n_layers, "classes": model.classes, "layers": layers + pad}


def act_loads(model, xs, n):
    """The host's MEM_ACT writes of sample ``n``'s x_l, packed at their regions."""
    layers, _ = regions([layer.in_shape for layer in model.layers])
    loads = []
    for layer, entry, x in zip(model.layers, layers, xs):
        words = to_words(pack_activations(x[n].reshape(layer.in_shape), C), 8)
        loads += [(MEM_ACT, entry["base"] + a, v) for a, v in enumerate(words)]
    return loads


def sample_memory(values, src, rng, words=128):
    """Sample-memory words with the int8 ``values`` at byte ``src`` and junk around."""
    mem = bytearray(rng.integers(0, 256, 4 * words, dtype=np.uint8).tobytes())
    mem[src:src + len(values)] = bytes(int(v) & 0xFF for v in values)
    return [int.from_bytes(mem[4 * i:4 * i + 4], "little") for i in range(words)]


# ---------------------------------------------------------------- testbench steps

async def host_load(ctx, bench, loads):
    for mem, addr, value in loads:
        ctx.set(bench.host.valid, 1)
        ctx.set(bench.host.payload, {"mem": mem, "addr": addr, "data": value})
        await ctx.tick().until(bench.host.ready)
    ctx.set(bench.host.valid, 0)


async def put_logits(ctx, bench, logits):
    """The engine writes ``logits`` to logit words 0.. itself: a (1, 1, 1) fc layer with
    zero weights, the logits as biases and no shift."""
    layer = Layer("fc", (1, 1, 1), len(logits), relu=False)
    plan = plan_layer(layer, (1, 1, 1), CFG, shift=0, wide=True)
    await host_load(ctx, bench, [(MEM_BIAS, a, v) for a, v in
                                 enumerate(to_words(pack_biases(logits, C), 32))])
    ctx.set(bench.engine.desc, plan.fields)
    await pulse(ctx, bench.engine.start)
    await ctx.tick().until(~bench.engine.busy)


async def peek(ctx, bench, addrs, mem=MEM_ACT):
    """The engine's words at ``addrs`` as (n, C) lanes."""
    got = []
    ctx.set(bench.peek, 1)
    ctx.set(bench.peek_mem, mem)
    for a in addrs:
        ctx.set(bench.peek_addr, a)
        await ctx.tick().repeat(2)                  # the port takes two cycles
        got.append(ctx.get(bench.engine.rd_data))
    ctx.set(bench.peek, 0)
    return from_words(got, C, 16)


async def strobe_gather(ctx, gu, to_lora, to_fill, index, label):
    ctx.set(gu.to_lora, to_lora)
    ctx.set(gu.to_fill, to_fill)
    ctx.set(gu.index, index)
    ctx.set(gu.label, label)
    await pulse(ctx, gu.gather)
    for port in (gu.to_lora, gu.to_fill, gu.index, gu.label):     # sampled on the strobe
        ctx.set(port, 0)


def sink(port, beats, fields, stall, seed):
    """Background testbench: ``port.ready`` low with probability ``stall``; every beat
    taken goes to ``beats`` as a tuple of ``fields``, every valid cycle is counted in
    ``beats.valid_cycles``."""
    rng = random.Random(seed)
    beats.valid_cycles = 0

    async def run(ctx):
        while True:
            ctx.set(port.ready, int(not (stall and rng.random() < stall)))
            _, _, valid, ready, payload = await ctx.tick().sample(port.valid, port.ready,
                                                                  port.payload)
            beats.valid_cycles += valid
            if valid and ready:
                beats.append(tuple(int(getattr(payload, f)) for f in fields))

    return run


class Beats(list):
    """The beats a `sink` took, and ``valid_cycles``: the cycles its ``valid`` was high."""
    valid_cycles = 0


LORA_FIELDS = ("data", "label", "first", "last")
FILL_FIELDS = ("index", "data", "first", "last")


def as_tuples(beats, fields):
    return [tuple(int(b[f]) for f in fields) for b in beats]


def run(bench, *benches, background=()):
    sim = Simulator(bench)
    sim.add_clock(1e-8)
    for tb in background:
        sim.add_testbench(tb, background=True)
    for tb in benches:
        sim.add_testbench(tb)
    sim.run()


# ---------------------------------------------------------------- GATHER

def gather_run(workload, bits, to_lora, to_fill, stall=0.0, samples=(0, 1), n_layers=None):
    """GATHER of ``samples`` (each loaded into the engine first; index 5 + n, label (3 n +
    1) mod classes), with ``lora`` and ``fill`` not ready with probability ``stall``
    (independent patterns); the inputs of the first ``n_layers`` layers (all by default).
    Returns the beats taken on both streams and the wants."""
    model, acts, base = real_samples(workload)
    xs = split_layers(model, acts)
    formatted = cache_format(model, xs, bits)[:n_layers]
    acts = acts[:, :sum(model.adapter_inputs[:n_layers])]
    labels = {n: (3 * n + 1) % model.classes for n in samples}
    want_lora, want_fill = [], []
    for n in samples:
        if to_lora:
            label = np.full(len(base), labels[n])
            want_lora += as_tuples(sample_beats(formatted, base, label, n), LORA_FIELDS)
        if to_fill:
            want_fill += as_tuples(fill_beats(5 + n, acts[n], base[n]), FILL_FIELDS)

    bench = Bench(CFG, [0])
    gu = bench.gu
    lora, fill = Beats(), Beats()

    async def main(ctx):
        ctx.set(gu.setup, gather_setup(model, n_layers))
        ctx.set(gu.fmt, setup_value(CFG, model, bits))
        for n in samples:
            await host_load(ctx, bench, act_loads(model, xs, n))
            await put_logits(ctx, bench, base[n])
            await strobe_gather(ctx, gu, to_lora, to_fill, 5 + n, labels[n])
            await ctx.tick().until(~gu.busy)

    run(bench, main, background=[sink(gu.lora, lora, LORA_FIELDS, stall, 1),
                                 sink(gu.fill, fill, FILL_FIELDS, stall, 2)])
    return lora, fill, want_lora, want_fill


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("workload", ["digits", "fan"])
def test_gather_to_lora(workload, bits):
    """Two samples to the LoRA engine alone: every x_l in the cache's format (digits:
    unsigned 4-bit layers; fan: a signed one), the base logits and the label; ``fill``
    never valid."""
    lora, fill, want_lora, _ = gather_run(workload, bits, to_lora=1, to_fill=0)
    assert lora == want_lora
    assert fill == [] and fill.valid_cycles == 0


def test_gather_to_fill():
    """Two digits samples to the cache alone: raw int8 activations and int16 logits with
    the index; ``lora`` never valid, whatever the 4-bit setting."""
    lora, fill, _, want_fill = gather_run("digits", 4, to_lora=0, to_fill=1)
    assert fill == want_fill
    assert lora == [] and lora.valid_cycles == 0


@pytest.mark.parametrize("workload", ["digits", "fan"])
def test_gather_both_backpressure(workload):
    """Both destinations, each not ready 40 % of the cycles (independent patterns): both
    packets intact, in order, no beat lost or doubled."""
    lora, fill, want_lora, want_fill = gather_run(workload, 4, to_lora=1, to_fill=1,
                                                  stall=0.4)
    assert lora == want_lora
    assert fill == want_fill


@pytest.mark.parametrize("n_layers", [0, 2])
def test_gather_fewer_layers(n_layers):
    """GATHER stops after ``n_layers`` layers (none: the logits alone) and then reads
    the logits."""
    lora, fill, want_lora, want_fill = gather_run("digits", 4, to_lora=1, to_fill=1,
                                                  stall=0.2, n_layers=n_layers)
    assert len(lora) == 2 * (sum(real_samples("digits")[0].adapter_inputs[:n_layers]) + 10)
    assert lora == want_lora
    assert fill == want_fill


# ---------------------------------------------------------------- MOVE

def sample_words_touched(geometry, src):
    """The cycles MOVE takes per activation word: the sample words its bytes lie in."""
    h, w, c = geometry
    groups = -(-c // C)
    lanes = [C] * (groups - 1) + [c - (groups - 1) * C]
    touched, a = [], src
    for _ in range(h * w):
        for n in lanes:
            touched.append((a + n - 1) // 4 - a // 4 + 1)
            a += n
    return touched


def move_run(geometry, values, src, base, stall=0.0, seed=0):
    """MOVE of the int8 ``values`` (``geometry`` (H, W, Cin), (i, j, c) order) stored at
    byte ``src`` of a sample memory full of junk, into layer 0's input at word ``base``
    of an activation buffer full of junk, with ``load`` stalled with probability
    ``stall``. Returns the words base - 1 .. base + words as (n, C) lanes and the
    cycles from the strobe until ``busy`` falls."""
    rng = np.random.default_rng(seed)
    layers, n_words = regions([geometry])
    layers[0]["base"] = base
    pad = [{"base": 0, "pixels": 0, "groups": 0, "tail": 0}] * (CFG.max_layers - 1)
    bench = Bench(CFG, sample_memory(values, src, rng))
    gu = bench.gu
    span = range(max(base - 1, 0), base + n_words + 1)
    out = {}

    async def main(ctx):
        ctx.set(gu.setup, {"n_layers": 1, "classes": 1, "layers": layers + pad})
        junk = to_words(np.full((1, C), JUNK), 8)[0]
        await host_load(ctx, bench, [(MEM_ACT, a, junk) for a in span])
        ctx.set(gu.src, src)
        await pulse(ctx, gu.move)
        ctx.set(gu.src, 0)                          # sampled on the strobe
        cycles = 1
        while ctx.get(gu.busy):
            await ctx.tick()
            cycles += 1
        out["cycles"] = cycles
        out["words"] = await peek(ctx, bench, span)

    async def stalls(ctx):
        r = random.Random(seed)
        while True:
            ctx.set(bench.stall, int(r.random() < stall))
            await ctx.tick()

    run(bench, main, background=[stalls] if stall else [])
    return out["words"], out["cycles"]


@pytest.mark.parametrize("geometry,src,base,stall", [
    ("digits", 23, 0, 0.0),             # (8, 8, 1): one valid lane per word
    ((2, 3, 11), 5, 7, 0.0),            # channels > C, not a multiple of C: tail 3
    ((1, 1, 256), 6, 3, 0.0),           # the fan model's input: 32 whole words
    ((1, 1, 256), 0, 3, 0.0),           # ... from a word-aligned address
    ((2, 3, 11), 2, 1, 0.5),            # load stalled half of the cycles
])
def test_move(geometry, src, base, stall):
    """The bytes of a sample stored compactly at byte ``src`` land at word ``base`` as
    `pack_activations` lays them out, zero lanes past the channels, the words around
    untouched; without stalls in one cycle per sample word each activation word touches,
    plus 8 or 9."""
    if geometry == "digits":
        model, acts, _ = real_samples("digits")
        geometry = tuple(model.layers[0].in_shape)
        values = split_layers(model, acts)[0][3]
    else:
        values = np.random.default_rng(src).integers(-128, 128, int(np.prod(geometry)))
    words, cycles = move_run(geometry, values, src, base, stall)
    want = pack_activations(np.asarray(values).reshape(geometry), C)
    inner = slice(1 if base else 0, -1)
    assert (words[inner] == want).all()
    assert (words[-1] == JUNK).all() and (base == 0 or (words[0] == JUNK).all())
    if not stall:
        # the sample memory's latency at the start, the words read ahead past the
        # sample's end at the end (they drain)
        assert cycles - sum(sample_words_touched(geometry, src)) in (8, 9)


# ---------------------------------------------------------------- timing

def test_timing_digits():
    """The cycles the docstring states, measured on digits (one coroutine, one tick per
    step): GATHER of 288 activations + 10 logits to both destinations at full rate, the
    first beat 5 cycles after the strobe and one beat per cycle, ``busy`` falling 303
    cycles after it; MOVE of the 64 input bytes, words written 5 .. 68 cycles after
    its strobe, one per cycle, ``busy`` falling 4 or 5 cycles after the last. Strobes while busy are ignored."""
    model, acts, base = real_samples("digits")
    xs = split_layers(model, acts)
    n = acts.shape[1] + model.classes
    src = 4 * 3 + 1
    bench = Bench(CFG, sample_memory(xs[0][0], src, np.random.default_rng(0)))
    gu = bench.gu
    t = {}

    async def strobe_and_watch(ctx, strobe, watch):
        """Cycles (from the strobe's, 0) in which ``watch`` is high, until busy falls;
        a second strobe of each kind 10 cycles in."""
        ctx.set(strobe, 1)
        seen, now = [], 0
        while True:
            _, _, busy, hot = await ctx.tick().sample(gu.busy, watch)
            ctx.set(strobe, 0)
            ctx.set(gu.move, now == 9)
            ctx.set(gu.gather, now == 9)
            if hot:
                seen.append(now)
            if now and not busy:
                return seen, now
            now += 1

    async def main(ctx):
        ctx.set(gu.setup, gather_setup(model))
        ctx.set(gu.fmt, setup_value(CFG, model, 8))
        ctx.set(gu.src, src)
        t["move"] = await strobe_and_watch(ctx, gu.move, gu.load.valid)
        await host_load(ctx, bench, act_loads(model, xs, 0)[64:])     # x_1 .. x_3
        await put_logits(ctx, bench, base[0])
        ctx.set(gu.lora.ready, 1)
        ctx.set(gu.fill.ready, 1)
        ctx.set(gu.to_lora, 1)
        ctx.set(gu.to_fill, 1)
        t["gather"] = await strobe_and_watch(ctx, gu.gather, gu.lora.valid & gu.fill.valid)
        for _ in range(5):
            await ctx.tick()
            assert not ctx.get(gu.busy)

    run(bench, main)
    writes, move_end = t["move"]
    assert writes == list(range(5, 69)) and move_end in (72, 73)
    beats, gather_end = t["gather"]
    assert beats == list(range(5, 5 + n)) and gather_end == n + 5 == 303

"""The activation-cache controller against the golden `sim.cache.ActivationCache`.

Every test replays one list of operations (fills, lookup-and-read requests, invalidate,
clear counters) on the golden model (`ref_run`) and on the gateware in Amaranth's
simulator (`rtl_run`), with random bubbles and stalls on the streams, and compares the
read beats, the hit/miss counters, the valid bits and the bytes of every line with ``==``.
The same operations run on Verilator (and Icarus where installed) through
tests/gateware/cocotb_cache.py.
"""

import ast
import functools
import random
import time
import types
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Module, Signal, signed
from amaranth.sim import Simulator

from gateware.cache import ActivationCache, _codes4, dp16kd_count, line_stride
from gateware.config import DEFAULT
from sim.cache import ActivationCache as GoldenCache
from sim.fixed_model import cache_format, codes4
from sim.rtl import missing_reason
from tests.gateware.amaranth_streams import pulse
from tests.gateware.harness import SIMULATORS, run_cocotb

# Small capacities so that every sequence overflows: 8 (indices past it alias onto lines
# 0 and 1 if the overflow check is wrong) and 6 (not a power of two). The default 512
# activation bytes per line hold the fan model's 384.
CFG = DEFAULT.replace(cache_samples=8)
CFG6 = DEFAULT.replace(cache_samples=6)
INDICES = [0, 1, 2, 3, 5, 8, 9, 1000]
WORKLOADS = {"digits": "rotate:30", "fan": "env:noisy"}


# ---------------------------------------------------------------- data

def shape(sizes, classes, shifts, signs):
    """A model as the cache sees it (what `sim.cache.ActivationCache` reads)."""
    return types.SimpleNamespace(adapter_inputs=list(sizes), classes=classes,
                                 meta={"cache4_shift": list(shifts), "cache4_signed": list(signs)})


@functools.lru_cache(maxsize=None)
def real_samples(workload, n=8):
    """The shipped model of ``workload`` and its frozen forward pass on the first ``n``
    target-train samples: (model, acts (n, n_act) int8, base (n, C) int16)."""
    from host.datasets import load_workload
    from host.models import load_base_model
    from sim.fixed_model import frozen_forward, quantize_input

    model = load_base_model(workload)
    split = load_workload(workload, WORKLOADS[workload]).target_train
    base, xs = frozen_forward(model, quantize_input(model, split.x[:n], DEFAULT), DEFAULT)
    return model, np.concatenate(xs, axis=1), base


def synthetic(seed, layers=8, n=8):
    """A random model shape with every shift and both signs, odd n_act, and full-range
    int8 activations and int16 logits (the clipping corners of the 4-bit codes)."""
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in rng.integers(1, 7, layers)]
    if sum(sizes) % 2 == 0:
        sizes[-1] += 1
    signs = [bool(s) for s in rng.integers(0, 2, layers)]
    shifts = [int(rng.integers(0, 5 if s else 4)) for s in signs]
    classes = int(rng.integers(1, DEFAULT.max_classes + 1))
    acts = rng.integers(-128, 128, (n, sum(sizes)))
    base = rng.integers(-32768, 32768, (n, classes))
    return shape(sizes, classes, shifts, signs), acts, base


def split_layers(model, acts):
    return np.split(acts, np.cumsum(model.adapter_inputs)[:-1], axis=1)


def setup_value(cfg, model, bits):
    """The `setup` port as a dict."""
    n = len(model.adapter_inputs)
    layers = [{"size": d, "shift": model.meta["cache4_shift"][l],
               "signed": int(model.meta["cache4_signed"][l])}
              for l, d in enumerate(model.adapter_inputs)]
    layers += [{"size": 0, "shift": 0, "signed": 0}] * (cfg.max_layers - n)
    return {"bits4": int(bits == 4), "classes": model.classes, "n_layers": n, "layers": layers}


def fill_beats(idx, acts, base):
    values = [int(v) for v in acts] + [int(v) for v in base]
    return [{"index": idx, "data": v, "first": int(k == 0), "last": int(k == len(values) - 1)}
            for k, v in enumerate(values)]


def epoch_ops(model, cfg, indices, epochs, seed=0):
    """The fine-tune pattern: every epoch looks up every sample (shuffled) and fills the
    misses. ``indices[j]`` is the index of sample row ``j``."""
    probe = GoldenCache(model, cfg, 8)
    rng = random.Random(seed)
    ops = []
    for _ in range(epochs):
        order = list(range(len(indices)))
        rng.shuffle(order)
        for j in order:
            i = indices[j]
            ops.append(("req", i, 1))
            if not probe.lookup(np.array([i]))[0]:
                ops.append(("fill", i, j))
                probe.fill(np.array([i]), [np.zeros((1, d), int) for d in model.adapter_inputs],
                           np.zeros((1, model.classes), int))
    return ops


def invalidate_ops():
    """Counting and non-counting lookups, a clear right after a counted lookup, an
    invalidate between two lookups of a valid line, a refill after it."""
    return ([("fill", i, i) for i in (0, 2, 5, 6, 7)]
            + [("req", i, 1) for i in (0, 1, 2, 5, 6, 7)]
            + [("req", i, 0) for i in (0, 3, 6)]
            + [("req", 5, 1), ("clear",)]
            + [("req", 2, 1), ("invalidate",), ("req", 2, 1), ("req", 0, 0)]
            + [("fill", 2, 3), ("req", 2, 1), ("req", 5, 1)])


# ---------------------------------------------------------------- reference

def ref_run(cfg, model, bits, acts, base, ops):
    """What the golden model answers: the read packets (beats as (data, logit, hit, first,
    last)), the counters, the valid bits and the lines."""
    cache = GoldenCache(model, cfg, bits)
    xs = split_layers(model, acts)
    packets = []
    for op in ops:
        if op[0] == "fill":
            _, i, j = op
            cache.fill(np.array([i]), [x[j:j + 1] for x in xs], base[j:j + 1])
        elif op[0] == "req":
            _, i, count = op
            hit = (cache.lookup if count else cache.holds)(np.array([i]))[0]
            if not hit:
                packets.append([(0, 0, 0, 1, 1)])
                continue
            rx, rbase = cache.read(np.array([i]))
            values = [(int(v), 0) for x in rx for v in x[0]] + [(int(v), 1) for v in rbase[0]]
            packets.append([(v, lg, 1, int(k == 0), int(k == len(values) - 1))
                            for k, (v, lg) in enumerate(values)])
        elif op[0] == "invalidate":
            cache.invalidate()
        elif op[0] == "clear":
            cache.hits = cache.misses = 0
    return {"packets": packets, "hits": cache.hits, "misses": cache.misses,
            "valid": cache.valid.copy(), "lines": cache.lines.copy()}


def split_packets(beats):
    packets, cur = [], []
    for b in beats:
        cur.append(b)
        if b[4]:
            packets.append(cur)
            cur = []
    assert not cur, "beats after the last packet"
    return packets


# ---------------------------------------------------------------- gateware (Amaranth simulator)

def _beat(payload):
    return (int(payload.data), int(payload.logit), int(payload.hit), int(payload.first),
            int(payload.last))


async def _put(ctx, port, payload, rng, idle):
    while idle and rng.random() < idle:
        await ctx.tick()
    ctx.set(port.valid, 1)
    ctx.set(port.payload, payload)
    await ctx.tick().until(port.ready)
    ctx.set(port.valid, 0)


def rtl_run(cfg, model, bits, acts, base, ops, seed=0, idle=0.3, stall=0.3, rows=None):
    """The same operations on the gateware. ``rows``: the lines whose bytes are read back
    (all by default). A fill waits for the answers to earlier requests of its line; a
    strobe follows the previous operation in the next cycle."""
    dut = ActivationCache(cfg)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    beats, out = [], {}

    async def sink(ctx):
        rng = random.Random(seed + 1)
        while True:
            ctx.set(dut.read.ready, int(not (stall and rng.random() < stall)))
            _, _, valid, ready, payload = await ctx.tick().sample(
                dut.read.valid, dut.read.ready, dut.read.payload)
            if valid and ready:
                beats.append(_beat(payload))

    async def delivered(ctx, n):
        while sum(b[4] for b in beats) < n:
            await ctx.tick()

    async def main(ctx):
        rng = random.Random(seed)
        ctx.set(dut.setup, setup_value(cfg, model, bits))
        sent, pending = 0, set()
        for op in ops:
            if op[0] == "fill":
                _, i, j = op
                if i in pending:
                    await delivered(ctx, sent)
                    pending.clear()
                for b in fill_beats(i, acts[j], base[j]):
                    await _put(ctx, dut.fill, b, rng, idle)
            elif op[0] == "req":
                await _put(ctx, dut.req, {"index": op[1], "count": op[2]}, rng, idle)
                sent += 1
                pending.add(op[1])
            else:
                strobe = dut.invalidate if op[0] == "invalidate" else dut.clear_counters
                ctx.set(strobe, 1)
                await ctx.tick()
                ctx.set(strobe, 0)
        await delivered(ctx, sent)
        while ctx.get(dut.busy):
            await ctx.tick()
        out["hits"], out["misses"] = ctx.get(dut.hits), ctx.get(dut.misses)
        out["fill_error"] = ctx.get(dut.fill_error)
        out["valid"] = np.array([ctx.get(dut.valid_data[i]) for i in range(cfg.cache_samples)], bool)
        ref = GoldenCache(model, cfg, bits)
        rows_ = range(cfg.cache_samples) if rows is None else rows
        lines = {}
        for i in rows_:
            a0 = i * line_stride(cfg)
            lines[i] = np.array([ctx.get(mem[row]) for mem, row in
                                 map(dut.byte_location, range(a0, a0 + ref.line_bytes))], np.uint8)
        out["lines"] = lines

    sim.add_testbench(sink, background=True)
    sim.add_testbench(main)
    sim.run()
    out["packets"] = split_packets(beats)
    return out


def check(cfg, model, bits, acts, base, ops, rows=None, **kw):
    ref = ref_run(cfg, model, bits, acts, base, ops)
    rtl = rtl_run(cfg, model, bits, acts, base, ops, rows=rows, **kw)
    assert len(rtl["packets"]) == len(ref["packets"])
    for k, (got, want) in enumerate(zip(rtl["packets"], ref["packets"])):
        assert got == want, f"read packet {k} differs"
    assert (rtl["hits"], rtl["misses"]) == (ref["hits"], ref["misses"])
    assert rtl["fill_error"] == 0
    np.testing.assert_array_equal(rtl["valid"], ref["valid"])
    for i, line in rtl["lines"].items():
        np.testing.assert_array_equal(line, ref["lines"][i], err_msg=f"line {i}")
    return ref, rtl


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("workload", ["digits", "fan"])
def test_real_activations(workload, bits):
    """Three epochs of the fine-tune pattern on real frozen-forward activations, 8
    samples, three of them past the capacity of 8 (missed every epoch)."""
    model, acts, base = real_samples(workload)
    indices = INDICES
    ops = epoch_ops(model, CFG, indices, epochs=3, seed=bits)
    ref, rtl = check(CFG, model, bits, acts, base, ops, seed=bits)
    n, k = len(indices), CFG.cache_samples
    inside = sum(i < k for i in indices)
    assert ref["hits"] == 2 * inside and ref["misses"] == n + 2 * (n - inside)
    # the hits return the cache format of the frozen forward pass (docs/numerics.md)
    hit = next(p for p in ref["packets"] if p[0][2])
    assert len(hit) == sum(model.adapter_inputs) + model.classes


def test_codes4_exhaustive():
    """The fill's 4-bit coder on every int8, every 3-bit shift and both signs."""
    m = Module()
    x, shift, sgn = Signal(signed(8)), Signal(3), Signal()
    code = _codes4(m, x, shift, sgn)
    sim = Simulator(m)
    got, want = [], []

    async def bench(ctx):
        for s in range(8):
            for g in (0, 1):
                for v in range(-128, 128):
                    ctx.set(x, v)
                    ctx.set(shift, s)
                    ctx.set(sgn, g)
                    got.append(ctx.get(code))
                    want.append(int(codes4(v, s, bool(g))) & 0xF)

    sim.add_testbench(bench)
    sim.run()
    assert got == want


@pytest.mark.parametrize("bits", [8, 4])
def test_codes_full_range(bits):
    """Eight layers (max_layers), every shift, both signs, odd n_act, random full-range
    int8 activations and int16 logits."""
    model, acts, base = synthetic(seed=bits)
    ops = [("fill", i, i) for i in range(8)] + [("req", i, 1) for i in range(8)]
    ref, _ = check(CFG, model, bits, acts, base, ops, seed=3)
    # the golden read of a line is the cache format of what was filled
    xs = cache_format(model, split_layers(model, acts[:1]), bits)
    assert [b[0] for b in ref["packets"][0][:acts.shape[1]]] == [int(v) for x in xs for v in x[0]]


def test_invalidate_counters_holds():
    """Lookups without counting, invalidate between lookups, clearing the counters,
    refilling after the invalidate, and fills of lines outside the capacity."""
    model, acts, base = real_samples("digits")
    ref, _ = check(CFG6, model, 4, acts, base, invalidate_ops(), seed=5)
    assert (ref["hits"], ref["misses"]) == (2, 2)


def test_full_default_config():
    """The default configuration (512 lines of 544 bytes): the last line, the first
    index past it, and the widest index."""
    cfg = DEFAULT
    model, acts, base = real_samples("digits")
    indices = [0, 511, 512, 1023]
    ops = [("fill", i, j) for j, i in enumerate(indices)] + [("req", i, 1) for i in indices]
    check(cfg, model, 8, acts, base, ops, rows=[0, 1, 510, 511], idle=0.0, stall=0.0)


def test_fill_framing_errors():
    """A packet cut short, a beat outside any packet and a packet run long raise
    fill_error and leave the line invalid; a good packet afterwards is stored."""
    model, acts, base = real_samples("fan")
    dut = ActivationCache(CFG)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    good = fill_beats(1, acts[0], base[0])
    got = {}

    async def main(ctx):
        rng = random.Random(0)
        ctx.set(dut.setup, setup_value(CFG, model, 8))
        short = [dict(b) for b in good[:10]]
        short[-1]["last"] = 1
        for b in short:
            await _put(ctx, dut.fill, b, rng, 0)
        got["short"] = ctx.get(dut.fill_error), ctx.get(dut.valid_data[1])
        await pulse(ctx, dut.clear_counters)
        await _put(ctx, dut.fill, {"index": 1, "data": 0, "first": 0, "last": 1}, rng, 0)
        got["stray"] = ctx.get(dut.fill_error)
        await pulse(ctx, dut.clear_counters)
        long = [dict(b) for b in good] + [{"index": 1, "data": 7, "first": 0, "last": 1}]
        long[-2]["last"] = 0
        for b in long:
            await _put(ctx, dut.fill, b, rng, 0)
        got["long"] = ctx.get(dut.fill_error), ctx.get(dut.valid_data[1])
        await pulse(ctx, dut.invalidate)
        for b in good:
            await _put(ctx, dut.fill, b, rng, 0)
        await ctx.tick()
        got["good"] = ctx.get(dut.fill_error), ctx.get(dut.valid_data[1])

    sim.add_testbench(main)
    sim.run()
    assert got == {"short": (1, 0), "stray": 1, "long": (1, 0), "good": (0, 1)}


def test_timing():
    """The cycle counts the docstring promises, with no bubbles and no stalls: a fill of
    n beats in n + 1 cycles, the first read beat 7 cycles after its request (6 for a
    miss), back-to-back hits every n + 2 cycles and misses every 2 cycles, one read beat
    per cycle within a packet."""
    model, acts, base = real_samples("digits")
    n = sum(model.adapter_inputs) + model.classes
    dut = ActivationCache(CFG)
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    t = {}

    async def main(ctx):
        # One coroutine, one tick per loop iteration: the cycle numbers are exact.
        ctx.set(dut.setup, setup_value(CFG, model, 8))
        while ctx.get(dut.busy):
            await ctx.tick()
        ctx.set(dut.fill.valid, 1)
        for i in (0, 1):
            beats, cycles = fill_beats(i, acts[i], base[i]), 0
            while beats:
                ctx.set(dut.fill.payload, beats[0])
                _, _, ready = await ctx.tick().sample(dut.fill.ready)
                cycles += 1
                if ready:
                    beats.pop(0)
            t[f"fill{i}"] = cycles
        ctx.set(dut.fill.valid, 0)
        reqs, now = [0, 1, 4, 5, 0], 0
        t["accepts"], t["beats"] = [], []
        ctx.set(dut.read.ready, 1)
        while reqs or ctx.get(dut.busy):
            ctx.set(dut.req.valid, int(bool(reqs)))
            if reqs:
                ctx.set(dut.req.payload, {"index": reqs[0], "count": 1})
            _, _, accepted, valid, payload = await ctx.tick().sample(
                dut.req.ready, dut.read.valid, dut.read.payload)
            if reqs and accepted:
                reqs.pop(0)
                t["accepts"].append(now)
            if valid:
                t["beats"].append((now, _beat(payload)))
            now += 1

    sim.add_testbench(main)
    sim.run()
    assert t["fill0"] == t["fill1"] == n + 1
    acc = t["accepts"]
    assert [b - a for a, b in zip(acc, acc[1:])] == [n + 2, n + 2, 2, 2]
    firsts = [now for now, b in t["beats"] if b[3]]
    assert [f - a for f, a in zip(firsts, acc)] == [7, 7, 6, 6, 7]
    cycles = [now for now, _ in t["beats"]]
    assert cycles[n - 1] - cycles[0] == n - 1          # one beat per cycle within a packet


def test_dp16kd_budget():
    """The line RAM of the default configuration and of a cache sized for digits."""
    assert line_stride(DEFAULT) == 512 + 2 * 16
    assert dp16kd_count(DEFAULT) == 136
    digits = DEFAULT.replace(cache_samples=359, cache_act_words=288, max_classes=10)
    assert dp16kd_count(digits) == 54                  # 308 bytes per line
    assert dp16kd_count(digits.replace(cache_act_words=144)) == 30   # 164: the 4-bit line


def test_gateware_does_not_import_sim():
    tree = ast.parse(Path(__file__).resolve().parents[2].joinpath("gateware", "cache.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "sim" or n.startswith("sim.")]


@pytest.mark.parametrize("sim", SIMULATORS)
def test_cocotb(sim):
    reason = missing_reason(sim)
    if reason:      # before building the component, which would go unused
        pytest.skip(f"{sim}: {reason}")
    start = time.monotonic()
    _, tests, _ = run_cocotb(sim, "act_cache_c8", ActivationCache(CFG),
                             "tests.gateware.cocotb_cache", CFG)
    assert tests >= 4, f"{tests} cocotb tests ran in {time.monotonic() - start:.1f} s"

"""cocotb tests of the layer engine (conv unit + systolic array + memories) against the
bit-exact golden model: every layer output compared with == to
`sim.fixed_model.layer_forward` / `frozen_forward`. Driven by tests/gateware/test_conv.py."""

import json
import os

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge, Timer
from cocotb.utils import get_sim_time

from firmware.layers import (ConvDescriptor, LayoutError, from_words, pack_activations,
                             pack_biases, pack_weights, plan_layer, plan_network, to_words,
                             unpack_activations)
from gateware.layer_engine import MEM_ACT, MEM_BIAS, MEM_LOGIT, MEM_WEIGHT, load_layout
from sim.fixed_model import frozen_forward, layer_forward, quantize_input
from sim.network import Layer

from tests.gateware.streams import config_from_env, pack, report_json, start

CFG = config_from_env()
R, C = CFG.array_rows, CFG.array_cols
PERIOD_NS = 10
LOAD = load_layout(C, CFG.acc_bits)


class Engine:
    def __init__(self, dut):
        self.dut = dut
        dut.load__valid.value = 0
        dut.start.value = 0
        dut.rd_mem.value = 0
        dut.rd_addr.value = 0
        self.stall = 0.0
        self.rng = np.random.default_rng(0)

    async def load(self, mem, base, values, width):
        """One word per cycle through the load port (call at a falling edge)."""
        for a, w in enumerate(to_words(values, width)):
            self.dut.load__valid.value = 1
            self.dut.load__payload.value = pack(LOAD, {"mem": mem, "addr": base + a, "data": w})
            await RisingEdge(self.dut.clk)
            await FallingEdge(self.dut.clk)
        self.dut.load__valid.value = 0

    async def _interfere(self):
        """Random loads of an unused weight word while a layer runs: each one takes the
        write port from the conv unit, so its output stalls and backs up into the array."""
        spare = CFG.weight_words // C - 1
        while True:
            busy = int(self.dut.busy.value)
            hit = busy and self.rng.random() < self.stall
            self.dut.load__valid.value = int(hit)
            if hit:
                self.dut.load__payload.value = pack(LOAD, {"mem": MEM_WEIGHT, "addr": spare, "data": 0})
            await RisingEdge(self.dut.clk)
            await FallingEdge(self.dut.clk)

    async def run(self, fields):
        """Start one layer and wait for it; returns its cycles (start to idle)."""
        self.dut.desc.value = pack(ConvDescriptor, fields)
        self.dut.start.value = 1
        await RisingEdge(self.dut.clk)
        t0 = get_sim_time("ns")
        await FallingEdge(self.dut.clk)
        self.dut.start.value = 0
        noise = cocotb.start_soon(self._interfere()) if self.stall else None
        await FallingEdge(self.dut.busy)
        cycles = round((get_sim_time("ns") - t0) / PERIOD_NS)
        if noise:
            noise.cancel()
        await FallingEdge(self.dut.clk)
        self.dut.load__valid.value = 0
        return cycles

    async def read(self, mem, base, count, geometry):
        got = []
        for a in range(count):
            self.dut.rd_mem.value = mem
            self.dut.rd_addr.value = base + a
            await RisingEdge(self.dut.clk)
            await RisingEdge(self.dut.clk)          # the port takes two cycles
            await ReadOnly()
            got.append(int(self.dut.rd_data.value))
            await FallingEdge(self.dut.clk)
        return unpack_activations(from_words(got, C, 16), geometry, C)


async def run_layer(eng, layer, x, w, b, shift, wide, geometry=None):
    """One standalone layer: load, run, read back. Returns (output, cycles)."""
    geometry = tuple(geometry or layer.in_shape)
    plan = plan_layer(layer, geometry, CFG, shift=shift, wide=wide)
    await eng.load(MEM_ACT, 0, pack_activations(x.reshape(geometry), C), 8)
    await eng.load(MEM_WEIGHT, 0, pack_weights(w, C), 8)
    await eng.load(MEM_BIAS, 0, pack_biases(b, C), CFG.acc_bits)
    cycles = await eng.run(plan.fields)
    y = await eng.read(MEM_LOGIT if wide else MEM_ACT, plan.fields["out_base"], plan.out_words,
                       plan.out_geometry)
    return y, cycles, plan


def check(got, want, what):
    got, want = np.asarray(got).reshape(-1), np.asarray(want).reshape(-1)
    bad = np.flatnonzero(got != want)
    assert not len(bad), f"{what}: {len(bad)} of {len(want)} wrong, first at {bad[0]}: {got[bad[0]]} != {want[bad[0]]}"


async def run_network(eng, model, xq):
    """Every layer of a model on one sample, as the device chains them."""
    plans = plan_network(model, CFG)
    for l, p in enumerate(plans):
        await eng.load(MEM_WEIGHT, p.fields["w_base"], pack_weights(model.weights[l], C), 8)
        await eng.load(MEM_BIAS, p.fields["b_base"], pack_biases(model.biases[l], C), CFG.acc_bits)
    # a sample is stored in the first layer's geometry (fan's (1, 256, 1) spectra feed an
    # fc layer whose input is (1, 1, 256))
    x = np.asarray(xq).reshape(plans[0].geometry)
    await eng.load(MEM_ACT, plans[0].fields["in_base"], pack_activations(x, C), 8)
    outs, cycles = [], []
    for l, p in enumerate(plans):
        cycles.append(await eng.run(p.fields))
        mem = MEM_LOGIT if p.fields["wide"] else MEM_ACT
        outs.append(await eng.read(mem, p.fields["out_base"], p.out_words, p.out_geometry))
    return outs, cycles, plans


async def check_model(dut, name, drift, samples, stall):
    from host.datasets import load_workload
    from host.models import load_base_model

    model = load_base_model(name)
    wl = load_workload(name, drift)
    xq = quantize_input(model, wl.target_train.x[:samples], CFG)
    logits, xs = frozen_forward(model, xq, CFG)
    eng = Engine(dut)
    report = []
    for n in range(samples):
        eng.stall = stall if n % 2 else 0.0
        outs, cycles, plans = await run_network(eng, model, xq[n])
        for l in range(len(plans)):
            want = xs[l + 1][n] if l + 1 < len(xs) else logits[n]
            check(outs[l], want, f"{name} sample {n} layer {l}")
        if n == 0:
            report = [{"layer": l, "macs": model.layers[l].macs, "cycles": c,
                       "ideal": model.layers[l].macs / (R * C)} for l, c in enumerate(cycles)]
    return report


@cocotb.test()
async def digits_network(dut):
    """The digits model, every layer with its real weights, chained on real samples;
    odd samples with random stalls at the engine's output."""
    await start(dut)
    report = await check_model(dut, "digits", "rotate:30", 3, 0.3)
    for row in report:
        dut._log.info("digits layer %d: %d cycles, ideal %.0f", row["layer"], row["cycles"], row["ideal"])
    _bench_write("digits", report)


@cocotb.test()
async def fan_network(dut):
    """The fan MLP (fc layers through the same conv unit)."""
    await start(dut)
    report = await check_model(dut, "fan", "env:noisy", 2, 0.3)
    _bench_write("fan", report)


def random_layer(rng):
    kind = rng.choice(["conv2d", "conv2d", "conv1d", "fc"])
    cin = int(rng.integers(1, 2 * C + 2))
    cout = int(rng.integers(1, 2 * C + 2))
    if kind == "fc":
        geometry = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), cin)
        layer = Layer("fc", (1, 1, int(np.prod(geometry))), cout, relu=bool(rng.integers(2)))
        return layer, geometry
    h = 1 if kind == "conv1d" else int(rng.integers(1, 10))
    w = int(rng.integers(1, 12))
    kh = 1 if kind == "conv1d" else int(rng.integers(1, 4))
    kw = int(rng.integers(1, 4))
    pad = int(rng.integers(0, 2))
    stride = int(rng.integers(1, 3))
    pool = int(rng.choice([1, 2]))
    layer = Layer(kind, (h, w, cin), cout, (kh, kw), pad, stride, bool(rng.integers(2)), pool)
    ho, wo, _ = layer.conv_shape
    if ho < 1 or wo < 1 or min(layer.out_shape[:2]) < 1:
        return None, None
    return layer, (h, w, cin)


@cocotb.test()
async def random_layers(dut):
    """Seeded random conv2d/conv1d/fc layers: channels that are not multiples of C,
    odd sizes, padding, stride 2, pooling with an odd conv output, 1 x N images,
    int8 and int16 outputs; random stalls on every other layer."""
    await start(dut)
    rng = np.random.default_rng(2024)
    eng = Engine(dut)
    done = 0
    while done < 24:
        layer, geometry = random_layer(rng)
        if layer is None:
            continue
        x = rng.integers(-128, 128, geometry)
        w = rng.integers(-128, 128, (layer.fan_in, layer.out_ch))
        b = rng.integers(-50000, 50000, layer.out_ch)
        shift = int(rng.integers(0, 14))
        wide = bool(rng.integers(2))
        try:
            plan_layer(layer, geometry, CFG, shift=shift, wide=wide)
        except LayoutError:
            wide = False          # more logits than the logit memory holds
        want = layer_forward(x.reshape((1,) + tuple(layer.in_shape)), layer, w, b, shift,
                             16 if wide else 8, CFG)
        eng.stall = 0.3 if done % 2 else 0.0
        got, _, _ = await run_layer(eng, layer, x, w, b, shift, wide, geometry)
        check(got, want, f"random layer {done}: {layer} geometry {geometry} shift {shift} wide {wide}")
        done += 1


@cocotb.test()
async def extremes(dut):
    """-128 everywhere (the largest products, 9 * 2C of them per output) and the
    saturating ends of the requantizer, int8 and int16."""
    await start(dut)
    eng = Engine(dut)
    pooled = Layer("conv2d", (5, 5, 2 * C), C + 1, (3, 3), 1, 1, False, 2)
    single = Layer("conv2d", (3, 3, 2 * C), C + 1, (3, 3), 0, 1, False, 1)   # logits fit
    for xv, wv, bv, shift, wide in ((-128, -128, 0, 0, False), (-128, 127, 0, 0, False),
                                    (-128, -128, 2**31 - 2**24, 0, True), (-128, 127, -2**31 + 2**24, 5, True),
                                    (127, 127, 0, 20, False)):
        layer = single if wide else pooled
        x = np.full(layer.in_shape, xv)
        w = np.full((layer.fan_in, layer.out_ch), wv)
        b = np.full(layer.out_ch, bv)
        want = layer_forward(x[None], layer, w, b, shift, 16 if wide else 8, CFG)
        got, _, _ = await run_layer(eng, layer, x, w, b, shift, wide)
        check(got, want, f"extreme x={xv} w={wv} b={bv} shift={shift}")


@cocotb.test()
async def gemm(dut):
    """GEMMs as 1 x 1 convolutions over M pixels (sizes from SKIPTUNE_GEMM_SIZES);
    exact, with cycles against MACs / (R * C) for the benchmark."""
    await start(dut)
    sizes = json.loads(os.environ.get("SKIPTUNE_GEMM_SIZES", "[[16, 24, 20]]"))
    rng = np.random.default_rng(3)
    eng = Engine(dut)
    report = []
    for m, k, n in sizes:
        h = max(1, -(-m // 255))
        layer = Layer("conv2d", (h, m // h, k), n, (1, 1), 0, 1, False, 1)
        x = rng.integers(-128, 128, layer.in_shape)
        w = rng.integers(-128, 128, (k, n))
        b = np.zeros(n, np.int64)
        want = layer_forward(x[None], layer, w, b, 0, 8, CFG)
        got, cycles, _ = await run_layer(eng, layer, x, w, b, 0, False)
        check(got, want, f"gemm {m}x{k}x{n}")
        ideal = m * k * n / (R * C)
        report.append({"m": m, "k": k, "n": n, "cycles": cycles, "ideal": ideal,
                       "utilization": ideal / cycles})
        dut._log.info("gemm %dx%dx%d: %d cycles, ideal %.0f, utilization %.3f", m, k, n,
                      cycles, ideal, ideal / cycles)
    _bench_write("gemm", report)


def _bench_write(key, rows):
    report_json("SKIPTUNE_BENCH_OUT", key, rows)

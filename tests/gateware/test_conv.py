"""The conv unit in its layer engine: a small layer in Amaranth's simulator, and the
digits and fan models, random and extreme layers on Verilator (and Icarus) for 4x4 and
8x8 arrays, all bit-exact against sim.fixed_model."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from numpy.testing import assert_array_equal

from firmware.layers import (LayoutError, from_words, pack_activations, pack_biases,
                             pack_weights, plan_layer, plan_network, to_words,
                             unpack_activations)
from gateware.config import AccelConfig
from gateware.layer_engine import MEM_ACT, MEM_BIAS, MEM_LOGIT, MEM_WEIGHT, LayerEngine
from host.models import load_base_model
from sim.fixed_model import layer_forward
from sim.network import Layer

from .harness import SIMULATORS, run_cocotb


async def load_engine(ctx, dut, loads):
    """Write ``loads`` [(mem, addr, word)] through the engine's load stream."""
    for mem, addr, v in loads:
        ctx.set(dut.load.valid, 1)
        ctx.set(dut.load.payload, {"mem": mem, "addr": addr, "data": v})
        await ctx.tick()
    ctx.set(dut.load.valid, 0)


async def read_engine(ctx, dut, mem, base, count):
    """``count`` words of ``mem`` from ``base`` through the engine's read port."""
    got = []
    for a in range(count):
        ctx.set(dut.rd_mem, mem)
        ctx.set(dut.rd_addr, base + a)
        await ctx.tick().repeat(2)                  # the port takes two cycles
        got.append(ctx.get(dut.rd_data))
    return got


def run_bench(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def rtl_layer_amaranth(cfg, layer, x, w, b, shift, wide):
    """One layer through a LayerEngine in Amaranth's simulator; returns its output."""
    C = cfg.array_cols
    plan = plan_layer(layer, layer.in_shape, cfg, shift=shift, wide=wide)
    dut = LayerEngine(cfg)
    got = []

    async def bench(ctx):
        loads = [(MEM_ACT, a, v) for a, v in enumerate(to_words(pack_activations(x, C), 8))]
        loads += [(MEM_WEIGHT, a, v) for a, v in enumerate(to_words(pack_weights(w, C), 8))]
        loads += [(MEM_BIAS, a, v) for a, v in enumerate(to_words(pack_biases(b, C), 32))]
        await load_engine(ctx, dut, loads)
        ctx.set(dut.desc, plan.fields)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        await ctx.tick().until(~dut.busy)
        got.extend(await read_engine(ctx, dut, MEM_LOGIT if wide else MEM_ACT,
                                     plan.fields["out_base"], plan.out_words))

    run_bench(dut, bench)
    return unpack_activations(from_words(got, C, 16), plan.out_geometry, C)


@pytest.mark.parametrize("layer,shift,wide", [
    (Layer("conv2d", (5, 4, 3), 5, (3, 3), 1, 1, True, 2), 6, False),   # odd sizes, pooled
    (Layer("conv2d", (4, 5, 2), 3, (2, 3), 0, 2, False, 1), 3, True),   # stride 2, logits
    (Layer("fc", (1, 1, 9), 6, relu=False), 2, False),
])
def test_layer_amaranth(layer, shift, wide):
    cfg = AccelConfig(array_rows=4, array_cols=4, act_words=64, weight_words=1024, bias_words=64)
    rng = np.random.default_rng(sum(layer.in_shape))
    x = rng.integers(-128, 128, layer.in_shape)
    w = rng.integers(-128, 128, (layer.fan_in, layer.out_ch))
    b = rng.integers(-3000, 3000, layer.out_ch)
    want = layer_forward(x[None], layer, w, b, shift, 16 if wide else 8, cfg)[0]
    assert_array_equal(rtl_layer_amaranth(cfg, layer, x, w, b, shift, wide), want)


def test_layer_after_a_short_tile_amaranth():
    """A layer whose last tile has fewer pixels than the array has rows (an fc layer: one
    pixel) still receives R rows from the array; the next layer must not see them (R - 1
    spare rows outlast the output pipeline only with R > 4)."""
    cfg = AccelConfig(array_rows=8, array_cols=4, act_words=64, weight_words=1024, bias_words=64)
    fc = Layer("fc", (1, 1, 9), 6, relu=False)
    conv = Layer("conv2d", (5, 4, 3), 5, (3, 3), 1, 1, True, 2)
    rng = np.random.default_rng(7)
    x1, x2 = rng.integers(-128, 128, fc.in_shape), rng.integers(-128, 128, conv.in_shape)
    w1, w2 = rng.integers(-128, 128, (9, 6)), rng.integers(-128, 128, (conv.fan_in, 5))
    b1, b2 = rng.integers(-3000, 3000, 6), rng.integers(-3000, 3000, 5)
    p1 = plan_layer(fc, fc.in_shape, cfg, shift=3, wide=True, in_base=40)
    p2 = plan_layer(conv, conv.in_shape, cfg, shift=6, wide=False, in_base=0, out_base=48,
                    w_base=p1.w_words, b_base=p1.b_words)
    C, dut, got = cfg.array_cols, LayerEngine(cfg), []

    async def bench(ctx):
        loads = [(MEM_ACT, 40 + a, v) for a, v in enumerate(to_words(pack_activations(x1, C), 8))]
        loads += [(MEM_ACT, a, v) for a, v in enumerate(to_words(pack_activations(x2, C), 8))]
        loads += [(MEM_WEIGHT, a, v) for a, v in
                  enumerate(to_words(np.concatenate([pack_weights(w1, C), pack_weights(w2, C)]), 8))]
        loads += [(MEM_BIAS, a, v) for a, v in
                  enumerate(to_words(np.concatenate([pack_biases(b1, C), pack_biases(b2, C)]), 32))]
        await load_engine(ctx, dut, loads)
        # start held high: the second layer begins in the first cycle the engine is idle
        ctx.set(dut.desc, p1.fields)
        ctx.set(dut.start, 1)
        await ctx.tick().until(dut.busy)
        ctx.set(dut.desc, p2.fields)
        await ctx.tick().until(~dut.busy)
        await ctx.tick()
        ctx.set(dut.start, 0)
        for _ in range(2000):               # a layer fed wrong rows may never end
            if not ctx.get(dut.busy):
                break
            await ctx.tick()
        else:
            raise AssertionError("the second layer never finished")
        got.extend(await read_engine(ctx, dut, MEM_ACT, 48, p2.out_words))

    run_bench(dut, bench)
    want = layer_forward(x2[None], conv, w2, b2, 6, 8, cfg)[0]
    assert_array_equal(unpack_activations(from_words(got, C, 16), p2.out_geometry, C), want)


def test_plans_of_the_shipped_models_fit_and_roundtrip():
    cfg = AccelConfig()
    for name in ("digits", "fan"):
        plans = plan_network(load_base_model(name), cfg)
        assert plans[-1].fields["wide"] == 1 and all(p.fields["wide"] == 0 for p in plans[:-1])
    x = np.arange(2 * 3 * 11).reshape(2, 3, 11)
    words = pack_activations(x, 8)
    assert words.shape == (2 * 3 * 2, 8)
    assert_array_equal(unpack_activations(words, x.shape, 8), x)
    w = np.arange(5 * 10).reshape(5, 10)
    pw = pack_weights(w, 8)
    assert_array_equal(pw[:5], w[:, :8]) and assert_array_equal(pw[5:, :2], w[:, 8:])
    assert not pw[5:, 2:].any()


def test_plan_refuses_what_the_unit_cannot_hold():
    cfg = AccelConfig(array_rows=3, array_cols=4)
    pooled = Layer("conv2d", (4, 4, 1), 2, (3, 3), 1, 1, True, 2)
    with pytest.raises(LayoutError, match="whole windows"):
        plan_layer(pooled, (4, 4, 1), cfg, shift=1, wide=False)
    with pytest.raises(LayoutError, match="shift"):
        plan_layer(Layer("fc", (1, 1, 4), 2), (1, 1, 4), AccelConfig(), shift=-1, wide=False)
    with pytest.raises(LayoutError, match="logits exceed"):
        plan_layer(Layer("conv2d", (4, 4, 1), 2, (3, 3), 1), (4, 4, 1), AccelConfig(), shift=1,
                   wide=True)
    with pytest.raises(LayoutError, match="overlap"):
        plan_layer(Layer("conv2d", (16, 16, 8), 8), (16, 16, 8), AccelConfig(act_words=384),
                   shift=1, wide=False)
    with pytest.raises(LayoutError, match="overlap"):
        plan_layer(Layer("fc", (1, 1, 16), 8), (1, 1, 16), AccelConfig(), shift=1, wide=False,
                   in_base=0, out_base=1)
    with pytest.raises(LayoutError, match="does not fit"):
        plan_layer(Layer("conv2d", (1, 300, 1), 2, (1, 3), 1), (1, 300, 1), AccelConfig(),
                   shift=1, wide=False)


@pytest.mark.parametrize("sim", SIMULATORS)
@pytest.mark.parametrize("rows,cols", [(4, 4), (8, 8)])
def test_conv_cocotb(sim, rows, cols):
    cfg = AccelConfig(array_rows=rows, array_cols=cols)
    run_cocotb(sim, f"layer_engine_{rows}x{cols}", LayerEngine(cfg), "tests.gateware.cocotb_conv", cfg)

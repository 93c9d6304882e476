"""Adapter datapath (gateware/adapter.py) against the bit-exact golden model
(sim/fixed_model.py: adapter_forward, loss_grad, adapter_grads): a tiny configuration in
Amaranth's simulator here, and the real digits and fan adapters in the cocotb tests of
tests/gateware/cocotb_adapter.py on Verilator and Icarus."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
from amaranth.sim import Simulator
from numpy.testing import assert_array_equal

from firmware.memmap import adapter_addresses, adapter_span, read_adapters, write_adapters
from gateware.adapter import AdapterDatapath, grad_bits
from gateware.config import DEFAULT, AccelConfig
from sim import fixed_model
from sim.rtl import missing_reason
from tests.gateware.harness import SIMULATORS, run_cocotb

TINY = AccelConfig(max_rank=4, max_classes=4, max_layers=3, max_adapter_in=16, max_batch=8,
                   adapter_words=128)


# What the tests load into the layout's padding words: the datapath must never read one
# into a sum (an all-zero padding would hide that).
PAD = -0x5A5A5A5B


def flat_masters(masters, cfg, pad=PAD):
    """[(A_l, B_l)] -> the ADAPTERS words from offset 0 (`firmware.memmap.adapter_bases`),
    the padding words ``pad``."""
    words = np.full(adapter_span([a.shape[0] for a, _ in masters], masters[0][0].shape[1], cfg),
                    pad, np.int64)
    write_adapters(words, masters, cfg)
    return [int(v) for v in words]


def padding(sizes, rank, classes, cfg):
    """The offsets of the padding words below the span."""
    return sorted(set(range(adapter_span(sizes, rank, cfg)))
                  - set(adapter_addresses(sizes, rank, classes, cfg).tolist()))


def split_flat(words, sizes, rank, classes, cfg):
    """[(A_l, B_l)] from the ADAPTERS words from offset 0."""
    return read_adapters(np.asarray(words, np.int64), sizes, rank, classes, cfg)


def setup_value(sizes, s_x, rank, classes, cfg):
    layers = [{"size": d, "h_shift": s + cfg.F_w - cfg.F_h} for d, s in zip(sizes, s_x)]
    layers += [{"size": 0, "h_shift": 0}] * (cfg.max_layers - len(sizes))
    return {"n_layers": len(sizes), "rank": rank, "classes": classes, "layers": layers}


def ref_adapter(s_x, xs, base, y, masters, cfg):
    """Golden (z per sample, grads [(dA_l, dB_l)] of the whole batch), with g from the
    golden loss unit on the golden z."""
    model = SimpleNamespace(s_x=s_x)
    z, hs = fixed_model.adapter_forward(model, xs, base, masters, cfg)
    g = fixed_model.loss_grad(z, y, cfg)
    return z, fixed_model.adapter_grads(model, xs, hs, g, masters, cfg)


def rtl_adapter(s_x, xs, base, y, masters, cfg, idle=0.0, stall=0.0, seed=0):
    """The same from the gateware in Amaranth's simulator: masters loaded through the
    memory port, accumulators cleared, one sample at a time (g from the golden loss unit
    on the RTL's z), accumulators read back through the port. Also returns per sample
    (forward cycles from the first input beat to the last z, gradient cycles from the
    first g beat until busy falls)."""
    dut = AdapterDatapath(cfg)
    sizes = [x.shape[1] for x in xs]
    rank, classes = masters[0][0].shape[1], base.shape[1]
    flat = flat_masters(masters, cfg)
    rng = random.Random(seed)
    zs, cycles = [], []
    grads_flat = []

    async def bench(ctx):
        ctx.set(dut.setup, setup_value(sizes, s_x, rank, classes, cfg))
        for a, w in enumerate(flat):
            ctx.set(dut.mem_addr, a)
            ctx.set(dut.mem_we, 1)
            ctx.set(dut.mem_wdata, w)
            await ctx.tick()
        ctx.set(dut.mem_we, 0)
        # garbage in the accumulators, then clear_grads
        for a in range(3):
            await ctx.tick()
        ctx.set(dut.clear_grads, 1)
        await ctx.tick()
        ctx.set(dut.clear_grads, 0)
        await ctx.tick().until(~dut.busy)
        # masters read back
        for a, w in enumerate(flat):
            ctx.set(dut.mem_addr, a)
            ctx.set(dut.mem_re, 1)
            await ctx.tick().repeat(2)               # the port takes two cycles
            assert ctx.get(dut.mem_rmaster) == w, f"master {a}"
        ctx.set(dut.mem_re, 0)
        for n in range(base.shape[0]):
            beats = [int(v) for x in xs for v in x[n]] + [int(v) for v in base[n]]
            t0 = None
            cycle = 0
            k = 0
            got = []
            # drive input and output together, cycle by cycle
            ctx.set(dut.o_stream.ready, 0)
            while len(got) < classes:
                valid_in = k < len(beats) and not (idle and rng.random() < idle)
                ctx.set(dut.i_stream.valid, valid_in)
                if valid_in:
                    ctx.set(dut.i_stream.payload, {"data": beats[k], "label": int(y[n]),
                                                   "first": k == 0, "last": k == len(beats) - 1})
                ready_out = not (stall and rng.random() < stall)
                ctx.set(dut.o_stream.ready, ready_out)
                _, _, in_ready, o_valid, o_payload = await ctx.tick().sample(
                    dut.i_stream.ready, dut.o_stream.valid, dut.o_stream.payload)
                if valid_in and in_ready:
                    if k == 0:
                        t0 = cycle
                    k += 1
                if o_valid and ready_out:
                    got.append((int(o_payload.z), int(o_payload.label),
                                int(o_payload.first), int(o_payload.last)))
                cycle += 1
            t_fwd = cycle - t0
            ctx.set(dut.i_stream.valid, 0)
            ctx.set(dut.o_stream.ready, 0)
            assert [b[1:] for b in got] == [(int(y[n]), c == 0, c == classes - 1)
                                            for c in range(classes)]
            z = [b[0] for b in got]
            zs.append(z)
            g = fixed_model.loss_grad(np.array([z]), np.array([y[n]]), cfg)[0]
            cycle = 0
            for c in range(classes):
                while idle and rng.random() < idle:
                    ctx.set(dut.g_stream.valid, 0)
                    await ctx.tick()
                    cycle += 1
                ctx.set(dut.g_stream.valid, 1)
                ctx.set(dut.g_stream.payload, {"g": int(g[c]), "cls": c, "first": c == 0,
                                               "last": c == classes - 1})
                while True:
                    _, _, ready = await ctx.tick().sample(dut.g_stream.ready)
                    cycle += 1
                    if ready:
                        break
            ctx.set(dut.g_stream.valid, 0)
            while ctx.get(dut.busy):
                await ctx.tick()
                cycle += 1
            cycles.append((t_fwd, cycle))
        for a in range(len(flat)):
            ctx.set(dut.mem_addr, a)
            ctx.set(dut.mem_re, 1)
            await ctx.tick().repeat(2)
            grads_flat.append(ctx.get(dut.mem_rgrad))
        ctx.set(dut.mem_re, 0)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    pads = padding(sizes, rank, classes, cfg)
    assert pads and all(grads_flat[a] == 0 for a in pads), "a padding word's accumulator written"
    return np.array(zs, np.int64), split_flat(grads_flat, sizes, rank, classes, cfg), cycles


def tiny_case(seed, extreme=False):
    rng = np.random.default_rng(seed)
    sizes, s_x, rank, classes, n = [5, 7, 3], [6, 0, -3], 3, 4, 4
    if extreme:
        xs = [np.full((n, d), -128, np.int64) for d in sizes]
        xs[1][1::2] = 127
        lim = (1 << 31)
        masters = [(np.where(rng.random((d, rank)) < 0.5, -lim, lim - 1),
                    np.where(rng.random((rank, classes)) < 0.5, -lim, lim - 1)) for d in sizes]
        base = rng.choice([-32768, 32767, 0], (n, classes))
    else:
        xs = [rng.integers(-128, 128, (n, d)) for d in sizes]
        masters = [(rng.integers(-1 << 28, 1 << 28, (d, rank)),
                    rng.integers(-1 << 27, 1 << 27, (rank, classes))) for d in sizes]
        base = rng.integers(-3000, 3000, (n, classes))
    y = rng.integers(0, classes, n)
    return s_x, xs, base, y, [(np.asarray(a, np.int64), np.asarray(b, np.int64)) for a, b in masters]


def assert_same(ref, rtl):
    z_ref, g_ref = ref
    z_rtl, g_rtl = rtl[:2]
    assert_array_equal(z_rtl, z_ref, err_msg="z")
    for l, ((da, db), (ra, rb)) in enumerate(zip(g_ref, g_rtl)):
        assert_array_equal(ra, da, err_msg=f"dA_{l}")
        assert_array_equal(rb, db, err_msg=f"dB_{l}")


def test_widths():
    """The documented widths: 16 lanes, 40-bit accumulators (docs/numerics.md section 8
    proves 39 bits for the golden g range; the port accepts any int16 g)."""
    assert DEFAULT.adapter_lanes == 16
    assert grad_bits(DEFAULT) == 40
    assert TINY.adapter_lanes == 4


@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_adapter_amaranth(extreme):
    case = tiny_case(3 + extreme, extreme)
    rtl = rtl_adapter(*case, TINY, idle=0.3, stall=0.3, seed=5)
    assert_same(ref_adapter(*case, TINY), rtl)


def test_adapter_cycles():
    """At full rate: forward n + max(C, r + 8 + log2 P) + L r + C + 9 cycles, gradient
    C + 2 L r + n + 7 (the AdapterDatapath docstring)."""
    s_x, xs, base, y, masters = tiny_case(7)
    z, grads, cycles = rtl_adapter(s_x, xs, base, y, masters, TINY)
    assert_same(ref_adapter(s_x, xs, base, y, masters, TINY), (z, grads))
    n, C, L, r = sum(x.shape[1] for x in xs), base.shape[1], len(xs), masters[0][0].shape[1]
    print("cycles per sample (forward, gradient):", cycles[0])
    lp = TINY.adapter_lanes.bit_length() - 1
    assert cycles == [(n + max(C, r + 8 + lp) + L * r + C + 9, C + 2 * L * r + n + 7)] * len(cycles)


@pytest.mark.parametrize("sim", SIMULATORS)
def test_adapter_cocotb(sim):
    reason = missing_reason(sim)
    if reason:                          # before building a component that would go unused
        pytest.skip(f"{sim}: {reason}")
    env = {"SKIPTUNE_ADAPTER_BATCH": "20" if sim == "verilator" else "5"}
    rtl, tests, wall = run_cocotb(sim, "adapter_dp", AdapterDatapath(DEFAULT),
                                  "tests.gateware.cocotb_adapter", DEFAULT, env=env)
    print(f"{sim}: build {rtl.build_seconds:.1f} s, {tests} tests in {wall:.1f} s")

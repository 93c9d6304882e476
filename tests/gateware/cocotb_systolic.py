"""cocotb tests of `SystolicArray` against exact integer products (`sim.fixed.imatmul`).

The Python side splits A @ B into the array's tiles (zeros in unused lanes) and
reassembles the result rows; every element is compared with ==. Run through
tests/gateware/test_systolic.py, which passes the AccelConfig in SKIPTUNE_CFG."""

import json
import os

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from gateware.layouts import feed_layout, result_layout
from host.models import load_base_model
from sim.fixed import imatmul
from sim.fixed_model import frozen_forward
from sim.network import im2col

from tests.gateware.streams import CycleCounter, StreamSink, StreamSource, config_from_env, start
from tests.gateware.test_systolic import assemble, ref_tiles

CFG = config_from_env()
R, C = CFG.array_rows, CFG.array_cols


async def rtl_gemm(dut, a, b, idle=0.0, stall=0.0, seed=0, hold=0):
    """A @ B on the array; returns (C, cycles from the first beat to the last row).
    ``hold``: cycles the sink stays not-ready at the start, so the output fills up."""
    beats, tiles = ref_tiles(a, b, R, C)
    src = StreamSource(dut, "i", feed_layout(R, C, CFG.act_bits), idle=idle, seed=seed)
    sink = StreamSink(dut, "o", result_layout(C, CFG.acc_bits), stall=stall, seed=seed + 1)
    counter = CycleCounter(dut).start()
    send = cocotb.start_soon(src.send(beats))
    for _ in range(hold):
        await RisingEdge(dut.clk)
    rows = await sink.collect(len(tiles) * R, timeout=20 * len(beats) + 1000)
    await send
    cycles = counter.stop()
    return assemble(rows, tiles, a.shape[0], b.shape[1], R, C), cycles


def check(got, a, b, what):
    want = imatmul(a, b)
    bad = np.argwhere(got != want)
    assert not len(bad), f"{what}: {len(bad)} wrong, first at {bad[0]}: {got[tuple(bad[0])]} != {want[tuple(bad[0])]}"


@cocotb.test()
async def random_shapes_with_stalls(dut):
    """Seeded random shapes including 1 x N, N x 1, K = 1 and primes; stalls on both edges."""
    await start(dut)
    rng = np.random.default_rng(7)
    shapes = [(1, 1, 1), (1, 13, 1), (1, 5, 17), (17, 5, 1), (13, 1, 11), (2 * R + 1, 7, 2 * C - 1),
              (R, 2, C), (31, 37, 29)]
    shapes += [tuple(int(x) for x in rng.integers(1, 3 * max(R, C), 3)) for _ in range(6)]
    for n, (m, k, nn) in enumerate(shapes):
        a = rng.integers(-128, 128, (m, k))
        b = rng.integers(-128, 128, (k, nn))
        got, _ = await rtl_gemm(dut, a, b, idle=0.3, stall=0.3, seed=n)
        check(got, a, b, f"{m}x{k}x{nn}")


@cocotb.test()
async def output_held_back(dut):
    """Short tiles while the sink refuses everything for a long time: the array must
    stop taking tile ends instead of overrunning its output FIFO."""
    await start(dut)
    rng = np.random.default_rng(5)
    for k in (1, R, 2 * R + 3):
        a = rng.integers(-128, 128, (4 * R, k))
        b = rng.integers(-128, 128, (k, 3 * C))
        got, _ = await rtl_gemm(dut, a, b, hold=400, seed=k)
        check(got, a, b, f"held back, K={k}")


@cocotb.test()
async def extremes_do_not_overflow(dut):
    """-128 everywhere (the largest product, 2^14, summed 1000 times), and mixed signs."""
    await start(dut)
    for a_val, b_val in ((-128, -128), (-128, 127), (127, 127)):
        a = np.full((R + 1, 1000), a_val)
        b = np.full((1000, C + 1), b_val)
        got, _ = await rtl_gemm(dut, a, b, stall=0.1, seed=3)
        check(got, a, b, f"{a_val} x {b_val}")


@cocotb.test()
async def digits_layers(dut):
    """Every layer of the digits model with its real weights, on the im2col rows of real
    inputs (the conv unit generates these rows in hardware)."""
    await start(dut)
    from host.datasets import load_workload
    from sim.fixed_model import quantize_input

    model = load_base_model("digits")
    wl = load_workload("digits", "rotate:30")
    xq = quantize_input(model, wl.target_train.x[:2], CFG)
    _, xs = frozen_forward(model, xq, CFG)
    for l, layer in enumerate(model.layers):
        x = xs[l][:1].reshape((1,) + tuple(layer.in_shape))
        a = im2col(x, layer)[0]
        got, _ = await rtl_gemm(dut, a, model.weights[l], idle=0.1, stall=0.1, seed=l)
        check(got, a, model.weights[l], f"digits layer {l}")


@cocotb.test()
async def throughput(dut):
    """Back-to-back GEMMs with a ready sink: cycles against MACs / (R * C). Written to
    SKIPTUNE_BENCH_OUT when set (make bench-gemm); here only checked for being exact."""
    await start(dut)
    rng = np.random.default_rng(11)
    sizes = json.loads(os.environ.get("SKIPTUNE_GEMM_SIZES", "[[64, 64, 64]]"))
    results = []
    for m, k, n in sizes:
        a = rng.integers(-128, 128, (m, k))
        b = rng.integers(-128, 128, (k, n))
        got, cycles = await rtl_gemm(dut, a, b)
        check(got, a, b, f"{m}x{k}x{n}")
        ideal = m * k * n / (R * C)
        results.append({"m": m, "k": k, "n": n, "cycles": cycles, "ideal": ideal,
                        "utilization": ideal / cycles})
        dut._log.info("%dx%dx%d: %d cycles, ideal %.0f, utilization %.3f", m, k, n, cycles,
                      ideal, ideal / cycles)
    out = os.environ.get("SKIPTUNE_BENCH_OUT")
    if out:
        with open(out, "w") as f:
            json.dump({"array": results}, f)

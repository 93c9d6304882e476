"""The systolic array: processing element and small grids in Amaranth's simulator, and
the 4x4 / 8x8 arrays against exact integer products on Verilator (and Icarus)."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from numpy.testing import assert_array_equal

from gateware.config import AccelConfig
from gateware.systolic import ProcessingElement, SystolicArray
from sim.fixed import imatmul

from .amaranth_streams import stream_source
from .harness import SIMULATORS, run_cocotb


def test_pe_sums_a_tile_and_restarts():
    dut = ProcessingElement()
    seen = []

    async def bench(ctx):
        steps = [(3, -4, 0), (-128, -128, 0), (127, 2, 1), (5, 5, 1), (0, 0, 0), (0, 0, 0)]
        for cycle, (a, b, last) in enumerate(steps + [(0, 0, 0)] * 3):
            valid = cycle < len(steps) and cycle != 4
            ctx.set(dut.a_in, a)
            ctx.set(dut.b_in, b)
            ctx.set(dut.valid_in, valid)
            ctx.set(dut.last_in, last)
            await ctx.tick()
            if ctx.get(dut.done):
                seen.append((cycle, ctx.get(dut.result)))
            assert ctx.get(dut.a_out) == a and ctx.get(dut.b_out) == b

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    # done one tick after the product register, i.e. read after the tick of cycle t+1
    assert seen == [(3, -12 + 16384 + 254), (4, 25)]


def ref_tiles(a, b, rows, cols):
    """Split A @ B into the array's tiles: the beats to send and, per tile, the
    (row slice, col slice) its R result rows fill."""
    m, k = a.shape
    n = b.shape[1]
    beats, tiles = [], []
    for m0 in range(0, m, rows):
        for n0 in range(0, n, cols):
            at = np.zeros((rows, k), np.int64)
            bt = np.zeros((k, cols), np.int64)
            at[: min(rows, m - m0)] = a[m0:m0 + rows]
            bt[:, : min(cols, n - n0)] = b[:, n0:n0 + cols]
            for kk in range(k):
                beats.append({"a": [int(x) for x in at[:, kk]], "b": [int(x) for x in bt[kk]],
                              "last": int(kk == k - 1)})
            tiles.append((m0, n0))
    return beats, tiles


def assemble(rows_out, tiles, m, n, rows, cols):
    c = np.zeros((m, n), np.int64)
    for t, (m0, n0) in enumerate(tiles):
        for r in range(rows):
            beat = rows_out[t * rows + r]
            assert beat["last"] == (r == rows - 1)
            if m0 + r < m:
                w = min(cols, n - n0)
                c[m0 + r, n0:n0 + w] = beat["c"][:w]
    return c


def rtl_gemm_amaranth(a, b, rows, cols, seed=0):
    """Run A @ B through a SystolicArray in Amaranth's simulator with random stalls."""
    dut = SystolicArray(rows, cols)
    beats, tiles = ref_tiles(a, b, rows, cols)
    out = []
    rng = np.random.default_rng(seed)

    async def sink(ctx):
        while len(out) < len(tiles) * rows:
            ready = rng.random() >= 0.3
            ctx.set(dut.o.ready, ready)
            _, _, valid, payload = await ctx.tick().sample(dut.o.valid, dut.o.payload)
            if ready and valid:
                out.append({"c": [int(x) for x in payload.c], "last": int(payload.last)})

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(stream_source(dut.i, beats, 0.2, rng), background=True)
    sim.add_testbench(sink)
    sim.run()
    return assemble(out, tiles, a.shape[0], b.shape[1], rows, cols)


@pytest.mark.parametrize("rows,cols,m,k,n", [
    (2, 3, 5, 4, 7),     # neither dimension a multiple of the array
    (3, 2, 1, 1, 1),     # one step tiles, shorter than R
    (2, 2, 4, 9, 4),
])
def test_small_array_amaranth(rows, cols, m, k, n):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a = rng.integers(-128, 128, (m, k))
    b = rng.integers(-128, 128, (k, n))
    assert_array_equal(rtl_gemm_amaranth(a, b, rows, cols), imatmul(a, b))


@pytest.mark.parametrize("sim", SIMULATORS)
@pytest.mark.parametrize("rows,cols", [(4, 4), (8, 8), (3, 5)])
def test_array_cocotb(sim, rows, cols):
    cfg = AccelConfig(array_rows=rows, array_cols=cols)
    run_cocotb(sim, f"systolic_{rows}x{cols}", SystolicArray.from_config(cfg),
               "tests.gateware.cocotb_systolic", cfg)

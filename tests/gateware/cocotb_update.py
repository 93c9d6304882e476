"""cocotb tests of the weight-update unit (gateware/update.py, top-level ``update_unit``):
real digits updates, random and extreme weights at extreme learning rates, every W', M',
V' and the LFSR state compared bit-exactly with sim.fixed_model (`update`, `_shift_adam`),
with random bubbles on the input and stalls on the output.

Run through tests/gateware/test_update.py; the configuration comes in SKIPTUNE_CFG and the
seed in SKIPTUNE_SEED."""

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from gateware.layouts import update_in_layout, update_out_layout
from sim import fixed_model
from sim.finetune import lfsr_seed
from tests.gateware.streams import StreamSink, StreamSource, config_from_env, env_int, start
from tests.gateware.test_update import (LATENCY, digits_batches, in_domain, lr_cases,
                                        random_beats, ref_update)

CFG = config_from_env()
SEED = env_int("SKIPTUNE_SEED", 2026)


async def begin(dut):
    """Drive every input to a defined value (an undriven port is X on Icarus, and a
    stream left valid by an earlier failed test would leak into this one), then reset."""
    dut.i_stream__valid.value = 0
    dut.o_stream__ready.value = 0
    dut.seed_load.value = 0
    dut.seed.value = 0
    dut.mant.value = 0
    dut.exp.value = 0
    await start(dut)


async def load_seed(dut, state):
    """Pulse seed_load with ``state`` (at a falling edge; returns at the next one)."""
    dut.seed.value = state
    dut.seed_load.value = 1
    await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.seed_load.value = 0


async def stream(dut, beats, mant, exp, idle=0.3, stall=0.3, seed=0):
    """Send ``beats`` with the learning rate (mant, exp), collect as many outputs.
    Returns (outputs, LFSR port after the last one, cycles)."""
    dut.mant.value = mant
    dut.exp.value = exp
    source = StreamSource(dut, "i_stream", update_in_layout(CFG), idle=idle, seed=SEED + seed)
    sink = StreamSink(dut, "o_stream", update_out_layout(CFG), stall=stall, seed=SEED + seed + 1)
    t0 = cocotb.utils.get_sim_time("ns")
    sending = cocotb.start_soon(source.send(beats))
    got = await sink.collect(len(beats), timeout=20 * len(beats) + 200)
    await sending
    cycles = int((cocotb.utils.get_sim_time("ns") - t0) // 10)
    return got, int(dut.lfsr.value), cycles


def assert_same(got, want, what):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{what}, beat {k}: got {g}, want {w}"


async def no_more(dut):
    """Nothing further comes out of the pipeline."""
    dut.o_stream__ready.value = 1
    for _ in range(LATENCY + 4):
        await RisingEdge(dut.clk)
        await ReadOnly()
        assert not int(dut.o_stream__valid.value), "a beat beyond the last one"
    await FallingEdge(dut.clk)
    dut.o_stream__ready.value = 0


@cocotb.test()
async def digits_updates(dut):
    """Five consecutive updates of the real digits adapters (A_0, B_0, ..., B_3: 1312
    weights each), with the LFSR seeded once, as `sim.finetune.finetune_fixed` runs them.
    W', M', V' of every weight after every update, and the LFSR state after each."""
    await begin(dut)
    seed = 0
    mant, exp = fixed_model.lr_mantissa(0.01, CFG)
    await load_seed(dut, lfsr_seed(seed))
    batches = digits_batches(5, seed=seed, cfg=CFG)
    for b, (beats, want, state) in enumerate(batches):
        got, lfsr, _ = await stream(dut, beats, mant, exp, idle=0.2, stall=0.3, seed=10 + b)
        assert_same(got, want, f"update {b}")
        assert lfsr == state, f"update {b}: LFSR {lfsr:#x}, want {state:#x}"
        moved = sum(g["w"] != x["w"] for g, x in zip(got, beats))
        dut._log.info(f"update {b}: {len(beats)} weights bit-exact, {moved} moved, LFSR {lfsr:#010x}")
    await no_more(dut)


@cocotb.test()
async def random_and_extremes(dut):
    """Random weights at every scale and the extremes (W, M, V at their limits, V = 0,
    |dW| up to 2^47, dW shifts across [-32, 31]) at learning rates 0.01, 1.0, 1e-5,
    2^-14, 16 and 0.1, one after the other on a running LFSR."""
    await begin(dut)
    state = lfsr_seed(SEED)
    await load_seed(dut, state)
    for k, (mant, exp) in enumerate(lr_cases(CFG)):
        beats = in_domain(random_beats(CFG, 300, seed=SEED + k), exp, CFG)
        got, lfsr, _ = await stream(dut, beats, mant, exp, idle=0.3, stall=0.4, seed=20 + k)
        want, state = ref_update(beats, state, mant, exp, CFG)
        assert_same(got, want, f"lr ({mant}, {exp})")
        assert lfsr == state
        dut._log.info(f"lr ({mant}, {exp}): {len(beats)} weights bit-exact")
    await no_more(dut)


@cocotb.test()
async def full_rate(dut):
    """Without bubbles or stalls N weights take N + LATENCY cycles; a seed of 0 loads 1."""
    await begin(dut)
    await load_seed(dut, 0)
    assert int(dut.lfsr.value) == 1
    mant, exp = fixed_model.lr_mantissa(0.01, CFG)
    beats = random_beats(CFG, 500, seed=SEED + 99, fshifts=(-1, 0, 1, 2, 8, 5, -3))
    got, lfsr, cycles = await stream(dut, beats, mant, exp, idle=0.0, stall=0.0, seed=30)
    want, state = ref_update(beats, 1, mant, exp, CFG)
    assert_same(got, want, "full rate")
    assert lfsr == state
    assert cycles <= len(beats) + LATENCY + 2, cycles
    dut._log.info(f"{len(beats)} weights in {cycles} cycles")

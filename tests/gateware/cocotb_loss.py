"""cocotb tests of the loss unit (gateware/loss.py, top-level ``loss_unit``): samples of
1 .. max_classes logits streamed in with random bubbles, gradients streamed out with random
stalls, every g, pred and correct compared bit-exactly with sim.fixed_model.

Run through tests/gateware/test_loss.py; the configuration comes in SKIPTUNE_CFG and the
seed in SKIPTUNE_SEED."""

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from gateware.layouts import loss_in_layout, loss_out_layout
from sim import fixed_model
from tests.gateware.streams import StreamSink, StreamSource, config_from_env, env_int, start

CFG = config_from_env()
SEED = env_int("SKIPTUNE_SEED", 2026)
LO, HI = -(1 << (CFG.logit_bits - 1)), (1 << (CFG.logit_bits - 1)) - 1


def expected_beats(samples):
    """The output beats the golden model predicts for samples [(logits, label)]."""
    beats = []
    for z, y in samples:
        g = fixed_model.loss_grad(np.array([z]), np.array([y]), CFG)[0]
        pred = int(fixed_model.argmax(np.array([z]))[0])
        for c in range(len(z)):
            beats.append({"g": int(g[c]), "cls": c, "pred": pred, "correct": int(pred == y),
                          "first": int(c == 0), "last": int(c == len(z) - 1)})
    return beats


async def check(dut, samples, idle=0.3, stall=0.3, seed=0, first=True):
    """Stream ``samples`` through the unit and compare every output beat; then make sure
    no further beat comes out. ``first``: the test's first call, which starts the clock and
    resets the unit (later calls continue at the falling edge where the last one ended)."""
    source = StreamSource(dut, "i_stream", loss_in_layout(CFG), idle=idle, seed=SEED + seed)
    sink = StreamSink(dut, "o_stream", loss_out_layout(CFG), stall=stall, seed=SEED + seed + 1)
    if first:
        await start(dut)
    beats = [{"z": z_c, "label": y, "first": int(c == 0), "last": int(c == len(z) - 1)}
             for z, y in samples for c, z_c in enumerate(z)]
    sending = cocotb.start_soon(source.send(beats))
    got = await sink.collect(len(beats), timeout=200 * len(beats) + 1000)
    await sending
    want = expected_beats(samples)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"beat {k}: got {g}, want {w}"
    sink.ready.value = 1
    for _ in range(4 * CFG.max_classes + 40):
        await RisingEdge(dut.clk)
        await ReadOnly()
        assert not int(sink.valid.value), "a beat beyond the last sample"
    await FallingEdge(dut.clk)
    sink.ready.value = 0
    dut._log.info(f"{len(samples)} samples, {len(beats)} beats bit-exact")


def rng(seed):
    return np.random.default_rng(SEED + seed)


def sample(z, r):
    z = [int(v) for v in z]
    return z, int(r.integers(0, len(z)))


@cocotb.test()
async def random_logits(dut):
    """Normal logits at three scales, any number of classes."""
    r = rng(1)
    samples = []
    for _ in range(150):
        n = int(r.integers(1, CFG.max_classes + 1))
        scale = float(r.choice([0.25, 2.0, 16.0, 100.0])) * 2 ** CFG.F_z
        samples.append(sample(np.clip(np.round(r.normal(0, scale, n)), LO, HI), r))
    await check(dut, samples, seed=1)


@cocotb.test()
async def all_equal(dut):
    """Equal logits: uniform probabilities, prediction class 0."""
    r = rng(2)
    values = [0, LO, HI, -1, 1] + [int(v) for v in r.integers(LO, HI + 1, 10)]
    samples = [sample([v] * n, r) for n in range(1, CFG.max_classes + 1) for v in values[:3]]
    samples += [sample([v] * int(r.integers(1, CFG.max_classes + 1)), r) for v in values]
    await check(dut, samples, seed=2)


@cocotb.test()
async def one_huge(dut):
    """One logit far above the rest: p is 2^F_g there and 0 elsewhere."""
    r = rng(3)
    samples = []
    for n in range(1, CFG.max_classes + 1):
        for rest in (LO, 0, HI - (20 << CFG.F_z)):
            z = np.clip(r.integers(-256, 256, n) + rest, LO, HI)
            z[int(r.integers(0, n))] = HI
            samples.append(sample(z, r))
    await check(dut, samples, seed=3)


@cocotb.test()
async def saturating(dut):
    """Logits at the int16 extremes and next to them, ties included."""
    r = rng(4)
    extremes = [LO, LO + 1, HI - 1, HI]
    samples = [sample(r.choice(extremes, int(r.integers(1, CFG.max_classes + 1))), r)
               for _ in range(60)]
    samples += [([LO, HI], 0), ([HI, LO], 1), ([LO] * CFG.max_classes, 0),
                ([HI] + [LO] * (CFG.max_classes - 1), CFG.max_classes - 1)]
    await check(dut, samples, seed=4)


@cocotb.test()
async def table_edges(dut):
    """Logit differences around every rounding step of t near 0 and around the clamp at
    exp_entries - 1, where the table may still be nonzero."""
    r = rng(8)
    step = 1 << max(CFG.F_z - CFG.F_t, 0)
    clamp = (CFG.exp_entries - 1) * step
    diffs = list(range(0, 3 * step)) + list(range(clamp - 2 * step, clamp + 2 * step))
    samples = []
    for d in diffs:
        top = int(r.integers(LO + d, HI + 1))
        others = top - r.integers(0, 2 * clamp, int(r.integers(0, 3)))
        samples.append(sample([top, top - d] + np.clip(others, LO, HI).tolist(), r))
    await check(dut, samples, seed=9)


@cocotb.test()
async def one_class(dut):
    """A single class: g = 0 for every logit (p = 1 exactly)."""
    r = rng(5)
    samples = [([int(v)], 0) for v in r.integers(LO, HI + 1, 40)] + [([LO], 0), ([HI], 0)]
    await check(dut, samples, seed=5)


@cocotb.test()
async def labels_everywhere(dut):
    """max_classes classes, the label on every class in turn."""
    r = rng(6)
    n = CFG.max_classes
    samples = []
    for y in range(n):
        for scale in (0.5, 8.0):
            z = np.clip(np.round(r.normal(0, scale * 2 ** CFG.F_z, n)), LO, HI)
            samples.append(([int(v) for v in z], y))
        z = np.zeros(n, int)
        z[y] = 1 << CFG.F_z                     # correct prediction
        samples.append((z.tolist(), y))
    await check(dut, samples, seed=6)


@cocotb.test()
async def full_rate_and_heavy_stalls(dut):
    """No bubbles and no stalls; then an output that mostly stalls, so both buffer banks
    fill and the input is held off."""
    r = rng(7)
    samples = [sample(np.round(r.normal(0, 2 ** CFG.F_z, int(r.integers(1, CFG.max_classes + 1)))), r)
               for _ in range(30)]
    await check(dut, samples, idle=0.0, stall=0.0, seed=7)
    await check(dut, samples, idle=0.0, stall=0.85, seed=8, first=False)

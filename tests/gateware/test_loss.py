"""Loss unit (gateware/loss.py) against the bit-exact golden model (sim/fixed_model.py):
fast checks in Amaranth's simulator here, and the cocotb tests of
tests/gateware/cocotb_loss.py on Verilator and Icarus."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator
from numpy.testing import assert_array_equal

from gateware.config import DEFAULT, AccelConfig
from gateware.loss import LossUnit, exp_table
from sim import fixed, fixed_model
from sim.rtl import missing_reason
from tests.gateware.amaranth_streams import Cycles, stream_source
from tests.gateware.harness import SIMULATORS, run_cocotb

# A second configuration: other gradient and table formats, a table short enough that its
# last entry is not 0 (so the clamp of t shows), and a max_classes that is not a power of
# two (the class index is wider than the classes it must hold).
ODD = AccelConfig(F_g=12, F_t=5, exp_entries=256, max_classes=10)


def ref_loss(samples, cfg):
    """Per sample (logits, label): (g per class, pred, correct) from the golden model."""
    out = []
    for z, y in samples:
        g = fixed_model.loss_grad(np.array([z]), np.array([y]), cfg)[0]
        pred = int(fixed_model.argmax(np.array([z]))[0])
        out.append((g.tolist(), pred, int(pred == y)))
    return out


def rtl_loss(samples, cfg, idle=0.0, stall=0.0, seed=0):
    """The same from the gateware in Amaranth's simulator, with random bubbles on the input
    (``idle``) and stalls on the output (``stall``). Also returns, per sample, the cycle at
    which its first gradient was accepted."""
    dut = LossUnit(cfg)
    rng_in, rng_out = random.Random(seed), random.Random(seed + 1)
    beats = [{"z": z_c, "label": y, "first": c == 0, "last": c == len(z) - 1}
             for z, y in samples for c, z_c in enumerate(z)]
    got, first_cycles = [], []
    cycles = Cycles()

    async def sink(ctx):
        for _ in beats:
            while stall and rng_out.random() < stall:
                await ctx.tick()
            ctx.set(dut.o_stream.ready, 1)
            payload, = await ctx.tick().sample(dut.o_stream.payload).until(dut.o_stream.valid)
            ctx.set(dut.o_stream.ready, 0)
            if payload.first:
                first_cycles.append(cycles.n)
            got.append({name: int(getattr(payload, name))
                        for name in ("g", "cls", "pred", "correct", "first", "last")})

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(cycles.count, background=True)
    sim.add_testbench(stream_source(dut.i_stream, beats, idle, rng_in))
    sim.add_testbench(sink)
    sim.run()

    out, pos = [], 0
    for z, _ in samples:
        mine = got[pos:pos + len(z)]
        pos += len(z)
        assert [b["cls"] for b in mine] == list(range(len(z)))
        assert [(b["first"], b["last"]) for b in mine] == \
            [(c == 0, c == len(z) - 1) for c in range(len(z))]
        assert len({(b["pred"], b["correct"]) for b in mine}) == 1, "pred varies within a sample"
        out.append(([b["g"] for b in mine], mine[0]["pred"], mine[0]["correct"]))
    return out, first_cycles


def random_samples(cfg, count, seed):
    rng = np.random.default_rng(seed)
    lo, hi = -(1 << (cfg.logit_bits - 1)), (1 << (cfg.logit_bits - 1)) - 1
    samples = []
    for _ in range(count):
        n = int(rng.integers(1, cfg.max_classes + 1))
        scale = float(rng.choice([0.5, 4.0, 32.0])) * 2 ** cfg.F_z
        z = np.clip(np.round(rng.normal(0, scale, n)), lo, hi).astype(int)
        samples.append((z.tolist(), int(rng.integers(0, n))))
    return samples


def assert_same(ref, rtl):
    assert len(ref) == len(rtl)
    for k, ((g_ref, p_ref, ok_ref), (g_rtl, p_rtl, ok_rtl)) in enumerate(zip(ref, rtl)):
        assert_array_equal(g_rtl, g_ref, err_msg=f"sample {k}")
        assert (p_rtl, ok_rtl) == (p_ref, ok_ref), f"sample {k}"


@pytest.mark.parametrize("cfg", [DEFAULT, ODD], ids=["default", "odd"])
def test_exp_table_is_the_golden_table(cfg):
    assert_array_equal(exp_table(cfg), fixed.exp_table(cfg.exp_entries, cfg.F_t, cfg.F_exp))


@pytest.mark.parametrize("cfg", [DEFAULT, ODD], ids=["default", "odd"])
def test_loss_amaranth_sim(cfg):
    samples = random_samples(cfg, 12, seed=1)
    hi = (1 << (cfg.logit_bits - 1)) - 1
    samples += [([5] * 3, 2), ([hi, -hi - 1, hi], 0), ([-hi - 1], 0),
                (list(range(cfg.max_classes)), cfg.max_classes - 1)]
    rtl, _ = rtl_loss(samples, cfg, idle=0.3, stall=0.4, seed=2)
    assert_same(ref_loss(samples, cfg), rtl)


def test_loss_cycles_per_sample():
    """At full rate a sample of C classes takes 2 C + 28 cycles (the LossUnit docstring)."""
    for classes in (10, 1):
        samples = [(list(range(classes)), 0)] * 4
        rtl, first = rtl_loss(samples, DEFAULT)
        assert_same(ref_loss(samples, DEFAULT), rtl)
        assert np.diff(first).tolist() == [2 * classes + 28] * 3


@pytest.mark.parametrize("cfg", [DEFAULT, ODD], ids=["default", "odd"])
@pytest.mark.parametrize("sim", SIMULATORS)
def test_loss_cocotb(sim, cfg):
    reason = missing_reason(sim)
    if reason:                          # before building a component that would go unused
        pytest.skip(f"{sim}: {reason}")
    name = "loss_unit" if cfg == DEFAULT else "loss_unit_odd"
    run_cocotb(sim, name, LossUnit(cfg), "tests.gateware.cocotb_loss", cfg)

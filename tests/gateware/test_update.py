"""Weight-update unit (gateware/update.py) against the bit-exact golden model
(sim/fixed_model.py `_shift_adam` and `update`, sim/fixed.py `Lfsr`): fast checks in
Amaranth's simulator here, and the cocotb tests of tests/gateware/cocotb_update.py on
Verilator and Icarus. The beat generators below are shared with the cocotb module."""

import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from gateware.config import DEFAULT, AccelConfig
from gateware.update import FSHIFT_BITS, LATENCY, UpdateUnit
from sim import fixed, fixed_model
from sim.fixed import Lfsr
from sim.finetune import lfsr_seed
from sim.rtl import missing_reason
from tests.gateware.amaranth_streams import Cycles
from tests.gateware.harness import SIMULATORS, run_cocotb

# A second configuration: other moment widths and decays, a narrower mantissa, another
# square shift (2 F_n - F_v = 10), a different e_min, and an m_bits that is no multiple of
# the multiplier split.
ODD = AccelConfig(F_v=22, beta1_shift=4, beta2_shift=9, m_bits=38, v_bits=44, e_min=-10,
                  lr_mant_bits=12, F_m=22)

FIELDS = ("w", "m", "v", "last")


# --- the reference ---------------------------------------------------------------------

def ref_update(beats, state, mant, exp, cfg):
    """Golden outputs of ``beats`` (dicts w, m, v, d, fshift, last) through `_shift_adam`,
    one LFSR step per weight from ``state``. Returns (outputs, LFSR state after)."""
    lfsr = Lfsr(state, cfg.lfsr_taps)
    rand = lfsr.draws(len(beats))
    col = {k: np.array([b[k] for b in beats], dtype=np.int64) for k in ("w", "m", "v", "d", "fshift")}
    out = {k: np.zeros(len(beats), np.int64) for k in ("w", "m", "v")}
    for f in np.unique(col["fshift"]):
        sel = col["fshift"] == f
        w, m, v = fixed_model._shift_adam(col["w"][sel], col["m"][sel], col["v"][sel], col["d"][sel],
                                          int(f) + cfg.F_n, mant, exp, rand[sel], cfg)
        out["w"][sel], out["m"][sel], out["v"][sel] = w, m, v
    return ([{"w": int(out["w"][k]), "m": int(out["m"][k]), "v": int(out["v"][k]),
              "last": int(b["last"])} for k, b in enumerate(beats)], lfsr.state)


# --- beats -----------------------------------------------------------------------------

def _limits(cfg):
    return {"w": (-(1 << (cfg.master_bits - 1)), (1 << (cfg.master_bits - 1)) - 1),
            "m": (-(1 << (cfg.m_bits - 1)), (1 << (cfg.m_bits - 1)) - 1),
            "v": (0, (1 << cfg.v_bits) - 1),
            "d": (-(1 << 47), (1 << 47) - 1)}


def _d_limit(fshift):
    """Largest |d| whose left shift by -fshift stays inside the golden model's int64."""
    return (1 << 47) - 1 if fshift >= -15 else (1 << (62 + fshift)) - 1


def random_beats(cfg, count, seed, fshifts=(-1, 0, 1, 2, 8)):
    """Weights with random state at every scale, plus (for ``count`` >= 40) the extremes:
    W, M, V at their saturation limits, V = 0 (the e_min floor), |dW| huge of both signs,
    and shifts of dW across [-32, 31]."""
    rng = np.random.default_rng(seed)
    lim = _limits(cfg)
    def pick(name, scale_bits):
        lo, hi = lim[name]
        x = int(rng.integers(-(1 << scale_bits), 1 << scale_bits))
        return max(lo, min(hi, abs(x) if name == "v" else x))

    beats = []
    for _ in range(count):
        fs = int(rng.choice(fshifts))
        dl = _d_limit(fs)
        beats.append({
            "w": pick("w", int(rng.integers(1, cfg.master_bits))),
            "m": pick("m", int(rng.integers(1, cfg.m_bits))),
            "v": pick("v", int(rng.integers(1, cfg.v_bits + 1))),
            "d": max(-dl, min(dl, pick("d", int(rng.integers(1, 48))))),
            "fshift": fs, "last": 0,
        })
    if count >= 40:
        (wl, wh), (ml, mh), (vl, vh), (dl, dh) = (lim[k] for k in ("w", "m", "v", "d"))
        extremes = [
            (wh, mh, vh, dh, 0), (wl, ml, vh, dl, 0), (wh, ml, 0, 0, 0), (wl, mh, 0, 0, 0),
            (0, 0, 0, 0, 0), (0, 0, 0, 1, 8), (0, 0, 0, -1, 8), (0, 0, 0, 128, 8),
            (0, 0, 0, -128, 8), (wh, mh, 0, dh, 8), (wl, ml, 0, dl, 8),
            (0, 0, 0, dh, -1), (0, 0, 0, dl, -1), (5, 4, 511, 0, 2), (-5, -4, 512, 0, 2),
            (wh, mh, vh, dh, -15), (wl, ml, vh, dl, -15), (1, -1, 1, 1 << 20, -32),
            (1, 1, 2, -(1 << 20), -32), (0, 3, 3, dh, 31), (0, -3, 3, dl, 31),
            (0, 0, 0, (1 << 40), 30), (0, 0, 0, -(1 << 40), 30),
            (-7, (1 << 30), (1 << 20), (1 << 31) - 1, 0), (7, -(1 << 30), 1, -(1 << 31), 0),
            # g at and just past the int32 limits, through every kind of shift
            (0, 0, 0, 1 << 31, 0), (0, 0, 0, -(1 << 31) - 1, 0), (0, 0, 0, -1, -32),
            (0, 0, 0, 1, -32), (0, 0, 0, -1, -31), (0, 0, 0, 1, -31), (0, 0, 0, -2, -30),
            (0, 0, 0, (1 << 32) - 1, 1), (0, 0, 0, (1 << 32) - 2, 1), (0, 0, 0, -(1 << 32) - 1, 1),
            (0, 0, 0, -(1 << 32) - 2, 1),
        ]
        for w, m, v, d, fs in extremes:
            beats.insert(int(rng.integers(0, len(beats) + 1)),
                         {"w": w, "m": m, "v": v, "d": d, "fshift": fs, "last": 0})
    beats[-1]["last"] = 1
    return beats


def lr_cases(cfg):
    """(mant, exp) pairs: the default step, the extremes 1e-5 and 1.0, and a few more."""
    return [fixed_model.lr_mantissa(lr, cfg) for lr in (0.01, 1.0, 1e-5, 2.0 ** -14, 16.0, 0.1)]


def in_domain(beats, exp, cfg):
    """The beats whose step shift stays <= 32 at ``exp`` (the golden model refuses larger
    shifts, and the unit's contract ends there): V' decides e, whatever the LR."""
    col = {k: np.array([b[k] for b in beats], dtype=np.int64) for k in ("w", "m", "v", "d", "fshift")}
    keep = np.ones(len(beats), bool)
    for f in np.unique(col["fshift"]):
        sel = col["fshift"] == f
        _, _, v = fixed_model._shift_adam(col["w"][sel], col["m"][sel], col["v"][sel], col["d"][sel],
                                          int(f) + cfg.F_n, 1, 0, np.zeros(int(sel.sum()), np.int64), cfg)
        e = np.maximum((fixed.bit_length(v) - cfg.F_v - cfg.beta2_shift) >> 1, cfg.e_min)
        keep[sel] = exp + e + cfg.F_n + cfg.beta1_shift - cfg.F_m <= 32
    out = [dict(b) for b, k in zip(beats, keep) if k]
    for b in out:
        b["last"] = 0
    out[-1]["last"] = 1
    return out


def weight_order(model, masters, moments, grads, cfg):
    """The update's beats in the order A_0, B_0, A_1, B_1, ... (row-major)."""
    beats = []
    ms, vs = moments
    for l in range(len(masters)):
        f_ds = (model.s_x[l] + cfg.F_e, cfg.F_h + cfg.F_g)
        for k in (0, 1):
            for w, m, v, d in zip(masters[l][k].ravel(), ms[l][k].ravel(), vs[l][k].ravel(),
                                  grads[l][k].ravel()):
                beats.append({"w": int(w), "m": int(m), "v": int(v), "d": int(d),
                              "fshift": f_ds[k] - cfg.F_n, "last": 0})
    beats[-1]["last"] = 1
    return beats


def flat_result(masters, moments):
    """The golden `update`'s (masters, moments) flattened in the beats' order."""
    out = []
    ms, vs = moments
    for l in range(len(masters)):
        for k in (0, 1):
            for w, m, v in zip(masters[l][k].ravel(), ms[l][k].ravel(), vs[l][k].ravel()):
                out.append({"w": int(w), "m": int(m), "v": int(v)})
    return out


def digits_batches(batches, seed=0, cfg=DEFAULT, lr=0.01):
    """The first ``batches`` updates of the bit-exact digits fine-tune (the loop of
    `sim.finetune.finetune_fixed`): per update (beats in, golden beats out, LFSR state
    after), starting from LFSR state ``lfsr_seed(seed)``."""
    from host.datasets import load_workload
    from host.models import load_base_model
    from sim.cache import ActivationCache
    from sim.finetune import Schedule, _gather_inputs, FixedResult, batch_order, init_adapters
    from sim.fixed_model import (adapter_forward, adapter_grads, init_moments, loss_grad,
                                 quantize_input, update)

    wl, model = load_workload("digits", "rotate:30"), load_base_model("digits")
    t = wl.target_train
    sched = Schedule(seed=seed, lr=lr)
    xq = quantize_input(model, t.x, cfg)
    y = np.asarray(t.y, np.int64)
    masters = init_adapters(model, sched.rank, seed, cfg)
    moments = init_moments(masters)
    lfsr = Lfsr(lfsr_seed(seed), cfg.lfsr_taps)
    cache = ActivationCache(model, cfg, sched.cache_bits)
    res = FixedResult(masters)
    out = []
    for idx in batch_order(len(y), sched.batch, seed)[:batches]:
        xs, base = _gather_inputs(model, xq, idx, cache, sched.cache_bits, cfg, res)
        z, hs = adapter_forward(model, xs, base, masters, cfg)
        grads = adapter_grads(model, xs, hs, loss_grad(z, y[idx], cfg), masters, cfg)
        beats = weight_order(model, masters, moments, grads, cfg)
        masters, moments = update(model, masters, moments, grads, sched.lr, lfsr, cfg)
        want = flat_result(masters, moments)
        for b, wnt in zip(beats, want):
            wnt["last"] = b["last"]
        out.append((beats, want, lfsr.state))
    return out


# --- the RTL in Amaranth's simulator ---------------------------------------------------

def rtl_update(runs, cfg, idle=0.0, stall=0.0, seed=0):
    """``runs``: [(beats, seed_state or None, mant, exp)], streamed one after the other;
    a run with a seed loads it (``seed_load``) before its first beat. Returns per run the
    output beats and the ``lfsr`` port once the run's last beat is out, and the cycles
    (from the first accepted beat) at which each output beat was taken."""
    dut = UpdateUnit(cfg)
    rng_in, rng_out = random.Random(seed), random.Random(seed + 1)
    results = []
    cycles = Cycles()
    accept_cycles, out_cycles = [], []
    done = []

    async def source(ctx):
        for k, (beats, state, mant, exp) in enumerate(runs):
            # the lr ports change only when the pipeline is empty: wait for the last run
            while len(done) < k:
                await ctx.tick()
            ctx.set(dut.mant, mant)
            ctx.set(dut.exp, exp)
            if state is not None:
                ctx.set(dut.seed, state)
                ctx.set(dut.seed_load, 1)
                await ctx.tick()
                ctx.set(dut.seed_load, 0)
            for beat in beats:
                while idle and rng_in.random() < idle:
                    await ctx.tick()
                ctx.set(dut.i_stream.valid, 1)
                ctx.set(dut.i_stream.payload, beat)
                await ctx.tick().until(dut.i_stream.ready)
                accept_cycles.append(cycles.n)
                ctx.set(dut.i_stream.valid, 0)

    async def sink(ctx):
        for beats, *_ in runs:
            got = []
            for _ in beats:
                while stall and rng_out.random() < stall:
                    await ctx.tick()
                ctx.set(dut.o_stream.ready, 1)
                payload, = await ctx.tick().sample(dut.o_stream.payload).until(dut.o_stream.valid)
                out_cycles.append(cycles.n)
                ctx.set(dut.o_stream.ready, 0)
                got.append({name: int(getattr(payload, name)) for name in FIELDS})
            results.append((got, ctx.get(dut.lfsr)))
            done.append(1)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(cycles.count, background=True)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return results, accept_cycles, out_cycles


def assert_same(got, want, what=""):
    assert len(got) == len(want), what
    for k, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{what} beat {k}: got {g}, want {w}"


def _check_runs(runs, cfg, **kw):
    results, _, _ = rtl_update(runs, cfg, **kw)
    state = 1
    for (beats, seed_state, mant, exp), (got, lfsr) in zip(runs, results):
        if seed_state is not None:
            state = seed_state or 1
        want, state = ref_update(beats, state, mant, exp, cfg)
        assert_same(got, want, f"mant={mant} exp={exp}")
        assert lfsr == state


@pytest.mark.parametrize("cfg", [DEFAULT, ODD], ids=["default", "odd"])
def test_update_amaranth_sim(cfg):
    """Random and extreme weights at three learning rates, with bubbles and stalls."""
    (m1, e1), (m2, e2), (m3, e3) = lr_cases(cfg)[:3]
    runs = [(random_beats(cfg, 60, seed=1), lfsr_seed(3), m1, e1),
            (random_beats(cfg, 20, seed=2), None, m2, e2),
            (in_domain(random_beats(cfg, 60, seed=3), e3, cfg), None, m3, e3)]
    _check_runs(runs, cfg, idle=0.3, stall=0.4, seed=5)


def test_update_digits_amaranth_sim():
    """Two real digits updates (a slice of each: the simulator is slow), back to back."""
    batches = digits_batches(2)
    mant, exp = fixed_model.lr_mantissa(0.01, DEFAULT)
    # A_0 (64 x 4) then B_0: take the first 40 weights of A_0 and all of B_0 of update 1
    beats = batches[1][0]
    part = beats[:40] + beats[256:296]
    runs = [(batches[0][0][:50], lfsr_seed(0), mant, exp), (part, None, mant, exp)]
    results, _, _ = rtl_update(runs, DEFAULT, idle=0.2, stall=0.2, seed=7)
    assert_same(results[0][0], batches[0][1][:50])
    want, _ = ref_update(part, results[0][1], mant, exp, DEFAULT)
    assert_same(results[1][0], want)


def test_update_latency_and_throughput():
    """Without bubbles or stalls a beat comes out LATENCY cycles after it was accepted,
    one per cycle (the UpdateUnit docstring)."""
    beats = random_beats(DEFAULT, 30, seed=9)
    mant, exp = fixed_model.lr_mantissa(0.01, DEFAULT)
    results, acc, out = rtl_update([(beats, lfsr_seed(0), mant, exp)], DEFAULT)
    want, _ = ref_update(beats, lfsr_seed(0), mant, exp, DEFAULT)
    assert_same(results[0][0], want)
    assert np.diff(acc).tolist() == [1] * (len(beats) - 1)
    assert [o - a for a, o in zip(acc, out)] == [LATENCY] * len(beats)


def test_lfsr_test_vector():
    """docs/numerics.md section 10: seed 0 gives 0x2545F491, then 0x9282FA4B, 0xC9617D26,
    0x64B0BE93; a seed of 0 loads 1."""
    assert lfsr_seed(0) == 0x2545F491
    dut = UpdateUnit(DEFAULT)
    seen = []

    async def bench(ctx):
        assert ctx.get(dut.lfsr) == 1                 # reset value
        ctx.set(dut.seed, 0)
        ctx.set(dut.seed_load, 1)
        await ctx.tick()
        assert ctx.get(dut.lfsr) == 1
        ctx.set(dut.seed, lfsr_seed(0))
        await ctx.tick()
        ctx.set(dut.seed_load, 0)
        seen.append(ctx.get(dut.lfsr))
        ctx.set(dut.o_stream.ready, 1)
        ctx.set(dut.i_stream.valid, 1)
        for _ in range(3):
            await ctx.tick()
            seen.append(ctx.get(dut.lfsr))
        ctx.set(dut.i_stream.valid, 0)
        await ctx.tick()                              # no beat, no step
        assert ctx.get(dut.lfsr) == seen[-1]

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen == [0x2545F491, 0x9282FA4B, 0xC9617D26, 0x64B0BE93]


def test_fshift_field_covers_the_models():
    """Every gradient shift f_d - F_n of the shipped models fits the beat's field."""
    from host.models import load_base_model
    lo, hi = -(1 << (FSHIFT_BITS - 1)), (1 << (FSHIFT_BITS - 1)) - 1
    for name in ("digits", "fan"):
        model = load_base_model(name)
        shifts = [s + DEFAULT.F_e - DEFAULT.F_n for s in model.s_x]
        shifts.append(DEFAULT.F_h + DEFAULT.F_g - DEFAULT.F_n)
        assert all(lo <= s <= hi for s in shifts), (name, shifts)


@pytest.mark.parametrize("sim", SIMULATORS)
def test_update_cocotb(sim):
    reason = missing_reason(sim)
    if reason:                          # before building a component that would go unused
        pytest.skip(f"{sim}: {reason}")
    # cocotb rewrites the asserts of every module imported after it starts (*.py): for
    # the digits workload (scikit-learn, SciPy) that costs about 5 s a run; only ours.
    env = {"COCOTB_REWRITE_ASSERTION_FILES": "cocotb_update.py test_update.py"}
    run_cocotb(sim, "update_unit", UpdateUnit(DEFAULT), "tests.gateware.cocotb_update", DEFAULT, env=env)

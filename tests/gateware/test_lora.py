"""LoRA engine (gateware/lora.py) against the bit-exact fine-tuning loop of
`sim.finetune.finetune_fixed` (adapter_forward, loss_grad, adapter_grads, update with the
schedule's LFSR): a tiny configuration in Amaranth's simulator here, and consecutive
batches of the real digits fine-tune in the cocotb tests of tests/gateware/cocotb_lora.py
on Verilator and Icarus. The golden loop below is shared with the cocotb module."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
from amaranth.sim import Simulator
from numpy.testing import assert_array_equal

from gateware.config import DEFAULT
from gateware.lora import LoraEngine
from gateware.update import LATENCY
from sim import fixed_model
from sim.finetune import lfsr_seed
from sim.fixed import Lfsr
from sim.rtl import missing_reason
from tests.gateware.amaranth_streams import pulse
from tests.gateware.harness import SIMULATORS, run_cocotb
from tests.gateware.test_adapter import TINY, flat_masters, split_flat


def setup_value(sizes, s_x, rank, classes, cfg):
    """The engine's setup: the adapter's, and the gradient shifts f_d - F_n of every
    A_l (s_x[l] + F_e) and B_l (F_h + F_g)."""
    layers = [{"size": d, "h_shift": s + cfg.F_w - cfg.F_h} for d, s in zip(sizes, s_x)]
    layers += [{"size": 0, "h_shift": 0}] * (cfg.max_layers - len(sizes))
    fshift = [{"a": s + cfg.F_e - cfg.F_n, "b": cfg.F_h + cfg.F_g - cfg.F_n} for s in s_x]
    fshift += [{"a": 0, "b": 0}] * (cfg.max_layers - len(s_x))
    return {"adapter": {"n_layers": len(sizes), "rank": rank, "classes": classes,
                        "layers": layers},
            "fshift": fshift}


def ref_lora(model, batches, masters, lr, seed, cfg):
    """The golden loop over ``batches`` [(xs, base, y)]: per batch the masters after its
    update (flat, packed order), the predictions argmax(z), and the LFSR state after."""
    moments = fixed_model.init_moments(masters)
    lfsr = Lfsr(lfsr_seed(seed), cfg.lfsr_taps)
    out = []
    for xs, base, y in batches:
        z, hs = fixed_model.adapter_forward(model, xs, base, masters, cfg)
        g = fixed_model.loss_grad(z, y, cfg)
        grads = fixed_model.adapter_grads(model, xs, hs, g, masters, cfg)
        masters, moments = fixed_model.update(model, masters, moments, grads, lr, lfsr, cfg)
        out.append((flat_masters(masters, cfg), fixed_model.argmax(z).tolist(), lfsr.state))
    return out


def sample_beats(xs, base, y, n):
    """The beats of sample ``n``: every x_l, then the base logits, label on the last."""
    vals = [int(v) for x in xs for v in x[n]] + [int(v) for v in base[n]]
    return [{"data": v, "label": int(y[n]), "first": k == 0, "last": k == len(vals) - 1}
            for k, v in enumerate(vals)]


def rtl_lora(s_x, batches, masters, lr, seed, cfg, idle=0.0, rng_seed=0, overlap=False):
    """The same from the gateware in Amaranth's simulator: masters loaded through the
    port, accumulators and moments cleared, the seed loaded; per batch every sample
    streamed in, ``update`` pulsed, the masters read back. Returns per batch (flat
    masters, correct count, forward cycles, update cycles, LFSR state). With
    ``overlap`` the next batch's samples follow the ``update`` strobe at once (the engine
    holds them until the update is done) and only the last batch is read back."""
    dut = LoraEngine(cfg)
    sizes = [x.shape[1] for x in batches[0][0]]
    rank, classes = masters[0][0].shape[1], batches[0][1].shape[1]
    flat = flat_masters(masters, cfg)
    mant, exp = fixed_model.lr_mantissa(lr, cfg)
    rng = random.Random(rng_seed)
    out = []

    async def bench(ctx):
        ctx.set(dut.setup, setup_value(sizes, s_x, rank, classes, cfg))
        ctx.set(dut.mant, mant)
        ctx.set(dut.exp, exp)
        ctx.set(dut.mem_we, 1)
        for a, w in enumerate(flat):
            ctx.set(dut.mem_addr, a)
            ctx.set(dut.mem_wdata, w)
            await ctx.tick()
        ctx.set(dut.mem_we, 0)
        ctx.set(dut.seed, lfsr_seed(seed))
        await pulse(ctx, dut.seed_load)
        ctx.set(dut.clear_grads, 1)
        ctx.set(dut.reset_moments, 1)
        await ctx.tick()
        ctx.set(dut.clear_grads, 0)
        ctx.set(dut.reset_moments, 0)
        await ctx.tick().until(~dut.busy)
        for k, (xs, base, y) in enumerate(batches):
            if not overlap or k == 0:
                await pulse(ctx, dut.clear_counters)
            for n in range(len(y)):
                for beat in sample_beats(xs, base, y, n):
                    while idle and rng.random() < idle:
                        ctx.set(dut.i_stream.valid, 0)
                        await ctx.tick()
                    ctx.set(dut.i_stream.valid, 1)
                    ctx.set(dut.i_stream.payload, beat)
                    await ctx.tick().until(dut.i_stream.ready)
                ctx.set(dut.i_stream.valid, 0)
            await pulse(ctx, dut.update)
            if overlap and k < len(batches) - 1:
                continue
            await ctx.tick().until(~dut.busy)
            counts = [ctx.get(s) for s in (dut.n_samples, dut.n_correct, dut.fwd_cycles,
                                           dut.upd_cycles)]
            assert counts[0] == (sum(len(b[2]) for b in batches) if overlap else len(y))
            got = []
            ctx.set(dut.mem_re, 1)
            for a in range(len(flat)):
                ctx.set(dut.mem_addr, a)
                await ctx.tick().repeat(2)           # the port takes two cycles
                got.append(ctx.get(dut.mem_rmaster))
                assert ctx.get(dut.mem_rgrad) == 0, f"accumulator {a} not cleared"
            ctx.set(dut.mem_re, 0)
            out.append((got, counts[1], counts[2], counts[3], ctx.get(dut.lfsr)))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return out


def tiny_batches(seed, n_batches=3, batch=2):
    rng = np.random.default_rng(seed)
    sizes, s_x, rank, classes = [5, 7, 3], [6, 0, -3], 3, 4
    masters = [(rng.integers(-1 << 26, 1 << 26, (d, rank)),
                rng.integers(-1 << 25, 1 << 25, (rank, classes))) for d in sizes]
    batches = []
    for _ in range(n_batches):
        xs = [rng.integers(-128, 128, (batch, d)) for d in sizes]
        base = rng.integers(-600, 600, (batch, classes))
        batches.append((xs, base, rng.integers(0, classes, batch)))
    return s_x, batches, masters


def sample_cycles(n, L, r, C, P):
    """forward+gradient cycles of one sample at full rate (the LoraEngine docstring)."""
    return 2 * n + max(C, r + 8 + P.bit_length() - 1) + 3 * L * r + 3 * C + 44


@pytest.mark.parametrize("idle", [0.0, 0.3], ids=["full-rate", "bubbles"])
def test_lora_amaranth(idle):
    """Three batches of two samples, three updates: masters, predictions and the LFSR
    bit-exact after every update; the update takes N + LATENCY + 2 cycles, a sample at
    full rate `sample_cycles`."""
    s_x, batches, masters = tiny_batches(11)
    lr, seed = 0.01, 0
    want = ref_lora(SimpleNamespace(s_x=s_x), batches, masters, lr, seed, TINY)
    got = rtl_lora(s_x, batches, masters, lr, seed, TINY, idle=idle, rng_seed=4)
    n_w = sum(a.size + b.size for a, b in masters)
    for k, ((w_m, w_pred, w_lfsr), (g_m, g_corr, fwd, upd, g_lfsr)) in enumerate(zip(want, got)):
        assert_array_equal(g_m, w_m, err_msg=f"masters after update {k}")
        assert g_corr == int((np.array(w_pred) == batches[k][2]).sum())
        assert g_lfsr == w_lfsr
        assert upd == n_w + LATENCY + 2
        if not idle:
            xs, base, y = batches[k]
            assert fwd == len(y) * sample_cycles(sum(x.shape[1] for x in xs), len(xs),
                                                 masters[0][0].shape[1], base.shape[1],
                                                 TINY.adapter_lanes)
        print(f"batch {k}: forward+gradient {fwd} cycles, update {upd} cycles")
    assert got[-1][0] != flat_masters(masters, TINY)


def test_lora_overlap():
    """Each batch's samples sent right after the previous ``update`` strobe, without
    waiting: the engine holds them until the update has written every weight back."""
    s_x, batches, masters = tiny_batches(12, n_batches=3, batch=3)
    want = ref_lora(SimpleNamespace(s_x=s_x), batches, masters, 0.02, 5, TINY)
    got = rtl_lora(s_x, batches, masters, 0.02, 5, TINY, idle=0.2, rng_seed=6, overlap=True)
    assert len(got) == 1
    assert_array_equal(got[0][0], want[-1][0])
    assert got[0][1] == sum(int((np.array(w[1]) == b[2]).sum()) for w, b in zip(want, batches))
    assert got[0][3] == 3 * (sum(a.size + b.size for a, b in masters) + LATENCY + 2)
    assert got[0][4] == want[-1][2]


@pytest.mark.parametrize("sim", SIMULATORS)
def test_lora_cocotb(sim):
    reason = missing_reason(sim)
    if reason:                          # before building a component that would go unused
        pytest.skip(f"{sim}: {reason}")
    # batches of 20: about 17k cycles each; Icarus runs this design at about 3k cycles/s
    env = {"SKIPTUNE_LORA_BATCHES": "5" if sim == "verilator" else "3",
           "SKIPTUNE_LORA_BATCH": "20"}
    env["COCOTB_REWRITE_ASSERTION_FILES"] = "cocotb_lora.py test_lora.py"
    rtl, tests, wall = run_cocotb(sim, "lora_engine", LoraEngine(DEFAULT),
                                  "tests.gateware.cocotb_lora", DEFAULT, env=env)
    print(f"{sim}: build {rtl.build_seconds:.1f} s, {tests} tests in {wall:.1f} s")

"""cocotb tests of the adapter datapath (gateware/adapter.py, top-level ``adapter_dp``) with
the real digits and fan models: masters from ``init_adapters`` (rank 4, seed 0) after one
or two golden fine-tuning steps (so that B is non-zero), loaded through the memory port; a
batch of real samples (``frozen_forward`` + ``cache_format`` at 8 bits) streamed in with
random bubbles, ``z`` streamed out with random stalls and compared per sample with
``adapter_forward``; ``g = loss_grad(z, y)`` computed here from the RTL's ``z`` and fed
back; after the batch every ``dA_l``, ``dB_l`` read through the port and compared with
``adapter_grads``. Also extreme inputs and masters, and the cycles per sample at full rate.

Run through tests/gateware/test_adapter.py; the configuration comes in SKIPTUNE_CFG and the
seed in SKIPTUNE_SEED."""

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge

from gateware.adapter import setup_layout
from gateware.layouts import loss_in_layout, loss_out_layout, sample_layout
from sim import fixed_model
from sim.finetune import adapter_macs, batch_order, init_adapters, lfsr_seed
from sim.fixed import Lfsr
from tests.gateware.test_adapter import flat_masters, padding, split_flat
from tests.gateware.streams import CycleCounter, StreamSink, StreamSource, config_from_env, env_int, pack, start

CFG = config_from_env()
SEED = env_int("SKIPTUNE_SEED", 2026)
RANK = 4
# Samples per batch: 20 on Verilator; the pytest driver asks for fewer on Icarus, which
# runs about 4x slower.
BATCH = env_int("SKIPTUNE_ADAPTER_BATCH", 20)


class Adapter:
    """Drives the unit: setup, memory port, and the three streams."""

    def __init__(self, dut, model, rank, idle=0.0, stall=0.0, seed=0):
        self.dut = dut
        self.model = model
        self.sizes = list(model.adapter_inputs)
        self.rank, self.classes = rank, model.classes
        layers = [{"size": d, "h_shift": s + CFG.F_w - CFG.F_h}
                  for d, s in zip(self.sizes, model.s_x)]
        layers += [{"size": 0, "h_shift": 0}] * (CFG.max_layers - len(layers))
        dut.setup.value = pack(setup_layout(CFG), {
            "n_layers": len(self.sizes), "rank": rank, "classes": self.classes, "layers": layers})
        for name in ("mem_re", "mem_we", "mem_clr", "clear_grads"):
            getattr(dut, name).value = 0
        self.src = StreamSource(dut, "i_stream", sample_layout(CFG), idle=idle, seed=SEED + seed)
        self.sink = StreamSink(dut, "o_stream", loss_in_layout(CFG), stall=stall, seed=SEED + seed + 1)
        self.gsrc = StreamSource(dut, "g_stream", loss_out_layout(CFG), idle=idle, seed=SEED + seed + 2)

    async def write_masters(self, masters):
        """One word per cycle through the port (call at a falling edge)."""
        for a, w in enumerate(flat_masters(masters, CFG)):
            self.dut.mem_addr.value = a
            self.dut.mem_wdata.value = w & 0xFFFFFFFF
            self.dut.mem_we.value = 1
            await FallingEdge(self.dut.clk)
        self.dut.mem_we.value = 0

    async def read(self, count):
        """(masters, grads) as flat lists, one word per cycle through the port (a word
        is out two cycles after its address)."""
        ms, gs = [], []
        self.dut.mem_re.value = 1
        for a in range(count + 1):
            self.dut.mem_addr.value = min(a, count - 1)
            await FallingEdge(self.dut.clk)          # the word of the address set before
            if a:
                ms.append(self.dut.mem_rmaster.value.to_signed())
                gs.append(self.dut.mem_rgrad.value.to_signed())
        self.dut.mem_re.value = 0
        return ms, gs

    async def clear(self):
        self.dut.clear_grads.value = 1
        await FallingEdge(self.dut.clk)
        self.dut.clear_grads.value = 0
        await self.idle()

    async def idle(self, timeout=100_000):
        for _ in range(timeout):
            await ReadOnly()
            if not int(self.dut.busy.value):
                await FallingEdge(self.dut.clk)
                return
            await FallingEdge(self.dut.clk)
        raise AssertionError("busy for ever")

    async def sample(self, xs, base, y):
        """One sample through the unit; returns its z (g fed back from loss_grad)."""
        beats = [{"data": int(v), "label": int(y), "first": 0, "last": 0}
                 for v in np.concatenate([x for x in xs] + [base])]
        beats[0]["first"], beats[-1]["last"] = 1, 1
        sending = cocotb.start_soon(self.src.send(beats))
        got = await self.sink.collect(self.classes, timeout=20 * len(beats) + 2000)
        await sending
        assert [(b["label"], b["first"], b["last"]) for b in got] == \
            [(int(y), int(c == 0), int(c == self.classes - 1)) for c in range(self.classes)]
        z = np.array([b["z"] for b in got], np.int64)
        g = fixed_model.loss_grad(z[None], np.array([y]), CFG)[0]
        await self.gsrc.send([{"g": int(g[c]), "cls": c, "pred": 0, "correct": 0,
                               "first": int(c == 0), "last": int(c == self.classes - 1)}
                              for c in range(self.classes)])
        return z


async def run_batch(dut, model, masters, xs, base, y, idle=0.3, stall=0.3, seed=0, first=True):
    """Load ``masters``, clear, run the batch, compare z per sample and the accumulators
    after the batch with the golden model. Returns the unit's driver."""
    if first:
        await start(dut)
    ad = Adapter(dut, model, masters[0][0].shape[1], idle=idle, stall=stall, seed=seed)
    await ad.write_masters(masters)
    await ad.clear()
    want_z, hs = fixed_model.adapter_forward(model, xs, base, masters, CFG)
    for n in range(len(y)):
        z = await ad.sample([x[n] for x in xs], base[n], y[n])
        assert np.array_equal(z, want_z[n]), f"sample {n}: z {z.tolist()} != {want_z[n].tolist()}"
    await ad.idle()
    g = fixed_model.loss_grad(want_z, y, CFG)
    want = fixed_model.adapter_grads(model, xs, hs, g, masters, CFG)
    words = flat_masters(masters, CFG)
    ms, gs = await ad.read(len(words))
    assert ms == words, "masters changed"
    assert not any(gs[a] for a in padding(ad.sizes, ad.rank, ad.classes, CFG)), "padding written"
    got = split_flat(gs, ad.sizes, ad.rank, ad.classes, CFG)
    count = sum(a.size + b.size for a, b in masters)
    for l, ((da, db), (ra, rb)) in enumerate(zip(want, got)):
        assert np.array_equal(ra, da), f"dA_{l}: {np.argwhere(ra != da)[:5].tolist()} differ"
        assert np.array_equal(rb, db), f"dB_{l}: {np.argwhere(rb != db)[:5].tolist()} differ"
        assert np.abs(db).max() > 0 and np.abs(da).max() > 0
    dut._log.info(f"{len(y)} samples: z and {count} accumulators bit-exact "
                  f"(max |dA| {max(int(np.abs(d).max()) for d, _ in want)}, "
                  f"max |dB| {max(int(np.abs(d).max()) for _, d in want)})")
    return ad


def workload(name, drift):
    from host.datasets import load_workload
    from host.models import load_base_model
    return load_base_model(name), load_workload(name, drift)


def trained(model, wl, steps, batch=20):
    """Masters after ``steps`` golden fine-tuning steps (rank 4, seed 0), and the inputs
    of the batch after them: (masters, xs, base, y)."""
    xq = fixed_model.quantize_input(model, wl.target_train.x, CFG)
    y_all = np.asarray(wl.target_train.y, np.int64)
    masters = init_adapters(model, RANK, 0, CFG)
    moments = fixed_model.init_moments(masters)
    lfsr = Lfsr(lfsr_seed(0), CFG.lfsr_taps)
    batches = batch_order(len(y_all), batch, 0)

    def inputs(idx):
        base, xs = fixed_model.frozen_forward(model, xq[idx], CFG)
        return fixed_model.cache_format(model, xs, 8), base, y_all[idx]

    for idx in batches[:steps]:
        xs, base, y = inputs(idx)
        z, hs = fixed_model.adapter_forward(model, xs, base, masters, CFG)
        g = fixed_model.loss_grad(z, y, CFG)
        grads = fixed_model.adapter_grads(model, xs, hs, g, masters, CFG)
        masters, moments = fixed_model.update(model, masters, moments, grads, 0.01, lfsr, CFG)
    return (masters,) + inputs(batches[steps][:BATCH])


@cocotb.test()
async def digits_batch(dut):
    """The digits model (4 layers, d = 64, 128, 64, 32, C = 10) after two golden updates:
    a batch of 20 real samples (BATCH) with bubbles and stalls."""
    model, wl = workload("digits", "rotate:30")
    masters, xs, base, y = trained(model, wl, 2)
    assert any(np.abs(b).max() > 0 for _, b in masters)
    await run_batch(dut, model, masters, xs, base, y, seed=1)


@cocotb.test()
async def fan_batch(dut):
    """The fan MLP (3 layers, d = 256, 64, 64, C = 3) after one golden update."""
    model, wl = workload("fan", "env:noisy")
    masters, xs, base, y = trained(model, wl, 1)
    await run_batch(dut, model, masters, xs, base, y, seed=2)


@cocotb.test()
async def extremes(dut):
    """The digits geometry with every x at -128 (or +127 in alternate samples), masters at
    the int32 rails (compute copies saturate), base logits at the int16 rails: every h,
    z and e saturates and the accumulators take their largest terms."""
    model, _ = workload("digits", "rotate:30")
    rng = np.random.default_rng(SEED)
    n = min(6, BATCH)
    lim = 1 << 31
    masters = [(np.where(rng.random((d, RANK)) < 0.5, -lim, lim - 1).astype(np.int64),
                np.where(rng.random((RANK, model.classes)) < 0.5, -lim, lim - 1).astype(np.int64))
               for d in model.adapter_inputs]
    xs = [np.full((n, d), -128, np.int64) for d in model.adapter_inputs]
    for x in xs:
        x[1::2] = 127
        x[2, ::3] = 0
    base = rng.choice([-32768, 32767], (n, model.classes)).astype(np.int64)
    y = rng.integers(0, model.classes, n)
    await run_batch(dut, model, masters, xs, base, y, seed=3)


@cocotb.test()
async def digits_full_rate(dut):
    """No bubbles, no stalls: cycles per digits sample, forward (first input beat to last
    z) and gradient (first g beat until busy falls), against the docstring's formulas and
    the MAC counts of sim.finetune.adapter_macs."""
    model, wl = workload("digits", "rotate:30")
    masters, xs, base, y = trained(model, wl, 1)
    await start(dut)
    ad = Adapter(dut, model, RANK)
    await ad.write_masters(masters)
    await ad.clear()
    n_act, C, L = sum(ad.sizes), model.classes, len(ad.sizes)
    want_z, _ = fixed_model.adapter_forward(model, xs, base, masters, CFG)
    cycles = []
    for s in range(3):
        clock = CycleCounter(dut).start()
        beats = [{"data": int(v), "label": int(y[s]), "first": 0, "last": 0}
                 for v in np.concatenate([x[s] for x in xs] + [base[s]])]
        sending = cocotb.start_soon(ad.src.send(beats))
        got = await ad.sink.collect(C)
        t_fwd = clock.n
        await sending
        z = np.array([b["z"] for b in got], np.int64)
        assert np.array_equal(z, want_z[s])
        g = fixed_model.loss_grad(z[None], y[s:s + 1], CFG)[0]
        t0 = clock.n
        await ad.gsrc.send([{"g": int(v), "cls": c, "pred": 0, "correct": 0, "first": 0, "last": 0}
                            for c, v in enumerate(g)])
        while True:                     # the first cycle with busy low
            await ReadOnly()
            if not int(dut.busy.value):
                break
            await FallingEdge(dut.clk)
        cycles.append((t_fwd, clock.n - t0))
        await FallingEdge(dut.clk)
        clock.stop()
    fwd, grad = adapter_macs(model, RANK)
    dut._log.info(f"digits rank {RANK}: forward {cycles[0][0]} cycles for {fwd} MACs, "
                  f"gradient {cycles[0][1]} cycles for {grad} MACs")
    assert cycles[0] == cycles[1] == cycles[2]
    assert cycles[0][0] == n_act + max(C, RANK + 8 + CFG.adapter_lanes.bit_length() - 1) + L * RANK + C + 9
    assert cycles[0][1] == C + 2 * L * RANK + n_act + 7

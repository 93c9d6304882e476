"""cocotb tests of the whole accelerator (gateware/top.py): the host port loads the digits
model, its fine-tuning samples and a compiled program in bulk, the device runs the whole
fine-tune alone, and the adapters read back must equal the golden fine-tune's to the bit.

Python only touches the port while loading and reading back; during a run it looks at
the status register every few thousand cycles. Figures go to SKIPTUNE_TOP_REPORT (JSON)."""

import os
import time

import cocotb
import numpy as np
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge, Timer

from firmware.compiler import (adapter_count, compile_finetune, compile_infer, finetune_images,
                               image_writes, infer_images, read_masters)
from firmware.isa import Error
from firmware.memmap import Control, Region, Regs, Status, address
from sim import fixed_model
from sim.finetune import Schedule, adapters_sha256, finetune_fixed
from tests.gateware.streams import config_from_env, env_int, report_json, start

CFG = config_from_env()
EPOCHS = env_int("SKIPTUNE_TOP_EPOCHS", 2)
INFER = env_int("SKIPTUNE_TOP_INFER", 100)
MODES = os.environ.get("SKIPTUNE_TOP_MODES", "on,off").split(",")
POLL = 5000


READ_LATENCY = 3       # cycles from re to rvalid (gateware.top.Accelerator)


class Port:
    """The host port, one access per cycle, driven on falling edges."""

    def __init__(self, dut):
        self.dut = dut
        dut.we.value = dut.re.value = 0
        dut.addr.value = dut.wdata.value = 0

    async def write(self, pairs):
        dut = self.dut
        for a, w in pairs:
            dut.addr.value, dut.wdata.value, dut.we.value = a, w, 1
            await FallingEdge(dut.clk)
        dut.we.value = 0

    async def read(self, addresses):
        """One read per cycle; each word comes with ``rvalid`` exactly 3 cycles after its
        ``re``."""
        dut, out, issued = self.dut, [], []
        cycle = 0
        while len(out) < len(addresses):
            if len(issued) < len(addresses):
                dut.addr.value, dut.re.value = addresses[len(issued)], 1
                issued.append(cycle)
            else:
                dut.re.value = 0
            await RisingEdge(dut.clk)
            await ReadOnly()
            if int(dut.rvalid.value):
                # seen after the rising edge READ_LATENCY edges from the one that took re
                assert cycle - issued[len(out)] == READ_LATENCY - 1
                out.append(int(dut.rdata.value))
            await FallingEdge(dut.clk)
            cycle += 1
        dut.re.value = 0
        return out

    async def reg(self, r):
        return (await self.read([address(Region.REGS, r, CFG)]))[0]

    async def run(self, entry=0, timeout=50_000_000):
        """Start at ``entry``, wait until the program stops; returns the status word."""
        await self.write([(address(Region.REGS, Regs.CONTROL, CFG), Control.START | entry << 16)])
        for _ in range(timeout // POLL):
            # a timer, not ClockCycles: no Python on every clock edge while it runs
            await Timer(POLL * 10, unit="ns")
            await FallingEdge(self.dut.clk)
            status = await self.reg(Regs.STATUS)
            if not status & Status.RUNNING:
                return status
        raise AssertionError("the program never stopped")

    async def counters(self):
        names = [r for r in Regs if r >= Regs.INDEX]
        values = await self.read([address(Region.REGS, r, CFG) for r in names])
        return {r.name.lower(): v for r, v in zip(names, values)}


def writes(program, images):
    """(address, word) pairs: the program at word 0 of PROGRAM, then every image."""
    return image_writes({Region.PROGRAM: [(0, program.words)], **images})


def report(key, value):
    report_json("SKIPTUNE_TOP_REPORT", key, value)


def workload():
    from host.datasets import load_workload
    from host.models import load_base_model
    return load_base_model("digits"), load_workload("digits", "rotate:30")


def finetune_order(n, sched):
    from sim.finetune import batch_order
    return np.concatenate(batch_order(n, sched.batch, sched.seed))


async def check_last_forward(port, model, program, x_last):
    """The activation buffer and the logits after the run hold the last sample's frozen
    forward pass, every layer's input where the program placed it."""
    from firmware.layers import from_words, unpack_activations
    from firmware.memmap import chunk_bits
    C = CFG.array_cols
    xq = fixed_model.quantize_input(model, x_last[None], CFG)
    base, xs = fixed_model.frozen_forward(model, xq, CFG)
    for l, plan in enumerate(program.plans):
        n, base_w = plan.in_words, plan.fields["in_base"]
        cb = chunk_bits(Region.ACT, CFG)
        words = []
        for w in range(base_w, base_w + n):
            chunks = await port.read([address(Region.ACT, w, CFG, k) for k in range(1 << cb)])
            words.append(sum(c << (32 * k) for k, c in enumerate(chunks)))
        got = unpack_activations(from_words(words, C, 8), plan.geometry, C).reshape(-1)
        np.testing.assert_array_equal(got, xs[l][0], err_msg=f"x_{l}")
    cb = chunk_bits(Region.LOGITS, CFG)
    words = []
    for w in range(-(-model.classes // C)):
        chunks = await port.read([address(Region.LOGITS, w, CFG, k) for k in range(1 << cb)])
        words.append(sum(c << (32 * k) for k, c in enumerate(chunks)))
    got = from_words(words, C, 16).reshape(-1)[:model.classes]
    np.testing.assert_array_equal(got, base[0], err_msg="logits")


@cocotb.test()
async def digits_finetune_and_infer(dut):
    await start(dut)
    port = Port(dut)
    assert await port.reg(Regs.ID) == 0x534B5431
    assert await port.reg(Regs.CONFIG_HASH) == CFG.hash
    model, wl = workload()
    x, y = wl.target_train.x, np.asarray(wl.target_train.y)
    masters = None
    for mode in MODES:
        sched = Schedule(epochs=EPOCHS, cache=mode != "off",
                         cache_bits=4 if mode == "on4" else 8)
        program = compile_finetune(model, sched, CFG, len(y))
        t0 = time.perf_counter()
        await port.write(writes(program, finetune_images(model, x, y, sched, CFG)))
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        status = await port.run()
        t_run = time.perf_counter() - t0
        assert status & Status.DONE and not status & Status.ERROR, f"status {status:#x}"
        if not sched.cache:
            await check_last_forward(port, model, program, x[finetune_order(len(y), sched)[-1]])
        n_words = adapter_count(model, sched.rank, CFG)
        words = await port.read([address(Region.ADAPTERS, i, CFG) for i in range(n_words)])
        got = read_masters(words, model, sched.rank, CFG)
        ref = finetune_fixed(model, x, y, sched, CFG)
        for (ga, gb), (ra, rb) in zip(got, ref.masters):
            np.testing.assert_array_equal(ga, ra)
            np.testing.assert_array_equal(gb, rb)
        counters = await port.counters()
        batches = -(-len(y) // sched.batch)
        assert counters["updates"] == EPOCHS * batches
        assert counters["samples"] == EPOCHS * len(y)
        if sched.cache:
            assert (counters["cache_hits"], counters["cache_misses"]) == (ref.cache_hits, ref.cache_misses)
        report(f"finetune_{mode}", {"epochs": EPOCHS, "sha256": adapters_sha256(got),
                                    "load_s": t_load, "run_s": t_run, **counters})
        dut._log.info(f"cache {mode}: {counters['cycles']} cycles "
                      f"(frozen {counters['cycles_frozen']}, cached {counters['cycles_cached']}), "
                      f"run {t_run:.1f} s")
        masters = got

    # inference with the fine-tuned adapters still in the device
    xt, yt = wl.target_test.x[:INFER], np.asarray(wl.target_test.y[:INFER])
    program = compile_infer(model, CFG, len(yt))
    await port.write(writes(program, infer_images(model, xt, yt, CFG)))
    status = await port.run()
    assert status & Status.DONE and not status & Status.ERROR, f"status {status:#x}"
    results = await port.read([address(Region.RESULTS, i, CFG) for i in range(len(yt))])
    xq = fixed_model.quantize_input(model, xt, CFG)
    base, xs = fixed_model.frozen_forward(model, xq, CFG)
    z, _ = fixed_model.adapter_forward(model, xs, base, masters, CFG)
    pred = fixed_model.argmax(z)
    np.testing.assert_array_equal([r & 0xFF for r in results], pred)
    np.testing.assert_array_equal([r >> 8 for r in results], (pred == yt).astype(int))
    counters = await port.counters()
    assert counters["correct"] == int((pred == yt).sum()) and counters["samples"] == len(yt)
    report("infer", {"samples": len(yt), **counters})
    assert Error(await port.reg(Regs.STATUS) >> 8 & 0xFF) == Error.NONE

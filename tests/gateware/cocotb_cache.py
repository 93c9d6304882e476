"""cocotb tests of the activation-cache controller (Verilator, Icarus): the operations and
the golden answers of tests/gateware/test_cache.py (`ref_run`), replayed on the Verilog
with random bubbles and stalls on every stream; read beats and counters compared with ==.

Run from pytest: tests/gateware/test_cache.py::test_cocotb."""

import cocotb
from cocotb.triggers import FallingEdge, RisingEdge

from gateware.cache import setup_layout
from gateware.layouts import fill_layout, read_layout, request_layout
from tests.gateware.streams import StreamSink, StreamSource, config_from_env, pack, start
from tests.gateware.test_cache import (INDICES, epoch_ops, fill_beats, invalidate_ops,
                                       real_samples, ref_run, setup_value, split_packets,
                                       synthetic)

CFG = config_from_env()


def _tuple(beat):
    return (beat["data"], beat["logit"], beat["hit"], beat["first"], beat["last"])


async def _strobe(dut, signal):
    signal.value = 1
    await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    signal.value = 0


async def rtl_run(dut, model, bits, acts, base, ops, total_beats, seed, idle=0.3, stall=0.3):
    """Replay ``ops`` on the DUT; returns the read packets and the counters."""
    dut.invalidate.value = 0
    dut.clear_counters.value = 0
    dut.setup.value = pack(setup_layout(CFG), setup_value(CFG, model, bits))
    await start(dut)
    fill = StreamSource(dut, "fill", fill_layout(CFG), idle=idle, seed=seed)
    req = StreamSource(dut, "req", request_layout(CFG), idle=idle, seed=seed + 1)
    sink = StreamSink(dut, "read", read_layout(CFG), stall=stall, seed=seed + 2)
    collecting = cocotb.start_soon(sink.collect(total_beats, timeout=200_000))

    async def delivered(n):
        while sum(b["last"] for b in sink.beats) < n:
            await FallingEdge(dut.clk)

    sent, pending = 0, set()
    for op in ops:
        if op[0] == "fill":
            _, i, j = op
            if i in pending:
                await delivered(sent)
                pending.clear()
            await fill.send(fill_beats(i, acts[j], base[j]))
        elif op[0] == "req":
            await req.send([{"index": op[1], "count": op[2]}])
            sent += 1
            pending.add(op[1])
        elif op[0] == "invalidate":
            await _strobe(dut, dut.invalidate)
        else:
            await _strobe(dut, dut.clear_counters)
    await collecting
    while int(dut.busy.value):
        await FallingEdge(dut.clk)
    return (split_packets([_tuple(b) for b in sink.beats]),
            int(dut.hits.value), int(dut.misses.value), int(dut.fill_error.value))


async def check(dut, model, bits, acts, base, ops, seed):
    ref = ref_run(CFG, model, bits, acts, base, ops)
    total = sum(len(p) for p in ref["packets"])
    packets, hits, misses, error = await rtl_run(dut, model, bits, acts, base, ops, total, seed)
    assert len(packets) == len(ref["packets"])
    for k, (got, want) in enumerate(zip(packets, ref["packets"])):
        assert got == want, f"read packet {k} differs"
    assert (hits, misses) == (ref["hits"], ref["misses"])
    assert error == 0


@cocotb.test()
@cocotb.parametrize(workload=["digits", "fan"], bits=[8, 4])
async def act_cache_real(dut, workload, bits):
    """Three epochs of the fine-tune pattern on real activations, past the capacity."""
    model, acts, base = real_samples(workload)
    await check(dut, model, bits, acts, base,
                epoch_ops(model, CFG, INDICES, epochs=3, seed=bits), seed=bits)


@cocotb.test()
@cocotb.parametrize(bits=[8, 4])
async def act_cache_codes(dut, bits):
    """Eight layers, every shift and sign, full-range activations and logits."""
    model, acts, base = synthetic(seed=bits)
    ops = [("fill", i, i) for i in range(8)] + [("req", i, 1) for i in range(8)]
    await check(dut, model, bits, acts, base, ops, seed=3)


@cocotb.test()
async def act_cache_invalidate(dut):
    """Counting and non-counting lookups, clear, invalidate, refill."""
    model, acts, base = real_samples("digits")
    await check(dut, model, 4, acts, base, invalidate_ops(), seed=5)

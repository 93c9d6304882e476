"""The host link: UartRx/UartTx (gateware/uart.py) and the LinkController
(gateware/link.py) in Amaranth's simulator, the controller against a fake host port
served from a Python dict; then the whole Device (gateware/device.py) at its pins on
Verilator (tests/gateware/cocotb_link.py)."""

import random

import pytest
from amaranth import Module
from amaranth.lib import wiring
from amaranth.sim import Simulator

from gateware.config import DEFAULT
from gateware.uart import UartRx, UartTx, baud_error, divisor_for
from tests.gateware.amaranth_streams import stream_source


def simulate(dut, *benches, background=()):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    for bench in background:
        sim.add_testbench(bench, background=True)
    for bench in benches:
        sim.add_testbench(bench)
    sim.run()


def collect(stream, out, count, timeout):
    """An async testbench taking ``count`` beats of ``stream`` into ``out``."""

    async def sink(ctx):
        ctx.set(stream.ready, 1)
        for _ in range(timeout):
            if len(out) >= count:
                return
            await ctx.tick()
            if ctx.get(stream.valid):
                out.append(ctx.get(stream.payload))
        raise AssertionError(f"timeout: {len(out)} of {count} beats")

    return sink


def uart_bits(byte, stop=1):
    return [0] + [(byte >> i) & 1 for i in range(8)] + [stop]


def drive_pin(pin, frames, divisor, jitter=0, rng=None, gap=0):
    """An async testbench that drives ``pin`` with each (byte, stop bit) of ``frames``;
    every bit edge moves by up to ``jitter`` cycles (the start bit's edge is the
    reference), ``gap`` idle cycles after each byte."""

    async def drive(ctx):
        ctx.set(pin, 1)
        await ctx.tick().repeat(3)
        for byte, stop in frames:
            ends = [divisor * (k + 1) + (rng.randint(-jitter, jitter) if jitter else 0)
                    for k in range(9)] + [10 * divisor, 10 * divisor + gap]
            t = 0
            for bit, end in zip(uart_bits(byte, stop) + [1], ends):
                ctx.set(pin, bit)
                if end > t:
                    await ctx.tick().repeat(end - t)
                t = end
        await ctx.tick().repeat(2 * divisor)     # the last byte's stop bit is sampled late

    return drive


def test_divisor_for_default():
    assert divisor_for(DEFAULT) == 33
    assert baud_error(DEFAULT, 33) == pytest.approx(0.0101, abs=1e-4)
    with pytest.raises(ValueError):
        divisor_for(DEFAULT.replace(baud=12_000_000))       # 8 cycles per bit: 4.2 % off
    with pytest.raises(ValueError):
        divisor_for(DEFAULT.replace(clock_hz=10_000_000))   # 3.33 cycles per bit


class Loopback(wiring.Component):
    def __init__(self, divisor):
        self.utx, self.urx = UartTx(divisor), UartRx(divisor)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx, m.submodules.rx = self.utx, self.urx
        m.d.comb += self.urx.rx.eq(self.utx.tx)
        return m


@pytest.mark.parametrize("divisor", [4, 33])
def test_uart_loopback(divisor):
    rng = random.Random(divisor)
    data = [rng.randrange(256) for _ in range(60 if divisor == 4 else 20)]
    dut = Loopback(divisor)
    got = []
    simulate(dut, collect(dut.urx.data, got, len(data), 12 * divisor * len(data) + 100),
             background=[stream_source(dut.utx.data, data)])
    assert got == data


def test_uart_tx_back_to_back_timing():
    """Bytes always available go out at exactly 10 bits each with no idle between."""
    d = 5
    dut = UartTx(d)
    data = [0x00, 0xFF, 0x5A]
    line = []

    async def watch(ctx):
        for _ in range(10 * d * len(data) + 3):
            await ctx.tick()
            line.append(ctx.get(dut.tx))

    simulate(dut, watch, background=[stream_source(dut.data, data)])
    start = line.index(0)
    bits = [line[start + k * d + d // 2] for k in range(10 * len(data))]
    assert bits == sum((uart_bits(b) for b in data), [])
    assert all(line[start + k * d + j] == line[start + k * d] for k in range(30) for j in range(d))


def test_uart_rx_drops_bad_stop_bit():
    d = 4
    dut = UartRx(d)
    got = []
    frames = [(0x31, 1), (0x42, 0), (0x53, 1)]
    simulate(dut, drive_pin(dut.rx, frames, d, gap=2 * d),
             background=[collect(dut.data, got, 3, 10_000)])
    assert got == [0x31, 0x53]


@pytest.mark.parametrize("divisor", [4, 7])
def test_uart_rx_jitter(divisor):
    rng = random.Random(7)
    data = [rng.randrange(256) for _ in range(40)]
    dut = UartRx(divisor)
    got = []
    simulate(dut, drive_pin(dut.rx, [(b, 1) for b in data], divisor, jitter=1, rng=rng),
             background=[collect(dut.data, got, len(data), 100_000)])
    assert got == data

"""cocotb-side helpers shared by the gateware tests: clock and reset, packing of
`amaranth.lib.data` payloads into the flat Verilog ports Amaranth emits, and stream
drivers and monitors with seeded random stalls.

Inputs are driven on the falling edge and a handshake is sampled after `ReadOnly()` in
that same time step, i.e. as the next rising edge will see it, which is what both
Verilator and Icarus agree on."""

import json
import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, ReadOnly, RisingEdge
from amaranth.hdl import Shape
from amaranth.lib import data

from gateware.config import AccelConfig


def config_from_env():
    """The AccelConfig under test, passed by the pytest driver as JSON in SKIPTUNE_CFG."""
    text = os.environ.get("SKIPTUNE_CFG")
    return AccelConfig(**json.loads(text)) if text else AccelConfig()


def env_int(name, default):
    return int(os.environ.get(name, default))


async def start(dut, cycles=2):
    """Start a 10 ns clock on `clk`, hold `rst` for ``cycles`` and release it on a falling
    edge, so the test continues at a falling edge."""
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    for _ in range(cycles):
        await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


class CycleCounter:
    """Counts rising edges of ``dut.clk`` between `start` and `stop`."""

    def __init__(self, dut):
        self.clk = dut.clk
        self.n = 0
        self._task = None

    def start(self):
        async def run():
            while True:
                await RisingEdge(self.clk)
                self.n += 1

        self.n = 0
        self._task = cocotb.start_soon(run())
        return self

    def stop(self):
        self._task.cancel()
        return self.n


def _width(shape):
    return shape.size if isinstance(shape, data.Layout) else Shape.cast(shape).width


def _flatten(layout, value, offset, out):
    if isinstance(layout, data.StructLayout):
        for name, field in layout:
            _flatten(field.shape, value[name], offset + field.offset, out)
    elif isinstance(layout, data.ArrayLayout):
        for i in range(layout.length):
            _flatten(layout.elem_shape, value[i], offset + i * _width(layout.elem_shape), out)
    else:
        out.append((offset, _width(layout), int(value)))


def pack(layout, value):
    """A nested dict/list payload -> the int on the Verilog port."""
    fields = []
    _flatten(data.Layout.cast(layout), value, 0, fields)
    word = 0
    for offset, width, v in fields:
        word |= (v & ((1 << width) - 1)) << offset
    return word


def _unflatten(layout, word, offset):
    if isinstance(layout, data.StructLayout):
        return {name: _unflatten(field.shape, word, offset + field.offset) for name, field in layout}
    if isinstance(layout, data.ArrayLayout):
        elem = layout.elem_shape
        return [_unflatten(elem, word, offset + i * _width(elem)) for i in range(layout.length)]
    shape = Shape.cast(layout)
    v = (word >> offset) & ((1 << shape.width) - 1)
    if shape.signed and v >> (shape.width - 1):
        v -= 1 << shape.width
    return v


def unpack(layout, word):
    """The int on a Verilog port -> nested dict/list (signed fields sign-extended)."""
    layout = data.Layout.cast(layout)
    return _unflatten(layout, int(word), 0)


class _Port:
    """The valid/ready/payload signals of the stream port ``prefix`` of ``dut``."""

    def __init__(self, dut, prefix, layout, seed):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.layout = layout
        self.clk = dut.clk
        self.rng = random.Random(seed)


class StreamSource(_Port):
    """Drives an `amaranth.lib.stream` sink port named ``prefix`` (``<prefix>__valid``,
    ``__ready``, ``__payload``). ``idle`` is the probability of a bubble per beat."""

    def __init__(self, dut, prefix, layout, idle=0.0, seed=0):
        super().__init__(dut, prefix, layout, seed)
        self.idle = idle
        self.valid.value = 0

    async def send(self, beats):
        """Send every payload (dicts) in order; returns at a falling edge."""
        for beat in beats:
            while self.idle and self.rng.random() < self.idle:
                self.valid.value = 0
                await RisingEdge(self.clk)
                await FallingEdge(self.clk)
            self.valid.value = 1
            self.payload.value = pack(self.layout, beat)
            while True:
                await ReadOnly()
                accepted = int(self.ready.value)
                await RisingEdge(self.clk)
                await FallingEdge(self.clk)
                if accepted:
                    break
        self.valid.value = 0


class StreamSink(_Port):
    """Accepts from a stream source port named ``prefix``; ``stall`` is the probability
    that ready is low in a cycle. Collected payloads are in ``beats``."""

    def __init__(self, dut, prefix, layout, stall=0.0, seed=1):
        super().__init__(dut, prefix, layout, seed)
        self.stall = stall
        self.beats = []
        self.ready.value = 0

    async def collect(self, count, timeout=1_000_000):
        """Accept ``count`` beats (or fail after ``timeout`` cycles); returns them."""
        start = len(self.beats)
        for _ in range(timeout):
            self.ready.value = int(not (self.stall and self.rng.random() < self.stall))
            await ReadOnly()
            if int(self.valid.value) and int(self.ready.value):
                self.beats.append(unpack(self.layout, self.payload.value))
            await RisingEdge(self.clk)
            await FallingEdge(self.clk)
            if len(self.beats) - start >= count:
                self.ready.value = 0
                return self.beats[start:]
        raise AssertionError(f"timeout: {len(self.beats) - start} of {count} beats after {timeout} cycles")


def report_json(env_name, key, value):
    """Merge ``{key: value}`` into the JSON file named by the environment variable
    ``env_name`` (nothing if it is unset): how a cocotb test hands figures to pytest."""
    path = os.environ.get(env_name)
    if not path:
        return
    data = json.load(open(path)) if os.path.exists(path) else {}
    data[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1)

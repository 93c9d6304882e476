"""SkidBuffer: the beats in order, none lost or doubled, a stalled beat held, and one beat
per cycle when nothing stalls (Amaranth's simulator)."""

import random

import pytest
from amaranth.sim import Simulator

from gateware.skid import SkidBuffer

from .amaranth_streams import stream_source


def run(beats, idle, stall, seed):
    """Send ``beats`` through a SkidBuffer, the source idle and the sink not ready with the
    given probabilities; returns the beats received, the cycle of each, and whether busy
    was ever low while a beat was inside."""
    dut = SkidBuffer(16)
    rng = random.Random(seed)
    got, when = [], []
    inside = [0, 0]                  # accepted, delivered
    busy_wrong = []

    async def sink(ctx):
        cycle = 0
        held = None
        while len(got) < len(beats) and cycle < 20 * len(beats):
            ready = not (stall and rng.random() < stall)
            ctx.set(dut.o.ready, ready)
            _, _, i_valid, i_ready, valid, payload, busy = await ctx.tick().sample(
                dut.i.valid, dut.i.ready, dut.o.valid, dut.o.payload, dut.busy)
            cycle += 1
            if held is not None:             # a beat offered and not taken stays as it was
                assert valid and payload == held, cycle
            if (inside[0] > inside[1]) != bool(busy):
                busy_wrong.append(cycle)
            inside[0] += bool(i_valid and i_ready)
            if valid and ready:
                got.append(payload)
                when.append(cycle)
                inside[1] += 1
                held = None
            else:
                held = payload if valid else None

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(stream_source(dut.i, beats, idle, rng), background=True)
    sim.add_testbench(sink)
    sim.run()
    return got, when, busy_wrong


@pytest.mark.parametrize("idle, stall, seed", [(0.0, 0.0, 0), (0.3, 0.0, 1), (0.0, 0.5, 2),
                                               (0.4, 0.6, 3), (0.1, 0.9, 4)])
def test_skid_keeps_every_beat_in_order(idle, stall, seed):
    beats = [random.Random(seed).randrange(1 << 16) for _ in range(300)]
    got, _, busy_wrong = run(beats, idle, stall, seed)
    assert got == beats
    assert busy_wrong == []


def test_skid_full_rate():
    got, when, _ = run(list(range(100)), 0.0, 0.0, 0)
    assert got == list(range(100))
    # one cycle in, then one beat per cycle
    assert when == list(range(when[0], when[0] + 100))

"""SegmentedRAM (gateware/segmented.py) in Amaranth's simulator against a Python list:
random writes and one read per cycle, each read's word three cycles later (`LATENCY`), across the
segments' boundaries; a write and a read of one word in a cycle read the old word."""

import random

import pytest
from amaranth.sim import Simulator

from gateware.segmented import SegmentedRAM, segment_words


def test_segment_words():
    # eight DP16KD: 16384 x 1 each for bytes, 4096 x 4 for 32-bit words
    assert segment_words(8) == 16384 and segment_words(32) == 4096
    assert segment_words(1) == 16384 and segment_words(36) == 2048


@pytest.mark.parametrize("width,depth", [(32, 2 * 4096 + 300), (8, 1000)])
def test_reads_follow_writes(width, depth):
    rng = random.Random(depth)
    init = [rng.getrandbits(width) for _ in range(depth)]
    dut = SegmentedRAM(width, depth, init=init)
    n_seg = -(-depth // segment_words(width))
    assert len(dut.segments) == n_seg
    assert dut.LATENCY == 3
    model = list(init)
    # addresses near the segments' edges and anywhere
    edges = [g * segment_words(width) + d for g in range(n_seg) for d in (-1, 0, 1)]
    edges = [a for a in edges if 0 <= a < depth]
    mismatches = []

    async def bench(ctx):
        pending = []                            # (address, expected word) of each read
        for cycle in range(3000):
            a = rng.choice(edges) if rng.random() < 0.5 else rng.randrange(depth)
            ctx.set(dut.r_addr, a)
            write = rng.random() < 0.3
            wa = a if rng.random() < 0.3 else rng.randrange(depth)
            wd = rng.getrandbits(width)
            ctx.set(dut.w_en, write)
            ctx.set(dut.w_addr, wa)
            ctx.set(dut.w_data, wd)
            pending.append((a, model[a]))       # the old word, even if written now
            if write:
                model[wa] = wd
            await ctx.tick()
            if len(pending) == 3:
                # the cycle after the tick shows the word of the address two ticks older
                want_a, want = pending.pop(0)
                got = ctx.get(dut.r_data)
                if got != want:
                    mismatches.append((cycle, want_a, want, got))

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert mismatches == []

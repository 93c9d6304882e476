"""Deep block RAM whose read passes a register before any multiplexer.

An ECP5 DP16KD without its output register takes about 6 ns from clock to data (yosys's
mapping does not use the register). A memory deeper than one block's mode is a cascade
with a multiplexer behind the outputs, and that multiplexer plus the route to its user
leaves no 10 ns cycle: a 68-block cascade ran at 41-48 MHz, a 56-block sample memory
into a register at 76 MHz. Here the memory is cut into segments of eight DP16KD side by
side (each in its 1, 2, 4 ... bit mode, so no segment needs a multiplexer), each
segment's word is registered twice, and only then is one chosen.

Why twice: the first register becomes the DP16KD's own output register
(`platforms.outreg`), and yosys keeps a LUT after the block RAM (its bypass that makes a
read in the cycle of a write to the same word give the old word), which then lies after
that register. On the 85F the route from a segment's blocks to that LUT took 5.5 ns, and
with the multiplexer and the user's logic behind it this was the worst path (16.2 ns);
the second register ends the path at the LUT.
"""

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory, MemoryData
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .ram import read_register

__all__ = ["SegmentedRAM", "segment_words"]

SEGMENT_BITS = 8 * 16384        # eight DP16KD of 16 Kbit


def segment_words(width):
    """Words of a segment: eight DP16KD hold ``width``-bit words to this depth in their
    ``16384 / 2**k`` x ``2**k`` modes (a power of two, at most 16384)."""
    words = 16384
    while words * width > SEGMENT_BITS and words > 1:
        words //= 2
    return words


class SegmentedRAM(wiring.Component):
    """``depth`` words of ``width`` bits in segments of `segment_words` with registered
    outputs.

    Members
    -------
    w_addr, w_data, w_en : In
        Write ``w_data`` at ``w_addr`` in the cycle ``w_en`` is high.
    r_addr : In
        Read address; no enable, a read every cycle.
    r_data : Out(width)
        The word at the ``r_addr`` of `LATENCY` = 3 cycles before (cycle 1: the block
        RAM; cycles 2 and 3: the segment registers, then a multiplexer by the registered
        segment number). A write and a read of the same word in one cycle read the old
        word.

    Attributes
    ----------
    segments : tuple of MemoryData
        Word ``a`` is ``segments[a // n][a % n]`` (`location`), for testbenches; ``init``
        (optional) is split among them.
    """

    LATENCY = 3

    def __init__(self, width, depth, init=()):
        self._seg = segment_words(width)
        init = list(init)
        self.segments = tuple(
            MemoryData(shape=width, depth=min(self._seg, depth - base),
                       init=init[base:base + self._seg])
            for base in range(0, depth, self._seg))
        super().__init__({
            "w_addr": In(range(depth)),
            "w_data": In(width),
            "w_en":   In(1),
            "r_addr": In(range(depth)),
            "r_data": Out(width),
        })

    def location(self, addr):
        return self.segments[addr // self._seg], addr % self._seg

    def elaborate(self, platform):
        m = Module()
        n = len(self.segments)
        low = ceil_log2(self._seg) if n > 1 else len(self.w_addr)
        q = []
        for g, seg in enumerate(self.segments):
            mem = m.submodules[f"seg{g}"] = Memory(data=seg)
            wp, rp = mem.write_port(), mem.read_port()
            q1 = read_register(m, rp, f"seg{g}_q1")
            q.append(Signal(seg.shape, name=f"seg{g}_q2", reset_less=True))
            m.d.comb += [
                wp.addr.eq(self.w_addr[:low]),
                wp.data.eq(self.w_data),
                wp.en.eq(self.w_en & (self.w_addr[low:] == g)),
                rp.addr.eq(self.r_addr[:low]),
            ]
            m.d.sync += q[g].eq(q1)
        if n == 1:
            m.d.comb += self.r_data.eq(q[0])
        else:
            # the segment number follows the word through the same registers
            sel = [Signal(range(n), name=f"sel{k}", reset_less=True) for k in range(self.LATENCY)]
            m.d.sync += [sel[0].eq(self.r_addr[low:])]
            m.d.sync += [b.eq(a) for a, b in zip(sel, sel[1:])]
            with m.Switch(sel[-1]):
                for g in range(n):
                    with m.Case(g):
                        m.d.comb += self.r_data.eq(q[g])
        return m

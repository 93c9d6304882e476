"""A register slice for a `lib.stream`: it cuts every combinational path through a
handshake (valid and payload forward, ready backward) at full throughput.
"""

from amaranth import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["SkidBuffer"]


class SkidBuffer(wiring.Component):
    """Two registers between a producer and a consumer.

    Members
    -------
    i : In(stream.Signature(shape))
        From the producer. ``i.ready`` is a register: low only while the skid register
        holds a beat.
    o : Out(stream.Signature(shape))
        To the consumer. ``o.valid`` and ``o.payload`` are registers.
    busy : Out(1)
        A beat is inside (for the busy flags of the units around it).

    Timing: a beat accepted on ``i`` is offered on ``o`` the next cycle; one beat per
    cycle passes while ``o.ready`` stays high. When ``o`` stalls, the beat accepted in
    that cycle waits in the skid register, and ``i`` is not ready until it has moved on.
    """

    def __init__(self, shape):
        super().__init__({"i": In(stream.Signature(shape)), "o": Out(stream.Signature(shape)),
                          "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        i, o = self.i, self.o
        skid = Signal.like(i.payload)
        skid_valid = Signal()
        # the skid register fills only behind a stalled beat on o: o.valid covers both
        m.d.comb += [i.ready.eq(~skid_valid), self.busy.eq(o.valid)]
        with m.If(~o.valid | o.ready):
            with m.If(skid_valid):
                m.d.sync += [o.payload.eq(skid), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [o.valid.eq(i.valid), o.payload.eq(i.payload)]
        with m.Elif(i.valid & i.ready):
            m.d.sync += [skid.eq(i.payload), skid_valid.eq(1)]
        return m

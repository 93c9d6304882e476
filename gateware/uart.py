"""8N1 UART receiver and transmitter with byte streams, for the host link.

# Ref: docs/protocol.md (3 Mbaud, 8 data bits, no parity, 1 stop bit).

Both take ``divisor``, the clock cycles per bit (at least 4, so that the receiver has a
middle to aim for and a cycle of margin either side of it).
"""

from amaranth import Cat, Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

from .config import AccelConfig

__all__ = ["UartRx", "UartTx", "divisor_for", "baud_error", "MAX_BAUD_ERROR"]

MAX_BAUD_ERROR = 0.02       # a 10-bit frame drifts 10x this by its stop bit: under half a bit


def baud_error(cfg, divisor):
    """The relative error of the baud rate that ``divisor`` gives at ``cfg.clock_hz``."""
    return abs(cfg.clock_hz / divisor - cfg.baud) / cfg.baud


def divisor_for(cfg):
    """Clock cycles per bit for ``cfg``'s clock and baud rate: round(clock_hz / baud).
    Raises ValueError when that is under 4 or misses the baud rate by 2 % or more (100 MHz
    / 3 Mbaud: 33, 1.0 % fast)."""
    if not isinstance(cfg, AccelConfig):
        raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
    divisor = round(cfg.clock_hz / cfg.baud)
    if divisor < 4:
        raise ValueError(f"{cfg.clock_hz} Hz is too slow a clock for {cfg.baud} baud")
    if baud_error(cfg, divisor) >= MAX_BAUD_ERROR:
        raise ValueError(f"divisor {divisor} misses {cfg.baud} baud by "
                         f"{100 * baud_error(cfg, divisor):.1f} % at {cfg.clock_hz} Hz")
    return divisor


def _check_divisor(divisor):
    if not isinstance(divisor, int) or divisor < 4:
        raise ValueError(f"divisor must be an integer of at least 4, not {divisor!r}")
    return divisor


class UartRx(wiring.Component):
    """8N1 receiver.

    Members
    -------
    rx : In(1), idle high
        The pin. It is synchronized with two flip-flops first (it comes from another
        clock domain), so every decision below lags the pin by two cycles.
    data : Out(stream.Signature(8))
        One beat per received byte, held until taken. A UART cannot wait: a byte that
        completes while the previous one is still not taken replaces it (overrun).

    Timing: a falling edge starts a byte; the start bit is checked ``divisor // 2``
    cycles later (still low, or it was a glitch and is ignored), and every data bit and
    the stop bit is sampled ``divisor`` cycles after the previous sample, i.e. in its
    middle. The byte is valid the cycle after its stop bit's middle (2 + 9.5 bit times
    after the start bit's edge on the pin). A low stop bit (framing error, or a break)
    drops the byte, and the receiver waits for the line to go high before it looks for
    the next start bit, so it cannot take the rest of a break for one.
    """

    def __init__(self, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__({"rx": In(1, init=1), "data": Out(stream.Signature(8))})

    def elaborate(self, platform):
        d = self._divisor
        m = Module()
        pin = Signal(init=1)
        m.submodules.sync = FFSynchronizer(self.rx, pin, init=1)

        timer = Signal(range(d))
        bit = Signal(range(8))
        shift = Signal(8)
        tick = timer == 0
        with m.If(~tick):
            m.d.sync += timer.eq(timer - 1)

        with m.If(self.data.ready):
            m.d.sync += self.data.valid.eq(0)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(~pin):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(tick):
                    m.d.sync += [timer.eq(d - 1), bit.eq(0)]
                    m.next = "DATA"
                    with m.If(pin):             # high again in the middle: a glitch
                        m.next = "IDLE"
            with m.State("DATA"):
                with m.If(tick):
                    m.d.sync += [timer.eq(d - 1), shift.eq(Cat(shift[1:], pin)), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(tick):
                    with m.If(pin):
                        m.d.sync += [self.data.payload.eq(shift), self.data.valid.eq(1)]
                        # back to IDLE at the stop bit's middle: half a bit of slack for
                        # a sender whose clock is a little faster than ours
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "BREAK"
            with m.State("BREAK"):
                with m.If(pin):
                    m.next = "IDLE"
        return m


class UartTx(wiring.Component):
    """8N1 transmitter.

    Members
    -------
    data : In(stream.Signature(8))
        Bytes to send; ``ready`` is high while the transmitter can take the next one.
    tx : Out(1), idle high
        The pin, straight from a flip-flop (no glitches).

    Timing: the start bit begins the cycle after a byte is taken and every bit lasts
    exactly ``divisor`` cycles. ``ready`` rises in the last cycle of the stop bit, so a
    stream that always has the next byte sends back to back, 10 * ``divisor`` cycles per
    byte with no idle time between bytes.
    """

    def __init__(self, divisor):
        self._divisor = _check_divisor(divisor)
        super().__init__({"data": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        d = self._divisor
        m = Module()
        shift = Signal(10, init=0x3FF)      # ones shift in behind the stop bit: idle high
        timer = Signal(range(d))
        left = Signal(range(11))            # bits still to finish, the current one included
        last_cycle = (left == 1) & (timer == 0)

        m.d.comb += [self.tx.eq(shift[0]), self.data.ready.eq((left == 0) | last_cycle)]
        with m.If(self.data.valid & self.data.ready):
            m.d.sync += [shift.eq(Cat(0, self.data.payload, 1)), timer.eq(d - 1), left.eq(10)]
        with m.Elif(left != 0):
            with m.If(timer == 0):
                m.d.sync += [shift.eq(Cat(shift[1:], 1)), timer.eq(d - 1), left.eq(left - 1)]
            with m.Else():
                m.d.sync += timer.eq(timer - 1)
        return m

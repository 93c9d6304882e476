"""The whole device at its pins: the accelerator behind the UART host link. The FPGA
build and the Verilator-built simulated board both instantiate `Device`.

# Ref: docs/protocol.md (the link); gateware/top.py (the accelerator and its host port).
"""

from amaranth import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .config import DEFAULT, AccelConfig
from .link import LinkController, timeout_cycles
from .top import Accelerator, host_port
from .uart import UartRx, UartTx, divisor_for

__all__ = ["Device", "SIM_DIVISOR"]

SIM_DIVISOR = 4         # the simulated board's UART: 4 clock cycles per bit


class Device(wiring.Component):
    """`Accelerator` + `UartRx` -> `LinkController` -> `UartTx`.

    Members
    -------
    rx : In(1), idle high
        UART from the host (8N1, ``divisor`` clock cycles per bit).
    tx : Out(1), idle high
        UART to the host.
    running, done, error : Out(1)
        The accelerator's status, for LEDs.

    ``divisor`` None takes `divisor_for(cfg)` (the board: 33 at 100 MHz and 3 Mbaud);
    the simulated board uses `SIM_DIVISOR`. The link's watchdog is WATCHDOG_BYTES byte
    times of this divisor.

    Timing: a byte takes 10 * ``divisor`` cycles each way. From the middle of a request's
    last stop bit on the rx pin, the response's start bit begins on the tx pin 7 cycles
    later (2 synchronizer flip-flops, the receiver's byte, the CRC check, the handoff, the
    header byte into the transmitter; a WRITE of n words adds n + 1), and the response
    then goes out with no idle time between its bytes. The host port between the link
    and the accelerator is registered both ways: a write lands one cycle after the link
    issues it, a read word reaches the link 3 cycles after its ``re``.
    """

    def __init__(self, cfg=DEFAULT, divisor=None):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        self._divisor = divisor_for(cfg) if divisor is None else divisor
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1),
                          "running": Out(1), "done": Out(1), "error": Out(1)})

    @property
    def divisor(self):
        return self._divisor

    def elaborate(self, platform):
        m = Module()
        m.submodules.accel = accel = Accelerator(self._cfg)
        m.submodules.uart_rx = uart_rx = UartRx(self._divisor)
        m.submodules.uart_tx = uart_tx = UartTx(self._divisor)
        m.submodules.link = link = LinkController(self._cfg, timeout_cycles(self._divisor))

        m.d.comb += [uart_rx.rx.eq(self.rx), self.tx.eq(uart_tx.tx),
                     link.running.eq(accel.running),
                     self.running.eq(accel.running), self.done.eq(accel.done),
                     self.error.eq(accel.error)]
        wiring.connect(m, uart_rx.data, link.rx)
        wiring.connect(m, link.tx, uart_tx.data)
        # the host port runs from the link to every unit and memory of the accelerator: a
        # register each way keeps the link's state machine and the accelerator's read
        # multiplexer out of each other's timing paths (a read answers 2 cycles later than
        # the accelerator's 3)
        for name, member in host_port().items():
            a, l = getattr(accel, name), getattr(link, name)
            m.d.sync += a.eq(l) if member.flow == In else l.eq(a)
        return m

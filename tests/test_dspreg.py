"""platforms/dspreg.py against yosys's own netlists of a small design with a multiply
registered each way: into a register with a synchronous reset, into a reset-less
register with an enable, into a register with both, through logic, and with the product
read by logic as well. Through YoWASP yosys's synth_ecp5:

- only the first two are folded, and the netlist stays whole;
- the folded netlist is the same circuit: both netlists, simulated side by side with
  Icarus (a MULT18X18D model of our own with its output register, and the fabric cells
  of tests/netlist_sim.py) on random inputs, give the same outputs every cycle;
- nextpnr places and routes the folded netlist, and times the multiply into the
  block's register instead of through it."""

import json
import random
import shutil

import pytest
from amaranth import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from platforms.dspreg import fold_multiplier_registers, main
from tests.netlist_sim import route, side_by_side, synth, undriven

WIDTH = 12                      # operands; one MULT18X18D each
KINDS = ("reset", "enable", "both", "logic", "shared")


class _Products(wiring.Component):
    """Operands ``a`` and ``b`` (each kind XORs in constants of its own) registered,
    then their product into a register, one multiplier per kind:

    - ``reset``: a register with the domain's (synchronous) reset, no enable;
    - ``enable``: a reset-less register loaded when ``ce`` is high;
    - ``both``: a register with the reset and the enable;
    - ``logic``: the product XORed with a constant into a register;
    - ``shared``: the product into a register and, through an XOR, out as ``tap``.
    """

    def __init__(self, kinds=KINDS):
        self._kinds = kinds
        super().__init__({"a": In(signed(WIDTH)), "b": In(signed(WIDTH)), "ce": In(1),
                          "tap": Out(2 * WIDTH),
                          **{f"q_{k}": Out(signed(2 * WIDTH)) for k in kinds}})

    def elaborate(self, platform):
        m = Module()
        for k, kind in enumerate(self._kinds):
            a = Signal(signed(WIDTH), name=f"{kind}_a")
            b = Signal(signed(WIDTH), name=f"{kind}_b")
            # operands of their own, or yosys shares one multiplier among the kinds
            m.d.sync += [a.eq(self.a ^ (k + 1)), b.eq(self.b ^ (k << 4))]
            p = Signal(signed(2 * WIDTH), name=f"{kind}_p", reset_less=kind == "enable")
            if kind in ("enable", "both"):
                with m.If(self.ce):
                    m.d.sync += p.eq(a * b)
            elif kind == "logic":
                m.d.sync += p.eq((a * b) ^ 0x5A5A5A)
            else:
                m.d.sync += p.eq(a * b)
            if kind == "shared":
                m.d.comb += self.tap.eq((a * b) ^ p)
            m.d.comb += getattr(self, f"q_{kind}").eq(p)
        return m


def _synth(d, kinds=KINDS):
    return synth(d, _Products(kinds))


def _multipliers(net):
    """{kind: its MULT18X18D cell}: yosys names each after the net its product first
    reaches (the output ``q_kind``, or ``tap`` for the shared one)."""
    cells = net["modules"]["top"]["cells"]
    found = {}
    for name, cell in cells.items():
        if cell["type"] == "MULT18X18D":
            (kind,) = [k for k in KINDS if name.startswith(f"q_{k}_")] or ["shared"] * name.startswith("tap_")
            found[kind] = cell
    return found


@pytest.fixture(scope="module")
def netlists(tmp_path_factory):
    """yosys's netlist, and a copy folded by the pass."""
    d = tmp_path_factory.mktemp("dspreg")
    plain = _synth(d)
    folded = json.loads(json.dumps(plain))
    summary = fold_multiplier_registers(folded)
    return d, plain, folded, summary


def test_only_registers_straight_after_the_product_are_folded(netlists):
    _, plain, folded, summary = netlists
    before, after = _multipliers(plain), _multipliers(folded)
    assert set(before) == set(KINDS)
    registered = {k for k, c in after.items() if c["parameters"].get("REG_OUTPUT_CLK") == "CLK0"}
    assert registered == {"reset", "enable"}
    assert summary == {"multipliers": 2, "flip_flops": 2 * 2 * WIDTH}
    top = folded["modules"]["top"]
    # the reset reaches the first's RST0, the enable the second's CE0
    rst = top["ports"]["rst"]["bits"]
    assert after["reset"]["connections"]["RST0"] == rst
    assert after["reset"]["connections"]["CE0"] == ["1"]
    assert after["enable"]["connections"]["RST0"] == ["0"]
    assert after["enable"]["connections"]["CE0"] == top["ports"]["ce"]["bits"]
    clk = top["ports"]["clk"]["bits"]
    assert all(after[k]["connections"]["CLK0"] == clk for k in registered)
    # no flip-flop reads a folded product any more; the outputs now come from the blocks
    ffs = [c for c in top["cells"].values() if c["type"] == "TRELLIS_FF"]
    for kind in registered:
        products = {b for i in range(36) for b in after[kind]["connections"][f"P{i}"]}
        assert set(top["ports"][f"q_{kind}"]["bits"]) <= products
        assert not any(c["connections"]["DI"][0] in products for c in ffs)
    # every input is driven, and nothing is left to fold
    assert undriven(top) == []
    again = json.loads(json.dumps(folded))
    assert fold_multiplier_registers(again) == {"multipliers": 0, "flip_flops": 0}


# A MULT18X18D as far as this pass uses it: a signed or unsigned 18 x 18 multiply, the
# output register on CLK0 with CE0 and a synchronous RST0; any other register is an error.
_MULT_MODEL = """
module MULT18X18D(%(ports)s);
  parameter REG_INPUTA_CLK = "NONE";
  parameter REG_INPUTB_CLK = "NONE";
  parameter REG_INPUTC_CLK = "NONE";
  parameter REG_PIPELINE_CLK = "NONE";
  parameter REG_OUTPUT_CLK = "NONE";
  parameter REG_OUTPUT_CE = "CE0";
  parameter REG_OUTPUT_RST = "RST0";
  parameter RESETMODE = "SYNC";
  parameter GSR = "ENABLED";
  %(inputs)s
  output %(outs)s;
  wire signed [18:0] a = {SIGNEDA & A[17], A};
  wire signed [18:0] b = {SIGNEDB & B[17], B};
  wire signed [37:0] product = a * b;
  reg [35:0] out = 0;
  initial
    if (REG_INPUTA_CLK != "NONE" || REG_INPUTB_CLK != "NONE" || REG_INPUTC_CLK != "NONE"
        || REG_PIPELINE_CLK != "NONE" || (REG_OUTPUT_CLK != "NONE" && (REG_OUTPUT_CLK != "CLK0"
        || REG_OUTPUT_CE != "CE0" || REG_OUTPUT_RST != "RST0" || RESETMODE != "SYNC")))
      $fatal(1, "model: not modelled");
  always @(posedge CLK0)
    if (RST0) out <= 0;
    else if (CE0) out <= product[35:0];
  wire [35:0] p = REG_OUTPUT_CLK == "CLK0" ? out : product[35:0];
  %(assigns)s
endmodule
"""


def _mult_model():
    inputs, ports = [], []
    for bus in "ABC":
        names = [f"{bus}{i}" for i in range(18)]
        ports += names
        inputs.append(f"input {', '.join(names)};")
        inputs.append(f"wire [17:0] {bus} = {{{', '.join(reversed(names))}}};")
    singles = ["SIGNEDA", "SIGNEDB", "SOURCEA", "SOURCEB"] + [f"{s}{k}" for s in ("CLK", "CE", "RST")
                                                               for k in range(4)]
    ports += singles
    inputs.append(f"input {', '.join(singles)};")
    outs = [f"P{i}" for i in range(36)]
    ports += outs
    return _MULT_MODEL % {"ports": ", ".join(ports), "inputs": "\n  ".join(inputs),
                          "outs": ", ".join(outs),
                          "assigns": "\n  ".join(f"assign P{i} = p[{i}];" for i in range(36))}


def test_folded_netlist_is_the_same_circuit(netlists):
    d, plain, folded, _ = netlists
    ins = {"a": WIDTH, "b": WIDTH, "ce": 1, "rst": 1}
    outs = {**{f"q_{k}": 2 * WIDTH for k in KINDS}, "tap": 2 * WIDTH}
    rnd = random.Random(11)
    cycles = 3000
    steps = [{"a": rnd.randrange(1 << WIDTH), "b": rnd.randrange(1 << WIDTH),
              "ce": rnd.random() < 0.7, "rst": t < 2 or rnd.random() < 0.05} for t in range(cycles)]
    mismatches, changes = side_by_side(d, plain, folded, _mult_model(), ins, outs, steps)
    assert mismatches == [], mismatches[:20]
    # the comparison sees the products: every output changes in most cycles
    assert all(n > cycles // 4 for n in changes.values()), changes


def test_nextpnr_times_the_multiply_into_the_register(tmp_path):
    """Unfolded, the worst path runs from the operand registers through the multiply
    (a combinational delay of the MULT18X18D) into the product's flip-flop; folded,
    the multiply ends in the block's own register: no path passes through it."""
    _synth(tmp_path, ("reset",))
    (tmp_path / "plain").mkdir()
    shutil.copy(tmp_path / "top.json", tmp_path / "plain" / "top.json")
    path = route(tmp_path / "plain")
    through = [s for s in path if s["type"] == "logic" and "MULT18X18D" in s["to"]["cell"]]
    assert through and path[-1]["to"]["cell"].startswith("q_reset_"), path

    assert main([str(tmp_path / "top.json"), "--summary", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text()) == {"multipliers": 1, "flip_flops": 2 * WIDTH}
    path = route(tmp_path)
    assert not [s for s in path if s["type"] == "logic" and "MULT18X18D" in s["to"]["cell"]], path


def test_bad_netlist_is_a_message(tmp_path, capsys):
    (tmp_path / "x.json").write_text("{not json")
    assert main([str(tmp_path / "x.json")]) == 2
    assert "dspreg:" in capsys.readouterr().err

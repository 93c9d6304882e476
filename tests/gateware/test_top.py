"""The whole accelerator (gateware/top.py) running compiled programs: the cocotb tests of
tests/gateware/cocotb_top.py on Verilator (the digits fine-tune, cache on and off, then
inference), and a shorter run on Icarus, which simulates this design far slower."""

import json
import os

import pytest

from gateware.config import DEFAULT
from gateware.top import Accelerator
from sim.rtl import ROOT, missing_reason
from tests.gateware.harness import run_cocotb

# Icarus runs the whole design at a few thousand cycles per second: a slice of the
# fine-tuning set there, the whole of it on Verilator.
RUNS = {
    "verilator": {"SKIPTUNE_TOP_EPOCHS": os.environ.get("SKIPTUNE_TOP_EPOCHS", "2"),
                  "SKIPTUNE_TOP_MODES": os.environ.get("SKIPTUNE_TOP_MODES", "on,off,on4"),
                  "SKIPTUNE_TOP_INFER": "100"},
    "icarus": {"SKIPTUNE_TOP_EPOCHS": "2", "SKIPTUNE_TOP_SAMPLES": "12",
               "SKIPTUNE_TOP_BATCH": "5", "SKIPTUNE_TOP_MODES": "on", "SKIPTUNE_TOP_INFER": "6"},
}


@pytest.mark.parametrize("sim", ["verilator", "icarus"])
def test_top_cocotb(sim):
    reason = missing_reason(sim)
    if reason:
        pytest.skip(f"{sim}: {reason}")
    out = ROOT / "build" / "rtl" / f"top-{sim}-report.json"
    out.unlink(missing_ok=True)
    env = dict(RUNS[sim], SKIPTUNE_TOP_REPORT=str(out))
    rtl, tests, wall = run_cocotb(sim, "top", Accelerator(DEFAULT), "tests.gateware.cocotb_top",
                                  DEFAULT, env=env)
    report = json.loads(out.read_text())
    print(f"{sim}: build {rtl.build_seconds:.1f} s, {tests} test in {wall:.1f} s")
    print(json.dumps(report, indent=1))
    modes = [k for k in report if k.startswith("finetune_")]
    assert modes and "infer" in report
    # 8-bit activations are the same through the cache or recomputed: same adapters
    if "finetune_on" in report and "finetune_off" in report:
        assert report["finetune_on"]["sha256"] == report["finetune_off"]["sha256"]
